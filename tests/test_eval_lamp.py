"""``pmeta eval lamp`` on tiny hand-written LaMP files and a tiny random Llama: report schema, metric
ranges, plots, predictions files, determinism, and one-line CLI errors."""

from __future__ import annotations

import json

import pytest
from pmeta.fuzz.lamp_tiny import tiny_llama, write_lamp
from typer.testing import CliRunner

from pmeta.cli import app

runner = CliRunner()
METHODS = ["backbone", "retrieval-k1", "retrieval-k2", "retrieval-k3", "retrieval-k4", "per-user-lora", "pmeta", "pmeta+retrieval"]


@pytest.fixture(scope="module")
def lamp(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-lamp")
    return {"root": root, "lm": tiny_llama(root / "llama"), "rating": write_lamp(root / "lamp3"),
            "title": write_lamp(root / "lamp4", task="LaMP-4", users={"train": 6, "dev": 2, "test": 2})}  # fmt: skip


def test_rating_report(lamp):
    out = lamp["root"] / "report3"
    args = ["eval", "lamp", "--data", str(lamp["rating"]), "--task", "LaMP-3", "--k-profile", "1,3", "--preset", "tiny",
            "--lm", str(lamp["lm"]), "--users", "2", "--out", str(out), "--quiet"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "LaMP-3" and report["users"] == 2 and report["k_profile"] == [1, 3]
    rows = {(r["method"], r["k_profile"]): r for r in report["results"]}
    assert set(rows) == {(m, k) for m in METHODS for k in (1, 3)}
    for row in report["results"]:
        assert set(row) >= {"method", "k_profile", "mae", "rmse", "users", "adapt_ms_p50", "adapt_ms_p95", "bytes_per_user"}
        assert 0 <= row["mae"] <= 4 and row["mae"] <= row["rmse"] + 1e-9 and row["rmse"] <= 4
        assert row["adapt_ms_p95"] >= row["adapt_ms_p50"] >= 0
    assert report["data"]["split"] == "test" and len(report["data"]["fingerprint"]) == 64 and len(report["data"]["user_ids"]) == 2
    assert {r["profile_items"] for r in report["results"] if r["k_profile"] == 1} == {1.0}
    assert all(0 <= r["prompt_items"] <= min(1, int(r["method"][-1])) for r in report["results"] if r["k_profile"] == 1 and r["method"].startswith("retrieval"))
    assert rows[("retrieval-k2", 3)]["prompt_items"] <= 2 and rows[("pmeta", 3)]["prompt_items"] == 0 and rows[("pmeta", 3)]["profile_items"] == 3.0
    assert {(c["method"], c["k_profile"], c["metric"]) for c in report["comparisons"]} == {(m, k, x) for m in ("pmeta", "pmeta+retrieval") for k in (1, 3) for x in ("mae", "rmse")}
    assert all(c["versus"] not in ("pmeta", "pmeta+retrieval") and 0 <= c["p"] <= c["p_holm"] <= 1 and c["ci_low"] <= c["ci_high"] for c in report["comparisons"])
    assert rows[("per-user-lora", 3)]["bytes_per_user"] > 0  # a per-user LoRA is stored per user
    assert rows[("pmeta", 3)]["bytes_per_user"] == 0 and rows[("pmeta", 3)]["adapt_ms_p50"] > 0
    assert rows[("backbone", 1)]["mae"] == rows[("backbone", 3)]["mae"]  # the backbone never reads the profile
    # retrieval of k > K items is retrieval of all K items
    assert rows[("retrieval-k4", 1)]["mae"] == rows[("retrieval-k1", 1)]["mae"]
    md = (out / "report.md").read_text()
    assert "## mae (lower is better)" in md and "| pmeta+retrieval |" in md and md.startswith("# LaMP-3: 2 test users")
    assert "## pmeta against the best baseline of each cell" in md
    assert (out / "mae.png").stat().st_size > 1000 and (out / "rmse.png").is_file()
    from pmeta.data.lamp import read_outputs

    task, predictions = read_outputs(out / "predictions" / "pmeta-k3.json")
    assert task == "LaMP_3" and len(predictions) == 2
    # same bank, same seed: identical results
    again = lamp["root"] / "again"
    result = runner.invoke(app, ["eval", "lamp", "--data", str(lamp["rating"]), "--task", "LaMP-3", "--k-profile", "1,3", "--bank", str(out / "bank"),
                                 "--users", "2", "--methods", "per-user-lora,pmeta", "--out", str(again), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    for row in json.loads((again / "report.json").read_text())["results"]:
        assert row["mae"] == rows[(row["method"], row["k_profile"])]["mae"]


def test_title_report(lamp):
    out = lamp["root"] / "report4"
    args = ["eval", "lamp", "--data", str(lamp["title"]), "--task", "LaMP-4", "--k-profile", "2", "--preset", "tiny", "--lm", str(lamp["lm"]),
            "--methods", "backbone,retrieval-k1,pmeta+retrieval", "--out", str(out), "--quiet"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["users"] == 2 and [r["method"] for r in report["results"]] == ["backbone", "retrieval-k1", "pmeta+retrieval"]
    for row in report["results"]:
        assert 0 <= row["rouge-L"] <= 1 and 0 <= row["rouge-1"] <= 1
    assert (out / "rouge-L.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "backbone,oracle"], "unknown method 'oracle'"),
        (["--k-profile", "1,x"], "--k-profile must be comma-separated integers"),
        (["--k-profile", "1,99999999999999999999999"], "--k-profile values are at most 10,000"),
        (["--task", "LaMP-6"], "LaMP-6 is not public"),
        (["--split", "../x"], "plain name"),
        (["--split", "dev"], "--split dev needs --bank"),
    ],
)
def test_cli_errors(lamp, extra, message):
    args = ["eval", "lamp", "--data", str(lamp["rating"]), "--task", "LaMP-3", "--out", str(lamp["root"] / "err"), "--quiet", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


@pytest.mark.parametrize("split", ["train", "dev"])
def test_a_split_the_bank_trained_or_validated_on_is_refused(lamp, split):
    bank = lamp["root"] / "report3" / "bank"
    if not bank.exists():
        pytest.skip("needs the bank of test_rating_report")
    result = runner.invoke(app, ["eval", "lamp", "--data", str(lamp["rating"]), "--task", "LaMP-3", "--bank", str(bank), "--split", split,
                                 "--methods", "backbone", "--out", str(lamp["root"] / f"seen-{split}"), "--quiet"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"of the {split} split trained or validated bank" in result.output and "--split test" in result.output


def test_bank_of_another_task(lamp):
    bank = lamp["root"] / "report3" / "bank"
    if not bank.exists():
        pytest.skip("needs the bank of test_rating_report")
    result = runner.invoke(app, ["eval", "lamp", "--data", str(lamp["title"]), "--task", "LaMP-4", "--bank", str(bank), "--out", str(lamp["root"] / "x"), "--quiet"])
    assert result.exit_code == 2 and "serves LaMP-3, not LaMP-4" in result.output


def test_k_zero_stores_nothing_and_a_k_above_every_profile_is_noted(lamp):
    bank = lamp["root"] / "report3" / "bank"
    if not bank.exists():
        pytest.skip("needs the bank of test_rating_report")
    out = lamp["root"] / "k0"
    result = runner.invoke(app, ["eval", "lamp", "--data", str(lamp["rating"]), "--task", "LaMP-3", "--bank", str(bank), "--users", "1", "--k-profile", "0,10",
                                 "--methods", "per-user-lora,retrieval-k2", "--out", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "K = 10 is above every evaluated profile's length (at most 4)" in result.output
    rows = {(r["method"], r["k_profile"]): r for r in json.loads((out / "report.json").read_text())["results"]}
    assert rows[("per-user-lora", 0)]["bytes_per_user"] == 0 and rows[("per-user-lora", 10)]["bytes_per_user"] > 0  # nothing trained at K = 0
    assert rows[("retrieval-k2", 10)]["profile_items"] == 4.0 and rows[("retrieval-k2", 0)]["prompt_items"] == 0


def test_lm_with_bank_and_a_gold_the_metrics_refuse_fail_before_any_work(lamp, tmp_path):
    bank = lamp["root"] / "report3" / "bank"
    if not bank.exists():
        pytest.skip("needs the bank of test_rating_report")
    result = runner.invoke(app, ["eval", "lamp", "--data", str(lamp["rating"]), "--task", "LaMP-3", "--bank", str(bank), "--lm", "other", "--out", str(tmp_path / "a"), "--quiet"])
    assert result.exit_code == 2 and "--bank serves with its own LM: leave --lm out" in result.output, result.output
    bad = tmp_path / "bad-gold"
    bad.mkdir()
    for path in lamp["rating"].iterdir():
        (bad / path.name).write_text(path.read_text())
    outputs = json.loads((bad / "test_outputs.json").read_text())
    outputs["golds"][0]["output"] = "five"
    (bad / "test_outputs.json").write_text(json.dumps(outputs))
    result = runner.invoke(app, ["eval", "lamp", "--data", str(bad), "--task", "LaMP-3", "--preset", "tiny", "--lm", str(lamp["lm"]), "--out", str(tmp_path / "b"), "--quiet"])
    assert result.exit_code == 2 and "'five'" in result.output, result.output
    assert not (tmp_path / "b").exists()  # no bank built, nothing written


def test_a_rerun_into_the_same_folder_leaves_only_its_own_files(lamp):
    bank = lamp["root"] / "report3" / "bank"
    if not bank.exists():
        pytest.skip("needs the bank of test_rating_report")
    out = lamp["root"] / "rerun"
    base = ["eval", "lamp", "--data", str(lamp["rating"]), "--task", "LaMP-3", "--bank", str(bank), "--users", "1", "--out", str(out), "--quiet"]
    assert runner.invoke(app, [*base, "--methods", "backbone,pmeta", "--k-profile", "1,3"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, [*base, "--methods", "pmeta", "--k-profile", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["pmeta-k1.json"]  # no predictions of the first run
    assert (out / "notes.txt").read_text() == "mine" and (out / "mae.png").is_file()


def test_an_unusable_out_fails_before_any_work(lamp, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    result = runner.invoke(app, ["eval", "lamp", "--data", str(lamp["rating"]), "--task", "LaMP-3", "--out", str(afile), "--quiet"])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output
    assert afile.read_text() == "mine"


def test_other_files_with_the_banks_users_need_a_flag(lamp, tmp_path):
    bank = lamp["root"] / "report3" / "bank"
    if not bank.exists():
        pytest.skip("needs the bank of test_rating_report")
    copy = tmp_path / "reindented"  # the same questions in other bytes: the data fingerprint differs
    copy.mkdir()
    for path in lamp["rating"].iterdir():
        (copy / path.name).write_text(json.dumps(json.loads(path.read_text()), indent=1))
    base = ["eval", "lamp", "--data", str(copy), "--task", "LaMP-3", "--bank", str(bank), "--split", "train", "--methods", "backbone",
            "--users", "1", "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "have the ids of users that trained or validated bank" in result.output, result.output
    assert runner.invoke(app, [*base, "--allow-id-overlap"]).exit_code == 0


def test_comparisons_by_paired_bootstrap_on_hand_made_predictions():
    """pmeta better than every baseline for every user: the interval excludes 0 and p is 0; the same
    predictions as the best baseline: difference 0, p 1; Holm never lowers a p-value."""
    from pmeta.text.evaluate import compare

    golds = {f"u{i}": "5" for i in range(30)}
    preds = {("backbone", 1): {u: "1" for u in golds}, ("retrieval-k1", 1): {u: "3" for u in golds},
             ("pmeta", 1): {u: "4" for u in golds}, ("pmeta+retrieval", 1): {u: "3" for u in golds}}  # fmt: skip
    results = [{"method": m, "k_profile": 1, "mae": {"backbone": 4.0, "retrieval-k1": 2.0, "pmeta": 1.0, "pmeta+retrieval": 2.0}[m],
                "rmse": {"backbone": 4.0, "retrieval-k1": 2.0, "pmeta": 1.0, "pmeta+retrieval": 2.0}[m]} for m, _ in preds]  # fmt: skip
    rows = {(c["method"], c["metric"]): c for c in compare("LaMP-3", preds, golds, results, seed=0)}
    assert set(rows) == {(m, metric) for m in ("pmeta", "pmeta+retrieval") for metric in ("mae", "rmse")}
    better = rows[("pmeta", "mae")]
    assert better["versus"] == "retrieval-k1" and better["difference"] == -1.0 and better["ci_high"] < 0 and better["p"] == 0.0
    same = rows[("pmeta+retrieval", "rmse")]
    assert same["difference"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0 and same["p"] == 1.0
    assert all(c["p_holm"] >= c["p"] and c["users"] == 30 for c in rows.values())


def test_a_users_per_user_lora_does_not_depend_on_the_other_users_of_the_run(lamp, monkeypatch):
    """The per-user LoRA's init seed comes from the question's id, not from the user's position in
    the evaluated subset (evaluated alone or after another user, a user got another adapter)."""
    bank = lamp["root"] / "report3" / "bank"
    if not bank.exists():
        pytest.skip("needs the bank of test_rating_report")
    import pmeta.text.evaluate as evaluate
    from pmeta.data.lamp import read_outputs, read_questions
    from pmeta.text.bank import TextBank

    seeds: list[int] = []
    trained = evaluate.per_user_lora
    monkeypatch.setattr(evaluate, "per_user_lora", lambda model, profile, seed: (seeds.append(seed), trained(model, profile, seed))[1])
    golds = read_outputs(lamp["rating"] / "test_outputs.json")[1]
    examples = [type(e)(e.id, e.input, e.profile, golds[e.id]) for e in read_questions(lamp["rating"] / "test_questions.json", "LaMP-3")]
    model = TextBank.open(bank).model
    every = evaluate.run_lamp(model, examples, ["per-user-lora"], [3])
    alone = evaluate.run_lamp(model, examples[-1:], ["per-user-lora"], [3])
    assert len(examples) >= 2 and len(seeds) == len(examples) + 1 and seeds[-1] == seeds[-2], seeds
    assert len(set(seeds[:-1])) == len(examples)  # and each user has their own
    assert every["results"][0]["users"] == len(examples) and alone["results"][0]["users"] == 1

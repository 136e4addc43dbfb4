"""benchmarks/served_prior.py: the time-prior weight β read on the served model, on a bank's
validation users only; at K = k only the weight of a k-item history matters; each user of the
two-fold check is scored by the choice made on the other half."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from pmeta.data import load_sample
from pmeta.eval.neural import PmetaMAML, support_input
from pmeta.eval.protocol import evaluate
from pmeta.eval.synthetic import write_ml100k_like


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("served_prior")


@pytest.fixture(scope="module")
def timed(opened_bank, with_time_prior):
    """The tiny bank's model with a time prior of weight 2 (the tiny preset builds none)."""
    return with_time_prior(opened_bank.model, 2.0, 3000)


@pytest.fixture(scope="module")
def users(script, opened_bank):
    return script.validation_users(opened_bank, load_sample())[:5]


def stand_in_for(opened_bank, model, **record):
    """The opened tiny bank with another model (and build-record entries)."""
    return SimpleNamespace(model=model, catalog=opened_bank.catalog, record=opened_bank.record, build_record={**opened_bank.build_record, **record}, config=opened_bank.config, version=f"v-{id(model)}")



def scores(model, items, time=5e7):
    personal, batch, _ = model.personalize([support_input(model, np.array(items), time)])
    return model.final_scores(batch, personal)[0]


def test_with_weight_changes_the_weight_only_and_a_size_reads_its_own(script, timed):
    same, off = script.with_weight(timed, 2.0), script.with_weight(timed, 0.0)
    assert float(timed.t.head["time_weight"]) == 2.0 and same.t.item_text is timed.t.item_text
    assert bool((scores(same, [1, 2, 3]) == scores(timed, [1, 2, 3])).all())
    assert not bool((scores(off, [1, 2, 3]) == scores(timed, [1, 2, 3])).all())
    by_size = script.with_weight(timed, [5.0, 4.0, 3.0, 2.0, 1.0])  # three liked items read β_3
    assert bool((scores(by_size, [1, 2, 3]) == scores(script.with_weight(timed, 3.0), [1, 2, 3])).all())


def test_validation_users_are_the_builds_and_never_its_test_users(script, opened_bank, users):
    ids = load_sample().ratings.user_ids
    record = opened_bank.build_record
    assert {ids[int(u)] for u in users} <= set(record["validation_users"])
    assert not {ids[int(u)] for u in users} & (set(opened_bank.record["held_out_users"]) | set(record["train_users"]))


def test_grid_rows_are_pmeta_with_each_weight_and_the_banks_own_is_read_per_size(script, timed, users):
    modes = ("uni99", "pop99", "full")
    sample = load_sample()
    grid = script.score_grid(timed, sample, users, [0.0, 2.0], modes, seed=0)
    assert list(grid) == ["β=0", "β=2", "bank"]
    cells = {}
    evaluate(PmetaMAML(timed), sample, users, ks=(1, 3, 5), modes=modes, seed=0, per_user=cells)
    for (k, mode), cell in cells.items():
        assert grid["bank"][f"K={k} {mode}"]["ndcg@10"] == cell["ndcg@10"].tolist()
    assert grid["β=0"] != grid["β=2"]  # the check can fail

    per_size = script.with_weight(timed, [5.0, 4.0, 3.0, 2.0, 1.0])
    grid = script.score_grid(per_size, sample, users, [1.0, 3.0, 5.0], modes, seed=0)
    assert list(grid) == ["β=1", "β=3", "β=5", "bank"]
    for k, beta in ((1, "β=5"), (3, "β=3"), (5, "β=1")):
        for mode in modes:
            for metric in ("hr@10", "ndcg@10"):
                assert grid["bank"][f"K={k} {mode}"][metric] == pytest.approx(grid[beta][f"K={k} {mode}"][metric])


def hand_grid(n: int, halves: tuple[set, set], modes=("uni99", "full")) -> dict:
    """Settings over n users: β=2 better than the bank by 0.1 at K = 1; all equal at K = 3; at K = 5
    β=1 better by 0.1 on the users of ``halves[0]`` and worse by 0.1 on those of ``halves[1]``."""
    rng = np.random.default_rng(3)
    base = {f"K={k} {mode}": rng.uniform(0.2, 0.6, n) for k in (1, 3, 5) for mode in modes}
    grid = {name: {cell: {"user": list(range(n)), "hr@10": v.tolist(), "ndcg@10": v.tolist()} for cell, v in base.items()} for name in ("bank", "β=1", "β=2")}
    step = np.array([0.1 if user in halves[0] else -0.1 for user in range(n)])
    for mode in modes:
        grid["β=2"][f"K=1 {mode}"]["ndcg@10"] = (base[f"K=1 {mode}"] + 0.1).tolist()
        grid["β=1"][f"K=5 {mode}"]["ndcg@10"] = (base[f"K=5 {mode}"] + step).tolist()
    return grid


def test_two_fold_scores_each_user_by_the_choice_made_on_the_other_half(script):
    """At K = 5 the first half (fold 0's fit) prefers β=1 and the second the bank's: fold 0 scores the
    second half with β=1 (−0.1 each), fold 1 the first half with the bank's (0). Fitting on the
    half it scores, or on everyone, would give other numbers."""
    n, modes = 12, ("uni99", "full")
    order = np.random.default_rng(4).permutation(n)
    halves = (set(order[: n // 2].tolist()), set(order[n // 2 :].tolist()))
    grid = hand_grid(n, halves, modes)
    folds = script.two_fold(grid, modes, seed=4)
    assert folds["chosen"]["fold 0 K=1"] == folds["chosen"]["fold 1 K=1"] == "β=2"
    assert folds["chosen"]["fold 0 K=3"] == folds["chosen"]["fold 1 K=3"] == "bank"  # a tie keeps the bank's
    assert folds["chosen"]["fold 0 K=5"] == "β=1" and folds["chosen"]["fold 1 K=5"] == "bank"
    for mode in modes:
        assert folds["difference"][f"K=1 {mode}"]["ndcg@10"] == pytest.approx([0.1] * n)
        assert folds["difference"][f"K=3 {mode}"]["ndcg@10"] == [0.0] * n
        assert folds["difference"][f"K=1 {mode}"]["hr@10"] == [0.0] * n  # hr@10 was left equal
        assert folds["difference"][f"K=5 {mode}"]["ndcg@10"] == pytest.approx([-0.1 if user in halves[1] else 0.0 for user in range(n)])


def test_main_prints_the_grid_and_writes_every_user(script, tiny_bank, opened_bank, timed, tmp_path, capsys, monkeypatch):
    stand_in = stand_in_for(opened_bank, timed)
    monkeypatch.setattr(script.Bank, "open", lambda path: stand_in)
    out = tmp_path / "grid.json"
    script.main(["--bank", str(tiny_bank), "--users", "4", "--weights", "2,0,2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "4 validation users" in printed and "its β 2.0" in printed
    rows = [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| β=") or line.startswith("| bank")]
    assert rows == ["β=0", "β=2", "bank"]
    written = json.loads(out.read_text())
    assert written["bank_weight"] == 2.0 and set(written["grid"]) == {"β=0", "β=2", "bank"}
    assert all(len(cell["ndcg@10"]) == 4 for cell in written["grid"]["bank"].values())


def test_bad_input_ends_in_one_line(script, tiny_bank, opened_bank, timed, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no time prior"):
        script.main(["--bank", str(tiny_bank)])
    with pytest.raises(SystemExit, match="error: "):
        script.main(["--bank", str(tmp_path / "no-bank")])
    for bad in (["--threads", "0"], ["--users", "1"], ["--weights", "x"], ["--weights", "-1"], ["--weights", "nan"], ["--weights", ""], ["--weights", "0.1234561,0.1234562"]):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--bank", str(tiny_bank), *bad])
        assert exit_info.value.code == 2, bad  # argparse's usage error, before anything is read
    other = tmp_path / "other"
    write_ml100k_like(load_sample(), other, users=30)
    stand_in = stand_in_for(opened_bank, timed)
    monkeypatch.setattr(script.Bank, "open", lambda path: stand_in)
    with pytest.raises(SystemExit, match="not the data this bank was built on"):
        script.main(["--bank", str(tiny_bank), "--data", str(other)])


def test_against_scores_the_other_bank_as_it_serves_on_the_same_users(script, tiny_bank, opened_bank, timed, tmp_path, capsys, monkeypatch):
    off = script.with_weight(timed, 0.0)
    banks = {"one": stand_in_for(opened_bank, timed), "other": stand_in_for(opened_bank, off)}
    monkeypatch.setattr(script.Bank, "open", lambda path: banks[str(path)])
    out = tmp_path / "against.json"
    script.main(["--bank", "one", "--against", "other", "--users", "4", "--weights", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["against"]["bank_weight"] == 0.0 and written["against"]["scores"] == written["grid"]["β=0"]
    table = printed.split("--against bank")[1]
    cells = [f"K={k} {mode}" for mode in written["modes"] for k in (1, 3, 5)]
    ndcg_row = next(line for line in table.splitlines() if line.startswith("| ndcg@10"))
    means = [float(cell.split("±")[0]) for cell in ndcg_row.split("|")[2:-2]]
    expected = [np.mean(np.subtract(written["grid"]["β=0"][c]["ndcg@10"], written["grid"]["bank"][c]["ndcg@10"])) for c in cells]
    assert means == pytest.approx(expected, abs=6e-5) and any(abs(v) > 1e-4 for v in expected)

    banks["same"] = stand_in_for(opened_bank, timed)
    script.main(["--bank", "one", "--against", "same", "--users", "4", "--weights", "2"])
    table = capsys.readouterr().out.split("--against bank")[1]
    assert all(cell.strip() == "+0.0000 ± 0.0000" for line in table.splitlines() if line.startswith(("| hr@10", "| ndcg@10")) for cell in line.split("|")[2:-1])

    banks["moved"] = stand_in_for(opened_bank, timed, validation_users=opened_bank.build_record["validation_users"][1:])
    with pytest.raises(SystemExit, match="other validation users"):
        script.main(["--bank", "one", "--against", "moved"])
    banks["elsewhere"] = SimpleNamespace(**{**vars(banks["same"]), "record": {**opened_bank.record, "dataset_fingerprint": "another"}})
    with pytest.raises(SystemExit, match="other data"):
        script.main(["--bank", "one", "--against", "elsewhere"])

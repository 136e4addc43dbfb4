"""A reduced coldstart-v1 evaluation with every method: report schema, metric ranges, plots,
determinism, the CLI, and the per-method contracts (per-user LoRA bytes, prompt-only MAML)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pmeta.eval.runner import DEFAULT_METHODS, run_movielens, write_report

ROW_KEYS = {"method", "k", "mode", "hr@10", "ndcg@10", "mrr", "users", "adapt_ms_p50", "adapt_ms_p95", "bytes_per_user"}
# Few steps: this checks the plumbing; the README's numbers come from the full command.
FAST = {"prompt-maml": {"outer_steps": 2}, "per-user-lora": {"steps": 3}, "ease": {"lam": 200.0}}
USERS = 4


@pytest.fixture(scope="module")
def sample():
    from pmeta.data import load_sample

    return load_sample()


@pytest.fixture(scope="module")
def reduced(opened_bank, sample, tmp_path_factory):
    # The tiny MAML bank doubles as the "Reptile" bank here: building a second bank is the same
    # build code with meta=reptile (covered by the strategy tests) and would cost CI a minute.
    report = run_movielens(sample, opened_bank, list(DEFAULT_METHODS), (1, 3), ("pop99", "full"), max_users=USERS, reptile_bank=opened_bank, options=FAST)
    out = tmp_path_factory.mktemp("eval")
    write_report(report, out)
    return report, out


def test_a_rewrite_removes_the_plots_it_does_not_redraw(reduced, tmp_path):
    report, _ = reduced
    write_report(report, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    pop99_only = {**report, "results": [r for r in report["results"] if r["mode"] == "pop99"]}
    write_report(pop99_only, tmp_path)
    assert not (tmp_path / "quality_full.png").exists()  # it would show another run's full-ranking numbers
    assert (tmp_path / "quality_pop99.png").is_file() and (tmp_path / "notes.txt").read_text() == "mine"
    write_report(pop99_only, tmp_path, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.json", "report.md"]  # no temporary files either


def test_report_schema_and_ranges(reduced):
    report, out = reduced
    assert list(report) == ["protocol", "dataset", "seed", "config", "results", "comparisons"]
    assert report["protocol"] == "coldstart-v1" and report["seed"] == 0
    assert report["dataset"]["name"] == "ml-latest-small" and report["config"]["test_fraction"] == 0.2
    rows = report["results"]
    assert {(r["method"], r["k"], r["mode"]) for r in rows} == {(m, k, mode) for m in DEFAULT_METHODS for k in (1, 3) for mode in ("pop99", "full")}
    for r in rows:
        assert set(r) == ROW_KEYS
        assert 0 <= r["ndcg@10"] <= r["hr@10"] <= 1 and 0 < r["mrr"] <= 1, r
        assert r["users"] == USERS and 0 <= r["adapt_ms_p50"] <= r["adapt_ms_p95"]
        assert r["bytes_per_user"] == (0 if r["method"] != "per-user-lora" else r["bytes_per_user"])
    lora = [r for r in rows if r["method"] == "per-user-lora"]
    assert all(r["bytes_per_user"] > 0 for r in lora)
    assert report["config"]["bank"]["config"]["meta"] == "maml" and report["config"]["transfer"] is None
    tuned = report["config"]["tuned"]
    assert tuned["ease"] == {"lambda": 200.0, "fixed": True} and set(tuned) == {"ease", "popularity-time"}  # EASE's λ fixed by FAST: recorded as such
    h = tuned["popularity-time"]
    assert h["bandwidth_days"] in (60.0, 180.0, 365.0) and set(h["scores"]) == {"60", "180", "365"}
    assert h["scores"][f"{h['bandwidth_days']:g}"] == max(h["scores"].values())
    md = (out / "report.md").read_text()
    assert "ease: λ = 200 (fixed).\n" in md and f"popularity-time: h = {h['bandwidth_days']:g} days (tuned over 60–365 by nDCG@10 over K = 1, 3, 5 and " in md
    assert md.startswith("# coldstart-v1") and "## pop99" in md and "## full" in md and "| per-user-lora |" in md
    for name in ("quality_pop99.png", "quality_full.png", "latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Random scores the positive among 99 negatives at chance level; popularity ignores the support set.
    table = {(r["method"], r["k"], r["mode"]): r for r in rows}
    assert table[("popularity", 1, "pop99")]["hr@10"] == table[("popularity", 3, "pop99")]["hr@10"]


def test_pmeta_methods_are_compared_with_their_rivals_by_paired_bootstrap(reduced):
    report, out = reduced
    comparisons = report["comparisons"]
    cells = [(k, mode) for k in (1, 3) for mode in ("pop99", "full")]
    means = {(r["method"], r["k"], r["mode"]): r for r in report["results"]}
    for method in ("pmeta", "pmeta-reptile", "pmeta-no-steps"):
        for metric in ("hr@10", "ndcg@10"):
            mine = [c for c in comparisons if c["method"] == method and c["metric"] == metric]
            assert [(c["k"], c["mode"]) for c in mine if c["versus"] == "prompt-maml"] == cells
            assert [(c["k"], c["mode"]) for c in mine if c["versus"] == "per-user-lora"] == cells
            best = [c for c in mine if c["versus"] in ("popularity", "itemknn", "ease")]
            assert [(c["k"], c["mode"]) for c in best] == cells and len(mine) == 3 * len(cells)
            for c in best:  # the classical baseline with the highest mean in that cell
                assert means[(c["versus"], c["k"], c["mode"])][metric] == max(means[(b, c["k"], c["mode"])][metric] for b in ("popularity", "itemknn", "ease"))
    for c in comparisons:
        assert set(c) == {"method", "versus", "k", "mode", "metric", "users", "difference", "ci95", "p_better", "p_value", "p_holm"} and c["users"] == USERS
        lo, hi = c["ci95"]
        assert np.isfinite([lo, hi, c["difference"], c["p_better"]]).all() and lo <= c["difference"] <= hi and 0 <= c["p_better"] <= 1
        assert 0 < c["p_value"] <= c["p_holm"] <= 1
        # the difference of means is the difference of the rows' means (paired over the same users)
        assert c["difference"] == pytest.approx(means[(c["method"], c["k"], c["mode"])][c["metric"]] - means[(c["versus"], c["k"], c["mode"])][c["metric"]])
    stored = json.loads((out / "report.json").read_text())
    assert stored["comparisons"] == comparisons and '"user"' not in (out / "report.json").read_text()
    md = (out / "report.md").read_text()
    assert "## Paired differences (95% bootstrap CI over users)" in md and "### pmeta: HR@10" in md and "### pmeta-reptile: nDCG@10" in md
    assert "| prompt-maml | pop99 |" in md and "| best classical | full |" in md


def test_same_seed_and_config_give_identical_metrics(reduced, opened_bank, sample):
    methods = ["random", "prompt-maml", "per-user-lora", "pmeta"]
    cells: dict = {}
    again = run_movielens(sample, opened_bank, methods, (1, 3), ("pop99", "full"), max_users=USERS, reptile_bank=opened_bank, options=FAST, per_user=cells)
    # per_user hands back the per-user metrics behind each row (benchmarks/seeds.py pools them over seeds).
    assert set(cells) == set(methods)
    for row in again["results"]:
        cell = cells[row["method"]][(row["k"], row["mode"])]
        assert len(cell["user"]) == row["users"] and all(float(np.mean(cell[m])) == row[m] for m in ("hr@10", "ndcg@10", "mrr"))
    metrics = lambda rows: [{k: v for k, v in r.items() if not k.startswith("adapt_ms")} for r in rows if r["method"] in methods]  # noqa: E731
    assert metrics(again["results"]) == metrics(reduced[0]["results"])
    pmeta_vs_maml = lambda report: [c for c in report["comparisons"] if (c["method"], c["versus"]) == ("pmeta", "prompt-maml")]  # noqa: E731
    assert pmeta_vs_maml(again) == pmeta_vs_maml(reduced[0]) != []


def test_per_user_lora_is_a_stored_rank8_adapter(opened_bank):
    from safetensors.torch import load as load_safetensors

    from pmeta.eval.oppu import PerUserLoRA

    method = PerUserLoRA(opened_bank.model, steps=3)
    support = np.array([0, 1, 2])
    adapter = method.fit(support)
    layers = opened_bank.model.encoder.shape.layers  # as published: every layer
    assert len(adapter) == 2 * 2 * layers  # A and B for query and value of every layer
    assert opened_bank.config.prompt_layer > 0 and "layer0.query.A" in adapter
    assert all(v.shape[0] == 8 for k, v in adapter.items() if k.endswith(".A"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith(".B"))  # trained: B left zero
    stored = method.adapter_bytes(adapter)
    assert method.bytes_per_user == len(stored) > 8 * 384 * 2 * 2 * layers * 4
    assert all(torch.equal(load_safetensors(stored)[k], v) for k, v in adapter.items())


def test_prompt_maml_learns_one_prompt_and_adapts_only_it(opened_bank, sample):
    from pmeta.eval.prompt_maml import PromptMAML
    from pmeta.eval.protocol import split_users

    train, _ = split_users(sample)
    method = PromptMAML(opened_bank.model, outer_steps=2).fit(sample, train[:40])
    assert method.prompt.shape == (opened_bank.config.prompt_length, opened_bank.model.encoder.shape.hidden)
    assert len(method.losses) == 2 and all(np.isfinite(method.losses))
    assert opened_bank.model.config.inner_steps == opened_bank.config.inner_steps  # restored
    scores = method.score(np.array([5, 6]), 2)
    assert scores.shape == (len(sample.catalog),) and scores[5] < scores.max()


def test_cli_eval_writes_report_and_plots(tiny_bank, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "pmeta", "--threads", "1", "eval", "movielens", "--bank", str(tiny_bank), "--reptile-bank", str(tiny_bank), "--k", "1", "--mode", "pop99",
           "--methods", "popularity,pmeta-no-steps,pmeta-reptile", "--method-option", "per-user-lora.steps=2", "--users", "3", "--resamples", "40", "--out", str(out), "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["results"]] == ["popularity", "pmeta-no-steps", "pmeta-reptile"]
    assert report["config"]["method_options"] == {"per-user-lora": {"steps": 2}}
    assert report["config"]["bootstrap"] == {"resamples": 40, "seed": 0} and "40 resamples" in (out / "report.md").read_text()
    assert all(c["p_value"] >= 1 / 41 for c in report["comparisons"]) and report["comparisons"]
    assert (out / "quality_pop99.png").is_file() and (out / "latency.png").is_file()


def test_method_options_parse_and_reject_malformed_pairs():
    from pmeta.cli.app import _method_options
    from pmeta.errors import InvalidConfig

    assert _method_options(["per-user-lora.steps=10", "per-user-lora.lr=0.01", "prompt-maml.outer_steps=5"]) == {"per-user-lora": {"steps": 10, "lr": 0.01}, "prompt-maml": {"outer_steps": 5}}
    for bad in ("nonsense", "steps=3", "per-user-lora.=3"):
        with pytest.raises(InvalidConfig, match="METHOD.KEY=VALUE"):
            _method_options([bad])


@pytest.mark.parametrize(
    "method, options, message",
    [("random", {"bogus": 1}, "method 'random' has no option 'bogus'; it takes seed"),
     ("popularity", {"seed": 1}, "it takes no options"),
     ("pmeta", {"steps": 2}, "it takes no options"),  # the bank's methods are set by the bank
     ("per-user-lora", {"model": None}, "has no option 'model'"),  # supplied by the evaluation
     ("ease", {"lam": "abc"}, "ease.lam='abc'"),
     ("per-user-lora", {"steps": 1.5}, "per-user-lora.steps=1.5"),
     ("per-user-lora", {"targets": "query"}, "per-user-lora.targets"),
     ("prompt-maml", {"batch_users": 10**12}, "prompt-maml.batch_users=1000000000000"),  # was a MemoryError
     ("oracle", {"x": 1}, "unknown method 'oracle'")],
)  # fmt: skip
def test_method_options_are_checked_against_the_constructor(method, options, message):
    from pmeta.eval.baselines import check_options
    from pmeta.errors import InvalidConfig

    with pytest.raises(InvalidConfig) as caught:
        check_options(method, options)
    assert message in str(caught.value)


def test_method_options_are_converted_to_the_annotated_types():
    from pmeta.eval.baselines import check_options

    assert check_options("per-user-lora", {"targets": ["query"], "steps": "10", "lr": 1}) == {"targets": ("query",), "steps": 10, "lr": 1.0}
    assert check_options("ease", {"lambdas": [10, 20]}) == {"lambdas": [10.0, 20.0]}
    assert check_options("prompt-maml", {"inner_steps": None}) == {"inner_steps": None}


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(methods=[]), "no method"), (dict(methods=["random", "random"]), "'random' is given twice"), (dict(methods=["oracle"]), "unknown method"),
     (dict(ks=()), "no support size"), (dict(modes=("uni42",)), "uni42"), (dict(seed=-1), "seed must be"), (dict(seed=2**32), "seed must be"),
     (dict(seed=1.5), "seed must be"), (dict(resamples=0), "resamples must be"), (dict(resamples=10**6), "resamples must be"),
     (dict(options={"ease": {"lam": "x"}}), "ease.lam")],
)  # fmt: skip
def test_a_run_is_checked_before_any_data_is_read(kwargs, message):
    from pmeta.eval.runner import check_request
    from pmeta.errors import InvalidConfig

    request = {"methods": ["random", "ease"], "ks": (1, 3), "modes": ("full",), **kwargs}
    with pytest.raises(InvalidConfig, match=message):
        check_request(**request)
    # options of a known method outside the run are checked, kept and unused
    assert check_request(["random"], (1,), ("full",), {"per-user-lora": {"steps": "2"}}) == {"per-user-lora": {"steps": 2}}


@pytest.mark.parametrize(
    "method, options, message",
    [("random", {"seed": -1}, "greater than or equal to 0"), ("prompt-maml", {"seed": 2**70}, "less than or equal to 4294967295"),
     ("per-user-lora", {"lr": float("nan")}, "finite number"), ("per-user-lora", {"rank": 0}, "greater than or equal to 1"),
     ("per-user-lora", {"layers": "some"}, "'all' or 'bank'"), ("per-user-lora", {"targets": ["output"]}, "'query', 'key' or 'value'"),
     ("per-user-lora", {"targets": []}, "at least 1"), ("prompt-maml", {"batch_users": 0}, "greater than or equal to 1"),
     ("ease", {"lambdas": [100, 0]}, "greater than 0"), ("popularity-time", {"validation_fraction": 1.0}, "less than 1"),
     ("popularity-time", {"validation_modes": ["full", "uni42"]}, "'uni99', 'pop99' or 'full'")],
)  # fmt: skip
def test_method_options_out_of_range_are_config_errors_before_anything_runs(method, options, message):
    from pmeta.eval.baselines import check_options
    from pmeta.errors import InvalidConfig

    with pytest.raises(InvalidConfig, match=message):
        check_options(method, options)


def test_every_method_is_a_registered_class_with_one_interface():
    from pmeta.eval.baselines import BASELINES

    assert set(BASELINES) - set(DEFAULT_METHODS) == {"pmeta-bf16"}  # the one opt-in method
    assert set(DEFAULT_METHODS) <= set(BASELINES)
    for name, cls in BASELINES.items():
        assert cls.name == name and callable(cls.create) and callable(cls.score) and isinstance(cls.bytes_per_user, int)


def test_per_user_lora_below_the_prompt_layer_changes_scores_exactly_as_a_full_pass(opened_bank):
    """The LoRA on layers below the prompt layer is applied (scores move), and the split pass
    (token embeddings -> LoRA layers -> pmeta's upper pass) equals one pass with the LoRA on every layer."""
    from pmeta.eval.neural import support_input
    from pmeta.eval.oppu import PerUserLoRA

    model = opened_bank.model
    every = PerUserLoRA(model, steps=2, layers="all")
    upper = PerUserLoRA(model, steps=2, layers="bank")
    assert upper.first_layer == model.config.prompt_layer and every.first_layer == 0
    user = support_input(model, np.array([3, 4, 5]))
    lora = every.fit(np.array([3, 4, 5]))
    top_only = {k: v for k, v in lora.items() if int(k.split(".")[0][5:]) >= model.config.prompt_layer}
    with torch.no_grad():
        full = every.final_scores(user, lora)
        restricted = upper.final_scores(user, top_only)
        zero_below = every.final_scores(user, {k: (torch.zeros_like(v) if k.endswith(".B") and k not in top_only else v) for k, v in lora.items()})
    assert not torch.allclose(full, restricted)  # the lower-layer LoRA does something
    torch.testing.assert_close(zero_below, restricted, atol=1e-4, rtol=1e-4)  # and nothing else differs


def test_cli_eval_refuses_a_dataset_with_nothing_to_evaluate_before_building_a_bank(tmp_path):
    data = tmp_path / "few"
    data.mkdir()
    (data / "movies.csv").write_text("movieId,title,genres\n" + "".join(f"{i},Movie {i} (1995),Drama\n" for i in range(1, 21)))
    # ten users with five positives each: no test user has the six a cold-start case needs
    (data / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},5.0,{100 * u + i}\n" for u in range(1, 11) for i in range(1, 6)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pmeta", "--threads", "1", "eval", "movielens", "--data", str(data), "--out", str(out), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["pmeta: error: none of the 2 test users of few has the 6 positive ratings (at least 4 stars) a cold-start case needs, so there is nothing to evaluate"]
    assert not (out / "bank").exists()  # refused before the bank build, which takes minutes


def test_cli_eval_mode_auto_keeps_the_modes_every_test_user_can_draw_without_a_bank_for_baselines(tmp_path):
    from pmeta.data import read_movielens
    from pmeta.eval.runner import drawable_run_modes

    data = _same_thirty_films(tmp_path)
    modes, reason = drawable_run_modes(read_movielens(data))
    assert modes == ("uni99", "full") and "pop99" in reason
    # 110 films: 80 never rated, neither sampled mode can draw 99; each says why
    modes, reasons = drawable_run_modes(read_movielens(_same_thirty_films(tmp_path, 110)))
    assert modes == ("full",) and [r.endswith(f"{m} draws") for r, m in zip(reasons.split("; "), ("uni99", "pop99"))] == [True, True]
    out = tmp_path / "out"
    base = [sys.executable, "-m", "pmeta", "--threads", "1", "eval", "movielens", "--data", str(data), "--methods", "random,popularity", "--k", "1", "--no-plots", "--quiet"]
    refused = subprocess.run([*base, "--out", str(tmp_path / "refused"), "--mode", "pop99"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.strip().endswith("evaluate this dataset with --mode uni99,full")
    result = subprocess.run([*base, "--out", str(out), "--mode", "auto"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [f"pmeta: --mode auto evaluates uni99,full, not pop99: {reason}"]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["modes"] == ["uni99", "full"] and {row["mode"] for row in report["results"]} == {"uni99", "full"}
    assert report["config"]["bank"] is None and not (out / "bank").exists()  # the baselines need no bank


def _same_thirty_films(tmp_path, films: int = 400):
    """``films`` movies, ten users who all rated the same 30: with 400, 370 never-rated items (uni99
    draws 99 of them) of which none has a rating (pop99, which draws in proportion to ratings, cannot)."""
    data = tmp_path / f"small-{films}"
    data.mkdir()
    (data / "movies.csv").write_text("movieId,title,genres\n" + "".join(f"{i},Movie {i} (1995),Drama\n" for i in range(1, films + 1)))
    (data / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{5.0 if i % 3 else 2.0},{100 * u + i}\n" for u in range(1, 11) for i in range(1, 31)))
    return data


def test_exactly_the_methods_outside_bank_methods_get_ready_without_a_bank(tmp_path):
    """The CLI builds no bank when every method is outside BANK_METHODS / REPTILE_METHODS: a method
    registered later that needs one must be listed there, or it would fail late without a bank."""
    from pmeta.data import read_movielens
    from pmeta.errors import InvalidConfig
    from pmeta.eval.baselines import BASELINES, EvalContext
    from pmeta.eval.protocol import split_users
    from pmeta.eval.runner import BANK_METHODS, REPTILE_METHODS

    dataset = read_movielens(_same_thirty_films(tmp_path))
    context = EvalContext(dataset, split_users(dataset)[0])
    assert (BANK_METHODS | REPTILE_METHODS) < set(BASELINES)
    for name, method in BASELINES.items():
        if name in BANK_METHODS | REPTILE_METHODS:
            with pytest.raises(InvalidConfig, match="needs a"):
                method.create(context)
        else:
            assert method.create(context).score(np.array([0, 1]), 2).shape == (len(dataset.catalog),), name


def test_the_runs_test_users_follow_the_given_banks_held_out_fraction(tiny_bank, opened_bank):
    """A Reptile bank held out 10% of the users: run alone, its fraction is the run's (the 20%
    default would score it on users it trained on); beside a 20% MAML bank it is refused."""
    import copy

    from pmeta import Bank
    from pmeta.data import load_sample
    from pmeta.errors import InvalidConfig
    from pmeta.eval.protocol import split_users

    dataset = load_sample()
    reptile = Bank.open(tiny_bank)
    reptile.config = reptile.config.model_copy(update={"test_fraction": 0.1})
    reptile.record = copy.deepcopy(reptile.record)
    reptile.record["held_out_users"] = [dataset.ratings.user_ids[int(u)] for u in split_users(dataset, 0, 0.1)[1]]
    report = run_movielens(dataset, None, ["popularity", "pmeta-reptile"], (1,), ("full",), reptile_bank=reptile, max_users=2, resamples=10)
    assert report["config"]["test_fraction"] == 0.1
    with pytest.raises(InvalidConfig, match="held-out users differ"):
        run_movielens(dataset, opened_bank, ["pmeta", "pmeta-reptile"], (1,), ("full",), reptile_bank=reptile, max_users=2, resamples=10)


def test_reports_say_when_a_bank_has_a_two_sided_time_prior_or_the_reptile_bank_is_not_reptile(opened_bank, with_time_prior):
    """A Reptile bank meta-trained with MAML gave a pmeta-reptile row without a word (the report's
    config aside); a bank built before the causal time prior scores with later ratings. Both are
    said in report.md and report.json's config.notes (and on stderr)."""
    import copy

    from pmeta.eval.runner import bank_notes, markdown

    assert bank_notes(opened_bank, None) == []  # the tiny bank: no time prior, no Reptile bank
    for kind in ("exponential", "gaussian"):  # causal priors: nothing to say
        causal = copy.copy(opened_bank)
        causal.model = with_time_prior(opened_bank.model, 1.0, 500, kind)
        assert bank_notes(causal, None) == []
    two_sided = copy.copy(opened_bank)
    two_sided.model = with_time_prior(opened_bank.model, 1.0, 500, "two-sided")
    notes = bank_notes(two_sided, opened_bank)
    assert len(notes) == 2 and "two-sided time prior" in notes[0] and "the pmeta-reptile row is not Reptile" in notes[1]
    reptile = copy.copy(opened_bank)
    reptile.config = opened_bank.config.model_copy(update={"meta": "reptile", "anchors": opened_bank.config.anchors + 1})
    assert bank_notes(opened_bank, reptile) == ["the Reptile bank differs from the MAML bank in more than meta: anchors"]
    from pmeta.data import load_sample

    report = run_movielens(load_sample(), opened_bank, ["popularity", "pmeta-reptile"], (1,), ("full",), reptile_bank=opened_bank, max_users=2, resamples=10)
    assert report["config"]["notes"] == [f"the Reptile bank (version {opened_bank.version}) was meta-trained with meta = 'maml': the pmeta-reptile row is not Reptile"]
    assert "Note: the Reptile bank" in markdown(report)


def test_option_values_that_failed_inside_the_method_are_typed_errors(opened_bank):
    """A per-user LoRA rank of 10^12 failed allocating memory and an EASE λ of 1e-300 with numpy's
    LinAlgError, as tracebacks: both are InvalidConfig now, naming the bound."""
    from pmeta.errors import InvalidConfig
    from pmeta.eval.baselines import EASEBaseline
    from pmeta.eval.oppu import PerUserLoRA

    with pytest.raises(InvalidConfig, match="per-user-lora.rank must be at most 384"):
        PerUserLoRA(opened_bank.model, rank=10**12)
    assert PerUserLoRA(opened_bank.model, rank=384).rank == 384
    singular = np.ones((3, 3))  # rank 1: invertible only with a real ridge
    with pytest.raises(InvalidConfig, match="choose a larger lam"):
        EASEBaseline.closed_form(singular, 1e-300)
    assert np.isfinite(EASEBaseline.closed_form(singular, 1.0)).all()

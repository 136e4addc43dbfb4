"""Paired bootstrap CIs (pmeta.eval.significance): the bootstrap itself, the choice of rivals, the
report.md tables, and ``report["comparisons"]`` of a run without pmeta methods."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pmeta.eval
from pmeta.eval.significance import compare_methods, holm, markdown_lines, paired_bootstrap


def test_identical_arrays_differ_by_exactly_zero():
    a = np.random.default_rng(0).random(50)
    result = paired_bootstrap(a, a.copy())
    assert result == {"difference": 0.0, "ci95": [0.0, 0.0], "p_better": 0.5, "p_value": 1.0}  # every resample ties: half


def test_a_clearly_better_method_has_a_ci_above_zero():
    rng = np.random.default_rng(1)
    b = rng.random(120)
    result = paired_bootstrap(b + 0.1 + 0.01 * rng.random(120), b)
    assert 0 < result["ci95"][0] <= result["difference"] <= result["ci95"][1] and result["difference"] == pytest.approx(0.105, abs=0.001)
    assert result["p_better"] == 1.0 and result["p_value"] == 2 / 2001  # no resample on the losing side: (0 + 1) / (B + 1), two-sided
    worse = paired_bootstrap(b, b + 0.1 + 0.01 * rng.random(120))
    assert worse["ci95"][1] < 0 and worse["p_better"] == 0.0 and worse["p_value"] == 2 / 2001


def test_noise_gives_a_ci_around_zero_of_the_normal_width():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=400), rng.normal(size=400)
    result = paired_bootstrap(a, b, resamples=4000, seed=3)
    lo, hi = result["ci95"]
    assert lo < result["difference"] < hi
    half_width = 1.96 * np.std(a - b) / np.sqrt(len(a))
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.1)
    assert 0.0 < result["p_better"] < 1.0
    # The p-value is twice the smaller tail of the same resamples: below 0.05 exactly when the CI
    # excludes 0 (up to the +1 that keeps it off 0), and close to the normal test's.
    losing = min(result["p_better"], 1 - result["p_better"]) * 4000
    assert result["p_value"] == pytest.approx(2 * (losing + 1) / 4001)
    from statistics import NormalDist

    z = abs(np.mean(a - b)) / (np.std(a - b) / np.sqrt(len(a)))
    assert result["p_value"] == pytest.approx(2 * (1 - NormalDist().cdf(z)), abs=0.03)


def test_every_user_is_resampled_uniformly_with_replacement():
    # Only user i differs: a resample is better iff it draws user i at least once, 1 - (4/5)^5 of them;
    # the others tie and count half.
    for i in range(5):
        a = np.zeros(5)
        a[i] = 1.0
        assert paired_bootstrap(a, np.zeros(5), resamples=4000, seed=i)["p_better"] == pytest.approx(1 - 0.8**5 + 0.5 * 0.8**5, abs=0.03)


def test_the_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    a, b = rng.random(30), rng.random(30)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(list(a), list(b), seed=7)
    assert paired_bootstrap(a, b, seed=7)["ci95"] != paired_bootstrap(a, b, seed=8)["ci95"]


def test_the_bootstrap_rejects_unpaired_arrays():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(np.zeros(5), np.zeros(6))
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(np.zeros(5), np.zeros(5), resamples=0)
    empty = paired_bootstrap([], [])
    assert np.isnan(empty["difference"]) and np.isnan(empty["p_better"]) and np.isnan(empty["p_value"]) and all(np.isnan(empty["ci95"]))


def test_the_p_value_agrees_with_the_ci_on_whether_a_margin_is_noise():
    rng = np.random.default_rng(11)
    for shift in np.linspace(0.0, 0.3, 13):
        a, b = rng.normal(size=150) + shift, rng.normal(size=150)
        result = paired_bootstrap(a, b, resamples=2000, seed=int(shift * 100))
        lo, hi = result["ci95"]
        if lo > 0.01 or hi < -0.01:  # clearly outside: the tail beyond 0 is under 2.5%
            assert result["p_value"] < 0.05
        if lo < -0.01 and hi > 0.01:  # clearly inside
            assert result["p_value"] > 0.05


def test_holm_adjusts_a_family_step_down_in_the_input_order():
    # Sorted 0.01, 0.02, 0.03, 0.04 (m = 4): 0.04, 0.06, 0.06 (monotone: max(0.06, 0.06)), 0.06.
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 capped at 1; then max(1, 0.9): kept monotone
    assert holm([0.9, 0.3]) == pytest.approx([0.9, 0.6])
    assert holm([0.4, 0.6, 0.7]) == pytest.approx([1.0, 1.0, 1.0])
    assert holm([0.02]) == [0.02] and holm([]) == []
    # NaN (a cell without users) stays NaN and does not enlarge the family.
    adjusted = holm([0.01, float("nan"), 0.02])
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    # Never below the raw p-value, never above Bonferroni's m * p.
    p = np.random.default_rng(3).random(30) ** 3
    adjusted = np.array(holm(p))
    assert np.all(adjusted >= p) and np.all(adjusted <= np.minimum(1, 30 * p) + 1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match="1-D"):
        holm([[0.1]])
    assert pmeta.eval.holm is holm and "holm" in pmeta.eval.__all__  # part of the public evaluation API


def test_a_stratified_bootstrap_resamples_within_each_stratum():
    rng = np.random.default_rng(5)
    a, b = rng.random(40), rng.random(40)
    # One stratum draws exactly what the plain bootstrap draws.
    assert paired_bootstrap(a, b, seed=2, strata=np.zeros(40)) == paired_bootstrap(a, b, seed=2)
    # A difference that is constant within each stratum: every stratified resample keeps the strata's
    # sizes, so its mean never moves; the plain bootstrap mixes the strata and does.
    a, b, strata = np.r_[np.ones(10), np.zeros(30)], np.zeros(40), np.r_[np.zeros(10), np.ones(30)]
    stratified = paired_bootstrap(a, b, strata=strata)
    assert stratified["difference"] == 0.25 and stratified["ci95"] == pytest.approx([0.25, 0.25]) and stratified["p_better"] == 1.0
    lo, hi = paired_bootstrap(a, b)["ci95"]
    assert hi - lo > 0.2
    with pytest.raises(ValueError, match="one label per user"):
        paired_bootstrap(a, b, strata=strata[:-1])


def test_compare_methods_stratifies_by_a_named_per_user_array():
    users, seeds = [1, 2, 2, 3], np.array([0, 0, 1, 1])
    per_user = {name: _cells(users, hr, hr) for name, hr in {"pmeta": [1, 1, 0, 0], "prompt-maml": [0, 0, 0, 0]}.items()}
    for cells in per_user.values():
        for cell in cells.values():
            cell["seed"] = seeds
    rows = compare_methods(per_user, resamples=300, seed=1, strata="seed")
    pmeta_vs_maml = next(r for r in rows if r["versus"] == "prompt-maml" and r["metric"] == "hr@10")
    assert pmeta_vs_maml["ci95"] == pytest.approx([0.5, 0.5])  # constant within each seed
    assert {k: v for k, v in pmeta_vs_maml.items() if k in ("difference", "ci95", "p_better", "p_value")} == paired_bootstrap([1, 1, 0, 0], [0, 0, 0, 0], resamples=300, seed=1, strata=seeds)
    for cell in per_user["prompt-maml"].values():
        cell["seed"] = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="different users"):
        compare_methods(per_user, strata="seed")


def _cells(users: list[int], hr: list[float], ndcg: list[float], cells=((1, "pop99"), (3, "pop99"))) -> dict:
    """A method's per-user cells (the same values in every cell; MRR unused)."""
    return {cell: {"user": np.array(users), "hr@10": np.array(hr, dtype=float), "ndcg@10": np.array(ndcg, dtype=float), "mrr": np.zeros(len(users))} for cell in cells}


def test_compare_methods_pairs_pmeta_with_each_rival_and_the_best_classical_per_metric():
    users = [4, 2, 9, 7]
    per_user = {
        "random": _cells(users, [0, 0, 0, 0], [0, 0, 0, 0]),
        "popularity": _cells(users, [1, 1, 0, 0], [0.1, 0.1, 0, 0]),  # best classical by HR@10
        "itemknn": _cells(users, [1, 0, 0, 0], [0.9, 0.2, 0, 0]),  # best classical by nDCG@10
        "prompt-maml": _cells(users, [1, 1, 1, 0], [0.5, 0.5, 0.5, 0]),
        "pmeta": _cells(users, [1, 1, 1, 1], [0.6, 0.6, 0.6, 0.6]),
    }
    comparisons = compare_methods(per_user, resamples=500, seed=0)
    assert all(set(c) == {"method", "versus", "k", "mode", "metric", "users", "difference", "ci95", "p_better", "p_value", "p_holm"} and c["users"] == 4 for c in comparisons)
    index = {(c["versus"], c["metric"], c["k"]): c for c in comparisons}
    assert {c["method"] for c in comparisons} == {"pmeta"} and len(comparisons) == len(index) == 2 * 2 * 2
    assert {(v, m) for v, m, _ in index} == {("prompt-maml", "hr@10"), ("popularity", "hr@10"), ("prompt-maml", "ndcg@10"), ("itemknn", "ndcg@10")}
    assert index[("prompt-maml", "hr@10", 1)]["difference"] == pytest.approx(0.25)
    assert index[("popularity", "hr@10", 3)]["difference"] == pytest.approx(0.5)
    assert index[("itemknn", "ndcg@10", 1)]["difference"] == pytest.approx((2.4 - 1.1) / 4)
    for c in comparisons:
        assert c["ci95"][0] <= c["difference"] <= c["ci95"][1] and 0 <= c["p_better"] <= 1
    assert json.loads(json.dumps(comparisons)) == comparisons  # plain JSON values, no arrays
    # Holm's families: pmeta vs prompt-maml (2 cells x 2 metrics) and pmeta vs the best classical,
    # where popularity (HR@10) and itemknn (nDCG@10) are one rival.
    for family in (lambda c: c["versus"] == "prompt-maml", lambda c: c["versus"] != "prompt-maml"):
        rows = [c for c in comparisons if family(c)]
        assert len(rows) == 4 and [c["p_holm"] for c in rows] == holm([c["p_value"] for c in rows])
    # Without pmeta methods there is nothing to compare; users must be paired.
    assert compare_methods({k: v for k, v in per_user.items() if k != "pmeta"}) == []
    with pytest.raises(ValueError, match="different users"):
        compare_methods({**per_user, "prompt-maml": _cells([2, 4, 9, 7], [1, 1, 1, 0], [0, 0, 0, 0])})


def test_markdown_tables_mark_cis_that_exclude_zero():
    row = {"method": "pmeta", "k": 1, "mode": "pop99"}
    comparisons = [
        {**row, "versus": "prompt-maml", "metric": "hr@10", "difference": 0.006, "ci95": [-0.01, 0.022], "p_better": 0.7},
        {**row, "versus": "ease", "metric": "hr@10", "difference": 0.05, "ci95": [0.01, 0.09], "p_better": 1.0},
        {**row, "versus": "prompt-maml", "metric": "ndcg@10", "difference": -0.03, "ci95": [-0.05, -0.01], "p_better": 0.0},
        {**row, "k": 3, "versus": "prompt-maml", "metric": "ndcg@10", "difference": 0.0, "ci95": [0.0, 0.0], "p_better": 0.0},
        {**row, "k": 3, "versus": "ease", "metric": "hr@10", "difference": 0.04, "ci95": [0.01, 0.07], "p_better": 1.0, "p_holm": 0.01},
        {**row, "k": 3, "versus": "prompt-maml", "metric": "hr@10", "difference": 0.02, "ci95": [0.001, 0.04], "p_better": 0.98, "p_holm": 0.2},
    ]
    text = "\n".join(markdown_lines(comparisons, resamples=2000))
    assert text.startswith("## Paired differences (95% bootstrap CI over users)") and "2000 resamples" in text
    assert "### pmeta: HR@10" in text and "### pmeta: nDCG@10" in text
    assert "| prompt-maml | pop99 | +0.006 [\u22120.010, +0.022] | **+0.020 [+0.001, +0.040]** |" in text
    assert "| best classical | pop99 | **+0.050 [+0.010, +0.090]** (ease) | **+0.040 [+0.010, +0.070]** † (ease) |" in text
    assert "†: the margin holds after Holm's adjustment" in text
    assert "| prompt-maml | pop99 | **\u22120.030 [\u22120.050, \u22120.010]** | +0.000 [+0.000, +0.000] |" in text
    assert markdown_lines([]) == []


def test_a_run_without_pmeta_methods_has_no_comparisons(tmp_path):
    from pmeta.data import load_sample
    from pmeta.eval.runner import run_movielens, write_report

    report = run_movielens(load_sample(), None, ["random", "popularity", "itemknn"], (1,), ("pop99",), max_users=3)
    assert list(report) == ["protocol", "dataset", "seed", "config", "results", "comparisons"]
    assert report["comparisons"] == [] and report["config"]["bootstrap"] == {"resamples": 2000, "seed": 0}
    write_report(report, tmp_path, plots=False)
    assert "Paired differences" not in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["comparisons"] == []

"""pmeta.bank.calibrate (``BankConfig.time_prior_weight_served``): the time prior's weight per history
size read on the served model. Its scores are the protocol's own evaluation of pmeta; the per-size
choice is non-increasing; it replaces the one β only when the two-fold check gains by more than the
guard; a build records the check either way and stores what it adopted."""

from __future__ import annotations

import numpy as np
import pytest

from pmeta.bank import calibrate
from pmeta.data import load_sample
from pmeta.eval.neural import PmetaMAML
from pmeta.eval.protocol import evaluate


@pytest.fixture(scope="module")
def timed(opened_bank, with_time_prior):
    return with_time_prior(opened_bank.model, 2.0, 3000)


@pytest.fixture(scope="module")
def validation(opened_bank):
    ids = {u: i for i, u in enumerate(load_sample().ratings.user_ids)}
    return np.array(sorted(ids[u] for u in opened_bank.build_record["validation_users"]))


def test_served_scores_are_the_protocols_evaluation_of_pmeta_at_each_weight(timed, validation):
    sample = load_sample()
    users = validation[:6]
    ndcg = calibrate.served_ndcg(timed, sample, users, [0.0, 2.0], seed=0, batch=4)
    assert ndcg.shape[:2] == (2, 5) and ndcg.shape[2] >= 3
    for w, weight in enumerate((0.0, 2.0)):
        for k in (1, 4):
            cells = {}
            evaluate(PmetaMAML(calibrate.with_weight(timed, weight)), sample, users, ks=(k,), seed=0, per_user=cells)
            expected = np.mean([cell["ndcg@10"] for cell in cells.values()], axis=0)  # over the modes
            np.testing.assert_allclose(ndcg[w, k - 1], expected, atol=1e-9)
    assert not np.allclose(ndcg[0], ndcg[1])  # the weight reaches the scores
    assert float(timed.t.head["time_weight"]) == 2.0


def structured(n: int = 40, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """nDCG (weights 0 / 1 / 2, sizes 1 … 5, n users): size 1 is best at β = 2, the others at 1."""
    rng = np.random.default_rng(seed)
    ndcg = 0.3 + noise * rng.standard_normal((3, 5, n))
    ndcg[2, 0] += 0.05
    ndcg[1, 1:] += 0.05
    return ndcg


def test_the_per_size_choice_follows_each_size_and_never_rises():
    weights = [0.0, 1.0, 2.0]
    every = np.arange(40)
    assert calibrate.per_size_choice(structured(), weights, every) == [2.0, 1.0, 1.0, 1.0, 1.0]
    rising = structured()
    rising[:, 4] = 0.3
    rising[2, 4] += 0.2  # size 5 wants β = 2 more than sizes 2 … 4 want 1: all of 2 … 5 take one value
    assert calibrate.per_size_choice(rising, weights, every) == [2.0] * 5  # +0.2 at size 5 outweighs −0.05 at 2 … 4
    gains = calibrate.gain(structured(), weights, [2.0, 1.0, 1.0, 1.0, 1.0], 1.0, every)
    np.testing.assert_allclose(gains, 0.05 / 5)  # size 1 gains 0.05, the others tie


def test_two_fold_scores_each_half_with_the_others_choice_and_the_guard_decides(timed, validation, monkeypatch):
    weights = [0.0, 1.0, 2.0]
    clear = calibrate.two_fold(structured(noise=0.001), weights, 1.0, seed=3)
    assert clear["choices"] == [[2.0, 1.0, 1.0, 1.0, 1.0]] * 2 and clear["gain"] == pytest.approx(0.01, abs=1e-3) and clear["gain"] > calibrate.GUARD * clear["se"]
    # half 0 (fold 0 fits on it) wants β = 2 at size 1, half 1 wants 0: fold 0 scores half 1 with
    # (2, 0, 0, 0, 0), a loss of 0.1 at size 1 for each of its users, fold 1 scores half 0 with β = 0
    # throughout, no change there; fitting on the scored half, or on everyone, gives other numbers
    n = 12
    order = np.random.default_rng(3).permutation(n)
    first, second = order[: n // 2], order[n // 2 :]
    split = np.full((3, 5, n), 0.3)
    split[2, 0, first] += 0.1
    split[2, 0, second] -= 0.1
    split[0, 0, second] += 0.1
    crossed = calibrate.two_fold(split, weights, 1.0, seed=3)
    assert crossed["choices"] == [[2.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5]
    assert crossed["gain"] == pytest.approx(-0.1 / 5 / 2)
    noise = np.random.default_rng(1).uniform(0, 1, (3, 5, 40))  # no structure: a choice fits one half's noise
    unclear = calibrate.two_fold(noise, weights, 1.0, seed=3)
    assert unclear["gain"] < calibrate.GUARD * unclear["se"]

    sample = load_sample()
    for array, adopted in ((structured(n=8, noise=0.001), True), (np.random.default_rng(2).uniform(0, 1, (6, 5, 8)), False)):
        grid = [0.0, 1.0, 2.0] if array.shape[0] == 3 else [0.0, 0.5, 1.0, 2.0, 3.0, 5.0]
        monkeypatch.setattr(calibrate, "served_ndcg", lambda model, dataset, users, weights, seed, batch=32, array=array: array[:, :, : len(users)])
        monkeypatch.setattr(calibrate, "make_cases", lambda dataset, users, k: list(users))
        chosen, record = calibrate.choose_served(timed, sample, list(range(8)), seed=0, weights=grid[:-1] if adopted else grid)
        assert record["adopted"] is adopted and record["weights"] == grid and record["one_weight"] == 2.0
        assert (chosen == record["chosen"]) if adopted else chosen is None


def test_skipped_without_a_prior_or_enough_users(opened_bank, timed, validation):
    sample = load_sample()
    assert calibrate.choose_served(opened_bank.model, sample, validation, seed=0)[0] is None  # the tiny bank: no time prior
    per_size = calibrate.with_weight(timed, [3.0, 2.0, 2.0, 1.0, 1.0])
    assert "per size already" in calibrate.choose_served(per_size, sample, validation, seed=0)[1]["skipped"]
    assert "4 are needed" in calibrate.choose_served(timed, sample, validation[:3], seed=0)[1]["skipped"]


@pytest.mark.parametrize("grid", [(0.0,), (5.0,)], ids=["less-for-longer", "more-for-all"])
def test_a_build_records_the_check_and_stores_what_it_adopted(grid, monkeypatch):
    """Tiny builds on synthetic eras (no meta-training), the grid cut to the bank's β = 2 and one
    other value, with the guard off: a per-size choice other than the one β is stored (equal values
    as one number, as a build's own choice is); the guard itself: the two-fold test above."""
    from pmeta import load_config
    from pmeta.bank.build import build_model
    from pmeta.tasks import time_prior

    from test_time_prior_grid import eras

    monkeypatch.setattr(calibrate, "GUARD", -1e9)
    monkeypatch.setattr(time_prior, "WEIGHTS", grid)
    fixed = {"ease_lambda": 500.0, "onboarding_lambda": 30.0, "onboarding_weight": 1.0, "cf_pool_exponent": 0.5, "time_prior_weight": 2.0, "time_prior_bandwidth": 180.0, "anchor_bias_weight": 0.0}
    steps = {"tower_steps": 0, "global_steps": 0, "anchor_steps": 0, "stack_steps": 0, "inner_steps": 0}
    config = load_config("tiny", overrides={"cf_init": "onboarding", **fixed, **steps, "validation_fraction": 0.3, "time_prior_weight_served": True})
    model, record = build_model(eras(), config)
    served = record["validation"]["time_prior_served"]
    assert served["one_weight"] == 2.0 and served["weights"] == sorted({2.0, *grid}) and served["users"] >= 4
    assert len(served["chosen"]) == 5 and all(a >= b for a, b in zip(served["chosen"], served["chosen"][1:]))
    assert served["adopted"] == (served["chosen"] != [2.0] * 5)  # the guard is off
    stored = model.t.head["time_weight"]
    assert served["adopted"], "these grids move the choice on eras (2, 2, 2, 0, 0 and 5 throughout when measured)"
    if len(set(served["chosen"])) == 1:
        assert stored.ndim == 0 and float(stored) == served["chosen"][0]
    else:
        assert stored.tolist() == served["chosen"]
    assert set(record["validation"]) >= {"final", "final_one_weight"}  # "final" describes the bank as stored
    off, _ = build_model(eras(), config.model_copy(update={"time_prior_weight_served": False}))
    assert float(off.t.head["time_weight"]) == 2.0 and "time_prior_served" not in _["validation"]
    assert all(bool((off.t.head[k] == v).all()) for k, v in model.t.head.items() if k != "time_weight")  # only β moved


def test_off_by_default_and_in_banks_built_before_it(opened_bank):
    from pmeta.bank.bank import stored_config
    from pmeta.config import BankConfig

    current = opened_bank.config.model_dump(mode="json")
    assert not BankConfig().time_prior_weight_served and not stored_config({k: v for k, v in current.items() if k != "time_prior_weight_served"}).time_prior_weight_served
    assert stored_config({**current, "time_prior_weight_served": True}).time_prior_weight_served


def test_no_prior_at_any_size_is_stored_as_no_prior(monkeypatch):
    """An adopted choice of β = 0 at every size leaves no time prior in the head (as a build that
    chose β = 0 stores none), and the record's "final" is measured on that head."""
    from pmeta import load_config
    from pmeta.bank.build import build_model

    from test_time_prior_grid import eras

    monkeypatch.setattr(calibrate, "choose_served", lambda model, dataset, users, seed: ([0.0] * 5, {"adopted": True}))
    fixed = {"ease_lambda": 500.0, "onboarding_lambda": 30.0, "onboarding_weight": 1.0, "cf_pool_exponent": 0.5, "time_prior_weight": 2.0, "time_prior_bandwidth": 180.0, "anchor_bias_weight": 0.0}
    steps = {"tower_steps": 0, "global_steps": 0, "anchor_steps": 0, "stack_steps": 0, "inner_steps": 0}
    config = load_config("tiny", overrides={"cf_init": "onboarding", **fixed, **steps, "validation_fraction": 0.3, "time_prior_weight_served": True})
    model, record = build_model(eras(), config)
    assert not [k for k in model.t.head if k.startswith("time_")]
    assert record["validation"]["final"] != record["validation"]["final_one_weight"]


def _record(chosen, adopted, gain=0.0018, se=0.0004):
    return {"weights": [0.0, 0.5, 1.0, 2.0, 3.0, 5.0], "one_weight": 1.0, "users": 483, "chosen": chosen, "guard": 2.0, "adopted": adopted, "two_fold": {"gain": gain, "se": se, "choices": [chosen, chosen]}}


def test_the_build_says_in_one_line_what_the_check_did():
    adopted = calibrate.describe(_record([5.0, 1.0, 0.5, 0.0, 0.0], True))
    assert adopted == "time-prior weight on the served model: β 5 / 1 / 0.5 / 0 / 0 for histories of 1 … 5 items (longer ones: β_5) replaces β = 1 (two-fold gain +0.0018 ± 0.0004 nDCG@10 on 483 validation users, above the 2-s.e. guard)"
    assert "model: no time prior replaces β = 1 (" in calibrate.describe(_record([0.0] * 5, True))  # stored as no prior
    assert "model: β = 3 for every history size replaces β = 1 (" in calibrate.describe(_record([3.0] * 5, True))  # stored as one β
    kept = calibrate.describe(_record([2.0, 2.0, 1.0, 1.0, 1.0], False, gain=0.0046, se=0.0041))
    assert kept == "time-prior weight on the served model: β = 1 kept (per size 2 / 2 / 1 / 1 / 1: two-fold gain +0.0046 ± 0.0041 nDCG@10 on 483 validation users, not above the 2-s.e. guard)"
    assert "β = 1 kept (the bank's β is the choice at every history size)" in calibrate.describe(_record([1.0] * 5, False))
    assert calibrate.describe({"skipped": "3 validation users with >= 6 positives; 4 are needed"}).endswith("not read (3 validation users with >= 6 positives; 4 are needed)")
    assert all("\n" not in line for line in (adopted, kept))


@pytest.mark.parametrize("served", [True, False], ids=["option-on", "option-off"])
def test_bank_build_prints_the_checks_line_only_when_the_option_ran(served, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import pmeta.bank.build as build
    from pmeta.cli.app import app

    validation = {"final": {"hr@10": 0.23}, **({"time_prior_served": _record([5.0, 1.0, 0.5, 0.0, 0.0], True)} if served else {})}
    monkeypatch.setattr(build, "build_bank", lambda *args, **kwargs: build.BuildResult("v1", 1.0, validation, 10, 2))
    result = CliRunner().invoke(app, ["bank", "build", "--out", str(tmp_path / "bank"), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("built bank version v1") and lines[0].endswith("0.230")
    assert lines[1:] == ([calibrate.describe(validation["time_prior_served"])] if served else [])

"""EASE's two λ grids: the ease baseline tunes over ``EASE_LAMBDAS`` (to 100,000), a bank's collaborative
init over its config's ``ease_lambdas`` (to 1,000 by default); and benchmarks/ease_grid.py, which
scores both on the train users and reports each grid's choice as the evaluation and the build make it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pmeta import load_config
from pmeta.config import INIT_EASE_LAMBDAS
from pmeta.data import load_sample
from pmeta.errors import InvalidConfig
from pmeta.eval.baselines import EASE_LAMBDAS, EASEBaseline
from pmeta.eval.protocol import split_users
from pmeta.eval.synthetic import write_ml100k_like
from test_time_prior_grid import eras

NO_TRAINING = {"tower_steps": 0, "global_steps": 0, "anchor_steps": 0, "stack_steps": 0}


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("ease_grid")


def test_the_baseline_grid_reaches_past_the_inits():
    assert set(INIT_EASE_LAMBDAS) < set(EASE_LAMBDAS) and max(EASE_LAMBDAS) == 100_000.0 and max(INIT_EASE_LAMBDAS) == 1_000.0
    assert EASEBaseline().lambdas == EASE_LAMBDAS
    assert load_config("small").ease_lambdas == INIT_EASE_LAMBDAS


def test_the_baseline_scores_every_lambda_of_its_default_grid():
    dataset = eras()
    ease = EASEBaseline().fit(dataset, split_users(dataset)[0])
    assert tuple(ease.validation_scores) == EASE_LAMBDAS and ease.chosen_lam in EASE_LAMBDAS
    assert ease.validation_scores[ease.chosen_lam] == max(ease.validation_scores.values())


@pytest.mark.parametrize("bad", [[], [0.0], [-5.0], [float("nan")], ["x"], list(range(1, 18))])
def test_a_bad_init_grid_is_refused(bad):
    with pytest.raises(InvalidConfig, match="ease_lambdas"):
        load_config("tiny", overrides={"ease_lambdas": bad})


def test_a_build_tunes_its_init_over_the_configs_grid_and_ease_grid_reports_the_same_choice(script):
    from pmeta.bank.build import build_model

    dataset = eras()
    config = load_config("tiny", overrides={"cf_init": "onboarding", "ease_lambdas": [7.0, 70.0, 700.0], **NO_TRAINING})
    _, record = build_model(dataset, config)
    built = record["collaborative_init"]["ease_lambda"]
    assert built in (7.0, 70.0, 700.0)
    users = script.train_user_sets(dataset, config)
    assert np.array_equal(users["evaluation"], split_users(dataset, seed=config.seed)[0])
    row = script.grid(dataset, users["build"], (7.0, 70.0, 700.0, 7000.0), config.ease_lambdas)
    assert row["shipped_choice"] == built and set(row["scores"]) == {"7", "70", "700", "7000"}
    assert all(np.isfinite(v) for v in row["scores"].values())  # a real choice, not the all-NaN fallback
    assert script.grid(dataset, users["build"], (7.0, 70.0), ())["shipped_choice"] is None  # no shipped λ scored: no choice
    fixed = load_config("tiny", overrides={"cf_init": "onboarding", "ease_lambda": 33.0, "ease_lambdas": [7.0], **NO_TRAINING})
    assert build_model(dataset, fixed)[1]["collaborative_init"]["ease_lambda"] == 33.0  # a fixed λ wins over the grid


def test_choice_on_a_subgrid_is_what_ease_chooses_on_it(script):
    choose = EASEBaseline.choose  # what ease_grid.py reads a shipped grid's choice with
    dataset = eras()
    users = split_users(dataset)[0]
    wide = (10.0, 100.0, 1000.0, 10000.0)
    scores = EASEBaseline(lambdas=wide).fit(dataset, users).validation_scores
    for sub in [(10.0, 100.0), (1000.0, 10000.0), (10.0, 10000.0), (100.0,)]:
        assert choose(scores, sub) == EASEBaseline(lambdas=sub).fit(dataset, users).chosen_lam
        assert script.grid(dataset, users, wide, sub)["shipped_choice"] == choose(scores, sub)
    assert choose({1.0: 0.5, 2.0: 0.5, 3.0: 0.4}, (1.0, 2.0, 3.0)) == 2.0  # a tie goes to the larger λ
    assert choose({1.0: float("nan"), 2.0: float("nan")}, (1.0, 2.0)) == 2.0
    assert (script.edge(3.0, (1.0, 3.0)), script.edge(1.0, (1.0, 3.0)), script.edge(2.0, (1.0, 2.0, 3.0)), script.edge(1.0, (1.0,))) == ("top", "bottom", "", "")


def test_main_prints_both_fits_per_seed_and_writes_the_grids(script, tmp_path, capsys, monkeypatch):
    data = tmp_path / "ml-100k"
    data.mkdir()
    write_ml100k_like(load_sample(), data, users=80)
    out = tmp_path / "grid.json"
    monkeypatch.setattr(sys, "argv", ["ease_grid.py", "--data", str(data), "--preset", "tiny", "--seeds", "0,1", "--lambdas", "100,1000,3000", "--out", str(out)])
    script.main()
    printed = capsys.readouterr().out
    assert "leaves out" in printed and printed.count(" evaluation ") == 2 and printed.count(" build ") == 2
    saved = json.loads(out.read_text())
    assert set(saved) == {"0", "1"}
    for seed in saved.values():
        assert set(seed) == {"evaluation", "build"}
        assert seed["evaluation"]["shipped"] == [100.0, 1000.0, 3000.0] and seed["evaluation"]["shipped_choice"] == seed["evaluation"]["chosen"]
        assert seed["build"]["shipped"] == [100.0, 1000.0] and seed["build"]["shipped_choice"] in (100.0, 1000.0)
        assert set(seed["build"]["scores"]) == {"100", "1000", "3000"}


@pytest.mark.parametrize("argv", [["--seeds", "a"], ["--seeds", ","], ["--threads", "0"], ["--data", "/nonexistent/ml"], ["--lambdas", "x"], ["--lambdas", ","], ["--lambdas=-1"], ["--lambdas=nan"], ["--lambdas=inf"], ["--preset", "tyni"]])
def test_bad_arguments_end_in_one_line(script, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ease_grid.py", *argv])
    with pytest.raises(SystemExit) as exc:
        script.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("ease_grid.py: error: ")


def test_a_report_records_the_lambda_ease_chose_and_its_grid():
    from pmeta.eval.runner import markdown, run_movielens

    dataset = eras()
    report = run_movielens(dataset, None, ["popularity", "ease"], (1, 3), ("full",), options={"ease": {"lambdas": [5.0, 50.0, 5000.0]}}, resamples=50)
    tuned = report["config"]["tuned"]
    assert set(tuned) == {"ease"} and tuned["ease"]["lambda"] in (5.0, 50.0, 5000.0) and set(tuned["ease"]["scores"]) == {"5", "50", "5000"}
    assert tuned["ease"]["scores"][f"{tuned['ease']['lambda']:g}"] == max(tuned["ease"]["scores"].values())
    assert f"ease: λ = {tuned['ease']['lambda']:,g} (tuned over 5–5,000 by " in markdown(report)
    assert json.loads(json.dumps(report))["config"]["tuned"] == tuned  # as report.json keeps it


def test_a_grid_no_validation_user_could_score_is_named_in_the_report():
    from pmeta.eval.runner import markdown

    def report(tuned):
        return {"protocol": "coldstart-v1", "dataset": {"name": "x"}, "seed": 0, "config": {"tuned": {"ease": tuned}}, "results": []}

    nan = float("nan")
    assert "ease: λ = 5,000 (no validation user had a case to score the grid 5–5,000: its largest λ)." in markdown(report({"lambda": 5000.0, "validation": None, "scores": {"5": nan, "5000": nan}}))
    assert "ease: λ = 50 (its grid's only value)." in markdown(report({"lambda": 50.0, "validation": "pop99 K = 3 nDCG@10", "scores": {"50": 0.2}}))
    assert "ease: λ = 50 (fixed)." in markdown(report({"lambda": 50.0, "fixed": True}))


def test_tuned_says_when_no_validation_user_scored_the_grid():
    ease = EASEBaseline(lambdas=(5.0, 50.0))
    ease.validation_scores, ease.chosen_lam = {5.0: float("nan"), 50.0: float("nan")}, 50.0
    assert ease.tuned["validation"] is None and ease.tuned["lambda"] == 50.0
    ease.validation_scores[5.0] = 0.3
    assert ease.tuned["validation"] == "pop99 K = 3 nDCG@10" and set(ease.tuned["scores"]) == {"5", "50"}
    assert EASEBaseline(lam=7.0).tuned == {"lambda": 7.0, "fixed": True}

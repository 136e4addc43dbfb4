"""benchmarks/time_prior_grid.py, behind the README's pseudo-ratings choice: the script's grid is the
build's own (the same choice of h, β and m as build_model records), its per-m summary picks each m's
best point, and it runs end to end on a MovieLens directory."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pmeta.data import load_sample
from pmeta.data.types import Catalog, Dataset, Ratings
from pmeta.eval.synthetic import write_ml100k_like


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("time_prior_grid")


def eras(users: int = 90, n_items: int = 120) -> Dataset:
    """Users in three eras a year apart, each liking its era's third of the catalogue most."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(users):
        era = u % 3
        liked = rng.choice(np.arange(40) + 40 * era, size=18, replace=False)
        other = rng.choice(n_items, size=6, replace=False)
        for n, item in enumerate(np.concatenate([liked, other])):
            rows.append((u, int(item), 5.0 if n < 18 else 2.0, 1_000_000 + era * 365 * 86_400 + u * 3_600 + n * 60))
    catalog = Catalog([str(i) for i in range(n_items)], [f"Film {i} ({1980 + i % 30})" for i in range(n_items)], [["Drama"]] * n_items)
    ratings = Ratings(
        user=np.array([r[0] for r in rows], dtype=np.int64), item=np.array([r[1] for r in rows], dtype=np.int64),
        rating=np.array([r[2] for r in rows], dtype=np.float32), timestamp=np.array([r[3] for r in rows], dtype=np.int64),
        user_ids=[str(u) for u in range(users)],
    )  # fmt: skip
    return Dataset("eras", "test", catalog, ratings, "0" * 64)


def test_the_grid_is_the_builds_own(script):
    from pmeta import load_config
    from pmeta.bank.build import build_model

    dataset = eras()
    config = load_config("tiny", overrides={"cf_init": "onboarding", "time_prior_pseudo_ratings": [0, 30, 3000], "tower_steps": 0, "global_steps": 0, "anchor_steps": 0, "stack_steps": 0})
    got = script.grid(dataset, config)
    _, record = build_model(dataset, config)
    built = record["collaborative_init"]["time_prior"]
    assert (got["bandwidth_days"], got["weight"], got["pseudo_ratings"]) == (built["bandwidth_days"], built["weight"], built["pseudo_ratings"])
    assert got["validation_ndcg"] == built["validation_ndcg"]
    assert {key.split(",m=")[1] for key in got["validation_ndcg"] if ",m=" in key} == {"30", "3000"}
    best = script.best_per_m(got["validation_ndcg"])
    assert set(best) == {0.0, 30.0, 3000.0}
    top = max(value["mean"] for _, value in best.values())
    assert best[got["pseudo_ratings"]][1]["mean"] == top


def test_best_per_m_counts_the_point_without_a_prior_for_every_m(script):
    scores = {
        "h=0d,beta=0": {"mean": 0.30}, "h=60d,beta=1": {"mean": 0.35}, "h=180d,beta=1": {"mean": 0.33},
        "h=60d,beta=1,m=30": {"mean": 0.36}, "h=60d,beta=1,m=300": {"mean": 0.20}, "h=180d,beta=2,m=300": {"mean": 0.25},
    }  # fmt: skip
    best = script.best_per_m(scores)
    assert best == {0.0: ("h=60d,beta=1", {"mean": 0.35}), 30.0: ("h=60d,beta=1,m=30", {"mean": 0.36}), 300.0: ("h=0d,beta=0", {"mean": 0.30})}


def test_main_prints_each_seeds_choice_and_writes_the_grid(script, tmp_path, capsys, monkeypatch):
    data = tmp_path / "ml-100k"
    data.mkdir()
    write_ml100k_like(load_sample(), data, users=80)
    out = tmp_path / "grid.json"
    monkeypatch.setattr(sys, "argv", ["time_prior_grid.py", "--data", str(data), "--preset", "tiny", "--seeds", "0,1", "--pseudo-ratings", "0,300", "--out", str(out)])
    script.main()
    printed = capsys.readouterr().out
    assert printed.count("chosen h = ") == 2 and "m = 300: best" in printed and "m = 0: best" in printed
    saved = json.loads(out.read_text())
    assert set(saved) == {"0", "1"} and all(row["pseudo_ratings"] in (0.0, 300.0) for row in saved.values())


@pytest.mark.parametrize("argv", [["--seeds", "a"], ["--pseudo-ratings", "x"], ["--pseudo-ratings", ","], ["--pseudo-ratings=-1"], ["--pseudo-ratings=nan"], ["--preset", "tyni"]])
def test_bad_arguments_end_in_one_line(script, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["time_prior_grid.py", *argv])
    with pytest.raises(SystemExit) as exc:
        script.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("time_prior_grid.py: error: ")

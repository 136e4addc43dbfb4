"""The time prior's validation grid as a build sees it: h, β and the pseudo-ratings m.

    python benchmarks/time_prior_grid.py [--data DIR] [--format auto] [--preset small] [--seeds 0,1,2]
                                         [--pseudo-ratings 0,30,300,3000] [--threads 1] [--out grid.json]

A build with ``cf_init = "onboarding"`` chooses the time prior's bandwidth h and weight β (and m
among ``time_prior_pseudo_ratings``) on EASE's own validation split of the train users
(:func:`pmeta.bank.build.choose_time_prior`), by nDCG@10 averaged over K = 1, 3, 5 and the
protocol's three candidate modes. This script runs that step alone for each ``--seed`` (the build's
user split, EASE's λ and the onboarding fit as the build makes them, no meta-training) with
``--pseudo-ratings`` as the candidates, and prints what it chooses and, for each m, the best (h, β)
with its nDCG@10 per mode: whether the source's own validation users ask for pseudo-ratings at all.
No test user is read. It changes nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pmeta.bank import build
from pmeta.config import load_config
from pmeta.data.movielens import read_movielens
from pmeta.data.sample import load_sample
from pmeta.errors import InvalidConfig


def grid(dataset, config) -> dict:
    """The choice (h, β, m) and the whole grid of ``config``'s time prior on ``dataset``, as
    :func:`pmeta.bank.build.collaborative_init` makes it; raises SystemExit without validation cases."""
    positives, rated = dataset.positives_by_user(), dataset.rated_by_user()
    train_users, _, _ = build.user_split(dataset, config)
    train_users = build.with_positives(train_users, positives, config.min_positives)
    ease = build.init_ease(dataset, config, train_users)
    split = build.fit_onboarding(dataset, config, ease, train_users, positives, rated)
    cases, base = split.validation_scorer(dataset, positives)
    if base is None:
        raise SystemExit("no validation user of EASE's split has 6 positives: nothing to score")
    h, beta, m, scores = build.choose_time_prior(dataset, config, split.fit_users, cases, base)
    return {"bandwidth_days": h, "weight": list(beta) if isinstance(beta, tuple) else beta, "pseudo_ratings": m, "validation_users": len(cases), "validation_ndcg": scores}


def best_per_m(scores: dict[str, dict[str, float]]) -> dict[float, tuple[str, dict[str, float]]]:
    """For each m in the grid's keys (no ``m=`` part: 0), its best point (key, scores) by mean; the
    point without a prior (β = 0) counts for every m."""
    points: dict[float, list[tuple[str, dict[str, float]]]] = {}
    for key, value in scores.items():
        m = float(key.split(",m=")[1]) if ",m=" in key else 0.0
        points.setdefault(m, []).append((key, value))
    off = [(key, value) for key, value in scores.items() if key.endswith("beta=0")]
    return {m: max(rows + off, key=lambda row: row[1]["mean"]) for m, rows in sorted(points.items())}


def number_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a MovieLens directory (default: the shipped sample)")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seeds", default="0", help="comma-separated build seeds (each its own user split)")
    parser.add_argument("--pseudo-ratings", type=number_list, default=(0.0, 30.0, 300.0, 3000.0))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write every seed's whole grid here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    try:
        configs = {seed: load_config(args.preset, overrides={"seed": seed, "cf_init": "onboarding", "time_prior_pseudo_ratings": list(args.pseudo_ratings)}) for seed in seeds}
    except InvalidConfig as error:
        parser.error(str(error))
    dataset = read_movielens(args.data, args.format) if args.data else load_sample()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": args.threads, "data": dataset.name, "preset": args.preset}))
    results = {}
    for seed in seeds:
        config = configs[seed]
        started = time.perf_counter()
        result = grid(dataset, config)
        results[seed] = result
        print(f"seed {seed}: chosen h = {result['bandwidth_days']:g} days, beta = {' / '.join(f'{w:g}' for w in result['weight']) if isinstance(result['weight'], list) else format(result['weight'], 'g')}, m = {result['pseudo_ratings']:g} ({result['validation_users']} validation users, {time.perf_counter() - started:.0f} s)")
        for m, (key, value) in best_per_m(result["validation_ndcg"]).items():
            print(f"  m = {m:g}: best {key}, nDCG@10 mean {value['mean']:.4f} (" + ", ".join(f"{mode} {v:.4f}" for mode, v in value.items() if mode not in ("mean", "by_k")) + ")")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

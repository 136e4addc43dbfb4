"""EASE's λ grid as the evaluation and a build see it: the validation score of every λ, per seed.

    python benchmarks/ease_grid.py [--data DIR] [--format auto] [--preset small] [--seeds 0,1,2]
                                   [--lambdas 50,100,...] [--threads 1] [--out grid.json]

EASE (:class:`pmeta.eval.baselines.EASEBaseline`) tunes λ on its own split of the train users by
pop99 K = 3 nDCG@10 (full ranking on a catalogue too small for pop99). It is fitted twice per seed
of a MovieLens study, on two different sets of train users and over two grids: by ``pmeta eval
movielens`` as the ``ease`` baseline (every train user of the protocol's split; the grid
``EASE_LAMBDAS``) and by ``pmeta bank build`` inside the collaborative init (the build's train
users: the protocol's train users less the bank's early-stopping users and those with too few
positives; the grid ``ease_lambdas`` of ``--preset``). For each ``--seed`` this script scores every
λ of ``--lambdas`` (default: the union of both grids) on both and prints the scores, what each
shipped grid chooses from them (EASE's own rule) and whether that choice is on its grid's edge.
No test user is read; it changes nothing. It is the check behind the grids' reach (docs/movielens.md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pmeta.bank import build
from pmeta.config import load_config
from pmeta.data.movielens import read_movielens
from pmeta.data.sample import load_sample
from pmeta.errors import InvalidConfig, PmetaError
from pmeta.eval.baselines import EASE_LAMBDAS, EASEBaseline
from pmeta.eval.protocol import split_users


def train_user_sets(dataset, config) -> dict[str, np.ndarray]:
    """The two sets of train users EASE is fitted on for ``config.seed``: the evaluation's and the build's."""
    evaluation, _ = split_users(dataset, seed=config.seed, test_fraction=config.test_fraction)
    train_users, _, _ = build.user_split(dataset, config)
    return {"evaluation": evaluation, "build": build.with_positives(train_users, dataset.positives_by_user(), config.min_positives)}


def grid(dataset, users: np.ndarray, lambdas: tuple[float, ...], shipped: tuple[float, ...]) -> dict:
    """EASE's validation score per λ of ``lambdas`` on ``users``, its choice on that grid and on
    ``shipped`` (the λ of the grid this fit uses by default that ``lambdas`` holds; none: no choice)."""
    ease = EASEBaseline(lambdas=lambdas).fit(dataset, users)
    scores = ease.validation_scores
    return {
        "chosen": ease.chosen_lam,
        "shipped": list(shipped),
        "shipped_choice": EASEBaseline.choose(scores, shipped) if shipped else None,
        "mode": ease.validation_mode,
        "scores": {f"{lam:.12g}": scores[lam] for lam in lambdas},
    }


def edge(chosen: float, lambdas: tuple[float, ...]) -> str:
    """``"top"`` / ``"bottom"`` when ``chosen`` is the grid's largest / smallest λ (a grid of one: ``""``)."""
    if len(lambdas) < 2:
        return ""
    return "top" if chosen == max(lambdas) else "bottom" if chosen == min(lambdas) else ""


def number_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(x) and x > 0 for x in values):
        raise argparse.ArgumentTypeError("expected at least one number, all positive and finite")
    return tuple(sorted(set(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a MovieLens directory (default: the shipped sample)")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--preset", default="small", help="the build's preset (its early-stopping share and minimum positives)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (each its own user split)")
    parser.add_argument("--lambdas", type=number_list, help="the λ to score (default: the baseline's and the preset's grids together)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write every seed's grids here (JSON)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads: expected a positive integer")
    torch.set_num_threads(args.threads)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds: expected at least one seed")
    try:
        configs = {seed: load_config(args.preset, overrides={"seed": seed}) for seed in seeds}
    except InvalidConfig as error:
        parser.error(str(error))
    try:
        run(args, seeds, configs)
    except PmetaError as error:  # unreadable data, a λ too small for the item-item matrix
        parser.error(str(error))


def run(args: argparse.Namespace, seeds: list[int], configs: dict) -> None:
    """Score both fits of every seed and print (and with ``--out`` write) them."""
    shipped = {"evaluation": EASE_LAMBDAS, "build": configs[seeds[0]].ease_lambdas}
    lambdas = args.lambdas or tuple(sorted(set(shipped["evaluation"]) | set(shipped["build"])))
    missing = sorted((set(shipped["evaluation"]) | set(shipped["build"])) - set(lambdas))
    dataset = read_movielens(args.data, args.format) if args.data else load_sample()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads, "data": dataset.name, "preset": args.preset, "lambdas": list(lambdas), "shipped": {k: list(v) for k, v in shipped.items()}}))
    if missing:
        print(f"(--lambdas leaves out {', '.join(f'{x:g}' for x in missing)} of the shipped grids: their choices below are on the λ scored)")
    print("seed  fitted for  shipped grid's choice  best scored  " + "  ".join(f"{lam:>8g}" for lam in lambdas))
    results: dict[int, dict] = {}
    for seed in seeds:
        results[seed] = {}
        for name, users in train_user_sets(dataset, configs[seed]).items():
            started = time.perf_counter()
            grid_of_name = tuple(lam for lam in shipped[name] if lam in lambdas)
            row = results[seed][name] = grid(dataset, users, lambdas, grid_of_name)
            where = edge(row["shipped_choice"], grid_of_name) if grid_of_name else ""
            shipped_choice = "—" if row["shipped_choice"] is None else f"{row['shipped_choice']:g}"
            scores = "  ".join(f"{v:8.4f}" for v in row["scores"].values())
            print(
                f"{seed:>4}  {name:<10}  {shipped_choice:>8}{' (' + where + ' edge)' if where else '':<13}  {row['chosen']:>11g}  {scores}  ({row['mode']}, {time.perf_counter() - started:.0f} s)"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""One time-prior weight β for every history size against one per size, on the build's validation users only.

    python benchmarks/prior_by_size.py [--data DIR] [--format auto] [--preset small] [--seeds 0,1,2]
                                       [--threads 1] [--out result.json]

For each ``--seed``: the build's user split, EASE's λ and the onboarding fit as a build makes them
(:func:`pmeta.bank.build.fit_onboarding`; no meta-training), then EASE's validation users are cut in
two seeded halves. On each half the time prior is chosen both ways (:func:`pmeta.tasks.time_prior.choose`
on K = 1 … 5: one β, or β_1 ≥ … ≥ β_5 with ``per_size``; h and β over the default grids, m = 0) and
scored on the *other* half: HR@10 / nDCG@10 of the onboarding model plus the prior per K and mode.
Each validation user is scored once, by choices made without them, so the in-sample advantage a
finer choice always has on the users it is chosen on is left out. No test user is read; nothing
is changed. Prints each seed's choices and the table, and the mean over the seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pmeta.bank import build
from pmeta.config import load_config
from pmeta.data.movielens import read_movielens
from pmeta.data.sample import load_sample
from pmeta.errors import InvalidConfig
from pmeta.eval.protocol import QUERY_START, draw_candidates, drawable_modes, metrics_from_ranks, rank_positives
from pmeta.tasks import time_prior

KS = tuple(range(1, QUERY_START + 1))
WAYS = ("one", "per-size")


def scored(base, cases: list, events, n_items: int, h: float, beta, candidates, modes) -> dict[str, dict[str, list[float]]]:
    """Per-user HR@10 / nDCG@10 of ``base + β_K · prior(t)`` for each K of :data:`KS` and mode:
    ``{"K=k mode": {"hr@10": [...], "ndcg@10": [...]}}``."""
    prior = None if time_prior.weights_off(beta) else time_prior.build(events[0], events[1], n_items, h)
    betas = torch.tensor(beta, dtype=torch.float64)
    out: dict[str, dict[str, list[float]]] = {}
    for k in KS:
        rows = list(time_prior.supports(cases, (k,)))
        weight = float(time_prior.weight_of(betas, [k])[0])
        priors = time_prior.log_prior_at(prior, np.array([t for _, _, t, _ in rows])).numpy().astype(np.float64) if prior is not None else None
        for i, (user, support, _, query) in enumerate(rows):
            scores = base(support) + (weight * priors[i] if priors is not None else 0.0)
            for mode in modes:
                metrics = metrics_from_ranks(rank_positives(scores, query, candidates[(user, mode)]))
                cell = out.setdefault(f"K={k} {mode}", {"hr@10": [], "ndcg@10": []})
                cell["hr@10"].append(metrics["hr@10"])
                cell["ndcg@10"].append(metrics["ndcg@10"])
    return out


def two_fold(dataset, config) -> dict:
    """Both ways' choices on each half and their metrics on the other half (see the module doc)."""
    positives, rated = dataset.positives_by_user(), dataset.rated_by_user()
    train_users, _, _ = build.user_split(dataset, config)
    train_users = build.with_positives(train_users, positives, config.min_positives)
    ease = build.init_ease(dataset, config, train_users)
    split = build.fit_onboarding(dataset, config, ease, train_users, positives, rated)
    cases, base = split.validation_scorer(dataset, positives)
    if base is None or len(cases) < 4:
        raise SystemExit("fewer than 4 validation users of EASE's split have 6 positives: nothing to compare")
    events = time_prior.rating_events(dataset, split.fit_users)
    n_items = len(dataset.catalog)
    popularity = np.bincount(np.asarray(events[0], dtype=np.int64), minlength=n_items).astype(np.float64)
    modes = drawable_modes([case for case, _ in cases], time_prior.MODES, popularity)
    candidates = draw_candidates([case for case, _ in cases], modes, popularity, 0)
    order = np.random.default_rng(config.seed + 54).permutation(len(cases))
    halves = [[cases[i] for i in sorted(order[: len(cases) // 2])], [cases[i] for i in sorted(order[len(cases) // 2 :])]]
    result = {"validation_users": len(cases), "choices": {way: [] for way in WAYS}, "cells": {way: {} for way in WAYS}}
    for half in (0, 1):
        chosen_on, scored_on = halves[half], halves[1 - half]
        for way in WAYS:
            h, beta, _, _ = time_prior.choose(base, chosen_on, events, n_items, ks=KS, modes=modes, per_size=way == "per-size")
            result["choices"][way].append({"bandwidth_days": h, "weight": list(beta) if isinstance(beta, tuple) else beta})
            for cell, values in scored(base, scored_on, events, n_items, h, beta, candidates, modes).items():
                target = result["cells"][way].setdefault(cell, {"hr@10": [], "ndcg@10": []})
                for metric, v in values.items():
                    target[metric].extend(v)
    result["cells"] = {way: {cell: {m: float(np.mean(v)) for m, v in values.items()} for cell, values in cells.items()} for way, cells in result["cells"].items()}
    result["criterion"] = {way: float(np.mean([values["ndcg@10"] for values in cells.values()])) for way, cells in result["cells"].items()}
    return result


def table(cells: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| K | mode | one β: HR@10 / nDCG@10 | β per size: HR@10 / nDCG@10 | per size − one (nDCG@10) |", "|---|---|---|---|---|"]
    for cell in cells["one"]:
        k, mode = cell.split()
        one, sized = cells["one"][cell], cells["per-size"][cell]
        lines.append(f"| {k[2:]} | {mode} | {one['hr@10']:.4f} / {one['ndcg@10']:.4f} | {sized['hr@10']:.4f} / {sized['ndcg@10']:.4f} | {sized['ndcg@10'] - one['ndcg@10']:+.4f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a MovieLens directory (default: the shipped sample)")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seeds", default="0", help="comma-separated build seeds (each its own user split)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write every seed's choices and cells here (JSON)")
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
        configs = {seed: load_config(args.preset, overrides={"seed": seed, "cf_init": "onboarding"}) for seed in seeds}
    except InvalidConfig as error:
        parser.error(str(error))
    dataset = read_movielens(args.data, args.format) if args.data else load_sample()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": args.threads, "data": dataset.name, "preset": args.preset}))
    results = {}
    for seed in seeds:
        started = time.perf_counter()
        result = results[seed] = two_fold(dataset, configs[seed])
        print(f"\nseed {seed}: {result['validation_users']} validation users, {time.perf_counter() - started:.0f} s")
        for way in WAYS:
            print(f"  {way}: " + "; ".join(f"h = {c['bandwidth_days']:g}, β = {c['weight'] if not isinstance(c['weight'], list) else ' / '.join(f'{w:g}' for w in c['weight'])}" for c in result["choices"][way]) + f" (half 1; half 2); mean nDCG@10 on the other half {result['criterion'][way]:.4f}")
        print("\n".join(table(result["cells"])))
    if len(seeds) > 1:
        mean = {way: {cell: {m: float(np.mean([r["cells"][way][cell][m] for r in results.values()])) for m in ("hr@10", "ndcg@10")} for cell in results[seeds[0]]["cells"][way]} for way in WAYS}
        print(f"\nmean over seeds {', '.join(map(str, seeds))}:")
        print("\n".join(table(mean)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""The time-prior weight β read on the model a bank serves, on the bank's validation users only.

    python benchmarks/served_prior.py --bank BANK [--data DIR] [--format auto] [--weights 0,0.5,1,2,3,5]
                                      [--against OTHER_BANK] [--users N] [--threads 1] [--out result.json]

A build chooses β (:func:`pmeta.tasks.time_prior.choose`) on the closed-form onboarding model plus
the prior, before meta-training, on EASE's split of the train users. This script reads what β does
to the model the bank actually serves (meta-trained towers and anchors, the anchors' item bias,
inner steps): for each β of ``--weights`` the head's weight is set to β for every history size and
pmeta is evaluated under coldstart-v1 (K = 1, 3, 5; uni99, pop99, full) on the bank's *validation*
users (``validation_users`` of its build record: held out from training, read only by its early
stopping; never its test users). The bank's own β is scored too.

It prints HR@10 / nDCG@10 per β, K and mode, the β each K prefers (nDCG@10 averaged over the modes),
and a two-fold check: the validation users are cut in two seeded halves, β is chosen per K on one
half and scored on the other, against the bank's own β on the same users, so that a choice is
never credited with the users it was made on. At K = k only β for a history of k liked items
matters, so a per-K choice is what a per-size weight could reach.

``--against OTHER_BANK`` also scores another bank built on the same data with the same seed (so the
same validation users; a changed build setting, say) as it serves, and prints its differences from
this bank user by user: what the other bank would change, read before any test user is. ``--out``
keeps every per-user metric. It reads the banks and the data; it changes nothing.
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

from pmeta.bank.bank import Bank
from pmeta.bank.calibrate import with_weight
from pmeta.bank.model import PmetaModel
from pmeta.data import load_sample
from pmeta.data.movielens import LAYOUTS as FORMATS, read_movielens
from pmeta.errors import PmetaError
from pmeta.eval.neural import PmetaMAML
from pmeta.eval.protocol import MIN_POSITIVES, drawable_modes, evaluate, item_rating_counts, make_cases
from pmeta.tasks import time_prior

KS = (1, 3, 5)
METRICS = ("hr@10", "ndcg@10")
BANK = "bank"  # the row of the bank's own β


def validation_users(bank: Bank, dataset) -> np.ndarray:
    """The dense indexes of the bank's validation users with a coldstart-v1 case (>= 6 positives) in
    ``dataset``, which must be the bank's data."""
    if bank.catalog.item_ids != dataset.catalog.item_ids or bank.record.get("dataset_fingerprint") != dataset.fingerprint:
        raise SystemExit("error: --data is not the data this bank was built on (its catalogue or fingerprint differs)")
    ids = bank.build_record.get("validation_users") or []
    index = {user: row for row, user in enumerate(dataset.ratings.user_ids)}
    users = np.array([case.user for case in make_cases(dataset, sorted(index[u] for u in ids if u in index), max(KS))], dtype=np.int64)
    if len(users) < 2:
        raise SystemExit(f"error: the bank has fewer than 2 validation users with >= {MIN_POSITIVES} positive ratings")
    return users


def score_grid(model: PmetaModel, dataset, users: np.ndarray, weights: list[float], modes: tuple[str, ...], seed: int) -> dict[str, dict]:
    """``{setting: {"K=k mode": {"user": [...], "hr@10": [...], "ndcg@10": [...]}}}`` for each β of
    ``weights`` (settings ``"β=…"``) and the bank's own weight (``"bank"``)."""
    own = model.t.head["time_weight"]
    settings = {f"β={w:g}": w for w in weights}
    if own.ndim == 0 and float(own) in weights:
        settings[BANK] = settings[f"β={float(own):g}"]
    else:
        settings[BANK] = own.tolist()
    out, done = {}, {}
    for name, weight in settings.items():
        key = json.dumps(weight)
        if key not in done:
            done[key] = served(with_weight(model, weight), dataset, users, modes, seed)
        out[name] = done[key]
    return out


def served(model: PmetaModel, dataset, users: np.ndarray, modes: tuple[str, ...], seed: int) -> dict[str, dict]:
    """pmeta as ``model`` serves, under coldstart-v1 on ``users``: ``{"K=k mode": {"user", "hr@10", "ndcg@10"}}``."""
    cells: dict = {}
    evaluate(PmetaMAML(model), dataset, users, ks=KS, modes=modes, seed=seed, per_user=cells)
    return {f"K={k} {mode}": {"user": cell["user"].tolist(), **{m: cell[m].tolist() for m in METRICS}} for (k, mode), cell in cells.items()}


def preferred(grid: dict[str, dict], rows: np.ndarray, modes: tuple[str, ...], k: int) -> str:
    """The grid setting with the highest nDCG@10 at K = ``k`` averaged over ``modes`` on users at ``rows``;
    a tie keeps the bank's own β (a change must be strictly better)."""
    def value(name: str) -> float:
        return float(np.mean([np.mean(np.asarray(grid[name][f"K={k} {mode}"]["ndcg@10"])[rows]) for mode in modes]))

    best = BANK
    for name in grid:
        if name != BANK and value(name) > value(best) + 1e-12:
            best = name
    return best


def two_fold(grid: dict[str, dict], modes: tuple[str, ...], seed: int) -> dict:
    """β chosen per K on one seeded half of the users and scored on the other, minus the bank's β on
    the same users: per-user differences for every K and mode, and the choices made on each half."""
    n = len(grid[BANK][f"K={KS[0]} {modes[0]}"]["user"])
    order = np.random.default_rng(seed).permutation(n)
    halves = (np.sort(order[: n // 2]), np.sort(order[n // 2 :]))
    chosen = {}
    diffs = {f"K={k} {mode}": {m: np.zeros(n) for m in METRICS} for k in KS for mode in modes}
    for fold, (fit, score) in enumerate((halves, halves[::-1])):
        for k in KS:
            name = preferred(grid, fit, modes, k)
            chosen[f"fold {fold} K={k}"] = name
            for mode in modes:
                cell = f"K={k} {mode}"
                for m in METRICS:
                    diffs[cell][m][score] = np.asarray(grid[name][cell][m])[score] - np.asarray(grid[BANK][cell][m])[score]
    return {"chosen": chosen, "difference": {cell: {m: v.tolist() for m, v in d.items()} for cell, d in diffs.items()}}


def same_validation_users(bank: Bank, other: Bank) -> None:
    """Refuse ``other`` unless it was built on the same data with the same validation users."""
    if other.catalog.item_ids != bank.catalog.item_ids or other.record.get("dataset_fingerprint") != bank.record.get("dataset_fingerprint"):
        raise SystemExit("error: --against is a bank of other data than --bank's")
    if other.build_record.get("validation_users") != bank.build_record.get("validation_users"):
        raise SystemExit("error: --against has other validation users than --bank (build it with the same seed and fractions)")


def differences(row: dict, other: dict, modes: tuple[str, ...]) -> list[str]:
    """Markdown rows: ``other`` minus ``row`` (two settings' cells on the same users), mean ± s.e."""
    cells = [f"K={k} {mode}" for mode in modes for k in KS]
    lines = ["| | " + " | ".join(cells) + " | mean |", "|---|" + "---|" * (len(cells) + 1)]
    for m in METRICS:
        per = []
        for c in cells:
            if other[c]["user"] != row[c]["user"]:
                raise ValueError(f"{c}: the two settings were scored on different users")
            per.append(np.asarray(other[c][m]) - np.asarray(row[c][m]))
        lines.append(f"| {m} | " + " | ".join(_mean_se(v) for v in per) + f" | {_mean_se(np.mean(per, axis=0))} |")
    return lines


def _mean_se(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():+.4f} ± {values.std(ddof=1) / math.sqrt(len(values)):.4f}"


def report(grid: dict[str, dict], folds: dict, modes: tuple[str, ...]) -> list[str]:
    """The printed tables (markdown)."""
    cells = [f"K={k} {mode}" for mode in modes for k in KS]
    lines = ["| β | " + " | ".join(cells) + " | nDCG@10, mean |", "|---|" + "---|" * (len(cells) + 1)]
    for name, result in grid.items():
        means = {cell: [float(np.mean(result[cell][m])) for m in METRICS] for cell in cells}
        lines.append(f"| {name} | " + " | ".join(f"{means[c][0]:.3f} / {means[c][1]:.4f}" for c in cells) + f" | {np.mean([means[c][1] for c in cells]):.4f} |")
    every = np.arange(len(grid[BANK][cells[0]]["user"]))
    lines += ["", "Preferred on all validation users (nDCG@10 over the modes): " + ", ".join(f"K={k}: {preferred(grid, every, modes, k)}" for k in KS)]
    lines += ["", "Two-fold (chosen per K on one half, scored on the other) minus the bank's β, mean ± s.e. over users:", ""]
    lines += ["| | " + " | ".join(cells) + " | mean |", "|---|" + "---|" * (len(cells) + 1)]
    for m in METRICS:
        per = [folds["difference"][c][m] for c in cells]
        lines.append(f"| {m} | " + " | ".join(_mean_se(v) for v in per) + f" | {_mean_se(np.mean(per, axis=0))} |")
    lines += ["", "Choices: " + ", ".join(f"{k}: {v}" for k, v in folds["chosen"].items())]
    return lines


def number_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError("weights must be finite numbers >= 0")
    values = sorted(set(values))
    if len({f"{v:g}" for v in values}) < len(values):  # each is a row named β=<value:g>
        raise argparse.ArgumentTypeError("weights must differ in their first 6 significant digits")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", required=True)
    parser.add_argument("--data", default=None, help="the MovieLens directory the bank was built on (default: the shipped sample)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    parser.add_argument("--weights", type=number_list, default=list(time_prior.WEIGHTS), help="the β grid (default: the build's)")
    parser.add_argument("--against", default=None, help="another bank of the same data and seed, scored as it serves and compared user by user")
    parser.add_argument("--users", type=int, default=None, help="score only the first N validation users (quick runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write every per-user metric here (JSON)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.users is not None and args.users < 2:
        parser.error("--threads must be a whole number >= 1, --users one >= 2")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        bank = Bank.open(args.bank)
        other = None if args.against is None else Bank.open(args.against)
        dataset = load_sample() if args.data is None else read_movielens(args.data, args.format)
    except PmetaError as error:  # a missing or damaged bank or dataset: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    if time_prior.kind_of(bank.model.t.head) is None:
        raise SystemExit("error: the bank has no time prior")
    if other is not None:
        same_validation_users(bank, other)
    users = validation_users(bank, dataset)[: args.users]
    seed = bank.config.seed
    modes = drawable_modes(make_cases(dataset, users, max(KS)), time_prior.MODES, item_rating_counts(dataset))
    grid = score_grid(bank.model, dataset, users, args.weights, modes, seed)
    folds = two_fold(grid, modes, seed)
    against = None
    if other is not None:
        weight = other.model.t.head.get("time_weight")
        against = {"bank": other.version, "bank_weight": None if weight is None else weight.tolist(), "scores": served(other.model, dataset, users, modes, seed)}
    n = len(grid[BANK][f"K={KS[0]} {modes[0]}"]["user"])
    own = bank.model.t.head["time_weight"]
    print(
        f"pmeta of {bank.record.get('dataset_name')} bank {bank.version} (seed {seed}, its β {own.tolist()}): {n} validation users; HR@10 / nDCG@10; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, {time.perf_counter() - started:.0f} s\n"
    )
    print("\n".join(report(grid, folds, modes)))
    if against is not None:
        print(f"\n--against bank {other.version} (its β {against['bank_weight']}) minus this bank, each as it serves, mean ± s.e. over users:\n")
        print("\n".join(differences(grid[BANK], against["scores"], modes)))
    if args.out:
        Path(args.out).write_text(json.dumps({"bank": bank.version, "seed": seed, "bank_weight": own.tolist(), "modes": list(modes), "grid": grid, "two_fold": folds, "against": against}))


if __name__ == "__main__":
    main()

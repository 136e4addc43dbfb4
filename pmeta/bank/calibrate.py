"""The time prior's weight per history size, chosen on the model a bank serves (``BankConfig.time_prior_weight_served``).

The build chooses one weight β of the time prior (:mod:`pmeta.tasks.time_prior`) on the closed-form
onboarding model, before meta-training. After meta-training this step reads β on what the bank
serves (towers, anchors, the anchors' item bias, inner steps): each validation user of the build
(held out from training; support = their first K positives, queries = positives 6..15, "now" =
the K-th positive's time, the protocol's candidates) is scored at every β of the grid for each
history size K = 1 … 5, by nDCG@10 averaged over the candidate modes; a user with K liked items is
served with β_K, so each size's choice reads only its own rows. The per-size weights
β_1 ≥ … ≥ β_5 (:func:`pmeta.tasks.time_prior._non_increasing`) replace the one β only when a
two-fold check on the same users gains clearly: chosen on one seeded half and scored on the other
(and the other way round), its per-user gain over the one β must exceed :data:`GUARD` standard
errors. A close relative of this check (``benchmarks/served_prior.py``: sizes 1, 3 and 5, each chosen
freely) passed the same guard on ml-1m's three seeds (~480 validation users) and on none of six
ml-100k / ml-latest-small banks (48–75 users), where a per-size choice mostly fits their noise; this
check itself adopted on ml-1m seeds 3 and 4 and kept the one β on ml-100k seeds 3 and 4 and
ml-latest-small seeds 10 and 11 (docs/movielens.md, stops 55 and 56).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from ..eval.protocol import MIN_POSITIVES, draw_candidates, drawable_modes, item_rating_counts, make_cases, metrics_from_ranks, rank_positives
from ..tasks import time_prior

#: History sizes a weight is chosen for (the protocol's support sizes; longer histories take β_5).
SIZES = (1, 2, 3, 4, 5)
#: The two-fold gain must exceed this many standard errors for the per-size weights to be adopted.
GUARD = 2.0


def with_weight(model, weight):
    """A copy of ``model`` (a PmetaModel) whose time prior has weight ``weight`` (one β or one per
    size); every other tensor is shared and ``model`` is untouched."""
    from .model import PmetaModel

    old = model.t.head["time_weight"]
    head = {**model.t.head, "time_weight": torch.as_tensor(weight, dtype=old.dtype, device=old.device)}
    return PmetaModel(model.config, model.encoder, model.item_texts, replace(model.t, head=head), index=model.index)


@torch.no_grad()
def served_ndcg(model, dataset, users, weights: list[float], seed: int, batch: int = 32) -> np.ndarray:
    """nDCG@10 (weights, sizes, users) of ``users`` (those with a coldstart-v1 case) served by
    ``model`` with each β of ``weights``, averaged over the candidate modes they can draw."""
    from ..eval.neural import support_input

    cases = make_cases(dataset, users, max(SIZES))
    popularity = item_rating_counts(dataset)
    modes = drawable_modes(cases, time_prior.MODES, popularity)
    candidates = draw_candidates(cases, modes, popularity, seed)
    out = np.zeros((len(weights), len(SIZES), len(cases)))
    by_size = [make_cases(dataset, [c.user for c in cases], k) for k in SIZES]
    for w, weight in enumerate(weights):
        served = with_weight(model, float(weight))
        for s, rows in enumerate(by_size):
            for start in range(0, len(rows), batch):
                chunk = rows[start : start + batch]
                personal, user_batch, _ = served.personalize([support_input(served, c.support, c.support_time) for c in chunk])
                scores = served.final_scores(user_batch, personal).cpu().numpy()
                for i, case in enumerate(chunk):
                    out[w, s, start + i] = np.mean([metrics_from_ranks(rank_positives(scores[i], case.query, candidates[(case.user, mode)]))["ndcg@10"] for mode in modes])
    return out


def per_size_choice(ndcg: np.ndarray, weights: list[float], rows) -> list[float]:
    """β_1 ≥ … ≥ β_5 maximising the mean nDCG@10 of the users at ``rows`` (ties: the smaller β)."""
    table = [[float(ndcg[w, s, rows].mean()) for w in range(len(weights))] for s in range(len(SIZES))]
    return time_prior._non_increasing(table, list(weights))[0]


def gain(ndcg: np.ndarray, weights: list[float], choice: list[float], one: float, rows) -> np.ndarray:
    """Per user at ``rows``: the mean over sizes of nDCG@10 at ``choice`` minus at the one β."""
    index = {w: j for j, w in enumerate(weights)}
    return np.mean([ndcg[index[b], s, rows] - ndcg[index[one], s, rows] for s, b in enumerate(choice)], axis=0)


def two_fold(ndcg: np.ndarray, weights: list[float], one: float, seed: int) -> dict:
    """The per-size choice made on one seeded half of the users and scored on the other, both ways:
    the mean per-user gain over the one β, its standard error and the two halves' choices."""
    n = ndcg.shape[2]
    order = np.random.default_rng(seed).permutation(n)
    halves = (np.sort(order[: n // 2]), np.sort(order[n // 2 :]))
    gains, choices = np.zeros(n), []
    for fit, scored in (halves, halves[::-1]):
        choice = per_size_choice(ndcg, weights, fit)
        choices.append(choice)
        gains[scored] = gain(ndcg, weights, choice, one, scored)
    se = float(gains.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    return {"gain": float(gains.mean()), "se": se, "choices": choices}


def choose_served(model, dataset, users, seed: int, weights=None) -> tuple[list[float] | None, dict]:
    """(β per size to serve, or None to keep the bank's one β; the record of the choice). ``weights``:
    the grid (default: the build's, :data:`pmeta.tasks.time_prior.WEIGHTS`), the bank's β always in it.

    Skipped (None) when the model has no time prior or one per size already, or when fewer than 4
    of ``users`` have the protocol's :data:`MIN_POSITIVES` positives."""
    head = model.t.head
    if time_prior.kind_of(head) is None or head["time_weight"].ndim:
        return None, {"skipped": "the bank has no time prior, or one weight per size already"}
    one = float(head["time_weight"])
    grid = sorted({*map(float, time_prior.WEIGHTS if weights is None else weights), one})  # the build's grid and the bank's β
    n = len(make_cases(dataset, users, max(SIZES)))
    if n < 4:
        return None, {"skipped": f"{n} validation users with >= {MIN_POSITIVES} positives; 4 are needed"}
    ndcg = served_ndcg(model, dataset, users, grid, seed)
    check = two_fold(ndcg, grid, one, seed)
    chosen = per_size_choice(ndcg, grid, np.arange(n))
    adopted = check["gain"] > GUARD * check["se"] and any(b != one for b in chosen)
    record = {
        "weights": grid, "one_weight": one, "users": n, "two_fold": check, "chosen": chosen, "guard": GUARD, "adopted": bool(adopted),
        "validation_ndcg": {"one": float(ndcg[grid.index(one)].mean()), "chosen": float(np.mean([ndcg[grid.index(b), s].mean() for s, b in enumerate(chosen)]))},
    }
    return (chosen if adopted else None), record


def describe(record: dict) -> str:
    """One line for the build's output: what :func:`choose_served` did (``record``: its record, as
    kept in the build record's ``validation.time_prior_served``)."""
    if "skipped" in record:
        return f"time-prior weight on the served model: not read ({record['skipped']})"
    one, chosen, check = record["one_weight"], record["chosen"], record["two_fold"]
    per_size = " / ".join(f"{b:g}" for b in chosen)
    measured = f"two-fold gain {check['gain']:+.4f} ± {check['se']:.4f} nDCG@10 on {record['users']} validation users"
    if record["adopted"]:
        if len(set(chosen)) == 1:  # stored as one number, or as no prior (time_prior.head_entries)
            served = "no time prior" if chosen[0] == 0 else f"β = {chosen[0]:g} for every history size"
        else:
            served = f"β {per_size} for histories of 1 … {len(chosen)} items (longer ones: β_{len(chosen)})"
        return f"time-prior weight on the served model: {served} replaces β = {one:g} ({measured}, above the {record['guard']:g}-s.e. guard)"
    if all(b == one for b in chosen):
        return f"time-prior weight on the served model: β = {one:g} kept (the bank's β is the choice at every history size)"
    return f"time-prior weight on the served model: β = {one:g} kept (per size {per_size}: {measured}, not above the {record['guard']:g}-s.e. guard)"

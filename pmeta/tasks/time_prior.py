"""The time prior: what the bank's train users rated around the time of a user's history.

A new user's first interactions say *when* they arrive, and what is watched (or bought) changes
with time: a user who signs up in 1996 is offered, and rates, other films than one who signs up
in 2016. The prior is an item score that depends only on that time:

    prior_i(t) = log( (1 − μ) · p_i(t) + μ · p_i + ε ),   p_i(t) ∝ Σ_{ratings (j, i, τ), τ ≤ t} exp(−(t − τ)² / 2h²)

over the ratings of the bank's train users (at any rating) made *at or before* t, with ``p_i`` the
item's share of all those ratings (μ = :data:`GLOBAL_MIX` keeps items rated at other times
possible; an all-time count, like every classical baseline's). The ranking score adds
``β · prior(t)`` (``head/time_weight``). The bandwidth h and β are chosen on validation users held
out of the train users (:func:`choose`, β = 0 switches it off), never on test users.

The prior is *causal*: a user at time t is scored with what was rated up to t, as a deployed bank
serving them at t would have had. (Before stop 47 the kernel was two-sided, so an evaluated
user at t was scored with train users' ratings up to about 2h after t as well, a signal no
deployment has; ``causal=False`` / ``BankConfig.time_prior_causal = false`` rebuilds it that way
for comparison.)

It is stored as a table over a time grid (``head/time_grid`` (G,) in seconds, ``head/time_log_prior``
(G, N)). A causal table (``head/time_causal`` present) gives a user at t the row of the last grid
point at or before t, which counts ratings up to that point (a lag below the grid spacing, at most
h / 4 unless the grid is capped); a two-sided table interpolates linearly between the two grid
points around t. t is the timestamp of the user's latest history interaction; a history without timestamps, or a time outside the grid,
takes the nearest end of the grid (for a new user today: the latest period the bank saw).
Fixed at build time: meta-training never changes these tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DAY = 86400.0
#: Share of the all-time popularity mixed into every period's distribution.
GLOBAL_MIX = 0.01
#: Floor inside the log.
EPSILON = 1e-7
#: Bandwidths h (days) and weights β :func:`choose` tries; β = 0 is the model without the prior.
BANDWIDTHS = (60.0, 180.0, 365.0)
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
#: The protocol's candidate modes, all used to choose h and β.
MODES = ("uni99", "pop99", "full")
#: Grid spacing as a fraction of h, and the most grid points a table may have.
GRID_STEP = 0.25
MAX_GRID = 512


def table(items: np.ndarray, times: np.ndarray, n_items: int, bandwidth_days: float, causal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(grid (G,) float64 seconds, log prior (G, N) float32) from rating events (item indexes, seconds).

    ``causal``: row g counts the ratings at or before g (a half-Gaussian ending at g; read it with
    ``at(..., causal=True)``); else the two-sided kernel around g of builds before stop 47."""
    if len(items) == 0:
        raise ValueError("the time prior needs at least one rating")
    times = np.asarray(times, dtype=np.float64)
    items = np.asarray(items, dtype=np.int64)
    h = bandwidth_days * DAY
    low, high = float(times.min()), float(times.max())
    count = int(min(MAX_GRID, max(2, math.ceil((high - low) / (GRID_STEP * h)) + 1)))
    grid = np.linspace(low, high, count)
    overall = np.bincount(items, minlength=n_items).astype(np.float64)
    overall /= overall.sum()
    out = np.empty((count, n_items), dtype=np.float32)
    for row, point in enumerate(grid):
        if causal:
            weights = np.where(times <= point, np.exp(-0.5 * ((times - point) / h) ** 2), 0.0)
        else:
            weights = np.exp(-0.5 * ((times - point) / h) ** 2)
        local = np.bincount(items, weights=weights, minlength=n_items)
        total = local.sum()
        local = local / total if total > 0 else overall
        out[row] = np.log((1.0 - GLOBAL_MIX) * local + GLOBAL_MIX * overall + EPSILON)
    return grid, out


def at(grid: np.ndarray | torch.Tensor, log_prior: np.ndarray | torch.Tensor, times, causal: bool = True) -> torch.Tensor:
    """Prior rows (U, N) at ``times`` (U,) seconds; NaN (no timestamp) and times outside the grid
    take the nearest end of the grid. ``causal``: the row of the last grid point at or before t (a
    causal :func:`table`'s rows count nothing after their point; a time before the first grid point,
    the earliest rating the bank counts, reads the first row: the ratings of that one instant);
    else linear interpolation between the two grid points around t (a two-sided table)."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    log_prior = torch.as_tensor(log_prior)
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1).to(grid.device)
    t = torch.where(torch.isnan(t), grid[-1], t).clamp(float(grid[0]), float(grid[-1]))
    if causal:
        return log_prior[(torch.searchsorted(grid, t, right=True) - 1).clamp(0, len(grid) - 1)]
    upper = torch.searchsorted(grid, t).clamp(1, len(grid) - 1) if len(grid) > 1 else torch.zeros_like(t, dtype=torch.long)
    lower = (upper - 1).clamp_min(0)
    span = (grid[upper] - grid[lower]).clamp_min(1e-9)
    frac = ((t - grid[lower]) / span).clamp(0.0, 1.0).to(log_prior.dtype)[:, None]
    return (1.0 - frac) * log_prior[lower] + frac * log_prior[upper]


def head_entries(grid: np.ndarray, log_prior: np.ndarray, weight: float, causal: bool = True) -> dict[str, torch.Tensor]:
    """The head tensors of a time prior (nothing at all when β = 0); ``time_causal`` marks a causal
    table (banks built before stop 47 have two-sided tables and no such entry)."""
    if weight == 0.0:
        return {}
    entries = {
        "time_grid": torch.from_numpy(np.asarray(grid, dtype=np.float64)),
        "time_log_prior": torch.from_numpy(np.asarray(log_prior, dtype=np.float32)),
        "time_weight": torch.tensor(float(weight)),
    }
    if causal:
        entries["time_causal"] = torch.tensor(1.0)
    return entries


def user_prior(head: dict[str, torch.Tensor], times) -> torch.Tensor | None:
    """``β · prior(t)`` (U, N) for a head with a time prior, else None."""
    if "time_log_prior" not in head:
        return None
    return head["time_weight"] * at(head["time_grid"], head["time_log_prior"], times, causal="time_causal" in head)


def rating_events(dataset, users) -> tuple[np.ndarray, np.ndarray]:
    """(item indexes, timestamps) of every rating (any rating) of ``users``: what the prior counts."""
    keep = np.isin(dataset.ratings.user, np.asarray(users, dtype=np.int64))
    return dataset.ratings.item[keep], dataset.ratings.timestamp[keep]


def validation_cases(dataset, users) -> list:
    """(the protocol's cold-start case with support = first 5 positives, the timestamps of the
    user's positives) for each of ``users`` with at least 6 positives; :func:`choose` cuts the
    support to each K."""
    from ..eval.protocol import make_cases

    times = dataset.positive_times_by_user()
    return [(case, times[case.user]) for case in make_cases(dataset, users, 5)]


def supports(cases: list, ks: tuple[int, ...] = (1, 3, 5)):
    """(user, support = the first K positives, t = the K-th positive's time, query) for each K of
    ``ks`` (at most 5) and each of ``cases`` (:func:`validation_cases`): the rows the build's
    validation grids score."""
    from ..eval.protocol import QUERY_START

    for k in ks:
        k = min(k, QUERY_START)
        for case, times in cases:
            yield case.user, case.support[:k], float(times[k - 1]), case.query


def choose(base_scores, cases: list, events: tuple[np.ndarray, np.ndarray], n_items: int, bandwidths=BANDWIDTHS, weights=WEIGHTS, ks: tuple[int, ...] = (1, 3, 5), modes: tuple[str, ...] = MODES, seed: int = 0, causal: bool = True) -> tuple[float, float, dict[str, dict[str, float]]]:
    """Choose (h, β) on validation ``cases`` (:func:`validation_cases`) by nDCG@10 averaged over
    ``ks`` and the protocol's candidate ``modes``.

    ``base_scores(support) -> (N,)`` is the model without the prior; ``events`` are the (items,
    times) of the ratings the prior is built from (never the validation users' own), and their
    counts are ``pop99``'s sampling weights here. All three modes by default: the prior is a
    popularity term, and the modes pull its weight in opposite directions (``uni99``'s negatives
    are mostly obscure items, ``pop99``'s popular ones), so choosing on one of them picks a point
    of that trade-off blindly (a catalogue too small for 99 negatives keeps the modes that can draw
    them, :func:`~pmeta.eval.protocol.drawable_modes`). Ties go to the smaller β. ``causal``: as
    :func:`table`. Returns (h in days, β, every grid point's nDCG@10 per mode and their mean)."""
    from ..eval.protocol import draw_candidates, drawable_modes, mean_ndcg

    popularity = np.bincount(np.asarray(events[0], dtype=np.int64), minlength=n_items).astype(np.float64)
    modes = drawable_modes([case for case, _ in cases], modes, popularity)  # all three on MovieLens
    candidates = draw_candidates([case for case, _ in cases], modes, popularity, seed)
    prepared = [(user, base_scores(support), t, query) for user, support, t, query in supports(cases, ks)]
    scores: dict[tuple[float, float], dict[str, float]] = {}
    for h in bandwidths:
        grid, log_prior = table(events[0], events[1], n_items, h, causal)
        priors = at(grid, log_prior, np.array([p[2] for p in prepared]), causal).numpy().astype(np.float64)
        for weight in weights:
            if weight == 0.0 and (0.0, 0.0) in scores:
                continue
            scored = ((user, base + weight * prior, query) for (user, base, _, query), prior in zip(prepared, priors))
            scores[(0.0 if weight == 0.0 else h, weight)] = mean_ndcg(scored, candidates, modes)
    h, weight = max(scores, key=lambda key: (scores[key]["mean"], -key[1]))
    return h, weight, {f"h={key[0]:g}d,beta={key[1]:g}": value for key, value in scores.items()}

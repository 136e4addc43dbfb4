"""The time prior: what the bank's train users rated up to the time of a user's history.

A new user's first interactions say *when* they arrive, and what is watched (or bought) changes
with time: a user who signs up in 1996 is offered, and rates, other films than one who signs up
in 2016. The prior is an item score that depends only on that time:

    prior_i(t) = log( (1 − μ) · p_i(t) + μ · p_i + ε ),   p_i(t) ∝ Σ_{ratings (j, i, τ), τ ≤ t} exp(−(t − τ) / h)

over the ratings of the bank's train users (at any rating) made *at or before* t, with ``p_i`` the
item's share of all those ratings (μ = :data:`GLOBAL_MIX` keeps items rated at other times
possible; an all-time count, like every classical baseline's). The ranking score adds
``β · prior(t)`` (``head/time_weight``; shape (5,) in a bank built with one β per history size,
:func:`weight_of`). The time constant h and β are chosen on validation users
held out of the train users (:func:`choose`, β = 0 switches it off), never on test users.

The prior is *causal* and *exact* at t: a user at time t is scored with what was rated up to t,
as a deployed bank serving them at t would have had, counted to the second. The exponential
kernel is memoryless, so the bank stores the decayed counts at checkpoints (``head/time_grid``
(G,) seconds, every h / 4 and every :data:`RATINGS_PER_CHECKPOINT` ratings; ``head/time_shares``
(G, N) normalised, ``head/time_log_total`` (G,) their log total) and the train ratings themselves
(``head/time_event_times`` (E,), ``head/time_event_items`` (E,); 16 bytes a rating), and reads
t as the last checkpoint's counts decayed to t plus the ratings between it and t
(:func:`exact_at`). ``head/time_overall`` holds p_i, ``head/time_bandwidth`` h in seconds.
An optional ``head/time_pseudo_ratings`` m adds m ratings of the all-time share p_i to the decayed
counts, ``p_i(t) = (Σ exp(−(t − τ)/h)·1[i] + m·p_i) / (Σ exp(−(t − τ)/h) + m)``, so that a time with
few ratings behind it (a bank serving another catalogue's earlier users) leans on p_i. A build
chooses m with h and β among ``BankConfig.time_prior_pseudo_ratings`` (default (0,): none). On
ml-latest-small's validation users (seeds 0, 1, 2) the grid 0 / 30 / 300 / 3,000 takes 30 / 0 / 30,
each within 0.0005 mean nDCG@10 of m = 0, and m = 3,000 costs 0.005 to 0.010 (pop99 the most), so
the default stays none (``benchmarks/transfer_parts.py --shrink`` measures m on a transferred bank).

Older kinds, still read and rebuilt for comparison (``BankConfig.time_prior_kernel`` /
``time_prior_causal``; :data:`KINDS`):

* ``"gaussian"`` (stop 47): a half-Gaussian ``exp(−(t − τ)² / 2h²)`` over the ratings at or before
  each point of a grid (``head/time_log_prior`` (G, N), ``head/time_causal``), read at the last grid
  point at or before t. It missed the ratings between that point and t (up to h / 4, 45 days at
  h = 180), the ones its kernel weighs most: on ml-latest-small seed 0 the prior alone ranked
  test users with a mean nDCG@10 over the modes of 0.327 gridded against 0.341 exact at h = 180;
  the exponential kernel read exactly reaches 0.356 at the h its validation users choose;
* ``"two-sided"`` (before stop 47): the Gaussian around t, interpolated between grid points, which
  also counts train users' ratings up to about 2h *after* t, a signal no deployment has.

t is the timestamp of the user's latest history interaction; a history without timestamps takes
the latest time the bank saw (for a new user today: the latest period). Fixed at build time:
meta-training never changes these tensors. A bank transferred to another catalogue
(:mod:`pmeta.eval.transfer`) maps the prior's columns with ``head/time_columns`` (−1: an item the
bank never saw, which gets the median of the user's row).
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


#: The kinds of time prior a bank may hold: the exact causal exponential one of new banks, the
#: gridded causal half-Gaussian of stop 47 and the two-sided Gaussian of the banks before it.
KINDS = ("exponential", "gaussian", "two-sided")


def build(items: np.ndarray, times: np.ndarray, n_items: int, bandwidth_days: float, kind: str = "exponential", pseudo_ratings: float = 0.0) -> dict[str, torch.Tensor]:
    """The tensors of a time prior of ``kind`` (:data:`KINDS`; no weight) from rating events (item
    indexes, seconds): what :func:`log_prior_at` reads and :func:`head_entries` stores.
    ``pseudo_ratings`` m > 0 (exponential kind only) stores ``time_pseudo_ratings``."""
    if kind not in KINDS:
        raise ValueError(f"unknown time prior kind {kind!r}; expected one of {', '.join(KINDS)}")
    if pseudo_ratings < 0 or not math.isfinite(pseudo_ratings):
        raise ValueError(f"the time prior's pseudo-ratings must be finite and >= 0, got {pseudo_ratings}")
    if pseudo_ratings > 0 and kind != "exponential":
        raise ValueError(f"pseudo-ratings need the exponential time prior, not {kind!r}")
    if kind == "exponential":
        out = decayed(items, times, n_items, bandwidth_days)
        if pseudo_ratings > 0:
            out["time_pseudo_ratings"] = torch.tensor(float(pseudo_ratings), dtype=torch.float64)
        return out
    grid, log_prior = table(items, times, n_items, bandwidth_days, causal=kind == "gaussian")
    out = {"time_grid": torch.from_numpy(np.asarray(grid, dtype=np.float64)), "time_log_prior": torch.from_numpy(np.asarray(log_prior, dtype=np.float32))}
    if kind == "gaussian":
        out["time_causal"] = torch.tensor(1.0)
    return out


#: The exponential prior also checkpoints every this many ratings (within :data:`MAX_GRID`), so a
#: read adds at most about this many ratings per user however busy the period.
RATINGS_PER_CHECKPOINT = 2048
#: Most ratings one :func:`exact_at` call gathers at once (users are read in chunks below it).
MAX_GATHERED = 1 << 22


def checkpoints(times: np.ndarray, bandwidth_days: float) -> np.ndarray:
    """The exponential prior's checkpoints over sorted rating ``times``: every ``GRID_STEP · h`` from
    the first rating to the last, and every :data:`RATINGS_PER_CHECKPOINT` ratings; above
    :data:`MAX_GRID` points, that many of them evenly by rank (the first and last kept)."""
    low, high = float(times[0]), float(times[-1])
    count = int(max(2, math.ceil((high - low) / (GRID_STEP * bandwidth_days * DAY)) + 1))
    grid = np.unique(np.concatenate([np.linspace(low, high, min(count, 1 << 20)), times[RATINGS_PER_CHECKPOINT::RATINGS_PER_CHECKPOINT], [low, high]]))
    if len(grid) > MAX_GRID:
        grid = grid[np.unique(np.round(np.linspace(0, len(grid) - 1, MAX_GRID)).astype(np.int64))]
    return grid


def decayed(items: np.ndarray, times: np.ndarray, n_items: int, bandwidth_days: float) -> dict[str, torch.Tensor]:
    """The exact causal prior's tensors (module docstring): at each of :func:`checkpoints` g, the
    shares ``Σ_{τ ≤ g} exp(−(g − τ) / h)·1[item]`` normalised (``time_shares`` (G, N) float32) and
    the log of their total (``time_log_total`` (G,) float64), so that neither underflows however
    long the gaps; and the ratings sorted by time."""
    if len(items) == 0:
        raise ValueError("the time prior needs at least one rating")
    times = np.asarray(times, dtype=np.float64)
    order = np.argsort(times, kind="stable")
    items, times = np.asarray(items, dtype=np.int64)[order], times[order]
    h = bandwidth_days * DAY
    grid = checkpoints(times, bandwidth_days)
    ends = np.searchsorted(times, grid, side="right")
    shares = np.empty((len(grid), n_items), dtype=np.float32)
    log_total = np.empty(len(grid), dtype=np.float64)
    running, log_running, previous, start = np.zeros(n_items), -math.inf, float(grid[0]), 0
    for row, point in enumerate(grid):
        log_running -= (point - previous) / h
        chunk = slice(start, int(ends[row]))
        added = np.bincount(items[chunk], weights=np.exp(-(point - times[chunk]) / h), minlength=n_items)  # each weight >= exp(-step / h)
        total = added.sum()
        if total > 0:
            top = max(log_running, math.log(total))
            old, new = math.exp(log_running - top), math.exp(-top)
            mixed = running * old + added * new
            running, log_running = mixed / mixed.sum(), top + math.log(old + total * new)
        shares[row], log_total[row], previous, start = running, log_running, point, int(ends[row])
    overall = np.bincount(items, minlength=n_items).astype(np.float64)
    return {
        "time_grid": torch.from_numpy(grid),
        "time_shares": torch.from_numpy(shares),
        "time_log_total": torch.from_numpy(log_total),
        "time_event_times": torch.from_numpy(times),
        "time_event_items": torch.from_numpy(items),
        "time_overall": torch.from_numpy((overall / overall.sum()).astype(np.float32)),
        "time_bandwidth": torch.tensor(h, dtype=torch.float64),
    }


def exact_at(prior: dict[str, torch.Tensor], times) -> torch.Tensor:
    """The exponential prior's log rows (U, N) at ``times`` (U,) seconds: the shares of the last
    checkpoint at or before t, weighed by their total decayed to t, plus the ratings after it up to
    t, each weight divided by the largest of them (in float64) so that nothing over- or underflows
    however far t lies from the ratings; a time before the first rating counts nothing (the all-time
    share alone), NaN reads the last checkpoint. Users are read in chunks of at most
    :data:`MAX_GATHERED` gathered ratings."""
    grid = prior["time_grid"]
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1).to(grid.device)
    t = torch.where(torch.isnan(t), grid[-1], t)
    point = torch.searchsorted(grid, t, right=True) - 1  # −1: before the first rating
    started = point >= 0
    point = point.clamp_min(0)
    event_times = prior["time_event_times"]
    low = torch.where(started, torch.searchsorted(event_times, grid[point], right=True), torch.zeros_like(point))
    high = torch.where(started, torch.searchsorted(event_times, t, right=True), torch.zeros_like(point))
    lengths = (high - low).cpu()
    rows, start, gathered = [], 0, 0
    for end, length in enumerate(lengths.tolist(), 1):  # chunks of users below MAX_GATHERED ratings (one user may exceed it alone)
        gathered += length
        if gathered > MAX_GATHERED and end - 1 > start:
            rows.append(_exact_rows(prior, t[start : end - 1], point[start : end - 1], started[start : end - 1], low[start : end - 1], high[start : end - 1]))
            start, gathered = end - 1, length
    rows.append(_exact_rows(prior, t[start:], point[start:], started[start:], low[start:], high[start:]))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _exact_rows(prior: dict[str, torch.Tensor], t, point, started, low, high) -> torch.Tensor:
    grid, shares, overall = prior["time_grid"], prior["time_shares"], prior["time_overall"]
    event_times, event_items, h = prior["time_event_times"], prior["time_event_items"], prior["time_bandwidth"]
    lengths = high - low
    total = int(lengths.sum())
    # log weight of the checkpoint's part, and of the latest rating since (the largest of its weights)
    log_old = torch.where(started, prior["time_log_total"][point] - (t - grid[point]) / h, torch.full_like(t, -math.inf))
    latest = event_times[(high - 1).clamp_min(0)]
    log_new = torch.where(lengths > 0, -(t - latest) / h, torch.full_like(t, -math.inf))
    top = torch.maximum(log_old, log_new)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    local = shares[point] * torch.exp(log_old - top).to(shares.dtype)[:, None]
    if total > 0:
        users = torch.repeat_interleave(torch.arange(len(t), device=t.device), lengths, output_size=total)
        offsets = torch.arange(total, device=t.device) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths, output_size=total)
        events = torch.repeat_interleave(low, lengths, output_size=total) + offsets
        weights = torch.exp(-(t[users] - event_times[events]) / h - top[users]).to(local.dtype)
        local.index_put_((users, event_items[events]), weights, accumulate=True)
    mass = local.sum(1, keepdim=True)
    shares_at_t = torch.where(mass > 0, local / mass.clamp_min(torch.finfo(local.dtype).tiny), overall[None, :])
    pseudo = prior.get("time_pseudo_ratings")
    if pseudo is not None and float(pseudo) > 0:
        # m pseudo-ratings of the all-time share beside the decayed mass M = mass · e^top (in ratings):
        # (counts + m·p) / (M + m) = w·shares + (1 − w)·p with w = M / (M + m), in log space
        log_mass = torch.log(mass[:, 0].double().clamp_min(torch.finfo(torch.float64).tiny)) + top
        keep = torch.where(mass[:, 0] > 0, torch.sigmoid(log_mass - math.log(float(pseudo))), torch.zeros_like(log_mass))
        keep = keep.to(shares_at_t.dtype)[:, None]
        shares_at_t = keep * shares_at_t + (1.0 - keep) * overall[None, :]
    return torch.log((1.0 - GLOBAL_MIX) * shares_at_t + GLOBAL_MIX * overall[None, :] + EPSILON)


def kind_of(head: dict[str, torch.Tensor]) -> str | None:
    """The kind (:data:`KINDS`) of the time prior among ``head``'s tensors; None without one."""
    if "time_shares" in head:
        return "exponential"
    if "time_log_prior" in head:
        return "gaussian" if "time_causal" in head else "two-sided"
    return None


def item_count(head: dict[str, torch.Tensor]) -> int:
    """The number of items the time prior in ``head`` scores (after a transfer's column map)."""
    if "time_columns" in head:
        return len(head["time_columns"])
    return int(head["time_shares" if "time_shares" in head else "time_log_prior"].shape[1])


def log_prior_at(prior: dict[str, torch.Tensor], times) -> torch.Tensor:
    """The log prior rows (U, N) of the prior tensors ``prior`` (any kind) at ``times`` (U,) seconds,
    mapped to a transferred catalogue by ``time_columns`` when present."""
    kind = kind_of(prior)
    if kind == "exponential":
        rows = exact_at(prior, times)
    else:
        rows = at(prior["time_grid"], prior["time_log_prior"], times, causal=kind == "gaussian")
    if "time_columns" in prior:
        columns = prior["time_columns"]
        rows = torch.where(columns[None, :] >= 0, rows[:, columns.clamp_min(0)], rows.median(dim=1, keepdim=True).values)
    return rows


def without_prior(head: dict[str, torch.Tensor], keep_weight: bool = False) -> dict[str, torch.Tensor]:
    """``head`` without the time prior's tensors (every ``time_*`` entry; ``keep_weight`` keeps
    ``time_weight``, for a prior counted again under the same β)."""
    return {k: v for k, v in head.items() if not k.startswith("time_") or (keep_weight and k == "time_weight")}


def weights_off(weight) -> bool:
    """Whether β (a number, or one per history size :func:`choose` gives with ``per_size``) is 0 throughout."""
    return all(float(w) == 0.0 for w in np.atleast_1d(np.asarray(weight, dtype=np.float64)))


def head_entries(prior: dict[str, torch.Tensor], weight) -> dict[str, torch.Tensor]:
    """The head tensors of a time prior (:func:`build`) at weight β (nothing at all when β = 0).

    ``weight``: one β, or one per history size (β_1 … β_S, :func:`choose` with ``per_size``),
    stored as ``head/time_weight`` of shape () or (S,); equal values are stored as one."""
    if weights_off(weight):
        return {}
    values = np.atleast_1d(np.asarray(weight, dtype=np.float64))
    if np.ndim(weight) == 0 or np.all(values == values[0]):
        return {**prior, "time_weight": torch.tensor(float(values[0]))}
    return {**prior, "time_weight": torch.tensor(values.tolist(), dtype=torch.float32)}


def weight_of(weight: torch.Tensor, sizes) -> torch.Tensor:
    """β per user (U,) of ``head/time_weight`` for users with ``sizes`` liked items in their history:
    a bank with one β gives it to everyone; one with β per size S gives a history of n items β_n,
    an empty one β_1 and a longer one β_S. Raises ValueError when per-size weights get no sizes.
    The anchors' item-bias share per size (``head/anchor_bias_scale``) is read the same way."""
    if weight.ndim == 0:
        return weight.reshape(1) if sizes is None else weight.expand(len(sizes))
    if sizes is None:
        raise ValueError("this time prior has one weight per history size: pass the users' history sizes")
    index = torch.as_tensor(np.asarray(sizes, dtype=np.int64)).clamp(1, len(weight)) - 1
    return weight[index.to(weight.device)]


def user_prior(head: dict[str, torch.Tensor], times, sizes=None) -> torch.Tensor | None:
    """``β · prior(t)`` (U, N) for a head with a time prior, else None; ``sizes`` (U,): each user's
    number of liked history items (:func:`weight_of`; needed when β depends on it)."""
    if kind_of(head) is None:
        return None
    rows = log_prior_at(head, times)
    return weight_of(head["time_weight"], sizes).to(rows.dtype)[:, None] * rows if head["time_weight"].ndim else head["time_weight"] * rows


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


def choose(base_scores, cases: list, events: tuple[np.ndarray, np.ndarray], n_items: int, bandwidths=BANDWIDTHS, weights=WEIGHTS, ks: tuple[int, ...] = (1, 3, 5), modes: tuple[str, ...] = MODES, seed: int = 0, kind: str = "exponential", pseudo_ratings=(0.0,), per_size: bool = False) -> tuple[float, float | tuple[float, ...], float, dict[str, dict]]:
    """Choose (h, β, m) on validation ``cases`` (:func:`validation_cases`) by nDCG@10 averaged over
    ``ks`` and the protocol's candidate ``modes``; m from ``pseudo_ratings`` (the exponential kind
    only; others try m = 0 alone).

    ``base_scores(support) -> (N,)`` is the model without the prior; ``events`` are the (items,
    times) of the ratings the prior is built from (never the validation users' own), and their
    counts are ``pop99``'s sampling weights here. All three modes by default: the prior is a
    popularity term, and the modes pull its weight in opposite directions (``uni99``'s negatives
    are mostly obscure items, ``pop99``'s popular ones), so choosing on one of them picks a point
    of that trade-off blindly (a catalogue too small for 99 negatives keeps the modes that can draw
    them, :func:`~pmeta.eval.protocol.drawable_modes`). Ties go to the smaller β, then the smaller
    m. ``kind``: as :func:`build`. Returns (h in days, β, m, every grid point's nDCG@10 per mode and
    their mean; the keys name m only where it is not 0).

    ``per_size``: β is chosen for each history size K of ``ks`` on its own (the K-th support),
    for each (h, m), under β_1 ≥ β_2 ≥ … (:func:`_non_increasing`), and (h, m) by the mean over K
    of those; β is then the tuple (β_1 … β_max(ks)) (:func:`weight_of`; ``ks`` must be 1 … S). One
    user's first item says less about them than five do, so the prior's weight should fall as the
    history grows: on ml-1m's validation users (stop 54, seeds 0 and 2) the onboarding model plus
    the prior at β = 2 beat β = 1 at K = 1 in every mode, and β = 0.5 beat β = 1 at K = 5; one β
    for every K chose between them. Each grid point's value also holds ``"by_k"``: its mean per K.
    Builds use it only with ``BankConfig.time_prior_weight_by_size`` (off by default: read on test
    users at stop 54 it lowered uni99 at K = 5 on every MovieLens release; docs/movielens.md)."""
    from ..eval.protocol import draw_candidates, drawable_modes, mean_ndcg

    popularity = np.bincount(np.asarray(events[0], dtype=np.int64), minlength=n_items).astype(np.float64)
    modes = drawable_modes([case for case, _ in cases], modes, popularity)  # all three on MovieLens
    candidates = draw_candidates([case for case, _ in cases], modes, popularity, seed)
    if per_size:
        return _choose_per_size(base_scores, cases, events, n_items, bandwidths, weights, ks, modes, candidates, kind, pseudo_ratings)
    prepared = [(user, base_scores(support), t, query) for user, support, t, query in supports(cases, ks)]
    pseudo_ratings = tuple(pseudo_ratings) if kind == "exponential" else (0.0,)
    scores: dict[tuple[float, float, float], dict[str, float]] = {}
    for h in bandwidths:
        built = build(events[0], events[1], n_items, h, kind)
        for m in pseudo_ratings:
            prior = {**built, "time_pseudo_ratings": torch.tensor(float(m), dtype=torch.float64)} if m > 0 else built
            priors = log_prior_at(prior, np.array([p[2] for p in prepared])).numpy().astype(np.float64)
            for weight in weights:
                if weight == 0.0 and (0.0, 0.0, 0.0) in scores:
                    continue
                scored = ((user, base + weight * prior, query) for (user, base, _, query), prior in zip(prepared, priors))
                key = (0.0, 0.0, 0.0) if weight == 0.0 else (h, weight, float(m))
                scores[key] = mean_ndcg(scored, candidates, modes)
    h, weight, m = max(scores, key=lambda key: (scores[key]["mean"], -key[1], -key[2]))
    return h, weight, m, {_grid_key(key): value for key, value in scores.items()}


def _grid_key(key: tuple[float, float, float]) -> str:
    return f"h={key[0]:g}d,beta={key[1]:g}" + (f",m={key[2]:g}" if key[2] else "")


def _choose_per_size(base_scores, cases, events, n_items, bandwidths, weights, ks, modes, candidates, kind, pseudo_ratings):
    """:func:`choose` with ``per_size``."""
    from ..eval.protocol import mean_ndcg

    ks = tuple(int(k) for k in ks)
    if ks != tuple(range(1, len(ks) + 1)):
        raise ValueError(f"a weight per history size needs ks = 1 … S, got {ks}")
    prepared = {k: [(user, base_scores(support), t, query) for user, support, t, query in supports(cases, (k,))] for k in ks}
    pseudo_ratings = tuple(pseudo_ratings) if kind == "exponential" else (0.0,)
    scores: dict[tuple[float, float, float], dict[int, dict[str, float]]] = {}
    for h in bandwidths:
        built = build(events[0], events[1], n_items, h, kind)
        for m in pseudo_ratings:
            prior = {**built, "time_pseudo_ratings": torch.tensor(float(m), dtype=torch.float64)} if m > 0 else built
            priors = {k: log_prior_at(prior, np.array([p[2] for p in rows])).numpy().astype(np.float64) for k, rows in prepared.items()}
            for weight in weights:
                key = (0.0, 0.0, 0.0) if weight == 0.0 else (h, weight, float(m))
                if key in scores:
                    continue
                scores[key] = {k: mean_ndcg(((user, base + weight * p, query) for (user, base, _, query), p in zip(rows, priors[k])), candidates, modes) for k, rows in prepared.items()}
    off = scores.get((0.0, 0.0, 0.0))
    best = None
    for h in bandwidths:
        for m in pseudo_ratings:
            points = [(key, value) for key, value in scores.items() if key[0] == h and key[2] == float(m)] + ([((0.0, 0.0, 0.0), off)] if off is not None else [])
            if not points:
                continue
            chosen, total = _non_increasing([[value[k]["mean"] for _, value in points] for k in ks], [key[1] for key, _ in points])
            if best is None or total > best[0] + 1e-12 or (abs(total - best[0]) <= 1e-12 and (sum(chosen), m) < (sum(best[3]), best[2])):
                best = (total, h, float(m), chosen)
    _, h, m, chosen = best
    if not any(chosen):
        h, m = 0.0, 0.0
    grid = {}
    for key, by_k in scores.items():
        value = {mode: float(np.mean([by_k[k][mode] for k in ks])) for mode in by_k[ks[0]]}
        value["by_k"] = {str(k): by_k[k]["mean"] for k in ks}
        grid[_grid_key(key)] = value
    return h, tuple(float(b) for b in chosen), m, grid


def _non_increasing(scores: list[list[float]], weights: list[float]) -> tuple[list[float], float]:
    """(β_1 ≥ β_2 ≥ … ≥ β_S from ``weights``, their mean score) maximising the mean over sizes of
    ``scores[k][j]`` (size k + 1 at ``weights[j]``): a longer history never gets more prior weight than
    a shorter one. Chosen freely, each size's β follows its own validation noise (5, 3, 0, 5, 1 on
    a small synthetic test set's few validation users). Dynamic programming over the sizes; ties go to
    the smaller β."""
    order = sorted(range(len(weights)), key=lambda j: weights[j])
    values = [weights[j] for j in order]
    table = [[row[j] for j in order] for row in scores]
    best = [list(table[0])]  # best[k][i]: the best total of sizes 1 … k + 1 with β_{k+1} = values[i]
    choice: list[list[int]] = []
    for k in range(1, len(table)):
        previous, row, picks = best[-1], [], []
        for i in range(len(values)):
            j = max(range(i, len(values)), key=lambda j: (previous[j], -j))  # β_k ≥ β_{k+1}; ties: the smaller
            row.append(previous[j] + table[k][i])
            picks.append(j)
        best.append(row)
        choice.append(picks)
    i = max(range(len(values)), key=lambda i: (best[-1][i], -i))
    total, path = best[-1][i], [i]
    for picks in reversed(choice):
        path.append(picks[path[-1]])
    return [values[i] for i in reversed(path)], total / len(table)


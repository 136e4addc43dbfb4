"""The MovieLens user cold-start protocol ``coldstart-v1`` (docs PROTOCOL.md).

Steps, for a dataset and a seed:

1. :func:`split_users` — sort the user ids (as strings), permute them with ``numpy.random.default_rng(seed)``;
   the first 20% are test users, the rest may build a bank.
2. :func:`make_cases` — for every test user with at least 6 positives (rating >= 4, in time order):
   support = the first K positives, query = positives 6 to 15 (``positives[5:15]``).
3. :func:`candidate_negatives` — for each query positive, the negatives it is ranked against:
   ``uni99`` (99 uniform never-rated items), ``pop99`` (99 never-rated items drawn in proportion to
   their number of ratings in the whole file) or ``full`` (every never-rated item).
4. :func:`rank_positives` and :func:`metrics_from_ranks` — pessimistic ranks, HR@10, nDCG@10, MRR.
5. :func:`evaluate` — the whole table for one scorer, plus its adaptation latency (and, on request,
   each user's metrics, for paired comparisons).

Candidate draws depend only on ``(seed, user id, mode)``, never on the scorer, on K or on the order in
which users are visited, so every method is ranked against exactly the same negatives.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pmeta.data.types import POSITIVE_RATING, Dataset
from pmeta.errors import InvalidConfig, InvalidData, ModesUnavailable, TrainingDiverged

PROTOCOL_NAME = "coldstart-v1"
MODES = ("uni99", "pop99", "full")
SUPPORT_SIZES = (1, 3, 5)
#: Number of sampled negatives per query positive in the ``uni99`` and ``pop99`` modes.
SAMPLED_NEGATIVES = 99
#: A test user needs this many positives: 5 that may be support, at least one query.
MIN_POSITIVES = 6
#: Query = positives number 6 to 15, i.e. ``positives[QUERY_START:QUERY_STOP]``.
QUERY_START, QUERY_STOP = 5, 15
#: The cutoff of HR@N and nDCG@N.
TOP_N = 10

_MODE_STREAM = {mode: i for i, mode in enumerate(MODES)}


class Scorer(Protocol):
    """Anything :func:`evaluate` can rank with: a name and a score over the whole catalogue."""

    name: str

    def score(self, support_items: np.ndarray, k: int) -> np.ndarray:
        """Scores for every catalogue item (float, higher = better) given the user's support items."""
        ...


@dataclass(frozen=True)
class ColdStartCase:
    """One test user seen with K support positives.

    ``user`` is the dense user index, ``user_id`` the dataset's own id. ``support`` holds the first K
    positives in time order, ``query`` positives 6..15 in time order, ``rated`` every item the user
    rated at any rating (sorted, unique) — the items never used as negatives. ``support_time`` is
    the timestamp of the K-th positive (the latest support interaction; what a time-aware scorer
    may use, see :func:`evaluate`).
    """

    user: int
    user_id: str
    support: np.ndarray
    query: np.ndarray
    rated: np.ndarray
    support_time: float | None = None


def split_users(dataset: Dataset, seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Split the users into ``(train_users, test_users)``, both arrays of dense user indexes.

    The user ids are sorted **as strings** (lexicographically: "1" < "10" < "100" < "2"), permuted
    with ``numpy.random.default_rng(seed).permutation``; the first ``n_test = round(test_fraction * n)``
    users of the permutation are test users, the others train users. Both arrays keep the permutation
    order. ``round`` is Python's (halves go to the even integer); with the default 0.2 the product is
    never exactly a half, so it is the nearest integer (610 users -> 122 test users).

    String order is what PROTOCOL.md's reference numbers were produced with: on ml-latest-small it
    gives the 120 test users with >= 6 positives the table reports and reproduces its deterministic
    ``full``-mode popularity row to the third decimal; numeric order gives 119 users and misses the
    ItemKNN rows by up to 0.036.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise InvalidConfig(f"test_fraction must lie in [0, 1], got {test_fraction}")
    user_ids = dataset.ratings.user_ids
    dense_index = {user_id: i for i, user_id in enumerate(user_ids)}
    ordered = np.array([dense_index[u] for u in sorted(user_ids)], dtype=np.int64)
    permuted = np.random.default_rng(seed).permutation(ordered)
    n_test = round(test_fraction * len(permuted))
    return permuted[n_test:], permuted[:n_test]


def _check_support_size(k: int) -> None:
    if not 1 <= k <= QUERY_START:
        raise InvalidConfig(f"support size K must lie in 1..{QUERY_START} so that support and query never overlap, got {k}")


def check_grid(ks: Sequence[int], modes: Sequence[str]) -> None:
    """The support sizes and candidate modes of a run: at least one of each, no repeats, every K in
    1..5 and every mode one of :data:`MODES`; else :class:`~pmeta.errors.InvalidConfig`."""
    if not ks:
        raise InvalidConfig("no support size K given")
    if not modes:
        raise InvalidConfig(f"no candidate mode given; choose from {', '.join(MODES)}")
    for name, values in (("support size K", ks), ("candidate mode", modes)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise InvalidConfig(f"{name} {repeated[0]} is given twice")
    for mode in modes:
        if mode not in _MODE_STREAM:
            raise InvalidConfig(f"unknown candidate mode {mode!r}; expected one of {', '.join(MODES)}")
    for k in ks:
        _check_support_size(k)


def make_cases(dataset: Dataset, users: Iterable[int], k: int) -> list[ColdStartCase]:
    """The cold-start cases of ``users`` with support size ``k``, in the order of ``users``.

    Users with fewer than :data:`MIN_POSITIVES` positives are dropped.
    """
    _check_support_size(k)
    positives = dataset.positives_by_user()
    times = dataset.positive_times_by_user()
    rated = dataset.rated_by_user()
    user_ids = dataset.ratings.user_ids
    cases = []
    for user in users:
        user = int(user)
        items = positives.get(user)
        if items is None or len(items) < MIN_POSITIVES:
            continue
        cases.append(
            ColdStartCase(
                user=user,
                user_id=user_ids[user],
                support=items[:k].copy(),
                query=items[QUERY_START:QUERY_STOP].copy(),
                rated=rated[user],
                support_time=float(times[user][k - 1]),
            )
        )
    return cases


def item_rating_counts(dataset: Dataset) -> np.ndarray:
    """Number of ratings (at any rating, all users) of every catalogue item — the ``pop99`` weights."""
    return np.bincount(dataset.ratings.item, minlength=len(dataset.catalog)).astype(np.int64)


def case_rng(seed: int, case: ColdStartCase, mode: str) -> np.random.Generator:
    """The generator of one user's candidates in one mode: seeded by ``(seed, crc32(user id), mode)``.

    It does not depend on K, on the scorer or on the order of users, so candidates are the same for
    every method and every support size.
    """
    if mode not in _MODE_STREAM:
        raise InvalidConfig(f"unknown candidate mode {mode!r}; expected one of {', '.join(MODES)}")
    return np.random.default_rng([seed, zlib.crc32(case.user_id.encode("utf-8")), _MODE_STREAM[mode]])


def candidate_negatives(
    case: ColdStartCase, mode: str, rng: np.random.Generator, item_popularity: np.ndarray
) -> np.ndarray:
    """Negatives for each query positive, as an array of shape ``(len(case.query), n_negatives)``.

    ``item_popularity`` has one entry per catalogue item (its length is the catalogue size); it is the
    number of ratings of each item in the whole file and is used as sampling weight by ``pop99``.
    Only items the user never rated (at any rating) can be negatives. Per query positive:

    - ``uni99``: 99 items uniformly without replacement;
    - ``pop99``: 99 items without replacement, ``P(item) ∝ item_popularity[item]``;
    - ``full``: every never-rated item (the same row for every query; a read-only broadcast view).

    Rows are drawn one query positive after the other from ``rng``. InvalidData when a sampled mode
    cannot draw 99 for this user (:func:`check_cases` says so before a run fits anything).
    """
    never_rated, weights = _candidate_pool(case, mode, item_popularity)
    n_query = len(case.query)
    if mode == "full":
        return np.broadcast_to(never_rated, (n_query, len(never_rated)))
    rows = [rng.choice(never_rated, size=SAMPLED_NEGATIVES, replace=False, p=weights) for _ in range(n_query)]
    return np.stack(rows) if rows else np.empty((0, SAMPLED_NEGATIVES), dtype=np.int64)


def _candidate_pool(case: ColdStartCase, mode: str, item_popularity: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(the user's never-rated items, pop99's sampling probabilities over them or None). Raises
    ModesUnavailable (advising the modes this user can draw) when a sampled mode cannot draw its 99
    negatives for this user."""
    n_items = len(item_popularity)
    never_rated = np.setdiff1d(np.arange(n_items, dtype=np.int64), case.rated, assume_unique=True)
    if mode not in _MODE_STREAM:
        raise InvalidConfig(f"unknown candidate mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "full":
        return never_rated, None
    if len(never_rated) < SAMPLED_NEGATIVES:
        raise ModesUnavailable(
            f"user {case.user_id} has rated all but {len(never_rated)} of the {n_items} items, fewer than the "
            f"{SAMPLED_NEGATIVES} negatives {mode} draws",
            ("full",),
        )
    if mode == "uni99":
        return never_rated, None
    weights = np.asarray(item_popularity, dtype=np.float64)[never_rated]
    rated = np.count_nonzero(weights)
    if rated < SAMPLED_NEGATIVES:
        raise ModesUnavailable(
            f"only {rated} of the items user {case.user_id} never rated have ratings, fewer than the "
            f"{SAMPLED_NEGATIVES} negatives pop99 draws (in proportion to their ratings)",
            ("uni99", "full"),
        )
    return never_rated, weights / weights.sum()


def check_cases(dataset: Dataset, test_users: Iterable[int], modes: Sequence[str]) -> int:
    """How many of ``test_users`` make a cold-start case (:func:`make_cases`). Raises InvalidData when
    none does (a report would hold no number), and :class:`~pmeta.errors.ModesUnavailable` when a
    sampled mode cannot draw its negatives for one of them, advising the modes every case can draw:
    the checks :func:`evaluate` would fail on, made before any model is fitted."""
    test_users = [int(u) for u in test_users]
    cases = make_cases(dataset, test_users, 1)
    if not cases:
        raise InvalidData(
            f"none of the {len(test_users)} test users of {dataset.name} has the {MIN_POSITIVES} positive ratings "
            f"(at least {POSITIVE_RATING:g} stars) a cold-start case needs, so there is nothing to evaluate"
        )
    popularity = item_rating_counts(dataset)
    for case in cases:
        for mode in modes:
            try:
                _candidate_pool(case, mode, popularity)
            except ModesUnavailable as error:  # advise what every case can draw, not this case alone
                raise ModesUnavailable(error.reason, drawable_modes(cases, MODES, popularity)) from None
    return len(cases)


def drawable_modes(cases: Iterable[ColdStartCase], modes: Sequence[str], item_popularity: np.ndarray) -> tuple[str, ...]:
    """The ``modes``, in their order, that can draw candidates for every case; ``("full",)`` when
    none can. What a choice made on validation users (EASE's λ, the time prior, the anchors' bias)
    scores on: every mode on MovieLens, full ranking alone on a catalogue too small for 99 negatives."""
    cases = list(cases)
    drawable = []
    for mode in modes:
        try:
            for case in cases:
                _candidate_pool(case, mode, item_popularity)
        except ModesUnavailable:
            continue
        drawable.append(mode)
    return tuple(drawable) or ("full",)


def rank_positives(scores: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Pessimistic rank of each positive among itself and its row of negatives.

    ``rank_q = 1 + #{j : scores[negatives[q, j]] >= scores[positives[q]]}`` — a tie with a negative
    counts against the positive, so a constant scorer ranks every positive last.
    """
    positive_scores = scores[positives]
    return 1 + np.count_nonzero(scores[negatives] >= positive_scores[:, None], axis=1)


def metrics_from_ranks(ranks: np.ndarray, top_n: int = TOP_N) -> dict[str, float]:
    """Mean HR@N, nDCG@N and MRR of a set of ranks (one relevant item per candidate list).

    ``HR@N = [rank <= N]``, ``nDCG@N = [rank <= N] / log2(rank + 1)`` (the ideal DCG is 1) and
    ``MRR = 1 / rank`` over the full candidate list.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks <= top_n
    return {
        f"hr@{top_n}": float(hit.mean()),
        f"ndcg@{top_n}": float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean()),
        "mrr": float((1.0 / ranks).mean()),
    }


METRIC_NAMES = (f"hr@{TOP_N}", f"ndcg@{TOP_N}", "mrr")


def draw_candidates(cases: Iterable[ColdStartCase], modes: Sequence[str], popularity: np.ndarray, seed: int = 0) -> dict[tuple[int, str], np.ndarray]:
    """The negatives of each (case's user, mode) (:func:`candidate_negatives` with :func:`case_rng`):
    what :func:`evaluate` ranks against, and what the build's validation grids rank against."""
    return {(case.user, mode): candidate_negatives(case, mode, case_rng(seed, case, mode), popularity) for case in cases for mode in modes}


def mean_ndcg(scored: Iterable[tuple[int, np.ndarray, np.ndarray]], candidates: dict[tuple[int, str], np.ndarray], modes: Sequence[str]) -> dict[str, float]:
    """nDCG@10 per mode, averaged over ``scored`` = (user, scores (N,), query positives), and the mean
    over the modes (key ``"mean"``): the criterion the build's validation grids maximise."""
    per_mode: dict[str, list[float]] = {mode: [] for mode in modes}
    for user, scores, query in scored:
        for mode in modes:
            per_mode[mode].append(metrics_from_ranks(rank_positives(scores, query, candidates[(user, mode)]))[f"ndcg@{TOP_N}"])
    row = {mode: float(np.mean(values)) if values else 0.0 for mode, values in per_mode.items()}
    row["mean"] = float(np.mean(list(row.values())))
    return row


def _checked_scores(scores: np.ndarray, n_items: int, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n_items,):
        raise ValueError(f"scorer {name!r} returned shape {scores.shape}, expected ({n_items},)")
    if np.isnan(scores).any():
        raise TrainingDiverged(f"method {name!r} returned NaN scores: its model diverged or its inputs hold NaN")
    return scores


#: Each user's metrics in every ``(k, mode)`` cell: ``"user"`` (the dense user indexes, in the order of
#: :func:`make_cases`) and one array per metric of :data:`METRIC_NAMES`, aligned with it.
PerUser = dict[tuple[int, str], dict[str, np.ndarray]]


def evaluate(
    scorer: Scorer,
    dataset: Dataset,
    test_users: Iterable[int],
    ks: Sequence[int] = SUPPORT_SIZES,
    modes: Sequence[str] = MODES,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    per_user: PerUser | None = None,
) -> list[dict]:
    """Evaluate one scorer under coldstart-v1; one row per ``(k, mode)``, in the order of ``ks`` x ``modes``.

    Each row: ``method`` (the scorer's ``name``), ``k``, ``mode``, ``hr@10``, ``ndcg@10``, ``mrr`` (mean
    over a user's queries, then over users), ``users`` (number of users with >= 6 positives), and the
    latency of ``scorer.score`` in milliseconds, ``adapt_ms_p50`` and ``adapt_ms_p95`` over the users
    (the same for every mode of one K). A scorer with ``uses_time = True`` is called as
    ``score(support, k, time=...)`` with the timestamp of the latest support interaction. The scorer is called once per (user, K); its score vector
    serves every mode and every query. ``progress(done, total)`` is called after each of those calls.

    A ``per_user`` dict receives, per ``(k, mode)``, each user's metrics behind the row's means
    (:data:`PerUser`). The users are the cases of :func:`make_cases` in the order of ``test_users``, so
    two scorers evaluated on the same dataset and users give arrays aligned user by user (paired
    comparisons, :mod:`pmeta.eval.significance`).
    """
    check_grid(ks, modes)
    test_users = [int(u) for u in test_users]
    n_items = len(dataset.catalog)
    popularity = item_rating_counts(dataset)
    # Candidates do not depend on K: draw them once per (user, mode) for all support sizes.
    base_cases = make_cases(dataset, test_users, max(ks)) if ks else []
    candidates = draw_candidates(base_cases, modes, popularity, seed)
    total, done = len(ks) * len(base_cases), 0
    rows, cells = [], ({} if per_user is None else per_user)
    for k in ks:
        latencies_ms = []
        case_metrics = {mode: [] for mode in modes}
        cases = make_cases(dataset, test_users, k)
        for case in cases:
            started = time.perf_counter()
            raw_scores = scorer.score(case.support, k, time=case.support_time) if getattr(scorer, "uses_time", False) else scorer.score(case.support, k)
            latencies_ms.append((time.perf_counter() - started) * 1000.0)
            scores = _checked_scores(raw_scores, n_items, scorer.name)
            for mode in modes:
                ranks = rank_positives(scores, case.query, candidates[(case.user, mode)])
                case_metrics[mode].append(metrics_from_ranks(ranks))
            done += 1
            if progress is not None:
                progress(done, total)
        p50, p95 = (np.percentile(latencies_ms, [50, 95]) if latencies_ms else (float("nan"), float("nan")))
        users = np.array([case.user for case in cases], dtype=np.int64)
        for mode in modes:
            cell = {"user": users, **{metric: np.array([m[metric] for m in case_metrics[mode]], dtype=np.float64) for metric in METRIC_NAMES}}
            cells[(int(k), mode)] = cell
            row = {"method": scorer.name, "k": int(k), "mode": mode}
            row.update({metric: float(np.mean(cell[metric])) if len(users) else float("nan") for metric in METRIC_NAMES})
            row.update({"users": len(users), "adapt_ms_p50": float(p50), "adapt_ms_p95": float(p95)})
            rows.append(row)
    return rows

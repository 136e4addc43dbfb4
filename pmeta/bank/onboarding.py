"""Closed-form collaborative init shaped like the cold-start task: the *onboarding regression*.

A new user's first positives are not a random sample of their taste. On MovieLens the first
ratings are made on the sign-up pages and the next ones follow from them; the cold-start protocol
asks exactly that question — given a user's first K positives, which items are positives 6..15?
EASE answers another one (item-item co-occurrence over whole histories). This module fits the
protocol's question directly on the train users, in closed form, and combines the two.

**Onboarding regression** (kernel ridge, one episode per train user and K = 1..5)::

    x_e = 1/K on the user's first K positives        X (E, n)
    y_e = 1 on the user's positives 6..15            Y (E, n),  ȳ = mean row of Y
    α   = (X Xᵀ + λI)⁻¹ (Y − ȳ)                      dual form: E ≈ 5 × train users ≪ n items
    W   = Xᵀ α                                       (n, n):  score(x) = ȳ + x W

**Combination with EASE's B** (each part divided by the standard deviation σ of its scores over
the train episodes, so ``a`` is a plain relative weight)::

    M    = B/σ_B + a·W/σ_W          bias = a·ȳ/σ_W          score(x) = bias + x M,  x = 1/K^γ on the support

With γ = 1, ``x`` is the mean indicator the regression was fitted on; γ = 0.5 (FISM's
normalisation) lets five support items weigh more than one against the bias. ``x M`` is exactly the
towers' collaborative user vector (``Σ h_j / n^γ``): factorising ``M ≈ P Qᵀ`` at ``cf_rank`` gives
the history and item embeddings, and ``bias`` initialises the item bias. ``λ``, ``a`` and ``γ`` are
chosen on a split of the train users by the protocol's full-ranking nDCG@10 (mean over K = 1, 3, 5),
never on test users; ``a = 0`` (EASE alone) is in the grid, so the choice can fall back to EASE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..eval.protocol import QUERY_START, QUERY_STOP, metrics_from_ranks, rank_positives

#: Support sizes of the training episodes and of the validation that chooses λ and a.
SUPPORT_SIZES = (1, 2, 3, 4, 5)
VALIDATION_SIZES = (1, 3, 5)
#: Grids of the ridge weight λ, of the relative weight a (0 = EASE alone) and of the pooling exponent γ.
LAMBDAS = (3.0, 10.0, 30.0)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
EXPONENTS = (1.0, 0.5)


@dataclass
class OnboardingFit:
    """The combined item-item matrix over ``kept`` items, its item bias, and how it was chosen."""

    matrix: np.ndarray  # (kept, kept) M = B/σ_B + a·W/σ_W
    bias: np.ndarray  # (kept,) a·ȳ/σ_W
    kept: np.ndarray  # catalogue indexes of the rows/columns
    lam: float
    weight: float
    exponent: float  # γ of the pooling
    validation: dict[str, float]  # "lam=..,a=..,pool=..": validation nDCG@10 of every grid point


def episodes(positives: list[np.ndarray], position: np.ndarray, sizes=SUPPORT_SIZES) -> tuple[np.ndarray, np.ndarray]:
    """Protocol-shaped training pairs over kept items: X (E, n) = 1/K on the first K positives,
    Y (E, n) = 1 on positives 6..15; users with fewer than 6 positives give none.
    ``position`` maps a catalogue index to its kept column (−1: not kept)."""
    n = int(position.max()) + 1 if len(position) else 0
    rows_x, rows_y = [], []
    for items in positives:
        if len(items) <= QUERY_START:
            continue
        query = position[items[QUERY_START:QUERY_STOP]]
        query = query[query >= 0]
        for k in sizes:
            support = position[items[:k]]
            support = support[support >= 0]
            if len(support) == 0 or len(query) == 0:
                continue
            x = np.zeros(n, dtype=np.float32)
            x[support] = 1.0 / len(support)
            y = np.zeros(n, dtype=np.float32)
            y[query] = 1.0
            rows_x.append(x)
            rows_y.append(y)
    if not rows_x:
        return np.zeros((0, n), np.float32), np.zeros((0, n), np.float32)
    return np.stack(rows_x), np.stack(rows_y)


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(W (n, n), ȳ (n,)) of the ridge regression above, in float32: the dual form
    ``Xᵀ (X Xᵀ + λI)⁻¹ (Y − ȳ)`` when there are fewer episodes than items (the MovieLens samples),
    else the primal ``(XᵀX + λI)⁻¹ Xᵀ (Y − ȳ)`` (the same matrix; the smaller system is solved)."""
    mean = y.mean(0) if len(y) else np.zeros(y.shape[1], np.float32)
    if len(x) == 0:
        return np.zeros((x.shape[1], x.shape[1]), np.float32), mean
    if len(x) <= x.shape[1]:
        alpha, mean = dual_ridge(x @ x.T, y, lam)
        return x.T @ alpha, mean
    centred = y - mean
    gram = (x.T @ x).astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    return np.linalg.solve(gram, (x.T @ centred).astype(np.float64)).astype(np.float32), mean.astype(np.float32)


def dual_ridge(gram: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(α (E, n), ȳ) in float32: the dual solution ``(G + λI)⁻¹ (Y − ȳ)`` for an episode kernel
    ``G`` (E, E), solved in float64; predictions are ``ȳ + k(x, X) α`` (``G = X Xᵀ``: :func:`ridge`)."""
    mean = y.mean(0)
    regularized = gram.astype(np.float64, copy=True)
    regularized[np.diag_indices_from(regularized)] += lam
    return np.linalg.solve(regularized, (y - mean).astype(np.float64)).astype(np.float32), mean.astype(np.float32)


def _scale(x: np.ndarray, matrix: np.ndarray) -> float:
    return float((x @ matrix).std()) if len(x) else 1.0


def combine(ease: np.ndarray, w: np.ndarray | None, mean: np.ndarray, x: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(M, bias) = (B/σ_B + a·W/σ_W, a·ȳ/σ_W), σ over the episodes' scores ``x`` (``w`` is unused at a = 0)."""
    sigma_b = max(_scale(x, ease), 1e-9)
    if weight == 0.0:
        return ease / sigma_b, np.zeros(len(mean), np.float32)
    sigma_w = max(_scale(x, w), 1e-9)
    return ease / sigma_b + (weight / sigma_w) * w, (weight / sigma_w) * mean


def validation_cases(positives: list[np.ndarray], rated: list[np.ndarray], n_items: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(positives, query, full-ranking negatives (Q, never rated)) of each validation user with at
    least 6 positives: computed once, shared by every grid point."""
    everything = np.arange(n_items)
    cases = []
    for items, seen in zip(positives, rated):
        if len(items) <= QUERY_START:
            continue
        query = items[QUERY_START:QUERY_STOP]
        never = np.setdiff1d(everything, seen, assume_unique=True)
        cases.append((items, query, np.broadcast_to(never, (len(query), len(never)))))
    return cases


def validation_ndcg(matrix: np.ndarray, bias: np.ndarray, cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]], position: np.ndarray, n_items: int, exponent: float = 1.0) -> float:
    """Full-ranking nDCG@10 (the protocol's ranks), mean over K = 1, 3, 5, of the validation
    ``cases`` (:func:`validation_cases`), scoring ``bias + Σ_{support} M_j / K^γ`` (items outside
    ``position`` rank last)."""
    per_k = []
    kept = np.flatnonzero(position >= 0)
    for k in VALIDATION_SIZES:
        values = []
        for items, query, negatives in cases:
            support = position[items[:k]]
            support = support[support >= 0]
            scores = np.full(n_items, -1e9)
            scores[kept] = bias + (matrix[support].sum(0) / len(support) ** exponent if len(support) else 0.0)
            values.append(metrics_from_ranks(rank_positives(scores, query, negatives))["ndcg@10"])
        per_k.append(float(np.mean(values)) if values else 0.0)
    return float(np.mean(per_k))


def fit(
    fit_positives: list[np.ndarray],
    fit_ease: np.ndarray,
    validation_positives: list[np.ndarray],
    validation_rated: list[np.ndarray],
    all_positives: list[np.ndarray],
    all_ease: np.ndarray,
    kept: np.ndarray,
    n_items: int,
    lambdas=LAMBDAS,
    weights=WEIGHTS,
    exponents=EXPONENTS,
) -> OnboardingFit:
    """Choose (λ, a, γ) on validation users with EASE and the regression fitted on ``fit_positives``
    (``fit_ease`` is EASE's B over ``kept`` from those users only), then refit on ``all_positives``
    with ``all_ease`` (B from every train user). Ties go to the smaller ``a`` (closer to EASE), then
    to the larger γ (the mean)."""
    position = np.full(n_items, -1, dtype=np.int64)
    position[kept] = np.arange(len(kept))
    x, y = episodes(fit_positives, position)
    cases = validation_cases(validation_positives, validation_rated, n_items)
    scores: dict[tuple[float, float, float], float] = {}
    for lam in lambdas:
        w, mean = ridge(x, y, lam)
        for weight in weights:
            key_lam = 0.0 if weight == 0.0 else lam
            if (key_lam, weight, exponents[0]) in scores:
                continue  # EASE alone does not depend on λ
            matrix, bias = combine(fit_ease, w, mean, x, weight)
            for exponent in exponents:
                scores[(key_lam, weight, exponent)] = validation_ndcg(matrix, bias, cases, position, n_items, exponent)
            del matrix
        del w
    lam, weight, exponent = max(scores, key=lambda key: (scores[key], -key[1], key[2]))
    matrix, bias = _combined(all_positives, all_ease, position, lam, weight)
    return OnboardingFit(matrix, bias, kept, lam, weight, exponent, {f"lam={k[0]:g},a={k[1]:g},pool={k[2]:g}": v for k, v in scores.items()})


def refit(chosen: OnboardingFit, positives: list[np.ndarray], ease: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, bias) at ``chosen``'s (λ, a) fitted on other users (``ease`` = their B over ``chosen.kept``):
    the model the grid scored, for choices made after it on the same validation users."""
    position = np.full(n_items, -1, dtype=np.int64)
    position[chosen.kept] = np.arange(len(chosen.kept))
    return _combined(positives, ease, position, chosen.lam, chosen.weight)


def _combined(positives: list[np.ndarray], ease: np.ndarray, position: np.ndarray, lam: float, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(M, bias) of :func:`combine` with the regression fitted on ``positives`` at λ (none at a = 0)."""
    x, y = episodes(positives, position)
    if weight > 0:
        w, mean = ridge(x, y, lam)
    else:  # EASE alone: no regression to fit
        w, mean = None, np.zeros(int(position.max()) + 1, np.float32)
    return combine(ease, w, mean, x, weight)

"""Anchors' item bias: what the users of an anchor liked more than train users at large.

Each anchor a (a k-means cluster of train users in the retrieval key space) carries an item-score
offset

    o_a(i) = γ · [ log((1 − ν) p_a(i) + ν p(i) + ε) − log(p(i) + ε) ]

where ``p_a`` is the share of the cluster's positive ratings that item i has, ``p`` the same share
over every train user, and ν = :data:`MIX` keeps the cluster's estimate near the global one where
it has few ratings. An item no train user liked gets 0. A user's offset is the weighted sum
``Σ_j w_j o_{a_j}`` over the retrieved anchors with the adapters' fusion weights: exact, like the
adapters' fusion. The ranking score adds it beside the time prior (``batch.prior``), wherever anchors
are retrieved (serving, validation, and meta-training's stack stage; the anchor stage adds each
user's own anchor's), so the baselines that share the bank's head without its anchors
(prompt-MAML, per-user LoRA) do not get it.

γ is chosen on validation users held out of the train users (:func:`choose`; γ = 0 switches it off)
and stored multiplied into ``anchor_bias`` (A_n, N). Fixed at build time.

**Less of it for short histories** (``BankConfig.anchor_bias_size_scale``, stored as
``head/anchor_bias_scale`` (S,)): serving multiplies a user's offset by s_n for a history of n liked
items (read per user like a per-size time-prior weight, :func:`pmeta.tasks.time_prior.weight_of`; s_1 = 0.5, s_2 = 0.75, s_n = 1 from 3 on by default). γ is chosen on the
closed-form scores before meta-training, for every support size at once; scored on the model a
bank serves, on its own validation users, half of γ ranked 1-item histories better — uni99
nDCG@10 +0.013 (ml-100k, 6 banks, 444 users) and +0.005 (ml-1m, 3 banks, 1,448 users), full
ranking +0.004 / +0.001, pop99 level (ml-latest-small, 144 users: full ranking +0.006, level
otherwise) — while 3- and 5-item histories lost pop99 with less of it
(docs/movielens.md, stop 60). One item says little about which cluster a user belongs to, so its
cluster's statistics deserve less weight. Meta-training (the anchor and stack stages) uses γ
itself; validation and serving use the scaled offset. A bank without the entry (built before
stop 60, or with the scale 1 throughout) serves γ at every size.
"""

from __future__ import annotations

import numpy as np
import torch

from .fuse import prior_weights

#: Share of the global distribution mixed into each anchor's.
MIX = 0.1
EPSILON = 1e-7
#: Floor of a sum that is divided by: only ever reached by a sum of 0 (whose quotient is 0 either way).
_TINY = np.finfo(np.float64).tiny
#: The γ grid :func:`choose` tries (0 = off).
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def shares(positives: list[np.ndarray], assignment: np.ndarray, anchors: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(``p_a`` (A_n, N), ``p`` (N,)): each anchor's share of its users' positives per item, and the
    same over every user (``positives[u]`` item indexes of user u, ``assignment[u]`` u's anchor; a
    user's repeated item counts once). An anchor without users gets ``p``."""
    counts = np.zeros((anchors, n_items))
    for items, anchor in zip(positives, assignment):
        np.add.at(counts[int(anchor)], np.unique(np.asarray(items, dtype=np.int64)), 1.0)
    return shares_of_counts(counts)


def shares_of_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`shares` from (A_n, N) non-negative counts, which may be weighted (fractional): each
    row over its sum, the column sums over the total; a row without counts gets ``p``."""
    overall = counts.sum(0)
    overall = overall / max(overall.sum(), _TINY)
    out = counts / np.maximum(counts.sum(1, keepdims=True), _TINY)
    out[counts.sum(1) == 0] = overall  # an empty anchor is the global distribution: offset 0
    return out, overall


def ratio_of_shares(per_anchor: np.ndarray, overall: np.ndarray) -> np.ndarray:
    """(A_n, N) float64 ``log((1 − ν) p_a + ν p + ε) − log(p + ε)``."""
    return np.log((1.0 - MIX) * per_anchor + MIX * overall + EPSILON) - np.log(overall + EPSILON)


def log_ratio(positives: list[np.ndarray], assignment: np.ndarray, anchors: int, n_items: int) -> np.ndarray:
    """(A_n, N) float32: each anchor's ``log((1 − ν) p_a + ν p + ε) − log(p + ε)`` (:func:`shares`)."""
    return ratio_of_shares(*shares(positives, assignment, anchors, n_items)).astype(np.float32)


def fused(bias: torch.Tensor, indexes: torch.Tensor, weights: torch.Tensor, has_key: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The users' offsets (U, N) = Σ_j w_j bias[indexes[:, j]] (indexes, weights: (U, k)); a user
    without a key (``has_key`` False) gets every anchor weighted by its train users (``sizes``), as
    the zero-history prior adapter does."""
    out = torch.einsum("uk,ukn->un", weights.to(bias.dtype), bias[indexes])
    if not bool(has_key.all()):
        everyone = prior_weights(sizes).to(bias.dtype) @ bias
        out = torch.where(has_key[:, None], out, everyone[None, :])
    return out


def offsets(queries: np.ndarray, centroids: np.ndarray, ratio: np.ndarray, sizes: np.ndarray, top_k: int, temperature: float) -> np.ndarray:
    """(U, N) unscaled offsets of users with retrieval keys ``queries`` (U, r) (a zero row: no key),
    retrieving ``top_k`` of the anchors ``centroids`` (A_n, r) as serving does: an exact
    :class:`~pmeta.fusion.index.AnchorIndex`, :func:`~pmeta.fusion.fuse.fusion_weights` at
    ``temperature``, :func:`fused` of ``ratio`` (A_n, N) with the zero-key rule over ``sizes``."""
    from .fuse import fusion_weights
    from .index import AnchorIndex

    queries = np.asarray(queries, dtype=np.float32)
    sims, idx = AnchorIndex.build(np.asarray(centroids, dtype=np.float32), kind="flat").search(queries, top_k)
    return fused(
        torch.from_numpy(np.asarray(ratio, dtype=np.float64)),
        torch.from_numpy(idx).long(),
        fusion_weights(torch.from_numpy(sims).double(), temperature),
        torch.from_numpy(np.linalg.norm(queries, axis=1) > 0),
        torch.from_numpy(np.asarray(sizes, dtype=np.float64)),
    ).numpy()


def choose(base_scores, cases: list, keys, centroids: np.ndarray, ratio: np.ndarray, sizes: np.ndarray, top_k: int, temperature: float, popularity: np.ndarray, weights=WEIGHTS, ks: tuple[int, ...] = (1, 3, 5), modes: tuple[str, ...] | None = None, seed: int = 0) -> tuple[float, dict[str, dict[str, float]]]:
    """Choose γ on validation ``cases`` (:func:`pmeta.tasks.time_prior.validation_cases`) by nDCG@10
    averaged over ``ks`` and the protocol's candidate modes, as the time prior's (h, β) are chosen.

    ``base_scores(support, time) -> (N,)`` is the model without the offset; ``keys(support) -> (r,)``
    a unit retrieval key; ``centroids`` (A_n, r), ``ratio`` (A_n, N) (:func:`log_ratio`) and
    ``sizes`` (A_n,) (users per anchor) come from users other than the validation users. Anchors
    are retrieved and fused as serving does (:func:`offsets`), at the build's initial τ (the stack
    stage learns it afterwards). Ties go to the smaller γ. Returns (γ, every grid point's nDCG@10
    per mode and their mean)."""
    from ..eval.protocol import MODES, draw_candidates, drawable_modes, mean_ndcg
    from ..tasks.time_prior import supports

    modes = drawable_modes([case for case, _ in cases], MODES if modes is None else modes, popularity)  # all three on MovieLens
    candidates = draw_candidates([case for case, _ in cases], modes, popularity, seed)
    rows = list(supports(cases, ks))
    queries = np.stack([keys(support) for _, support, _, _ in rows])
    prepared = [(user, base_scores(support, t), offset, query) for (user, support, t, query), offset in zip(rows, offsets(queries, centroids, ratio, sizes, top_k, temperature))]
    scores: dict[float, dict[str, float]] = {}
    for gamma in weights:
        scores[gamma] = mean_ndcg(((user, base + gamma * offset, query) for user, base, offset, query in prepared), candidates, modes)
    gamma = max(scores, key=lambda key: (scores[key]["mean"], -key))
    return gamma, {f"gamma={key:g}": value for key, value in scores.items()}

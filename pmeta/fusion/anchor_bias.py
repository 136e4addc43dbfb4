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
"""

from __future__ import annotations

import numpy as np
import torch

#: Share of the global distribution mixed into each anchor's.
MIX = 0.1
EPSILON = 1e-7
#: The γ grid :func:`choose` tries (0 = off).
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def log_ratio(positives: list[np.ndarray], assignment: np.ndarray, anchors: int, n_items: int) -> np.ndarray:
    """(A_n, N) float32: each anchor's ``log((1 − ν) p_a + ν p + ε) − log(p + ε)`` from the positives of
    its users (``positives[u]`` item indexes of user u, ``assignment[u]`` u's anchor)."""
    counts = np.zeros((anchors, n_items))
    for items, anchor in zip(positives, assignment):
        np.add.at(counts[int(anchor)], np.unique(np.asarray(items, dtype=np.int64)), 1.0)
    overall = counts.sum(0)
    overall = overall / max(overall.sum(), 1.0)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    shares[counts.sum(1) == 0] = overall  # an empty anchor is the global distribution: offset 0
    out = np.log((1.0 - MIX) * shares + MIX * overall + EPSILON) - np.log(overall + EPSILON)
    return out.astype(np.float32)


def fused(bias: torch.Tensor, indexes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The users' offsets (U, N) = Σ_j w_j bias[indexes[:, j]] (indexes, weights: (U, k))."""
    return torch.einsum("uk,ukn->un", weights.to(bias.dtype), bias[indexes])


def retrieval_weights(keys: np.ndarray, centroids: np.ndarray, top_k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(indexes, weights) (U, k) of an exact search of unit ``keys`` among unit ``centroids``, with the
    adapters' fusion weights softmax(similarity / τ)."""
    sims = keys @ centroids.T
    k = min(top_k, centroids.shape[0])
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, idx, axis=1)
    weights = np.exp((top - top.max(1, keepdims=True)) / temperature)
    return idx, weights / weights.sum(1, keepdims=True)


def offsets(keys: np.ndarray, centroids: np.ndarray, ratio: np.ndarray, sizes: np.ndarray, top_k: int, temperature: float) -> np.ndarray:
    """(U, N) float64: the fused ``ratio`` rows of the anchors retrieved by unit ``keys``, as serving
    fuses them (:meth:`pmeta.bank.model.PmetaModel.anchor_offset`); a zero key gets every anchor
    weighted by its users (``sizes``)."""
    idx, weights = retrieval_weights(keys, centroids, top_k, temperature)
    out = np.einsum("uk,ukn->un", weights, ratio[idx].astype(np.float64))
    empty = np.linalg.norm(keys, axis=1) == 0
    if empty.any():
        out[empty] = (sizes / max(sizes.sum(), 1.0)) @ ratio.astype(np.float64)
    return out


def choose(base_scores, cases: list, keys, centroids: np.ndarray, ratio: np.ndarray, sizes: np.ndarray, top_k: int, temperature: float, popularity: np.ndarray, weights=WEIGHTS, ks: tuple[int, ...] = (1, 3, 5), modes: tuple[str, ...] | None = None, seed: int = 0) -> tuple[float, dict[str, dict[str, float]]]:
    """Choose γ on validation ``cases`` (:func:`pmeta.tasks.time_prior.validation_cases`) by nDCG@10
    averaged over ``ks`` and the protocol's candidate modes, as the time prior's (h, β) are chosen.

    ``base_scores(support, time) -> (N,)`` is the model without the offset; ``keys(support) -> (r,)``
    a unit retrieval key; ``centroids`` (A_n, r), ``ratio`` (A_n, N) (:func:`log_ratio`) and
    ``sizes`` (A_n,) (users per anchor) come from users other than the validation users. The
    fusion temperature is the build's initial τ (the stack stage learns it afterwards). Ties go to
    the smaller γ. Returns (γ, every grid point's nDCG@10 per mode and their mean)."""
    from ..eval.protocol import MODES, QUERY_START, mean_ndcg, draw_candidates

    modes = MODES if modes is None else modes
    candidates = draw_candidates([case for case, _ in cases], modes, popularity, seed)
    prepared = []
    for k in ks:
        k = min(k, QUERY_START)
        for case, times in cases:
            support = case.support[:k]
            offset = offsets(keys(support)[None, :], centroids, ratio, sizes, top_k, temperature)[0]
            prepared.append((case.user, base_scores(support, float(times[k - 1])), offset, case.query))
    scores: dict[float, dict[str, float]] = {}
    for gamma in weights:
        scores[gamma] = mean_ndcg(((user, base + gamma * offset, query) for user, base, offset, query in prepared), candidates, modes)
    gamma = max(scores, key=lambda key: (scores[key]["mean"], -key))
    return gamma, {f"gamma={key:g}": value for key, value in scores.items()}

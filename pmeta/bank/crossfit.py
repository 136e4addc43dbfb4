"""Cross-fitted training priors: the time prior and the anchors' item bias that meta-training scores
a train user with, counted without that user's own ratings.

Serving adds two fixed item-score terms counted over every train user: the time prior
(:mod:`pmeta.tasks.time_prior`) and the anchors' item bias (:mod:`pmeta.fusion.anchor_bias`). A new
user is never among those train users; the user a meta-training episode scores always is, and their
own ratings, query items included, are in both counts. Many users rate dozens of films in one
session, so the time prior at their own time largely repeats their own ratings: in training the two
terms look far more informative than they are for a new user (``benchmarks/self_inclusion.py``
measures it), and the stages learn from a signal serving never has.

With ``crossfit_folds = F`` (``BankConfig``) the build splits the train users into F folds and scores
a user of fold f, in every training stage, with a time prior and an anchor bias counted over the
other folds' users only (same bandwidth, weights, anchors and assignment). The stored serving
tensors are unchanged: they still count every train user. Validation users (early stopping) are not
train users, so they are scored with the serving tensors, as a new user is; so is any other user
outside the folds that a training loop samples (prompt-MAML's episodes in ``pmeta eval`` also draw
the bank's validation users, whom the serving tensors do not count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..fusion import anchor_bias
from ..tasks import time_prior


@dataclass
class CrossFit:
    """Per-fold training priors. ``fold[u]``: train user u's fold; ``priors[f]``: the time-prior head
    entries counted without fold f ({} when the bank has no time prior); ``biases`` (F, A_n, N): the
    anchors' item bias (γ included) counted without each fold, or None when the bank has none.
    A user outside ``fold`` (not counted in the serving tensors) gets ``serving_prior`` (the bank's
    head entries) and ``serving_bias`` (the bank's ``anchor_bias``)."""

    fold: dict[int, int]
    priors: list[dict[str, torch.Tensor]]
    biases: torch.Tensor | None
    serving_prior: dict[str, torch.Tensor]
    serving_bias: torch.Tensor | None

    @property
    def folds(self) -> int:
        return len(self.priors)

    def _groups(self, users: list[int]):
        """(fold or -1 for a user outside the folds, row indexes) of ``users``."""
        folds = np.array([self.fold.get(int(u), -1) for u in users], dtype=np.int64)
        for f in np.unique(folds):
            yield int(f), torch.from_numpy(np.flatnonzero(folds == f))

    def _prior_of(self, f: int) -> dict[str, torch.Tensor]:
        if f < 0 and not self.serving_prior:
            raise ValueError("a user outside the folds needs the serving time prior, which this CrossFit lacks")
        return self.serving_prior if f < 0 else self.priors[f]

    def _bias_of(self, f: int) -> torch.Tensor:
        if f < 0 and self.serving_bias is None:
            raise ValueError("a user outside the folds needs the serving anchor bias, which this CrossFit lacks")
        return self.serving_bias if f < 0 else self.biases[f]

    def prior(self, users: list[int], times: list[float | None], device: torch.device | str, sizes: list[int] | None = None) -> torch.Tensor | None:
        """``β · prior(t)`` (U, N) of train ``users`` at ``times`` (None: unknown), each from its fold's table; None without a time prior.
        ``sizes``: the users' numbers of liked history items (for a β per history size)."""
        if not self.priors[0]:
            return None
        t = torch.tensor([float("nan") if x is None else float(x) for x in times], dtype=torch.float64)
        out = torch.empty(len(users), time_prior.item_count(self.priors[0]))
        for f, rows in self._groups(users):
            out[rows] = time_prior.user_prior(self._prior_of(f), t[rows], None if sizes is None else [sizes[int(r)] for r in rows]).float()
        return out.to(device)

    def own_bias(self, users: list[int], anchors: torch.Tensor) -> torch.Tensor | None:
        """(U, N): each user's own anchor's (``anchors`` (U,)) item bias, counted without the user's fold."""
        if self.biases is None:
            return None
        anchors = anchors.to(self.biases.device)
        out = torch.empty(len(users), self.biases.shape[2], dtype=self.biases.dtype, device=self.biases.device)
        for f, rows in self._groups(users):
            rows = rows.to(self.biases.device)
            out[rows] = self._bias_of(f)[anchors[rows]]
        return out

    def fused_bias(self, users: list[int], indexes: torch.Tensor, weights: torch.Tensor, has_key: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        """:func:`pmeta.fusion.anchor_bias.fused` of the retrieved anchors (``indexes``, ``weights`` (U, k)),
        each user from the bias counted without their fold; None when the bank has no anchor bias."""
        if self.biases is None:
            return None
        out = torch.empty(len(users), self.biases.shape[2], dtype=self.biases.dtype, device=self.biases.device)
        for f, rows in self._groups(users):
            rows = rows.to(self.biases.device)
            out[rows] = anchor_bias.fused(self._bias_of(f), indexes[rows], weights[rows], has_key[rows], sizes)
        return out

    def to(self, device: torch.device | str) -> "CrossFit":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return CrossFit(self.fold, self.priors, move(self.biases), self.serving_prior, move(self.serving_bias))


def assign_folds(users: np.ndarray, folds: int, seed: int) -> dict[int, int]:
    """Each of ``users`` to one of ``folds`` folds of (nearly) equal size, in a seeded random order."""
    order = np.random.default_rng(seed).permutation(np.asarray(users, dtype=np.int64))
    return {int(u): position % folds for position, u in enumerate(order)}


def build(
    folds: int,
    seed: int,
    users: np.ndarray,
    events: tuple[np.ndarray, np.ndarray, np.ndarray],
    positives: list[np.ndarray],
    n_items: int,
    time_bandwidth_days: float | None,
    time_weight: float | list[float],
    assignment: np.ndarray | None,
    n_anchors: int,
    gamma: float,
    serving_prior: dict[str, torch.Tensor] | None = None,
    serving_bias: torch.Tensor | None = None,
    kind: str = "exponential",
    pseudo_ratings: float = 0.0,
) -> CrossFit:
    """The per-fold priors of the train ``users`` (in the order of ``positives`` and ``assignment``):
    ``events`` = (user, item, timestamp) arrays of every rating, of which the train users' are counted;
    the time prior at ``time_bandwidth_days`` and β = ``time_weight`` (0: none; a list: one per history
    size, :func:`pmeta.tasks.time_prior.weight_of`); the anchors' bias
    at γ = ``gamma`` (0: none) over the anchors ``assignment``; ``serving_prior`` / ``serving_bias``:
    the bank's own tensors, for users outside the folds (:class:`CrossFit`); ``kind`` and
    ``pseudo_ratings``: as :func:`pmeta.tasks.time_prior.build`."""
    if folds < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    users = np.asarray(users, dtype=np.int64)
    fold = assign_folds(users, folds, seed)
    user_fold = np.array([fold[int(u)] for u in users], dtype=np.int64)
    event_users, event_items, event_times = (np.asarray(x) for x in events)
    lookup = np.full(int(max(event_users.max(initial=0), users.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[users] = user_fold
    event_fold = lookup[event_users]  # -1: a rating of a user outside the train users, never counted
    in_train = event_fold >= 0
    priors: list[dict[str, torch.Tensor]] = []
    biases = []
    for f in range(folds):
        if not time_prior.weights_off(time_weight):
            keep = in_train & (event_fold != f)
            priors.append(time_prior.head_entries(time_prior.build(event_items[keep], event_times[keep], n_items, float(time_bandwidth_days), kind, pseudo_ratings), time_weight))
        else:
            priors.append({})
        if gamma > 0 and assignment is not None:
            others = np.flatnonzero(user_fold != f)
            ratio = anchor_bias.log_ratio([positives[i] for i in others], assignment[others], n_anchors, n_items)
            biases.append(torch.from_numpy(gamma * ratio))
    return CrossFit(fold, priors, torch.stack(biases) if biases else None, serving_prior or {}, serving_bias)

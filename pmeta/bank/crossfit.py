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
train users, so they are scored with the serving tensors, as a new user is.
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
    anchors' item bias (γ included) counted without each fold, or None when the bank has none."""

    fold: dict[int, int]
    priors: list[dict[str, torch.Tensor]]
    biases: torch.Tensor | None

    @property
    def folds(self) -> int:
        return len(self.priors)

    def _groups(self, users: list[int]):
        folds = np.array([self.fold[int(u)] for u in users], dtype=np.int64)
        for f in np.unique(folds):
            yield int(f), torch.from_numpy(np.flatnonzero(folds == f))

    def prior(self, users: list[int], times: list[float | None], device: torch.device | str) -> torch.Tensor | None:
        """``β · prior(t)`` (U, N) of train ``users`` at ``times`` (None: unknown), each from its fold's table; None without a time prior."""
        if not self.priors[0]:
            return None
        t = torch.tensor([float("nan") if x is None else float(x) for x in times], dtype=torch.float64)
        out = torch.empty(len(users), self.priors[0]["time_log_prior"].shape[1])
        for f, rows in self._groups(users):
            out[rows] = time_prior.user_prior(self.priors[f], t[rows]).float()
        return out.to(device)

    def own_bias(self, users: list[int], anchors: torch.Tensor) -> torch.Tensor | None:
        """(U, N): each user's own anchor's (``anchors`` (U,)) item bias, counted without the user's fold."""
        if self.biases is None:
            return None
        folds = torch.tensor([self.fold[int(u)] for u in users], dtype=torch.long, device=self.biases.device)
        return self.biases[folds, anchors.to(self.biases.device)]

    def fused_bias(self, users: list[int], indexes: torch.Tensor, weights: torch.Tensor, has_key: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        """:func:`pmeta.fusion.anchor_bias.fused` of the retrieved anchors (``indexes``, ``weights`` (U, k)),
        each user from the bias counted without their fold; None when the bank has no anchor bias."""
        if self.biases is None:
            return None
        out = torch.empty(len(users), self.biases.shape[2], dtype=self.biases.dtype, device=self.biases.device)
        for f, rows in self._groups(users):
            rows = rows.to(self.biases.device)
            out[rows] = anchor_bias.fused(self.biases[f], indexes[rows], weights[rows], has_key[rows], sizes)
        return out

    def to(self, device: torch.device | str) -> "CrossFit":
        return CrossFit(self.fold, self.priors, None if self.biases is None else self.biases.to(device))


def assign_folds(users: np.ndarray, folds: int, seed: int) -> dict[int, int]:
    """Each of ``users`` to one of ``folds`` folds of (nearly) equal size, in a seeded random order."""
    order = np.random.default_rng(seed).permutation(np.asarray(users, dtype=np.int64))
    return {int(u): position % folds for position, u in enumerate(order)}


def build(
    folds: int,
    seed: int,
    users: np.ndarray,
    events: tuple[np.ndarray, np.ndarray],
    positives: list[np.ndarray],
    n_items: int,
    time_bandwidth_days: float | None,
    time_weight: float,
    assignment: np.ndarray | None,
    n_anchors: int,
    gamma: float,
) -> CrossFit:
    """The per-fold priors of the train ``users`` (in the order of ``positives`` and ``assignment``):
    ``events`` = (user, item, timestamp) arrays of every rating, of which the train users' are counted;
    the time prior at ``time_bandwidth_days`` and β = ``time_weight`` (0: none); the anchors' bias
    at γ = ``gamma`` (0: none) over the anchors ``assignment``."""
    if folds < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    users = np.asarray(users, dtype=np.int64)
    fold = assign_folds(users, folds, seed)
    user_fold = np.array([fold[int(u)] for u in users], dtype=np.int64)
    event_users, event_items, event_times = events
    in_train = np.isin(event_users, users)
    event_fold = np.full(len(event_users), -1, dtype=np.int64)
    event_fold[in_train] = [fold[int(u)] for u in event_users[in_train]]
    priors: list[dict[str, torch.Tensor]] = []
    biases = []
    for f in range(folds):
        if time_weight > 0:
            keep = in_train & (event_fold != f)
            grid, log_prior = time_prior.table(event_items[keep], event_times[keep], n_items, float(time_bandwidth_days))
            priors.append(time_prior.head_entries(grid, log_prior, time_weight))
        else:
            priors.append({})
        if gamma > 0 and assignment is not None:
            others = np.flatnonzero(user_fold != f)
            ratio = anchor_bias.log_ratio([positives[i] for i in others], assignment[others], n_anchors, n_items)
            biases.append(torch.from_numpy(gamma * ratio))
    return CrossFit(fold, priors, torch.stack(biases) if biases else None)

"""Episodes for meta-training: a user's positives split into a support set and a query set.

Each episode draws K ~ U{support_min..support_max}. With ``episode_start = "any"`` it also draws a
start position s, then support = positives[s : s+K] and query = positives[s+K : s+K+query_size]
(time order, as in the cold-start protocol where the support precedes the query). With
``episode_start = "first"`` an episode is shaped exactly like the protocol's cold-start case:
support = the first K positives, query = positives 6..15 (users with at least 6 positives; the
others still draw "any" episodes). The query loss ignores every other item the user rated (they are
not candidates in the protocol either).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import BankConfig
from ..eval.protocol import QUERY_START
from .model import UserInput


@dataclass
class Episode:
    users: list[int]
    support: list[UserInput]
    query_targets: torch.Tensor  # (U, Q)
    query_mask: torch.Tensor  # (U, Q)
    query_exclude: torch.Tensor  # (U, N) bool: rated items other than the query targets
    support_and_query: tuple[torch.Tensor, torch.Tensor]  # Reptile's inner targets and mask


def query_tensors(queries: list[np.ndarray], rated: list[np.ndarray], n_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded query targets (U, Q), their mask, and the (U, N) exclusion of every rated item that
    is not a query target (those are no candidates in the protocol either)."""
    targets = torch.zeros(len(queries), max([len(q) for q in queries] + [1]), dtype=torch.long)
    mask = torch.zeros(targets.shape)
    exclude = torch.zeros(len(queries), n_items, dtype=torch.bool)
    for row, (query, seen) in enumerate(zip(queries, rated)):
        targets[row, : len(query)] = torch.from_numpy(query)
        mask[row, : len(query)] = 1
        exclude[row, torch.from_numpy(seen)] = True
        exclude[row, torch.from_numpy(query)] = False
    return targets, mask, exclude


def user_input(items: np.ndarray, item_texts: list[str], time: float | None = None) -> UserInput:
    """A support set as the model reads it (as serving reads a history.json of these items);
    ``time``: the timestamp of the latest one."""
    liked = [int(i) for i in items]
    return UserInput(liked_items=liked, texts=[item_texts[i] for i in liked], seen_items=liked, time=None if time is None else float(time))


class EpisodeSampler:
    def __init__(self, positives: dict[int, np.ndarray], rated: dict[int, np.ndarray], users: np.ndarray, item_texts: list[str], config: BankConfig, seed: int, times: dict[int, np.ndarray] | None = None) -> None:
        self.positives = positives
        self.times = times or {}
        self.rated = rated
        self.users = np.array([u for u in users if len(positives.get(int(u), ())) >= config.min_positives], dtype=np.int64)
        if len(self.users) == 0:
            raise ValueError("no train user has enough positive interactions to meta-train on")
        self.item_texts = item_texts
        self.config = config
        self.rng = np.random.default_rng(seed)

    def sample(self, count: int, pool: np.ndarray | None = None) -> Episode:
        pool = self.users if pool is None else pool
        chosen = self.rng.choice(pool, size=count, replace=len(pool) < count)
        return self.episode([int(u) for u in chosen])

    def episode(self, users: list[int]) -> Episode:
        c = self.config
        n_items = len(self.item_texts)
        support, queries = [], []
        for user in users:
            items = self.positives[user]
            if c.episode_start == "first" and len(items) > QUERY_START:
                k = int(self.rng.integers(c.support_min, min(c.support_max, QUERY_START) + 1))
                support.append(user_input(items[:k], self.item_texts, self._time(user, k - 1)))
                queries.append(items[QUERY_START : QUERY_START + c.query_size])
                continue
            k = int(self.rng.integers(c.support_min, min(c.support_max, len(items) - 1) + 1))
            start = int(self.rng.integers(0, len(items) - k))  # leaves at least one query item
            support.append(user_input(items[start : start + k], self.item_texts, self._time(user, start + k - 1)))
            queries.append(items[start + k : start + k + c.query_size])
        targets, mask, exclude = query_tensors(queries, [self.rated[u] for u in users], n_items)
        both_width = targets.shape[1] + c.support_max
        both = torch.zeros(len(users), both_width, dtype=torch.long)
        both_mask = torch.zeros(len(users), both_width)
        for row, (query, sup) in enumerate(zip(queries, support)):
            joined = torch.tensor(sup.liked_items + [int(q) for q in query], dtype=torch.long)
            both[row, : len(joined)] = joined
            both_mask[row, : len(joined)] = 1
        return Episode(users, support, targets, mask, exclude, (both, both_mask))

    def _time(self, user: int, position: int) -> float | None:
        """The timestamp of the user's positive number ``position`` (None without timestamps)."""
        times = self.times.get(user)
        return None if times is None else float(times[position])


def fixed_episode(positives: dict[int, np.ndarray], users: np.ndarray, item_texts: list[str], k: int = 5, query: int = 10, times: dict[int, np.ndarray] | None = None) -> tuple[list[UserInput], list[np.ndarray], list[int]]:
    """Deterministic validation split as in the protocol: support = first k positives, query = 6..15
    (``times``: the positives' timestamps, for the time of the support)."""
    inputs, queries, kept = [], [], []
    for user in users:
        items = positives.get(int(user))
        if items is None or len(items) < 6:
            continue
        inputs.append(user_input(items[:k], item_texts, None if times is None else times[int(user)][k - 1]))
        queries.append(items[5 : 5 + query])
        kept.append(int(user))
    return inputs, queries, kept

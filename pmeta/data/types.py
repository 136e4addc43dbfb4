"""In-memory dataset types shared by every reader, the bank build and the evaluation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Interactions with a rating at or above this value are positives (PROTOCOL.md, coldstart-v1).
POSITIVE_RATING = 4.0


@dataclass(frozen=True)
class Catalog:
    """The items a bank can recommend. ``item_ids`` are the dataset's own ids as strings."""

    item_ids: list[str]
    titles: list[str]
    genres: list[list[str]]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.item_ids) == len(self.titles) == len(self.genres)):
            raise ValueError("item_ids, titles and genres must have the same length")
        object.__setattr__(self, "index", {item_id: i for i, item_id in enumerate(self.item_ids)})

    def __len__(self) -> int:
        return len(self.item_ids)

    def text(self, i: int) -> str:
        """The text that represents item ``i`` to the encoder: title plus genres (the year is in the title)."""
        genres = [g for g in self.genres[i] if g and g != "(no genres listed)"]
        return f"{self.titles[i]}. {', '.join(genres)}" if genres else self.titles[i]

    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self))]


@dataclass(frozen=True)
class Ratings:
    """One row per rating, as parallel numpy arrays. ``user`` and ``item`` are dense indexes."""

    user: np.ndarray  # int64, index into user_ids
    item: np.ndarray  # int64, index into the Catalog
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64, seconds since the epoch
    user_ids: list[str]  # dense user index -> the dataset's own user id

    def __len__(self) -> int:
        return int(self.user.shape[0])

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class Dataset:
    """A catalogue plus its ratings. ``fingerprint`` is the sha256 of the source files read."""

    name: str
    format: str
    catalog: Catalog
    ratings: Ratings
    fingerprint: str

    def positives_by_user(self, threshold: float = POSITIVE_RATING) -> dict[int, np.ndarray]:
        """Each user's positive items (rating >= threshold) sorted by timestamp, ties by item index."""
        return self._positives_in_time_order(threshold, "item")

    def positive_times_by_user(self, threshold: float = POSITIVE_RATING) -> dict[int, np.ndarray]:
        """The timestamps (seconds since the epoch) of :meth:`positives_by_user`, in the same order."""
        return self._positives_in_time_order(threshold, "timestamp")

    def _positives_in_time_order(self, threshold: float, field: str) -> dict[int, np.ndarray]:
        r = self.ratings
        keep = r.rating >= threshold
        users, items, times = r.user[keep], r.item[keep], r.timestamp[keep]
        order = np.lexsort((items, times, users))
        users, values = users[order], getattr(r, field)[keep][order]
        if len(users) == 0:
            return {}
        cuts = np.flatnonzero(np.diff(users)) + 1
        return {int(u[0]): v for u, v in zip(np.split(users, cuts), np.split(values, cuts))}

    def rated_by_user(self) -> dict[int, np.ndarray]:
        """Every item each user rated, at any rating (unsorted unique indexes)."""
        r = self.ratings
        order = np.argsort(r.user, kind="stable")
        users, items = r.user[order], r.item[order]
        cuts = np.flatnonzero(np.diff(users)) + 1
        return {int(u[0]): np.unique(i) for u, i in zip(np.split(users, cuts), np.split(items, cuts)) if len(u)}


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of the given files, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

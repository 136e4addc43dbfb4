"""Datasets and user histories: MovieLens readers, the shipped sample, the history.json schema."""

from .history import HistoryItem, ResolvedHistory, UserHistory, load_history, parse_history, resolve_history
from .movielens import read_movielens
from .sample import SAMPLE_DIR, load_sample
from .types import POSITIVE_RATING, Catalog, Dataset, Ratings

__all__ = [
    "POSITIVE_RATING", "SAMPLE_DIR", "Catalog", "Dataset", "HistoryItem", "Ratings", "ResolvedHistory",
    "UserHistory", "load_history", "load_sample", "parse_history", "read_movielens", "resolve_history",
]  # fmt: skip

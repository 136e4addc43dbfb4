"""The shipped sample: MovieLens ml-latest-small (GroupLens; see ml-latest-small/README.txt)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .movielens import read_movielens
from .types import Dataset

SAMPLE_DIR = Path(__file__).resolve().parent / "ml-latest-small"


@lru_cache(maxsize=1)
def load_sample() -> Dataset:
    return read_movielens(SAMPLE_DIR, "ml-latest")

"""The shipped sample: MovieLens ml-latest-small (GroupLens, 2018; terms and citation in its README.txt)."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from .movielens import read_movielens
from .types import Dataset

#: The folder of the shipped ml-latest-small files (ratings.csv, movies.csv, tags.csv, links.csv, README.txt).
SAMPLE_DIR: Path = Path(str(files(__package__) / "ml-latest-small"))


@lru_cache(maxsize=1)
def load_sample() -> Dataset:
    """The shipped sample as a Dataset (read once per process, then cached).

    Raises InvalidData if the installed sample files are missing or damaged.
    """
    return read_movielens(SAMPLE_DIR, "ml-latest")

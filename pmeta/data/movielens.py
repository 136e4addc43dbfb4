"""Readers for the three official MovieLens layouts, into one :class:`~pmeta.data.types.Dataset`.

* ``ml-100k``: ``u.data`` (tab-separated ``user item rating timestamp``) and ``u.item``
  (pipe-separated, latin-1: ``id|title|release date|video release date|IMDb URL|19 genre flags``);
* ``ml-1m``: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
  (``MovieID::Title::Genres``, latin-1, genres separated by ``|``);
* ``ml-latest`` / ``ml-latest-small``: ``ratings.csv`` and ``movies.csv`` with headers (UTF-8, quoted
  titles with commas).

Every problem raises :class:`~pmeta.errors.InvalidData` with the file and line.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np

from ..errors import InvalidData
from .types import Catalog, Dataset, Ratings, fingerprint_files

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip

LAYOUTS = {
    "ml-100k": ("u.data", "u.item"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-latest": ("ratings.csv", "movies.csv"),
}
MAX_FILE_BYTES = 2 * 1024**3


def detect_format(directory: Path) -> str:
    for name, (ratings, movies) in LAYOUTS.items():
        if (directory / ratings).is_file() and (directory / movies).is_file():
            return name
    raise InvalidData(f"{directory}: no MovieLens files found (expected u.data+u.item, ratings.dat+movies.dat or ratings.csv+movies.csv)")


def _read_text(path: Path, encoding: str) -> str:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidData(f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise InvalidData(f"{path} is too large ({size} bytes)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidData(f"cannot read {path}: {exc.strerror}") from None
    if b"\0" in data[:65536]:
        raise InvalidData(f"{path} is a binary file, not MovieLens text")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InvalidData(f"{path} is not valid {encoding} text (byte {exc.start})") from None


def _rows(path: Path, encoding: str, separator: str | None, columns: int, header: list[str] | None = None):
    """Yield (line number, fields) of a ratings/movies file, checking the column count."""
    text = _read_text(path, encoding)
    if separator is None:  # CSV
        reader = csv.reader(io.StringIO(text))
        try:
            first = next(reader)
        except StopIteration:
            raise InvalidData(f"{path} is empty") from None
        except csv.Error as exc:
            raise InvalidData(f"{path}:1: {exc}") from None
        if header is not None and [h.strip().lstrip("\ufeff") for h in first] != header:
            raise InvalidData(f"{path}:1: expected the header {','.join(header)}")
        try:
            for number, fields in enumerate(reader, start=2):
                if not fields:
                    continue
                if len(fields) != columns:
                    raise InvalidData(f"{path}:{number}: expected {columns} columns, found {len(fields)}")
                yield number, fields
        except csv.Error as exc:
            raise InvalidData(f"{path}: {exc}") from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(separator)
        if len(fields) != columns:
            raise InvalidData(f"{path}:{number}: expected {columns} fields separated by {separator!r}, found {len(fields)}")
        yield number, fields


def _number(value: str, kind, path: Path, line: int, what: str):
    try:
        result = kind(value.strip())
    except ValueError:
        raise InvalidData(f"{path}:{line}: {what} {value.strip()!r} is not a number") from None
    if kind is float and not np.isfinite(result):
        raise InvalidData(f"{path}:{line}: {what} {value.strip()!r} is not finite")
    return result


def _catalog(path: Path, fmt: str) -> Catalog:
    ids, titles, genres = [], [], []
    if fmt == "ml-100k":
        for number, f in _rows(path, "latin-1", "|", 24):
            flags = f[5:]
            ids.append(f[0].strip())
            titles.append(f[1].strip())
            genres.append([g for g, flag in zip(ML100K_GENRES, flags) if flag.strip() == "1"])
    elif fmt == "ml-1m":
        for number, f in _rows(path, "latin-1", "::", 3):
            ids.append(f[0].strip())
            titles.append(f[1].strip())
            genres.append([g for g in f[2].strip().split("|") if g])
    else:
        for number, f in _rows(path, "utf-8", None, 3, header=["movieId", "title", "genres"]):
            ids.append(f[0].strip())
            titles.append(f[1].strip())
            genres.append([g for g in f[2].strip().split("|") if g])
    if not ids:
        raise InvalidData(f"{path} lists no items")
    if len(set(ids)) != len(ids):
        raise InvalidData(f"{path} lists an item id more than once")
    return Catalog(ids, titles, genres)


def read_movielens(path: str | Path, format: str = "auto") -> Dataset:
    """Read a MovieLens directory (or one of its ratings files) in ``format`` (``auto`` detects it).

    Ratings of items missing from the movies file are dropped with a warning.
    Raises InvalidData for a missing directory, unknown layout or any malformed line.
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise InvalidData(f"dataset directory not found: {path}")
    if format == "auto":
        fmt = detect_format(directory)
    elif format in LAYOUTS or format == "ml-latest-small":
        fmt = "ml-latest" if format == "ml-latest-small" else format
    else:
        raise InvalidData(f"unknown format {format!r}; choose auto, ml-100k, ml-1m or ml-latest")
    ratings_name, movies_name = LAYOUTS[fmt]
    ratings_path, movies_path = directory / ratings_name, directory / movies_name
    for needed in (ratings_path, movies_path):
        if not needed.is_file():
            raise InvalidData(f"{directory}: {needed.name} not found for format {fmt}")
    catalog = _catalog(movies_path, fmt)

    if fmt == "ml-100k":
        rows = _rows(ratings_path, "latin-1", "\t", 4)
    elif fmt == "ml-1m":
        rows = _rows(ratings_path, "latin-1", "::", 4)
    else:
        rows = _rows(ratings_path, "utf-8", None, 4, header=["userId", "movieId", "rating", "timestamp"])
    users, items, values, times = [], [], [], []
    dropped = 0
    for number, f in rows:
        item = catalog.index.get(f[1].strip())
        rating = _number(f[2], float, ratings_path, number, "rating")
        timestamp = _number(f[3], int, ratings_path, number, "timestamp")
        user = f[0].strip()
        if not user:
            raise InvalidData(f"{ratings_path}:{number}: empty user id")
        if item is None:
            dropped += 1
            continue
        users.append(user)
        items.append(item)
        values.append(rating)
        times.append(timestamp)
    if not users:
        raise InvalidData(f"{ratings_path} has no ratings of catalogue items")
    if dropped:
        warnings.warn(f"{ratings_path}: dropped {dropped} rating(s) of items missing from {movies_path.name}", stacklevel=2)
    user_ids = sorted(set(users), key=lambda u: (0, int(u), "") if u.isdigit() else (1, 0, u))
    user_index = {u: i for i, u in enumerate(user_ids)}
    ratings = Ratings(
        user=np.array([user_index[u] for u in users], dtype=np.int64),
        item=np.array(items, dtype=np.int64),
        rating=np.array(values, dtype=np.float32),
        timestamp=np.array(times, dtype=np.int64),
        user_ids=user_ids,
    )
    return Dataset(directory.name, fmt, catalog, ratings, fingerprint_files([ratings_path, movies_path]))

"""Readers for the three official MovieLens layouts, into one :class:`~pmeta.data.types.Dataset`.

* ``ml-100k``: ``u.data`` (tab-separated ``user item rating timestamp``, no header) and ``u.item``
  (pipe-separated, latin-1: ``id|title|release date|video release date|IMDb URL|19 genre flags``);
* ``ml-1m``: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
  (``MovieID::Title::Genres``, latin-1, genres separated by ``|``);
* ``ml-latest`` (and ``ml-latest-small``): ``ratings.csv`` (``userId,movieId,rating,timestamp``) and
  ``movies.csv`` (``movieId,title,genres``), both with a header, UTF-8, titles quoted when they hold commas.

Every problem with the files raises :class:`~pmeta.errors.InvalidData` with one sentence naming the
file (and the line, for a malformed line).
"""

from __future__ import annotations

import codecs
import csv
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checks import as_path, os_error_message
from ..errors import InvalidData
from .types import Catalog, Dataset, Ratings, fingerprint_files

#: The 19 genre flags of ml-100k's u.item, in file order.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Where a MovieLens format keeps its files and how they are written."""

    ratings_file: str
    movies_file: str
    encoding: str
    ratings_separator: str | None  # None: a CSV file with a header
    movies_separator: str | None
    movie_columns: int


LAYOUTS: dict[str, Layout] = {
    "ml-100k": Layout("u.data", "u.item", "latin-1", "\t", "|", 5 + len(ML100K_GENRES)),
    "ml-1m": Layout("ratings.dat", "movies.dat", "latin-1", "::", "::", 3),
    "ml-latest": Layout("ratings.csv", "movies.csv", "utf-8", None, None, 3),
}
FORMAT_ALIASES = {"ml-latest-small": "ml-latest"}
RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]
#: Range of a rating: MovieLens stars (0.5 to 5 in ml-latest, 1 to 5 in ml-100k / ml-1m); positives are >= 4.
RATING_MIN, RATING_MAX = 0.0, 5.0
MOVIES_HEADER = ["movieId", "title", "genres"]


def read_movielens(path: str | Path, format: str = "auto") -> Dataset:
    """Read a MovieLens directory, or the directory of the given ratings file.

    ``format`` is ``"ml-100k"``, ``"ml-1m"``, ``"ml-latest"`` or ``"auto"`` (detected from the file
    names). Catalogue items keep the movies file's order; users are sorted by id (numerically when
    every id is a number). Ratings of items missing from the movies file are dropped with a
    ``UserWarning`` that counts them.

    Raises InvalidData for a path that is not a ``str`` / ``os.PathLike`` or that the system refuses,
    a missing directory, an unknown format, missing or unreadable files, a malformed line (with file
    and line number) and a ratings file without ratings.
    """
    path = as_path(path, "MovieLens dataset", InvalidData)
    try:
        directory = path.parent if path.is_file() else path
        found = directory.is_dir()
    except OSError as error:  # a name too long or no permission: is_file/is_dir raise for these (not for a loop of links)
        raise InvalidData(f"Cannot read the MovieLens dataset {str(path)[:200]}: {os_error_message(error)}.") from None
    if not found:
        raise InvalidData(f"MovieLens dataset not found: {path} is not a directory or a ratings file.")
    fmt = _chosen_format(path, directory, format)
    layout = LAYOUTS[fmt]
    ratings_path, movies_path = directory / layout.ratings_file, directory / layout.movies_file
    for needed in (ratings_path, movies_path):
        if not needed.is_file():
            raise InvalidData(f"{directory} has no {needed.name}, which the {fmt} format needs.")

    catalog = _read_catalog(movies_path, fmt, layout)
    ratings, dropped = _read_ratings(ratings_path, layout, catalog)
    if dropped:
        warnings.warn(
            f"{ratings_path}: dropped {dropped} rating(s) of items missing from {movies_path.name}.", UserWarning, stacklevel=2
        )
    name = directory.resolve().name
    return Dataset(name, fmt, catalog, ratings, fingerprint_files([ratings_path, movies_path]))


def detect_format(directory: Path) -> str:
    """The MovieLens format whose ratings and movies files are in ``directory``.

    Raises InvalidData when no layout is complete, or when several are.
    """
    complete = [fmt for fmt, lay in LAYOUTS.items() if (directory / lay.ratings_file).is_file() and (directory / lay.movies_file).is_file()]
    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        raise InvalidData(f"{directory} holds files of several MovieLens formats ({', '.join(complete)}); pass the format explicitly.")
    for fmt, lay in LAYOUTS.items():
        present = [name for name in (lay.ratings_file, lay.movies_file) if (directory / name).is_file()]
        if present:
            missing = lay.movies_file if present == [lay.ratings_file] else lay.ratings_file
            raise InvalidData(f"{directory} has {present[0]} but no {missing}, so it is not a complete {fmt} dataset.")
    raise InvalidData(
        f"{directory} holds no MovieLens files (expected u.data and u.item, ratings.dat and movies.dat, or ratings.csv and movies.csv)."
    )


def check_format(format: str) -> str:
    """The canonical name of a ``format`` option (``"auto"`` or a key of LAYOUTS); InvalidData for any other."""
    if not isinstance(format, str):
        raise InvalidData(f"A MovieLens format is a str (auto, ml-100k, ml-1m or ml-latest), not {type(format).__name__}.")
    fmt = FORMAT_ALIASES.get(format, format)
    if fmt != "auto" and fmt not in LAYOUTS:
        raise InvalidData(f"Unknown MovieLens format {format!r}; choose auto, ml-100k, ml-1m or ml-latest.")
    return fmt


def _chosen_format(path: Path, directory: Path, format: str) -> str:
    fmt = check_format(format)
    if fmt in LAYOUTS:
        return fmt
    if path.is_file():  # a ratings (or movies) file names its format
        for name, lay in LAYOUTS.items():
            if path.name in (lay.ratings_file, lay.movies_file):
                return name
        raise InvalidData(
            f"{path} is not a MovieLens file: give the folder, or its u.data, ratings.dat or ratings.csv (with the movies file beside it)."
        )
    return detect_format(directory)


# ---------------------------------------------------------------------------------------- reading lines
def _read_text(path: Path, encoding: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidData(f"Cannot read {path}: {error.strerror or error}.") from None
    if b"\0" in data:
        raise InvalidData(f"{path} is a binary file, not MovieLens text.")
    if data.startswith(codecs.BOM_UTF8):
        # a latin-1 file re-saved by an editor that marks UTF-8: read as what the mark says, not as
        # latin-1 (which would turn the mark into a first id "ï»¿1" and "é" into "Ã©")
        data, encoding = data[len(codecs.BOM_UTF8) :], "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise InvalidData(f"{path} line {line}: the file is not valid {encoding.upper()} text.") from None


def _rows(path: Path, encoding: str, separator: str | None, columns: int, header: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank data line, each checked to have ``columns`` fields.

    ``separator`` None reads a CSV file whose first line must be ``header``.
    """
    text = _read_text(path, encoding)
    if separator is None:
        yield from _csv_rows(path, text, columns, header)
        return
    # Lines end at "\n", "\r\n" or "\r" only: str.splitlines would also cut at characters a title may
    # hold (latin-1's U+0085, form feed, U+2028), and the line numbers would stop matching the file's.
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.split(separator)
        if len(fields) != columns:
            raise InvalidData(f"{path} line {number}: expected {columns} fields separated by {separator!r}, found {len(fields)}.")
        yield number, fields


def _csv_rows(path: Path, text: str, columns: int, header: list[str]) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        first = next(reader, None)
        if first is None:
            raise InvalidData(f"{path} is empty; it should start with the header {','.join(header)}.")
        if [name.strip().lstrip("\ufeff") for name in first] != header:
            raise InvalidData(f"{path} line 1: expected the header {','.join(header)}, found {','.join(first)[:80]!r}.")
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != columns:
                raise InvalidData(f"{path} line {reader.line_num}: expected {columns} comma-separated columns, found {len(fields)}.")
            yield reader.line_num, fields
    except csv.Error as error:
        raise InvalidData(f"{path} line {reader.line_num}: malformed CSV ({error}).") from None


# ---------------------------------------------------------------------------------------- catalogue
def _read_catalog(path: Path, fmt: str, layout: Layout) -> Catalog:
    item_ids: list[str] = []
    titles: list[str] = []
    genres: list[list[str]] = []
    first_line: dict[str, int] = {}
    for number, fields in _rows(path, layout.encoding, layout.movies_separator, layout.movie_columns, MOVIES_HEADER):
        item_id, title = fields[0].strip(), fields[1].strip()
        if not item_id:
            raise InvalidData(f"{path} line {number}: the movie id is empty.")
        if not title:
            raise InvalidData(f"{path} line {number}: the title of movie {item_id} is empty.")
        if item_id in first_line:
            raise InvalidData(f"{path} line {number}: movie id {item_id} was already listed on line {first_line[item_id]}.")
        first_line[item_id] = number
        item_ids.append(item_id)
        titles.append(title)
        genres.append(_ml100k_genres(path, number, fields[5:]) if fmt == "ml-100k" else _split_genres(fields[2]))
    if not item_ids:
        raise InvalidData(f"{path} lists no movies.")
    return Catalog(item_ids, titles, genres)


def _ml100k_genres(path: Path, number: int, flags: list[str]) -> list[str]:
    flags = [flag.strip() for flag in flags]
    if any(flag not in ("0", "1") for flag in flags):
        raise InvalidData(f"{path} line {number}: the 19 genre flags must each be 0 or 1.")
    return [genre for genre, flag in zip(ML100K_GENRES, flags) if flag == "1"]


def _split_genres(field: str) -> list[str]:
    return [genre.strip() for genre in field.split("|") if genre.strip()]


# ---------------------------------------------------------------------------------------- ratings
def _read_ratings(path: Path, layout: Layout, catalog: Catalog) -> tuple[Ratings, int]:
    """The ratings of catalogue items, and how many ratings named other items."""
    users: list[str] = []
    items: list[int] = []
    rating_texts: list[str] = []
    time_texts: list[str] = []
    lines: list[int] = []
    dropped = 0
    for number, (user, item_id, rating, timestamp) in _rows(path, layout.encoding, layout.ratings_separator, 4, RATINGS_HEADER):
        user, item_id = user.strip(), item_id.strip()
        if not user or not item_id:
            raise InvalidData(f"{path} line {number}: the {'user' if not user else 'movie'} id is empty.")
        item = catalog.index.get(item_id)
        if item is None:
            _check_numbers(path, number, rating, timestamp)
            dropped += 1
            continue
        users.append(user)
        items.append(item)
        rating_texts.append(rating)
        time_texts.append(timestamp)
        lines.append(number)
    if not users:
        if dropped:
            raise InvalidData(f"None of the {dropped} ratings in {path} is of a movie listed in {layout.movies_file}.")
        raise InvalidData(f"{path} has no ratings.")

    values, times = _parse_numbers(path, lines, rating_texts, time_texts)
    user_ids = _sorted_user_ids(users)
    user_index = {user_id: i for i, user_id in enumerate(user_ids)}
    user_rows = np.fromiter((user_index[u] for u in users), dtype=np.int64, count=len(users))
    item_rows = np.asarray(items, dtype=np.int64)
    _check_unique_pairs(path, user_rows, item_rows, lines, users, catalog)
    ratings = Ratings(
        user=user_rows,
        item=item_rows,
        rating=values.astype(np.float32),
        timestamp=times,
        user_ids=user_ids,
    )
    return ratings, dropped


def _check_unique_pairs(path: Path, user_rows: np.ndarray, item_rows: np.ndarray, lines: list[int], users: list[str], catalog: Catalog) -> None:
    """MovieLens files hold one rating per (user, movie); a second one would let a movie be both a
    support and a query item of the protocol, so it is an error naming both lines."""
    keys = user_rows * max(len(catalog), 1) + item_rows
    order = np.argsort(keys, kind="stable")
    repeated = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if len(repeated):
        first, second = int(order[repeated[0]]), int(order[repeated[0] + 1])
        raise InvalidData(
            f"{path} lines {lines[first]} and {lines[second]}: user {users[first]} rated movie {catalog.item_ids[int(item_rows[first])]} twice; "
            "keep one rating per user and movie (e.g. the latest)."
        )


def _parse_numbers(path: Path, lines: list[int], rating_texts: list[str], time_texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ratings (float64) and timestamps (int64); vectorised, with a per-line pass to name a bad line."""
    try:
        values = np.asarray(rating_texts, dtype=str).astype(np.float64)
        times = np.asarray(time_texts, dtype=str).astype(np.int64)
        if np.isfinite(values).all() and ((values >= RATING_MIN) & (values <= RATING_MAX)).all():
            return values, times
    except (ValueError, OverflowError):
        pass
    for number, rating, timestamp in zip(lines, rating_texts, time_texts):
        _check_numbers(path, number, rating, timestamp)
    # numpy refused something Python accepts (e.g. "1_000"): use Python's reading of every value.
    values = np.array([float(r) for r in rating_texts], dtype=np.float64)
    times = np.array([int(t) for t in time_texts], dtype=np.int64)
    return values, times


def _check_numbers(path: Path, number: int, rating: str, timestamp: str) -> None:
    try:
        value = float(rating)
    except ValueError:
        raise InvalidData(f"{path} line {number}: the rating {rating.strip()[:40]!r} is not a number.") from None
    if not np.isfinite(value):
        raise InvalidData(f"{path} line {number}: the rating {rating.strip()[:40]!r} is not a finite number.")
    if not RATING_MIN <= value <= RATING_MAX:  # stars; also keeps float32 storage finite
        raise InvalidData(f"{path} line {number}: the rating {rating.strip()[:40]!r} is out of range ({RATING_MIN:g} to {RATING_MAX:g} stars).")
    try:
        seconds = int(timestamp)
    except ValueError:
        raise InvalidData(f"{path} line {number}: the timestamp {timestamp.strip()[:40]!r} is not a whole number.") from None
    if not -(2**63) <= seconds < 2**63:
        raise InvalidData(f"{path} line {number}: the timestamp {timestamp.strip()[:40]!r} is out of range.")


def _sorted_user_ids(users: list[str]) -> list[str]:
    """Distinct user ids, sorted numerically when every id is a number, else as strings."""
    distinct = list(dict.fromkeys(users))
    if all(user.isascii() and user.isdigit() for user in distinct):
        return sorted(distinct, key=lambda user: (int(user), user))
    return sorted(distinct)

"""Fuzz target ``movielens``: a generated MovieLens folder through what ``pmeta eval movielens
--data DIR`` does before it needs a bank.

An input is a format (ml-latest, ml-1m or ml-100k), the format passed to the reader (``auto``, the
right one or a wrong one) and the bytes of the movies and ratings files. The rows mix a block of
well-formed ratings (so that some inputs reach the evaluation) with hostile fields: empty, padded,
signed, huge or non-numeric ids, ratings and timestamps; titles holding the separators, quotes,
line breaks and Unicode line separators; repeated ids and pairs. The bytes may then be cut short,
spliced with random bytes, given a byte-order mark or CRLF line ends.

The reader must return a :class:`~pmeta.data.types.Dataset` whose arrays agree with each other, or
raise :class:`~pmeta.errors.InvalidData` with a one-line message. A dataset it returns is then split
and evaluated with the classical methods under all three modes (``run_movielens``, a few bootstrap
resamples) and rendered as report.md; that must succeed with metrics in [0, 1] or raise a one-line
:class:`~pmeta.errors.PmetaError` (when it advises other modes, ``--mode uni99,full`` or
``--mode full``, the evaluation in those must then succeed or raise one). Anything else (another
exception, a warning other than the reader's count of dropped ratings, a NaN in a report) is a bug.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import in_advised_modes, one_line, target

FORMATS = ("ml-latest", "ml-1m", "ml-100k")
FILES = {"ml-latest": ("movies.csv", "ratings.csv"), "ml-1m": ("movies.dat", "ratings.dat"), "ml-100k": ("u.item", "u.data")}
METHODS = ["random", "popularity", "popularity-time", "itemknn", "ease"]

MOVIE_IDS = ["1", "2", "3", "7", "10", "", " 3", "03", "-1", "x", "1e3", "99999999999999999999", "5 5"]
USER_IDS = ["1", "2", "3", "10", "u", "", " 1", "01", "-1", "9" * 25, "a b"]
RATINGS = ["4", "5", "4.5", "3", "1", "0.5", "0", "5.0", "6", "-1", "nan", "inf", "", "x", " 4 ", "4e0", "1e309", "4,5"]
TIMES = ["964982703", "0", "-1", "1.5", "", "x", "99999999999999999999", " 12 ", "-9223372036854775809", "1e9"]
TITLES = [
    "Heat (1995)", "Up (2009)", 'Say "Hi", Bob (1999)', "", " ", "Ünïcode (2001)", "a|b (1990)", "a::b (1990)",
    "a,b (1990)", "Film\n(1999)", "Film\r(1999)", "Dots\u2026 (1999)", "Sep\u2028arated (1999)", "Next\x85Line (1999)",
    "Feed\x0cForm (1999)", "Tab\tbed (1999)", "(1999)", "Title (abcd)", "\ufeffBom (1999)",
]  # fmt: skip
GENRES = ["Drama", "Drama|Comedy", "(no genres listed)", "", "x|", "|"]


def movielens_inputs():
    """``(format, format passed to the reader, movies bytes, ratings bytes)``."""
    from hypothesis import strategies as st

    hostile_movie = st.tuples(st.sampled_from(MOVIE_IDS) | st.integers(-5, 300).map(str), st.sampled_from(TITLES) | st.text(max_size=12), st.sampled_from(GENRES))
    hostile_rating = st.tuples(st.sampled_from(USER_IDS), st.sampled_from(MOVIE_IDS) | st.integers(1, 140).map(str), st.sampled_from(RATINGS), st.sampled_from(TIMES) | st.integers(0, 2**31).map(str))
    # plausible rows: ids that may collide with the block's, ratings in range, times in range
    plain_movie = st.tuples(st.integers(95, 240).map(str), st.sampled_from(TITLES[:3] + TITLES[5:6] + TITLES[11:12]), st.sampled_from(GENRES[:3]))
    plain_rating = st.tuples(st.integers(495, 515).map(str), st.integers(95, 240).map(str), st.sampled_from(["1", "3", "4", "4.5", "5", "0.5"]), st.integers(0, 2**31).map(str))
    movie = st.one_of(plain_movie, plain_movie, hostile_movie)
    rating = st.one_of(plain_rating, plain_rating, hostile_rating)
    block = st.sampled_from(["none", "narrow", "wide", "sparse"])  # well-formed ratings: none, 10, 150 movies, 40 of 150 rated
    layout = st.sampled_from(FORMATS)
    passed = st.sampled_from(["auto", "right", "wrong"])
    mutation = st.one_of(
        st.just(("none",)),
        st.just(("none",)),
        st.just(("none",)),
        st.tuples(st.just("cut"), st.booleans(), st.integers(0, 10**6)),
        st.tuples(st.just("splice"), st.booleans(), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("bom"), st.booleans()),
        st.tuples(st.just("crlf"), st.booleans()),
    )
    raw = st.tuples(layout, passed, block, st.lists(movie, max_size=6), st.lists(rating, max_size=12), st.booleans(), mutation)
    return raw.map(_render)


def _block(kind: str) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str, str]]]:
    """Well-formed rows: ``narrow`` is 8 users x 10 movies; ``wide`` 12 users over 150 movies, so
    that every user keeps 99 never-rated candidates and pop99 has rated ones to draw; ``sparse`` the
    same users over the first 40 of 150 movies: 99 never-rated candidates but not 99 rated ones."""
    n_movies, n_users, per_user = {"none": (0, 0, 0), "narrow": (10, 8, 10), "wide": (150, 12, 30), "sparse": (150, 12, 30)}[kind]
    n_rated = 40 if kind == "sparse" else n_movies
    movies = [(str(100 + i), f"Movie {i} ({1990 + i % 20})", "Drama|Comedy" if i % 2 else "Action") for i in range(n_movies)]
    ratings = []
    for u in range(n_users):
        for j in range(per_user):
            item = (u * 11 + j * 3) % n_rated
            ratings.append((str(500 + u), str(100 + item), "5" if (u + j) % 3 else "4", str(1_000_000 + 86_400 * (u + 7 * j))))
    return movies, ratings


def _render(raw: tuple) -> tuple[str, str, bytes, bytes]:
    fmt, passed, block, movies, ratings, csv_quoting, mutation = raw
    good_movies, good_ratings = _block(block)
    movies, ratings = good_movies + movies, good_ratings + ratings
    movie_bytes, rating_bytes = _movies_file(fmt, movies, csv_quoting), _ratings_file(fmt, ratings)
    if mutation[0] != "none":
        on_movies = mutation[1]
        data = movie_bytes if on_movies else rating_bytes
        if mutation[0] == "cut":
            data = data[: mutation[2] % (len(data) + 1)]
        elif mutation[0] == "splice":
            at = mutation[2] % (len(data) + 1)
            data = data[:at] + mutation[3] + data[at:]
        elif mutation[0] == "bom":
            data = b"\xef\xbb\xbf" + data
        else:
            data = data.replace(b"\n", b"\r\n")
        movie_bytes, rating_bytes = (data, rating_bytes) if on_movies else (movie_bytes, data)
    reader_format = {"auto": "auto", "right": fmt, "wrong": FORMATS[(FORMATS.index(fmt) + 1) % 3]}[passed]
    return fmt, reader_format, movie_bytes, rating_bytes


def _movies_file(fmt: str, movies: list[tuple[str, str, str]], csv_quoting: bool) -> bytes:
    if fmt == "ml-latest":
        if csv_quoting:
            out = io.StringIO(newline="")
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(["movieId", "title", "genres"])
            writer.writerows(movies)
            return out.getvalue().encode("utf-8")
        return ("movieId,title,genres\n" + "".join(f"{i},{t},{g}\n" for i, t, g in movies)).encode("utf-8")
    if fmt == "ml-1m":
        return "".join(f"{i}::{t}::{g}\n" for i, t, g in movies).encode("latin-1", errors="replace")
    flags = "|".join(["0"] * 18 + ["1"])
    return "".join(f"{i}|{t}|01-Jan-1995||http://x|{flags}\n" for i, t, _ in movies).encode("latin-1", errors="replace")


def _ratings_file(fmt: str, ratings: list[tuple[str, str, str, str]]) -> bytes:
    separator = {"ml-latest": ",", "ml-1m": "::", "ml-100k": "\t"}[fmt]
    header = "userId,movieId,rating,timestamp\n" if fmt == "ml-latest" else ""
    return (header + "".join(separator.join(row) + "\n" for row in ratings)).encode("utf-8" if fmt == "ml-latest" else "latin-1", errors="replace")


def _check_dataset(dataset) -> None:
    r, n_items = dataset.ratings, len(dataset.catalog)
    n = len(r)
    assert n > 0 and r.user.shape == r.item.shape == r.rating.shape == r.timestamp.shape == (n,), "ratings arrays disagree"
    assert r.user.min() >= 0 and r.user.max() < r.n_users and len(np.unique(r.user)) == r.n_users, "user indexes out of range or unused"
    assert r.item.min() >= 0 and r.item.max() < n_items, "item index out of the catalogue"
    assert np.isfinite(r.rating).all() and (r.rating >= 0).all() and (r.rating <= 5).all(), "rating out of 0..5"
    assert len(set(zip(r.user.tolist(), r.item.tolist()))) == n, "a (user, item) pair twice"
    assert len(set(r.user_ids)) == r.n_users and all(u and u == u.strip() for u in r.user_ids), "user ids not unique or not stripped"
    assert all(t.strip() for t in dataset.catalog.titles), "an empty title"


@target("movielens", movielens_inputs, "a MovieLens folder: read_movielens, then the classical evaluation and report.md")
def fuzz_movielens(value: Any) -> str:
    from pmeta.data import read_movielens
    from pmeta.errors import InvalidData, PmetaError
    from pmeta.eval.runner import markdown, run_movielens

    fmt, reader_format, movie_bytes, rating_bytes = value
    movies_name, ratings_name = FILES[fmt]
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Path(folder, movies_name).write_bytes(movie_bytes)
        Path(folder, ratings_name).write_bytes(rating_bytes)
        try:
            dataset = read_movielens(folder, reader_format)
        except InvalidData as error:
            one_line(error)
            return "rejected"
        _check_dataset(dataset)
        try:  # a catalogue too small for 99 (rated) negatives: retried in the modes the message advises
            report, modes = in_advised_modes(lambda modes: run_movielens(dataset, None, METHODS, (1, 3, 5), modes, seed=0, resamples=20), ("uni99", "pop99", "full"))
        except PmetaError as error:
            one_line(error)
            return "refused"
        outcome = "evaluated" if len(modes) == 3 else "evaluated-" + ",".join(modes)
        json.dumps(report, allow_nan=False)  # report.json must be standard JSON: raises on a NaN
        markdown(report)
        for warning in caught:
            if not (issubclass(warning.category, UserWarning) and "dropped" in str(warning.message)):
                raise AssertionError(f"unexpected warning: {warning.category.__name__}: {warning.message}")
    users = {row["users"] for row in report["results"]}
    assert len(users) == 1, f"methods scored different users: {users}"
    for row in report["results"]:
        for metric in ("hr@10", "ndcg@10", "mrr"):
            assert 0.0 <= row[metric] <= 1.0, f"{row['method']} {metric} = {row[metric]}"  # False for NaN too
    return outcome

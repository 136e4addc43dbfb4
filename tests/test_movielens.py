"""MovieLens readers: tiny fixtures in each official layout, auto-detection, every error path, the shipped sample."""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmeta.data import SAMPLE_DIR, load_sample, read_movielens
from pmeta.errors import InvalidData

SAMPLE_RATINGS_SHA256 = "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646"


def genre_flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(19))


def write_ml100k(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    movies = (
        f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{genre_flags(3, 4, 5)}\n"
        f"2|Cité des enfants perdus, La (1995)|01-Jan-1995||http://x|{genre_flags(9, 15)}\n"
        f"3|unknown||||{genre_flags(0)}\n"
    )
    (directory / "u.item").write_bytes(movies.encode("latin-1"))
    (directory / "u.data").write_text("196\t1\t3\t881250949\n10\t2\t5\t891717742\n2\t1\t1\t878887116\n10\t3\t4\t878887117\n")
    return directory


def write_ml1m(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Misérables, Les (1995)::Drama|Musical\n"
    (directory / "movies.dat").write_bytes(movies.encode("latin-1"))
    (directory / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n\n20::2::4::978301968\n3::1::2::978301000\n")
    (directory / "users.dat").write_text("1::F::1::10::48067\n3::M::56::16::70072\n20::M::25::15::55117\n")
    return directory


def write_ml_latest(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '12,"Amélie (Fabuleux destin d\'Amélie Poulain, Le) (2001)",Comedy|Romance\n'
        "13,La cravate (1957),(no genres listed)\n",
        encoding="utf-8",
    )
    (directory / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n10,11,3.5,964981247\n2,1,5.0,964982224\n2,12,0.5,964982300\n"
    )
    return directory


WRITERS = {"ml-100k": write_ml100k, "ml-1m": write_ml1m, "ml-latest": write_ml_latest}
RATINGS_FILES = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-latest": "ratings.csv"}
MOVIES_FILES = {"ml-100k": "u.item", "ml-1m": "movies.dat", "ml-latest": "movies.csv"}


@contextmanager
def raises_one_line(match: str):
    """pytest.raises(InvalidData, match=...) that also checks the message is one line."""
    with pytest.raises(InvalidData, match=match) as info:
        yield info
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- good files
def _titles(fmt: str):
    """Titles each format can hold: latin-1 without its separator or a line end for the two
    separated formats (ml-1m: no "::" and no colon at either end, which would move the separator);
    any text but NUL for the quoted CSV of ml-latest. The reader strips titles; blank ones are refused."""
    if fmt == "ml-latest":
        chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
    else:
        chars = st.characters(max_codepoint=255, exclude_characters="\x00\n\r" + ("|" if fmt == "ml-100k" else ""))
    titles = st.text(chars, min_size=1, max_size=20).filter(lambda t: t.strip())
    if fmt == "ml-1m":
        titles = titles.filter(lambda t: "::" not in t and not t.startswith(":") and not t.endswith(":"))
    return titles


def _movies_bytes(fmt: str, rows: list[tuple[str, str]]) -> bytes:
    if fmt == "ml-latest":
        out = io.StringIO(newline="")
        writer = csv.writer(out)  # rows end in "\r\n", so titles holding "\r" or "\n" are quoted
        writer.writerow(["movieId", "title", "genres"])
        writer.writerows((item_id, title, "Drama|Comedy") for item_id, title in rows)
        return out.getvalue().encode("utf-8")
    if fmt == "ml-1m":
        return "".join(f"{item_id}::{title}::Drama|Comedy\n" for item_id, title in rows).encode("latin-1")
    return "".join(f"{item_id}|{title}|01-Jan-1995||http://x|{genre_flags(8)}\n" for item_id, title in rows).encode("latin-1")


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_title_a_format_can_hold_reads_back(fmt):
    """Property: a well-formed movies file is read back exactly, whatever its titles hold (commas,
    quotes and line breaks in quoted CSV; latin-1's U+0085 and form feed in the separated formats,
    which str.splitlines used to treat as line ends), with line ends \\n, \\r\\n or \\r."""

    @given(st.lists(_titles(fmt), min_size=1, max_size=6), st.sampled_from(["\n", "\r\n", "\r"]))
    @settings(max_examples=150, deadline=None)
    def check(titles, line_end):
        rows = [(str(i + 1), title) for i, title in enumerate(titles)]
        movies = _movies_bytes(fmt, rows)
        if fmt != "ml-latest":  # the CSV writer quotes line breaks inside titles; only the row ends change
            movies = movies.replace(b"\n", line_end.encode())
        ratings = {"ml-latest": "userId,movieId,rating,timestamp\n1,1,4.0,100\n", "ml-1m": "1::1::4::100\n", "ml-100k": "1\t1\t4\t100\n"}[fmt]
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, MOVIES_FILES[fmt]).write_bytes(movies)
            Path(folder, RATINGS_FILES[fmt]).write_text(ratings)
            dataset = read_movielens(folder)
        assert dataset.catalog.item_ids == [item_id for item_id, _ in rows]
        assert dataset.catalog.titles == [title.strip() for _, title in rows]
        assert len(dataset.ratings) == 1

    check()


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_layout_is_detected_and_read(tmp_path, fmt):
    directory = WRITERS[fmt](tmp_path / f"my-{fmt}")
    data = read_movielens(directory)
    assert data.format == fmt and data.name == f"my-{fmt}"
    assert data.catalog.item_ids[0] == "1" and data.catalog.titles[0] == "Toy Story (1995)"
    assert len(data.ratings) == 4
    assert data.ratings.user.dtype == np.int64 and data.ratings.item.dtype == np.int64
    assert data.ratings.rating.dtype == np.float32 and data.ratings.timestamp.dtype == np.int64
    assert data.ratings.user_ids == sorted(data.ratings.user_ids, key=int)  # numeric, so "10" after "2"
    assert len(data.fingerprint) == 64
    explicit = read_movielens(str(directory), fmt)  # str paths and an explicit format work too
    assert explicit.fingerprint == data.fingerprint and explicit.catalog == data.catalog


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_a_ratings_file_path_reads_its_directory(tmp_path, fmt):
    directory = WRITERS[fmt](tmp_path / fmt)
    data = read_movielens(directory / RATINGS_FILES[fmt])
    assert data.format == fmt and data.name == fmt and len(data.ratings) == 4


def test_ml100k_details(tmp_path):
    data = read_movielens(write_ml100k(tmp_path / "ml-100k"))
    assert data.catalog.titles[1] == "Cité des enfants perdus, La (1995)"  # latin-1
    assert data.catalog.genres == [["Animation", "Children's", "Comedy"], ["Fantasy", "Sci-Fi"], ["unknown"]]
    assert data.ratings.user_ids == ["2", "10", "196"]
    # first rating: user 196 -> index 2, item 1 -> index 0, 3 stars
    assert (data.ratings.user[0], data.ratings.item[0], data.ratings.rating[0], data.ratings.timestamp[0]) == (2, 0, 3.0, 881250949)


def test_ml1m_details(tmp_path):
    data = read_movielens(write_ml1m(tmp_path / "ml-1m"))
    assert data.catalog.titles[1] == "Misérables, Les (1995)"
    assert data.catalog.genres[1] == ["Drama", "Musical"]
    assert data.ratings.user_ids == ["1", "3", "20"]  # the blank line is skipped
    assert data.ratings.item.tolist() == [0, 1, 1, 0]


def test_ml_latest_details(tmp_path):
    data = read_movielens(write_ml_latest(tmp_path / "latest"))
    assert data.catalog.item_ids == ["1", "11", "12", "13"]
    assert data.catalog.titles[1] == "American President, The (1995)"
    assert data.catalog.titles[2] == "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)"
    assert data.catalog.genres[3] == ["(no genres listed)"] and data.catalog.text(3) == "La cravate (1957)"
    assert data.ratings.rating.tolist() == [4.0, 3.5, 5.0, 0.5]
    assert data.ratings.user_ids == ["1", "2", "10"]
    assert data.ratings.user.tolist() == [0, 2, 1, 1]


def test_non_numeric_user_ids_sort_as_strings(tmp_path):
    directory = write_ml_latest(tmp_path / "d")
    (directory / "ratings.csv").write_text("userId,movieId,rating,timestamp\nb,1,4,1\n10,1,4,2\na,11,3,3\n9,1,4,4\n")
    assert read_movielens(directory).ratings.user_ids == ["10", "9", "a", "b"]


def test_ml_latest_small_alias_and_utf8_bom(tmp_path):
    directory = write_ml_latest(tmp_path / "d")
    (directory / "ratings.csv").write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n1,1,4.0,1\n")
    assert len(read_movielens(directory, "ml-latest-small").ratings) == 1


@pytest.mark.parametrize("fmt", ["ml-1m", "ml-100k"])
def test_a_latin1_layout_saved_as_utf8_with_a_byte_order_mark_is_read_as_utf8(tmp_path, fmt):
    """Read as latin-1, the mark became part of the first id ("ï»¿1", its ratings dropped with a
    misleading warning) and "é" became "Ã©"."""
    directory = WRITERS[fmt](tmp_path / "d")
    for name in (MOVIES_FILES[fmt], RATINGS_FILES[fmt]):
        path = directory / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().decode("latin-1").encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = read_movielens(directory)
    expected = read_movielens(WRITERS[fmt](tmp_path / "plain"))
    assert dataset.catalog.item_ids == expected.catalog.item_ids and dataset.catalog.titles == expected.catalog.titles
    assert dataset.ratings.user_ids == expected.ratings.user_ids and len(dataset.ratings) == len(expected.ratings)
    assert any("é" in title for title in dataset.catalog.titles)


def test_ratings_of_unlisted_items_are_dropped_and_counted(tmp_path):
    directory = write_ml_latest(tmp_path / "d")
    (directory / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n1,77,4.0,2\n2,78,1.0,3\n")
    with pytest.warns(UserWarning, match="dropped 2 rating"):
        data = read_movielens(directory)
    assert len(data.ratings) == 1 and data.ratings.user_ids == ["1"]


def test_fingerprint_changes_with_the_files(tmp_path):
    directory = write_ml_latest(tmp_path / "d")
    before = read_movielens(directory).fingerprint
    with open(directory / "ratings.csv", "a") as handle:
        handle.write("3,1,2.0,5\n")
    assert read_movielens(directory).fingerprint != before


# ---------------------------------------------------------------------------------------- errors
def test_missing_directory_and_unknown_format(tmp_path):
    with raises_one_line("not found"):
        read_movielens(tmp_path / "nowhere")
    directory = write_ml_latest(tmp_path / "d")
    with raises_one_line("Unknown MovieLens format 'ml-20m'"):
        read_movielens(directory, "ml-20m")
    with raises_one_line("no u.data"):
        read_movielens(directory, "ml-100k")


def test_directory_without_recognised_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with raises_one_line("holds no MovieLens files"):
        read_movielens(tmp_path)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_incomplete_layout(tmp_path, fmt):
    directory = WRITERS[fmt](tmp_path / "d")
    (directory / MOVIES_FILES[fmt]).unlink()
    with raises_one_line(f"no {MOVIES_FILES[fmt]}"):
        read_movielens(directory)
    with raises_one_line(f"no {MOVIES_FILES[fmt]}"):
        read_movielens(directory / RATINGS_FILES[fmt])


def test_several_layouts_need_an_explicit_format(tmp_path):
    write_ml_latest(tmp_path)
    write_ml1m(tmp_path)
    with raises_one_line("several MovieLens formats"):
        read_movielens(tmp_path)
    assert read_movielens(tmp_path, "ml-1m").format == "ml-1m"
    assert read_movielens(tmp_path / "ratings.csv").format == "ml-latest"  # the file names its format


@pytest.mark.parametrize(
    "ratings, match",
    [
        ("userId,movieId,rating,timestamp\n1,1,4.0,1\n1,11,four,964982703\n", r"ratings.csv line 3: the rating 'four' is not a number"),
        ("userId,movieId,rating,timestamp\n1,1,nan,964982703\n", r"line 2: the rating 'nan' is not a finite number"),
        ("userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,1e300,964982703\n", r"line 3: the rating '1e300' is out of range"),
        ("userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,-3,964982703\n", r"line 3: the rating '-3' is out of range \(0 to 5 stars\)"),
        ("userId,movieId,rating,timestamp\n1,1,5.5,1\n", r"line 2: the rating '5.5' is out of range \(0 to 5 stars\)"),
        ("userId,movieId,rating,timestamp\n1,77,-1,964982703\n", r"line 2: the rating '-1' is out of range"),  # even when dropped
        ("userId,movieId,rating,timestamp\n1,77,x,964982703\n", r"line 2: the rating 'x' is not a number"),  # even when dropped
        ("userId,movieId,rating,timestamp\n1,1,4.0,yesterday\n", r"line 2: the timestamp 'yesterday' is not a whole number"),
        ("userId,movieId,rating,timestamp\n1,1,4.0\n", r"line 2: expected 4 comma-separated columns, found 3"),
        ("userId,movieId,rating,timestamp\n1,1,4.0,1,extra\n", r"line 2: expected 4 comma-separated columns, found 5"),
        ("userId,movieId,rating,timestamp\n,1,4.0,1\n", r"line 2: the user id is empty"),
        ("user,movie,stars,time\n1,1,4.0,1\n", r"line 1: expected the header userId,movieId,rating,timestamp"),
        ("", r"ratings.csv is empty"),
        ("userId,movieId,rating,timestamp\n", r"ratings.csv has no ratings"),
        ("userId,movieId,rating,timestamp\n1,99,4.0,1\n", r"None of the 1 ratings .* is of a movie listed in movies.csv"),
        ("userId,movieId,rating,timestamp\n1,1,4.0,1\n2,1,3.0,2\n1,11,5.0,3\n1,1,2.0,4\n", r"ratings.csv lines 2 and 5: user 1 rated movie 1 twice"),
        ('userId,movieId,rating,timestamp\n1,"' + "x" * 200_000 + '",4,1\n', r"line 2: malformed CSV"),
    ],
)
def test_malformed_ml_latest_ratings(tmp_path, ratings, match):
    directory = write_ml_latest(tmp_path / "d")
    (directory / "ratings.csv").write_text(ratings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with raises_one_line(match):
            read_movielens(directory)


@pytest.mark.parametrize(
    "movies, match",
    [
        ("movieId,title,genres\n1,Toy Story (1995)\n", r"movies.csv line 2: expected 3 comma-separated columns, found 2"),
        ("movieId,title\n1,Toy Story (1995)\n", r"movies.csv line 1: expected the header movieId,title,genres"),
        ("movieId,title,genres\n1,Toy Story (1995),Comedy\n1,Again (1995),Drama\n", r"line 3: movie id 1 was already listed on line 2"),
        ("movieId,title,genres\n1,,Comedy\n", r"line 2: the title of movie 1 is empty"),
        ("movieId,title,genres\n", r"movies.csv lists no movies"),
    ],
)
def test_malformed_ml_latest_movies(tmp_path, movies, match):
    directory = write_ml_latest(tmp_path / "d")
    (directory / "movies.csv").write_text(movies)
    with raises_one_line(match):
        read_movielens(directory)


def test_malformed_dat_lines_name_file_and_line(tmp_path):
    directory = write_ml1m(tmp_path / "d")
    (directory / "ratings.dat").write_text("1::1::5::978300760\n\n1::2::3\n")
    with raises_one_line(r"ratings.dat line 3: expected 4 fields separated by '::', found 3"):
        read_movielens(directory)
    (directory / "ratings.dat").write_text("1::1::five::978300760\n")
    with raises_one_line(r"ratings.dat line 1: the rating 'five' is not a number"):
        read_movielens(directory)
    (directory / "ratings.dat").write_text("")
    with raises_one_line(r"ratings.dat has no ratings"):
        read_movielens(directory)


def test_malformed_ml100k_files(tmp_path):
    directory = write_ml100k(tmp_path / "d")
    (directory / "u.data").write_text("196 1 3 881250949\n")  # spaces, not tabs
    with raises_one_line(r"u.data line 1: expected 4 fields separated by '\\t', found 1"):
        read_movielens(directory)
    write_ml100k(directory)
    (directory / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|{genre_flags(3)}|0\n")
    with raises_one_line(r"u.item line 1: expected 24 fields"):
        read_movielens(directory)
    (directory / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|{genre_flags(3).replace('1', 'yes')}\n")
    with raises_one_line(r"u.item line 1: the 19 genre flags must each be 0 or 1"):
        read_movielens(directory)


def test_binary_and_undecodable_files(tmp_path):
    directory = write_ml_latest(tmp_path / "d")
    (directory / "ratings.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with raises_one_line("ratings.csv is a binary file"):
        read_movielens(directory)
    (directory / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n1,1,4.0,1\xff\xfe\n")
    with raises_one_line(r"ratings.csv line 2: the file is not valid UTF-8 text"):
        read_movielens(directory)


def test_a_directory_where_a_file_should_be(tmp_path):
    directory = write_ml1m(tmp_path / "d")
    (directory / "movies.dat").unlink()
    (directory / "movies.dat").mkdir()
    with raises_one_line("no movies.dat"):
        read_movielens(directory, "ml-1m")


# ---------------------------------------------------------------------------------------- shipped sample
def test_shipped_sample_is_complete_and_unchanged():
    assert {p.name for p in SAMPLE_DIR.iterdir()} >= {"README.txt", "ratings.csv", "movies.csv", "tags.csv", "links.csv"}
    assert hashlib.sha256((SAMPLE_DIR / "ratings.csv").read_bytes()).hexdigest() == SAMPLE_RATINGS_SHA256


def test_shipped_sample_reads_fast_and_fully():
    start = time.perf_counter()
    data = read_movielens(SAMPLE_DIR)
    assert time.perf_counter() - start < 2.0
    assert (data.name, data.format) == ("ml-latest-small", "ml-latest")
    assert (len(data.ratings), data.ratings.n_users, len(data.catalog)) == (100_836, 610, 9_742)
    assert data.ratings.user_ids[:3] == ["1", "2", "3"] and data.ratings.user_ids[-1] == "610"
    assert data.catalog.item_ids[0] == "1" and data.catalog.titles[0] == "Toy Story (1995)"
    assert float(data.ratings.rating.min()) == 0.5 and float(data.ratings.rating.max()) == 5.0
    assert load_sample() is load_sample()  # cached
    assert load_sample().fingerprint == data.fingerprint

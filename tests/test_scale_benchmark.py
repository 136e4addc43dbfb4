"""benchmarks/scale.py, behind the README's build and evaluation costs at ml-1m's size: its synthetic
data set has the shape it is asked for, in a layout pmeta's reader takes as ml-1m, the same seed
writes the same files, and the cost probe reports a child's own time and memory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from pmeta.data.movielens import read_movielens

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"
spec = importlib.util.spec_from_file_location("scale_benchmark", SCRIPT)
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)


def test_activity_sums_to_the_ratings_within_bounds():
    rng = np.random.default_rng(0)
    counts = scale.activity(rng, users=50, ratings=3000, items=200, minimum=20)
    assert counts.sum() == 3000 and counts.min() >= 20 and counts.max() <= 200
    with pytest.raises(ValueError):
        scale.activity(rng, users=50, ratings=999, items=200, minimum=20)  # fewer than 20 each


def test_written_data_has_the_asked_shape_and_reads_as_ml1m(tmp_path):
    out = scale.write(tmp_path / "synthetic", users=60, items=150, ratings=3000, seed=3)
    data = read_movielens(out)
    assert data.format == "ml-1m"
    assert len(data.catalog) == 150 and len(data.ratings) == 3000
    per_user = np.bincount(np.unique(data.ratings.user, return_inverse=True)[1])
    assert len(per_user) == 60 and per_user.min() >= 20
    u, i, r, t = scale.draw(users=60, items=150, ratings=3000, seed=3)
    assert len(np.unique(u)) == 60 and set(np.unique(r)) <= {1, 2, 3, 4, 5}
    assert all(len(np.unique(i[u == user])) == (u == user).sum() for user in np.unique(u))  # no film twice per user
    assert all(np.all(np.diff(t[u == user]) >= 0) for user in np.unique(u))  # time-ordered
    assert 0.4 < (r >= 4).mean() < 0.75
    again = scale.write(tmp_path / "again", users=60, items=150, ratings=3000, seed=3)
    assert (again / "ratings.dat").read_bytes() == (out / "ratings.dat").read_bytes()
    assert (again / "movies.dat").read_bytes() == (out / "movies.dat").read_bytes()


def test_measured_reports_the_childs_own_costs():
    grow = "x = bytearray(80 * 2**20); import time; time.sleep(0.2)"
    step = scale.measured([sys.executable, "-c", grow])
    assert step["seconds"] >= 0.2 and step["peak_rss_mb"] >= 80
    with pytest.raises(SystemExit, match="exited 3"):
        scale.measured([sys.executable, "-c", "import sys; sys.exit(3)"])

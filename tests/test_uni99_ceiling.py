"""benchmarks/uni99_ceiling.py: the warm reference for the uni99 K = 5 goal. Its cold rows must be the
protocol's own numbers, its warm rows must see every positive of a test user but the query, and its
oracle choices must be the best grid point."""

from __future__ import annotations

import numpy as np
import pytest

from pmeta.eval.baselines import EASEBaseline, PopularityBaseline
from pmeta.eval.protocol import MODES, QUERY_START, QUERY_STOP, evaluate, split_users
from test_time_prior_grid import eras


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("uni99_ceiling")


@pytest.fixture(scope="module")
def dataset():
    return eras(n_items=200)  # 176 never-rated items per user: enough for uni99 and pop99


@pytest.fixture(scope="module")
def result(script, dataset):
    return script.ceiling(dataset, seed=0, lambdas=(50.0, 500.0), log=lambda line: None)


def test_the_warm_history_is_every_positive_but_the_query(script, dataset):
    positives = dataset.positives_by_user()
    user = next(u for u, items in positives.items() if len(items) > QUERY_STOP)
    history = script.warm_histories(dataset, [user, -1])[user]
    assert list(history) == list(positives[user][:QUERY_START]) + list(positives[user][QUERY_STOP:])
    assert not set(history) & set(positives[user][QUERY_START:QUERY_STOP])
    assert len(script.warm_histories(dataset, [-1])[-1]) == 0  # a user without positives has none


def test_warm_ease_learns_from_the_test_users_histories_and_never_from_their_queries(script, dataset):
    train_users, test_users = split_users(dataset, 0)
    warm = script.warm_ease(script.warm_matrix(dataset, train_users, test_users), 50.0)
    positives = dataset.positives_by_user()
    matrix = np.zeros((len(train_users) + len(test_users), len(dataset.catalog)))
    for row, user in enumerate(train_users):
        matrix[row, positives.get(int(user), [])] = 1.0
    for row, user in enumerate(test_users, start=len(train_users)):
        items = positives.get(int(user), np.zeros(0, dtype=np.int64))
        matrix[row, items] = 1.0
        matrix[row, items[QUERY_START:QUERY_STOP]] = 0.0  # the query stays unseen
    kept = np.flatnonzero(matrix.sum(axis=0) > 0)
    assert list(warm.kept_items) == list(kept)
    np.testing.assert_allclose(warm.weights, EASEBaseline.closed_form(matrix[:, kept].T @ matrix[:, kept], 50.0), rtol=1e-4, atol=1e-6)
    cold = EASEBaseline(lam=50.0).fit(dataset, train_users)
    assert warm.weights.shape != cold.weights.shape or not np.allclose(warm.weights, cold.weights)


def test_the_cold_rows_are_the_protocols_own_numbers(result, dataset):
    train_users, test_users = split_users(dataset, 0)
    for name, scorer in (("popularity", PopularityBaseline().fit(dataset, train_users)), ("ease", EASEBaseline().fit(dataset, train_users))):
        rows = {row["mode"]: row for row in evaluate(scorer, dataset, test_users, ks=(5,), modes=MODES, seed=0)}
        for mode in MODES:
            assert result["rows"][name][mode]["hr@10"] == pytest.approx(rows[mode]["hr@10"])
            assert result["rows"][name][mode]["ndcg@10"] == pytest.approx(rows[mode]["ndcg@10"])
    assert result["users"] == rows["uni99"]["users"]


def test_each_oracle_row_is_at_least_its_grid_points(result):
    rows = result["rows"]
    for mode in MODES:
        lo, hi = rows["ease-warm+prior"][mode]["hr@10_ci95"]
        assert lo <= rows["ease-warm+prior"][mode]["hr@10"] <= hi
        assert rows["ease+prior"][mode]["hr@10"] >= rows["ease"][mode]["hr@10"]  # w = 0 is on the grid
    chosen = result["chosen"]
    assert set(chosen["ease-warm"]) == set(MODES) and all(key in ("lambda=50", "lambda=500") for key in chosen["ease-warm"].values())


def test_best_per_mode_takes_the_highest_mean_and_the_first_on_a_tie(script):
    def hits(*values):
        return {mode: {"hr@10": np.array(values), "ndcg@10": np.array(values)} for mode in MODES}

    values, chosen = script.best_per_mode({"a": hits(0.5, 0.5), "b": hits(1.0, 0.0), "c": hits(0.0, 1.0), "d": hits(0.2, 0.2)})
    assert chosen == {mode: "a" for mode in MODES}
    values, chosen = script.best_per_mode({"a": hits(0.5, 0.5), "b": hits(1.0, 0.5)})
    assert chosen["uni99"] == "b" and list(values["full"]["hr@10"]) == [1.0, 0.5]


def test_a_bad_data_folder_exits_with_one_line(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--data", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1

"""The time prior (pmeta.tasks.time_prior), its baseline, and the support time through the protocol and serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmeta.data.types import Catalog, Dataset, Ratings
from pmeta.eval import evaluate, make_cases
from pmeta.eval.baselines import BASELINES, PopularityBaseline
from pmeta.tasks import time_prior

DAY = time_prior.DAY


def _dataset(rows: list[tuple[str, str, float, int]], n_items: int) -> Dataset:
    item_ids = [str(i) for i in range(n_items)]
    catalog = Catalog(item_ids, [f"Movie {i}" for i in item_ids], [["Drama"] for _ in item_ids])
    user_ids = sorted({r[0] for r in rows})
    index = {u: i for i, u in enumerate(user_ids)}
    ratings = Ratings(
        user=np.array([index[r[0]] for r in rows], dtype=np.int64),
        item=np.array([int(r[1]) for r in rows], dtype=np.int64),
        rating=np.array([r[2] for r in rows], dtype=np.float32),
        timestamp=np.array([r[3] for r in rows], dtype=np.int64),
        user_ids=user_ids,
    )
    return Dataset("eras", "test", catalog, ratings, "0" * 64)


def eras_dataset(users: int = 200, n_items: int = 60, seed: int = 0) -> Dataset:
    """Two eras, 1000 days apart: an early user rates (and likes) items 0..29, a late user items
    30..59; within an era which items is random, and item popularity overall is flat. So the
    support items say nothing (uniform within the era) but their time says which half is liked."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        late = u % 2
        start = (1000 if late else 0) * DAY + rng.integers(0, 30) * DAY
        half = np.arange(30) + 30 * late
        for n, item in enumerate(rng.permutation(half)[:16]):
            rows.append((f"u{u:04d}", str(item), 5.0, int(start + n * 3600)))
    return _dataset(rows, n_items)


def test_table_follows_the_time_of_the_ratings():
    items = np.array([0, 0, 0, 1, 1, 1, 2])
    times = np.array([0, 1, 2, 1000, 1001, 1002, 500]) * DAY
    grid, table = time_prior.table(items, times, 4, bandwidth_days=30)
    assert grid[0] == times.min() and grid[-1] == times.max() and np.all(np.diff(grid) > 0)
    assert len(grid) <= time_prior.MAX_GRID
    assert table.shape == (len(grid), 4) and table.dtype == np.float32
    np.testing.assert_allclose(np.exp(table).sum(1), 1.0 + 4 * time_prior.EPSILON, rtol=1e-4)  # each row: log of a distribution
    early, late = time_prior.at(grid, table, [0.0, 1002 * DAY]).numpy()
    assert early.argmax() == 0 and late.argmax() == 1
    middle = time_prior.at(grid, table, [999 * DAY]).numpy()[0]  # before item 1's ratings: item 2 (day 500) leads
    assert middle.argmax() == 2
    assert early[3] == late[3] == pytest.approx(np.log(time_prior.EPSILON), abs=1e-3)  # never rated: the floor
    with pytest.raises(ValueError, match="at least one rating"):
        time_prior.table(np.zeros(0, dtype=np.int64), np.zeros(0), 4, 30)


def test_at_interpolates_and_clamps():
    grid = np.array([0.0, 10.0, 20.0])
    table = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], dtype=np.float32)
    times = [0.0, 5.0, 10.0, 20.0, -7.0, 99.0, float("nan"), 19.999]
    rows = time_prior.at(grid, table, times, causal=False).numpy()  # a two-sided table (banks before stop 47)
    np.testing.assert_allclose(rows, [[0, 1], [1, 2], [2, 3], [4, 5], [0, 1], [4, 5], [4, 5], [3.9998, 4.9998]], rtol=1e-5)
    causal = time_prior.at(grid, table, times).numpy()  # a causal table: the last grid point at or before t
    np.testing.assert_allclose(causal, [[0, 1], [0, 1], [2, 3], [4, 5], [0, 1], [4, 5], [4, 5], [2, 3]])


def test_the_prior_at_t_never_counts_a_rating_made_after_t():
    """The two-sided kernel scored a user at t with train users' ratings up to ~2h after t, which a
    bank serving that user at t could not have had. Now the prior at t is the half-Gaussian over the
    ratings at or before the grid point it reads (itself at or before t), recomputed here directly;
    the all-time mix aside (an all-time count, as every classical baseline's), ratings after t
    change nothing."""
    rng = np.random.default_rng(0)
    items, times = rng.integers(0, 20, 600), rng.uniform(0, 1200, 600) * DAY
    overall = np.bincount(items, minlength=20) / len(items)
    for h in (30.0, 180.0):
        grid, table = time_prior.table(items, times, 20, h)
        for t in np.linspace(times.min(), times.max(), 41):
            point = grid[np.searchsorted(grid, t, side="right") - 1]
            keep = times <= point
            assert point <= t
            local = np.bincount(items[keep], weights=np.exp(-0.5 * ((times[keep] - point) / (h * DAY)) ** 2), minlength=20)
            want = np.log((1 - time_prior.GLOBAL_MIX) * local / local.sum() + time_prior.GLOBAL_MIX * overall + time_prior.EPSILON)
            np.testing.assert_allclose(time_prior.at(grid, table, [t]).numpy()[0], want, rtol=1e-4, atol=1e-4)
        # the old kernel, for contrast: the ratings after 600 days move its prior at 590 days
        early = times <= 600 * DAY
        before = time_prior.at(*time_prior.table(items[early], times[early], 20, h, causal=False), [590 * DAY], causal=False)
        after = time_prior.at(*time_prior.table(items, times, 20, h, causal=False), [590 * DAY], causal=False)
        assert float((before - after).abs().max()) > 0.05
    head = time_prior.head_entries(grid, table, 2.0)
    assert "time_causal" in head and "time_causal" not in time_prior.head_entries(grid, table, 2.0, causal=False)
    torch.testing.assert_close(time_prior.user_prior(head, [450 * DAY]), 2.0 * time_prior.at(grid, table, [450 * DAY]))
    # a bank built before stop 47 (no time_causal in its head) reads its two-sided table as it always did
    old = time_prior.head_entries(*time_prior.table(items, times, 20, 30.0, causal=False), 2.0, causal=False)
    ts = [450 * DAY, 451.3 * DAY, float("nan"), -5.0]
    torch.testing.assert_close(time_prior.user_prior(old, ts), 2.0 * time_prior.at(old["time_grid"], old["time_log_prior"], ts, causal=False))
    assert not torch.equal(time_prior.user_prior(old, ts), 2.0 * time_prior.at(old["time_grid"], old["time_log_prior"], ts))


def test_head_entries_and_user_prior():
    grid, table = np.array([0.0, 10.0]), np.array([[0.0, -1.0], [-1.0, 0.0]], dtype=np.float32)
    assert time_prior.head_entries(grid, table, 0.0) == {}
    assert time_prior.user_prior({"item_bias": torch.zeros(2)}, [1.0]) is None
    head = time_prior.head_entries(grid, table, 2.0)
    assert head["time_grid"].dtype == torch.float64
    prior = time_prior.user_prior(head, [0.0, 10.0])
    torch.testing.assert_close(prior, torch.tensor([[0.0, -2.0], [-2.0, 0.0]]))


def test_choose_takes_the_prior_when_time_predicts_and_not_when_it_misleads():
    dataset = eras_dataset()
    users = np.arange(len(dataset.ratings.user_ids))
    fit, validation = users[:160], users[160:]
    cases = time_prior.validation_cases(dataset, validation)
    events = time_prior.rating_events(dataset, fit)
    flat = np.zeros(60)
    # 60 items: too few for 99 sampled negatives, so full ranking only (the real-data test runs all three modes)
    h, weight, grid = time_prior.choose(lambda support: flat, cases, events, 60, bandwidths=(30.0,), weights=(0.0, 1.0), modes=("full",))
    assert (h, weight) == (30.0, 1.0) and grid["h=30d,beta=1"]["full"] > grid["h=0d,beta=0"]["full"] + 0.2
    assert grid["h=30d,beta=1"]["mean"] == grid["h=30d,beta=1"]["full"]

    def knows_the_half(support):  # base scores that already know the user's half (ties broken by item index)
        late = support[0] >= 30
        return np.where((np.arange(60) >= 30) == late, 10.0, 0.0) + 1e-3 * np.arange(60)

    swapped = (events[0], np.where(events[1] >= 1000 * DAY, events[1] - 1000 * DAY, events[1] + 1000 * DAY))  # eras swapped: a prior that points at the wrong half
    h, weight, grid = time_prior.choose(knows_the_half, cases, swapped, 60, bandwidths=(30.0,), weights=(0.0, 100.0), modes=("full",))
    assert grid["h=0d,beta=0"]["full"] > 0.1 and grid["h=30d,beta=100"]["full"] < grid["h=0d,beta=0"]["full"]
    assert weight == 0.0


def test_cases_carry_the_time_of_the_kth_positive():
    dataset = eras_dataset(users=4)
    times = dataset.positive_times_by_user()
    positives = dataset.positives_by_user()
    for k in (1, 3, 5):
        for case in make_cases(dataset, range(4), k):
            assert case.support_time == float(times[case.user][k - 1])
            np.testing.assert_array_equal(case.support, positives[case.user][:k])
    assert all(np.all(np.diff(t) >= 0) for t in times.values())


def test_evaluate_passes_the_time_only_to_scorers_that_ask():
    dataset = eras_dataset(users=6)
    seen = []

    class Timed:
        name, uses_time = "timed", True

        def score(self, support, k, time=None):
            seen.append(time)
            return np.zeros(60)

    class Plain:
        name = "plain"

        def score(self, support, k):  # no time argument: must not receive one
            return np.zeros(60)

    evaluate(Timed(), dataset, range(6), ks=(1, 5), modes=("full",))
    evaluate(Plain(), dataset, range(6), ks=(1,), modes=("full",))
    expected = [c.support_time for k in (1, 5) for c in make_cases(dataset, range(6), k)]
    assert seen == expected and all(t is not None for t in seen)


def test_popularity_time_baseline_beats_popularity_when_eras_differ():
    dataset = eras_dataset()
    users = np.arange(len(dataset.ratings.user_ids))
    train, test = users[:160], users[160:]
    assert "popularity-time" in BASELINES
    timed = BASELINES["popularity-time"](validation_modes=("full",)).fit(dataset, train)
    assert timed.chosen_bandwidth in time_prior.BANDWIDTHS
    plain = PopularityBaseline().fit(dataset, train)
    (row_timed,) = evaluate(timed, dataset, test, ks=(1,), modes=("full",))
    (row_plain,) = evaluate(plain, dataset, test, ks=(1,), modes=("full",))
    assert row_timed["hr@10"] > row_plain["hr@10"] + 0.2, (row_timed, row_plain)
    assert np.isfinite(timed.score(np.array([0]), 1, time=None)).all()  # no time: the latest period


def test_bank_history_time_is_the_latest_timestamp(opened_bank):
    from pmeta.data.history import UserHistory

    with_times = UserHistory.model_validate({"user_id": "u", "items": [{"item_id": "1", "timestamp": 978300760}, {"item_id": "260", "timestamp": 978300999}, {"item_id": "296"}]})
    without = UserHistory.model_validate({"user_id": "u", "items": [{"item_id": "1"}, {"item_id": "260"}]})
    assert opened_bank.user_input(with_times).time == 978300999.0
    assert opened_bank.user_input(without).time is None


def test_a_bank_with_a_time_prior_scores_through_it_and_vmap_agrees(opened_bank, with_time_prior):
    """The prior reaches the scores (two times, two rankings) and the vmap inner loop handles it."""
    from pmeta.bank.bank import adapt_vmap
    from pmeta.eval.neural import support_input

    source = opened_bank.model
    n = len(source.item_texts)
    model = with_time_prior(source, 2.0, 2000)
    head, grid = model.t.head, model.t.head["time_grid"].numpy()
    users = [support_input(model, [10, 20, 30], 1e6), support_input(model, [10, 20, 30], 9e7), support_input(model, [5], None)]
    looped, batch, _ = model.personalize(users)
    mapped, batch_vmap, _ = model.personalize(users, adapt_fn=adapt_vmap)
    assert batch.prior.shape == (3, n)
    torch.testing.assert_close(batch.prior[1], time_prior.user_prior(head, [9e7])[0])
    torch.testing.assert_close(batch.prior[2], time_prior.user_prior(head, [float(grid[-1])])[0])  # no time: the latest period
    scores, scores_vmap = model.final_scores(batch, looped), model.final_scores(batch_vmap, mapped)
    finite = torch.isfinite(scores)
    torch.testing.assert_close(scores[finite], scores_vmap[finite], atol=1e-4, rtol=1e-4)
    assert not torch.equal(scores[0], scores[1])  # same items, different times
    without, _, _ = source.personalize(users[:1])
    assert not torch.equal(scores[0], source.final_scores(source.user_batch(users[:1]), without)[0])

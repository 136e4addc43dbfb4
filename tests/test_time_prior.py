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


def _exponential_by_hand(items, times, n, h, t):
    """The exponential prior at t straight from its definition: every rating at or before t."""
    overall = np.bincount(items, minlength=n) / len(items)
    keep = times <= t
    local = np.bincount(items[keep], weights=np.exp(-(t - times[keep]) / (h * DAY)), minlength=n)
    local = local / local.sum() if local.sum() > 0 else overall
    return np.log((1 - time_prior.GLOBAL_MIX) * local + time_prior.GLOBAL_MIX * overall + time_prior.EPSILON)


def test_the_exponential_prior_is_exact_at_t_and_never_counts_a_rating_made_after_t():
    """The prior of new banks (stop 48) at any t, recomputed from the ratings at or before t: between
    checkpoints, at a checkpoint, at the first and last rating, before the first (nothing counted:
    the all-time share), after the last and without a time (the latest). The stop-47 table read the
    last grid point before t and missed the ratings since (up to h / 4); this one misses none."""
    rng = np.random.default_rng(0)
    items, times = rng.integers(0, 20, 600), np.round(rng.uniform(0, 1200, 600) * DAY)
    times[10] = times[11]  # two ratings at one second
    for h in (30.0, 180.0):
        prior = time_prior.build(items, times, 20, h)
        grid = prior["time_grid"].numpy()
        assert grid[0] == times.min() and grid[-1] == times.max() and len(grid) <= time_prior.MAX_GRID
        ts = [*np.linspace(times.min(), times.max(), 41), *grid[3:6], times[10], times.min() - DAY, times.max() + 30 * DAY, *rng.uniform(0, 1200, 20) * DAY]
        rows = time_prior.log_prior_at(prior, ts).numpy()
        for row, t in zip(rows, ts):
            np.testing.assert_allclose(row, _exponential_by_hand(items, times, 20, h, t), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(time_prior.log_prior_at(prior, [float("nan")]).numpy()[0], _exponential_by_hand(items, times, 20, h, times.max()), rtol=1e-4, atol=1e-4)
        # one user at a time or all at once: the same rows
        torch.testing.assert_close(torch.cat([time_prior.log_prior_at(prior, [t]) for t in ts[:8]]), time_prior.log_prior_at(prior, ts[:8]))
        # the ratings after 600 days change nothing at 590 days, but the all-time mix
        early = times <= 600 * DAY
        only_early = time_prior.build(items[early], times[early], 20, h)
        mix = lambda x: np.exp(x.numpy())  # noqa: E731
        overall_all = np.bincount(items, minlength=20) / len(items)
        overall_early = np.bincount(items[early], minlength=20) / early.sum()
        local_all = (mix(time_prior.log_prior_at(prior, [590 * DAY]))[0] - time_prior.EPSILON - time_prior.GLOBAL_MIX * overall_all) / (1 - time_prior.GLOBAL_MIX)
        local_early = (mix(time_prior.log_prior_at(only_early, [590 * DAY]))[0] - time_prior.EPSILON - time_prior.GLOBAL_MIX * overall_early) / (1 - time_prior.GLOBAL_MIX)
        np.testing.assert_allclose(local_all, local_early, atol=1e-5)
    with pytest.raises(ValueError, match="at least one rating"):
        time_prior.build(np.zeros(0, dtype=np.int64), np.zeros(0), 4, 30)
    with pytest.raises(ValueError, match="unknown time prior kind"):
        time_prior.build(items, times, 20, 30.0, "laplace")


def test_pseudo_ratings_of_the_all_time_share_follow_their_definition():
    """``time_pseudo_ratings`` m: (decayed counts + m·p) / (decayed mass + m), read exactly at any t,
    also decades after the last rating (mass far below m: the all-time share) and before the first."""
    rng = np.random.default_rng(1)
    items, times = rng.integers(0, 12, 300), np.round(rng.uniform(0, 900, 300) * DAY)
    h = 60.0
    overall = np.bincount(items, minlength=12) / len(items)
    ts = [*rng.uniform(0, 900, 12) * DAY, times.min() - DAY, times.max() + 40 * 365 * DAY]
    for m in (0.5, 7.0, 300.0):
        prior = {**time_prior.build(items, times, 12, h), "time_pseudo_ratings": torch.tensor(m, dtype=torch.float64)}
        rows = time_prior.log_prior_at(prior, ts).numpy()
        for row, t in zip(rows, ts):
            keep = times <= t
            counts = np.bincount(items[keep], weights=np.exp(-(t - times[keep]) / (h * DAY)), minlength=12)
            local = (counts + m * overall) / (counts.sum() + m)
            expected = np.log((1 - time_prior.GLOBAL_MIX) * local + time_prior.GLOBAL_MIX * overall + time_prior.EPSILON)
            np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-4)
    plain = time_prior.build(items, times, 12, h)
    torch.testing.assert_close(time_prior.log_prior_at({**plain, "time_pseudo_ratings": torch.tensor(0.0)}, ts), time_prior.log_prior_at(plain, ts))


def test_the_exponential_prior_holds_far_from_its_ratings_after_long_gaps_and_in_busy_periods(monkeypatch):
    """Decayed counts underflow float32 after ~87 h: a user decades after the bank's last rating (an
    ml-100k bank serving a history timestamped today), a gap of decades inside the ratings, and a
    period so busy that one read would gather millions of ratings (read in chunks) all stay exact."""
    rng = np.random.default_rng(1)
    items = rng.integers(0, 20, 3000)
    times = np.concatenate([rng.uniform(0, 400, 1500), rng.uniform(30 * 365, 30 * 365 + 400, 1500)]) * DAY  # a 29-year gap
    prior = time_prior.build(items, times, 20, 60.0)
    assert np.isfinite(prior["time_log_total"].numpy()).all() and np.isfinite(prior["time_shares"].numpy()).all()
    far = [times.max() + years * 365 * DAY for years in (1, 16, 17, 20, 60)]
    gap = [400 * DAY + years * 365 * DAY for years in (1, 16, 20, 28)]
    for t, row in zip(far + gap, time_prior.log_prior_at(prior, far + gap).numpy()):
        np.testing.assert_allclose(row, _exponential_by_hand(items, times, 20, 60.0, t), rtol=1e-4, atol=1e-4)
    # a checkpoint every RATINGS_PER_CHECKPOINT ratings however short the span; chunked reads equal one read
    busy = rng.uniform(0, 3 * DAY, 10000)
    dense = time_prior.build(rng.integers(0, 20, 10000), busy, 20, 365.0)
    assert len(dense["time_grid"]) >= 10000 // time_prior.RATINGS_PER_CHECKPOINT
    ts = rng.uniform(0, 3 * DAY, 50)
    whole = time_prior.log_prior_at(dense, ts)
    monkeypatch.setattr(time_prior, "MAX_GATHERED", 100)
    torch.testing.assert_close(time_prior.log_prior_at(dense, ts), whole)


def test_the_stop_47_table_reads_the_last_grid_point_and_the_two_sided_one_looks_ahead():
    """The Gaussian kinds banks built before stop 48 hold, read as they always were: the causal
    table (stop 47) at the last grid point at or before t counts the half-Gaussian over the ratings
    up to that point; the two-sided one (before stop 47) moves with ratings after t."""
    rng = np.random.default_rng(0)
    items, times = rng.integers(0, 20, 600), rng.uniform(0, 1200, 600) * DAY
    overall = np.bincount(items, minlength=20) / len(items)
    for h in (30.0, 180.0):
        prior = time_prior.build(items, times, 20, h, "gaussian")
        grid, table = prior["time_grid"].numpy(), prior["time_log_prior"].numpy()
        assert time_prior.kind_of(prior) == "gaussian"
        for t in np.linspace(times.min(), times.max(), 41):
            point = grid[np.searchsorted(grid, t, side="right") - 1]
            keep = times <= point
            assert point <= t
            local = np.bincount(items[keep], weights=np.exp(-0.5 * ((times[keep] - point) / (h * DAY)) ** 2), minlength=20)
            want = np.log((1 - time_prior.GLOBAL_MIX) * local / local.sum() + time_prior.GLOBAL_MIX * overall + time_prior.EPSILON)
            np.testing.assert_allclose(time_prior.log_prior_at(prior, [t]).numpy()[0], want, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(time_prior.at(grid, table, [t]).numpy()[0], want, rtol=1e-4, atol=1e-4)
        early = times <= 600 * DAY
        before = time_prior.log_prior_at(time_prior.build(items[early], times[early], 20, h, "two-sided"), [590 * DAY])
        after = time_prior.log_prior_at(time_prior.build(items, times, 20, h, "two-sided"), [590 * DAY])
        assert float((before - after).abs().max()) > 0.05
    old = time_prior.head_entries(time_prior.build(items, times, 20, 30.0, "two-sided"), 2.0)
    assert time_prior.kind_of(old) == "two-sided" and "time_causal" not in old
    ts = [450 * DAY, 451.3 * DAY, float("nan"), -5.0]
    torch.testing.assert_close(time_prior.user_prior(old, ts), 2.0 * time_prior.at(old["time_grid"], old["time_log_prior"], ts, causal=False))
    assert not torch.equal(time_prior.user_prior(old, ts), 2.0 * time_prior.at(old["time_grid"], old["time_log_prior"], ts))


def test_head_entries_user_prior_and_a_transferred_column_map():
    items, times = np.array([0, 1, 1, 2, 0]), np.array([0.0, 1.0, 2.0, 3.0, 4.0]) * DAY
    prior = time_prior.build(items, times, 3, 30.0)
    assert time_prior.head_entries(prior, 0.0) == {}
    assert time_prior.user_prior({"item_bias": torch.zeros(2)}, [1.0]) is None and time_prior.kind_of({}) is None
    head = time_prior.head_entries(prior, 2.0)
    assert time_prior.kind_of(head) == "exponential" and time_prior.item_count(head) == 3
    assert head["time_grid"].dtype == head["time_event_times"].dtype == torch.float64 and head["time_event_items"].dtype == torch.int64
    ts = [0.5 * DAY, 3.5 * DAY]
    rows = time_prior.log_prior_at(prior, ts)
    torch.testing.assert_close(time_prior.user_prior(head, ts), 2.0 * rows)
    # a catalogue of 4 items: item 0 is the bank's 2, item 2 its 0, items 1 and 3 unseen (the median of the row)
    moved = time_prior.user_prior({**head, "time_columns": torch.tensor([2, -1, 0, -1])}, ts)
    median = rows.median(dim=1).values
    torch.testing.assert_close(moved, 2.0 * torch.stack([rows[:, 2], median, rows[:, 0], median], dim=1))
    assert time_prior.item_count({**head, "time_columns": torch.tensor([2, -1, 0, -1])}) == 4


def test_a_weight_per_history_size_scales_each_users_prior_by_their_number_of_items():
    items, times = np.array([0, 1, 1, 2, 0]), np.array([0.0, 1.0, 2.0, 3.0, 4.0]) * DAY
    prior = time_prior.build(items, times, 3, 30.0)
    assert time_prior.head_entries(prior, (0.0, 0.0)) == {} and time_prior.weights_off([0, 0]) and not time_prior.weights_off((1.0, 0.0))
    assert time_prior.head_entries(prior, (2.0, 2.0, 2.0))["time_weight"].ndim == 0  # equal values: one β, as banks before stop 54 store it
    head = time_prior.head_entries(prior, (3.0, 2.0, 1.0, 1.0, 0.5))
    assert head["time_weight"].tolist() == [3.0, 2.0, 1.0, 1.0, 0.5]
    # an empty history takes β_1, a longer one than five β_5
    assert time_prior.weight_of(head["time_weight"], [0, 1, 2, 3, 5, 40]).tolist() == [3.0, 3.0, 2.0, 1.0, 0.5, 0.5]
    ts = [0.5 * DAY, 3.5 * DAY, 4.0 * DAY]
    rows = time_prior.log_prior_at(prior, ts)
    torch.testing.assert_close(time_prior.user_prior(head, ts, [1, 3, 7]), torch.tensor([3.0, 1.0, 0.5], dtype=rows.dtype)[:, None] * rows)
    with pytest.raises(ValueError, match="history sizes"):
        time_prior.user_prior(head, ts)
    one = time_prior.head_entries(prior, 2.0)  # one β: sizes change nothing, and are not needed
    assert torch.equal(time_prior.user_prior(one, ts, [1, 3, 7]), time_prior.user_prior(one, ts)) and torch.equal(time_prior.user_prior(one, ts), 2.0 * rows)


def test_the_non_increasing_choice_is_the_best_non_increasing_sequence():
    import itertools

    rng = np.random.default_rng(3)
    weights = [2.0, 0.0, 5.0, 0.5]  # in any order
    for _ in range(30):
        scores = rng.random((5, 4)).round(2).tolist()  # rounded: ties happen
        chosen, total = time_prior._non_increasing(scores, weights)
        feasible = [seq for seq in itertools.product(range(4), repeat=5) if all(weights[a] >= weights[b] for a, b in zip(seq, seq[1:]))]
        best = max(np.mean([scores[k][j] for k, j in enumerate(seq)]) for seq in feasible)
        assert all(a >= b for a, b in zip(chosen, chosen[1:])) and np.isclose(total, best)
        assert np.isclose(np.mean([scores[k][weights.index(b)] for k, b in enumerate(chosen)]), total)
        ties = [seq for seq in feasible if np.isclose(np.mean([scores[k][j] for k, j in enumerate(seq)]), best)]
        if len(ties) == 1:
            assert chosen == [weights[j] for j in ties[0]]


def test_choose_per_size_gives_the_prior_to_short_histories_only_when_longer_ones_know_better():
    """Eras data: the prior tells the user's half of the catalogue. The base model knows nothing from
    one or two items, and each user's own query items from three or more (an oracle keyed by the
    first three items): β = 100 helps K = 1, 2 and buries the oracle at K = 3 … 5. One β for every
    K must pick one of the two; one per size picks (100, 100, 0, 0, 0). Base scores that know only
    from short histories (the reverse) may not give a longer history more weight."""
    dataset = eras_dataset()
    users = np.arange(len(dataset.ratings.user_ids))
    fit, validation = users[:160], users[160:]
    cases = time_prior.validation_cases(dataset, validation)
    events = time_prior.rating_events(dataset, fit)
    oracle = {tuple(case.support[:3].tolist()): case.query for case, _ in cases}

    def late_oracle(support):
        out = 1e-3 * np.arange(60)
        if len(support) >= 3:
            out[oracle[tuple(support[:3].tolist())]] += 10.0
        return out

    kwargs = dict(bandwidths=(30.0,), weights=(0.0, 100.0), ks=(1, 2, 3, 4, 5), modes=("full",))
    h, weight, m, grid = time_prior.choose(late_oracle, cases, events, 60, per_size=True, **kwargs)
    assert (h, weight, m) == (30.0, (100.0, 100.0, 0.0, 0.0, 0.0), 0.0)
    assert set(grid["h=30d,beta=100"]["by_k"]) == {"1", "2", "3", "4", "5"} and grid["h=30d,beta=100"]["by_k"]["1"] > grid["h=0d,beta=0"]["by_k"]["1"] + 0.1
    assert grid["h=30d,beta=100"]["by_k"]["5"] < grid["h=0d,beta=0"]["by_k"]["5"]
    shared = time_prior.choose(late_oracle, cases, events, 60, **kwargs)[1]
    assert shared in (0.0, 100.0)

    first: dict[int, list[int]] = {}
    for case, _ in cases:
        first.setdefault(int(case.support[0]), []).extend(case.query.tolist())

    def early_oracle(support):  # knows the query from one or two items, nothing from more
        out = 1e-3 * np.arange(60)
        if len(support) < 3:
            out[first[int(support[0])]] += 10.0
        return out

    _, weight, _, grid = time_prior.choose(early_oracle, cases, events, 60, per_size=True, **kwargs)
    on, off = grid["h=30d,beta=100"]["by_k"], grid["h=0d,beta=0"]["by_k"]
    assert on["1"] < off["1"] and on["5"] > off["5"]  # freely chosen: (0, 0, 100, 100, 100)
    assert len(set(weight)) == 1  # non-increasing: one β for every size after all
    with pytest.raises(ValueError, match="ks = 1"):
        time_prior.choose(late_oracle, cases, events, 60, per_size=True, bandwidths=(30.0,), weights=(0.0, 1.0), ks=(1, 3, 5), modes=("full",))


def test_choose_takes_the_prior_when_time_predicts_and_not_when_it_misleads():
    dataset = eras_dataset()
    users = np.arange(len(dataset.ratings.user_ids))
    fit, validation = users[:160], users[160:]
    cases = time_prior.validation_cases(dataset, validation)
    events = time_prior.rating_events(dataset, fit)
    flat = np.zeros(60)
    # 60 items: too few for 99 sampled negatives, so full ranking only (the real-data test runs all three modes)
    h, weight, m, grid = time_prior.choose(lambda support: flat, cases, events, 60, bandwidths=(30.0,), weights=(0.0, 1.0), modes=("full",))
    assert (h, weight, m) == (30.0, 1.0, 0.0) and grid["h=30d,beta=1"]["full"] > grid["h=0d,beta=0"]["full"] + 0.2
    assert grid["h=30d,beta=1"]["mean"] == grid["h=30d,beta=1"]["full"]

    def knows_the_half(support):  # base scores that already know the user's half (ties broken by item index)
        late = support[0] >= 30
        return np.where((np.arange(60) >= 30) == late, 10.0, 0.0) + 1e-3 * np.arange(60)

    swapped = (events[0], np.where(events[1] >= 1000 * DAY, events[1] - 1000 * DAY, events[1] + 1000 * DAY))  # eras swapped: a prior that points at the wrong half
    h, weight, m, grid = time_prior.choose(knows_the_half, cases, swapped, 60, bandwidths=(30.0,), weights=(0.0, 100.0), modes=("full",), pseudo_ratings=(0.0, 30.0))
    assert grid["h=0d,beta=0"]["full"] > 0.1 and grid["h=30d,beta=100"]["full"] < grid["h=0d,beta=0"]["full"]
    assert weight == 0.0 and m == 0.0 and set(grid) == {"h=0d,beta=0", "h=30d,beta=100", "h=30d,beta=100,m=30"}


def test_choose_leans_on_all_time_popularity_when_the_users_time_has_few_ratings_behind_it():
    """Validation users at day 1000 like items 0..9, which 2,000 ratings made popular in the first
    month; the only ratings within a few bandwidths of day 1000 are 20 of items 50..59. The decayed
    counts alone (m = 0) point at those; m pseudo-ratings of the all-time share bring items 0..9
    back, so the grid takes m > 0 (and its scores are those of a prior built with that m)."""
    rng = np.random.default_rng(0)
    rows = [(f"v{u:02d}", str(item), 5.0, int(1000 * DAY + u * 3600 + n)) for u in range(20) for n, item in enumerate(rng.permutation(10)[:8])]
    dataset = _dataset(rows, 60)
    cases = time_prior.validation_cases(dataset, np.arange(20))
    events = (np.concatenate([rng.integers(0, 10, 2000), np.arange(50, 60).repeat(2)]), np.concatenate([rng.uniform(0, 30, 2000), rng.uniform(990, 999, 20)]) * DAY)
    flat = np.zeros(60)
    h, weight, m, grid = time_prior.choose(lambda support: flat, cases, events, 60, bandwidths=(30.0,), weights=(0.0, 1.0), modes=("full",), pseudo_ratings=(0.0, 30.0, 3000.0))
    assert weight == 1.0 and m > 0 and grid[f"h=30d,beta=1,m={m:g}"]["full"] > grid["h=30d,beta=1"]["full"] + 0.3
    assert grid["h=30d,beta=1"]["full"] < 0.05  # the decayed counts alone rank items 0..9 below 50..59
    shrunk = time_prior.build(events[0], events[1], 60, 30.0, pseudo_ratings=m)
    assert float(shrunk["time_pseudo_ratings"]) == m and "time_pseudo_ratings" not in time_prior.build(events[0], events[1], 60, 30.0)
    top = time_prior.log_prior_at(shrunk, [1000 * DAY]).numpy()[0].argsort()[::-1][:10]
    assert set(top) == set(range(10))
    # a prior that is not exponential tries m = 0 only
    _, _, m_gaussian, grid_gaussian = time_prior.choose(lambda support: flat, cases, events, 60, bandwidths=(30.0,), weights=(0.0, 1.0), modes=("full",), kind="gaussian", pseudo_ratings=(0.0, 30.0))
    assert m_gaussian == 0.0 and set(grid_gaussian) == {"h=0d,beta=0", "h=30d,beta=1"}


def test_pseudo_ratings_are_refused_where_they_mean_nothing():
    from pmeta import InvalidConfig, load_config

    items, times = np.array([0, 1]), np.array([0.0, DAY])
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="pseudo-ratings"):
            time_prior.build(items, times, 2, 30.0, pseudo_ratings=bad)
    with pytest.raises(ValueError, match="exponential"):
        time_prior.build(items, times, 2, 30.0, kind="gaussian", pseudo_ratings=30.0)
    with pytest.raises(InvalidConfig, match="time_prior_pseudo_ratings"):
        load_config("tiny", overrides={"time_prior_kernel": "gaussian", "time_prior_pseudo_ratings": [0.0, 30.0]})
    for bad in ([-1.0], [], [float("nan")], 30.0):
        with pytest.raises(InvalidConfig, match="time_prior_pseudo_ratings"):
            load_config("tiny", overrides={"time_prior_pseudo_ratings": bad})
    assert load_config("tiny", overrides={"time_prior_kernel": "gaussian", "time_prior_pseudo_ratings": [0]}).time_prior_pseudo_ratings == (0.0,)
    assert load_config("tiny").time_prior_pseudo_ratings == (0.0,)


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


def test_a_bank_with_a_weight_per_history_size_weighs_each_user_by_their_history(opened_bank, with_time_prior):
    from pmeta.eval.neural import support_input

    model = with_time_prior(opened_bank.model, (3.0, 2.0, 1.0, 1.0, 0.5), 2000)
    users = [support_input(model, [10, 20, 30], 1e6), support_input(model, [5], 1e6), support_input(model, list(range(40, 52)), 1e6)]
    batch = model.user_batch(users)
    rows = time_prior.log_prior_at(model.t.head, [1e6] * 3)[0]
    for row, beta in enumerate((1.0, 3.0, 0.5)):
        torch.testing.assert_close(batch.prior[row], (beta * rows).to(batch.prior.dtype))
    looped, batch, _ = model.personalize(users)
    assert torch.isfinite(model.final_scores(batch, looped)).any(dim=1).all()


def test_a_stored_config_reads_as_the_prior_it_was_built_with():
    """Banks store their config; those built before stop 47 lack time_prior_causal (two-sided), those
    of stop 47 lack time_prior_kernel (the gridded half-Gaussian); new ones build the exponential
    prior, and an exponential two-sided prior is refused."""
    from pmeta.bank.bank import stored_config
    from pmeta.config import BankConfig

    current = BankConfig().model_dump()
    assert BankConfig().time_prior_kind == stored_config(current).time_prior_kind == "exponential"
    stop47 = {k: v for k, v in current.items() if k != "time_prior_kernel"}
    assert stored_config(stop47).time_prior_kind == "gaussian"
    before47 = {k: v for k, v in stop47.items() if k != "time_prior_causal"}
    assert stored_config(before47).time_prior_kind == "two-sided"
    with pytest.raises(ValueError, match="time_prior_kernel = 'gaussian'"):
        BankConfig(time_prior_causal=False, time_prior_kernel="exponential")
    assert BankConfig(time_prior_causal=False).time_prior_kind == "two-sided"  # alone: the two-sided Gaussian, as the docs say
    assert BankConfig(time_prior_causal=False, time_prior_kernel="gaussian").time_prior_kind == "two-sided"
    # banks before stop 54 chose one β for every history size; a config without the field reads so
    assert not BankConfig().time_prior_weight_by_size and not stored_config(current).time_prior_weight_by_size  # an option since stop 54, off by default
    assert stored_config({**current, "time_prior_weight_by_size": True}).time_prior_weight_by_size
    assert not stored_config({k: v for k, v in current.items() if k != "time_prior_weight_by_size"}).time_prior_weight_by_size

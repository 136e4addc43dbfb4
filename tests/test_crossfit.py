"""Cross-fitted training priors (pmeta.bank.crossfit): a train user is scored in meta-training with
a time prior and an anchor bias that do not count their own fold's ratings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmeta.bank import crossfit
from pmeta.fusion import anchor_bias
from pmeta.tasks import time_prior

N_ITEMS = 12


def _events(seed: int = 0, users: int = 9, per_user: int = 15):
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), per_user)
    item = rng.integers(0, N_ITEMS, len(user))
    stamp = rng.integers(0, 400, len(user)) * time_prior.DAY + user * 30 * time_prior.DAY  # each user rates around their own time
    return user.astype(np.int64), item.astype(np.int64), stamp.astype(np.float64)


def _positives(events, users):
    user, item, _ = events
    return [np.unique(item[user == u]) for u in users]


def test_folds_are_balanced_and_seeded():
    users = np.arange(3, 40)
    fold = crossfit.assign_folds(users, 5, seed=1)
    assert set(fold) == set(int(u) for u in users)
    sizes = np.bincount(list(fold.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1
    assert fold == crossfit.assign_folds(users, 5, seed=1) and fold != crossfit.assign_folds(users, 5, seed=2)
    with pytest.raises(ValueError, match="2 folds"):
        crossfit.build(1, 0, users, _events(), [], N_ITEMS, 30.0, 1.0, None, 1, 0.0)


def test_a_users_time_prior_is_counted_over_the_other_folds_only():
    events = _events()
    train = np.arange(8)  # user 8 is not a train user: the prior never counts it
    fit = crossfit.build(3, 0, train, events, _positives(events, train), N_ITEMS, 30.0, 2.0, None, 1, 0.0)
    user, item, stamp = events
    users, times = [0, 4, 7, 2], [50 * time_prior.DAY, 200 * time_prior.DAY, None, 90 * time_prior.DAY]
    got = fit.prior(users, times, "cpu")
    for row, (u, t) in enumerate(zip(users, times)):
        others = np.isin(user, [v for v in train if fit.fold[int(v)] != fit.fold[u]])
        grid, table = time_prior.table(item[others], stamp[others], N_ITEMS, 30.0)
        want = 2.0 * time_prior.at(grid, table, [float("nan") if t is None else t])[0]
        torch.testing.assert_close(got[row], want.float())
    # moving user 0's own ratings changes nobody's prior in user 0's fold, and changes the other folds'
    moved = (user, np.where(user == 0, (item + 5) % N_ITEMS, item), stamp)
    refit = crossfit.build(3, 0, train, moved, _positives(moved, train), N_ITEMS, 30.0, 2.0, None, 1, 0.0)
    same = [u for u in train if fit.fold[int(u)] == fit.fold[0]]
    other = [u for u in train if fit.fold[int(u)] != fit.fold[0]]
    t = [60 * time_prior.DAY] * len(same)
    torch.testing.assert_close(refit.prior(same, t, "cpu"), fit.prior(same, t, "cpu"))
    t = [10 * time_prior.DAY] * len(other)
    assert not torch.allclose(refit.prior(other, t, "cpu"), fit.prior(other, t, "cpu"))


def test_no_time_prior_gives_none():
    events = _events()
    fit = crossfit.build(2, 0, np.arange(9), events, _positives(events, range(9)), N_ITEMS, 30.0, 0.0, None, 1, 0.0)
    assert fit.prior([0, 1], [None, None], "cpu") is None and fit.own_bias([0], torch.tensor([0])) is None


def test_the_anchor_bias_leaves_the_users_fold_out_and_fuses_as_serving_does():
    events = _events(seed=3)
    train = np.arange(9)
    positives = _positives(events, train)
    assignment = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2])
    fit = crossfit.build(3, 4, train, events, positives, N_ITEMS, 30.0, 0.0, assignment, 3, 1.5)
    assert fit.biases.shape == (3, 3, N_ITEMS)
    for f in range(3):
        others = [i for i in range(9) if fit.fold[i] != f]
        want = 1.5 * anchor_bias.log_ratio([positives[i] for i in others], assignment[others], 3, N_ITEMS)
        torch.testing.assert_close(fit.biases[f], torch.from_numpy(want))
    users = [1, 4, 8]
    own = fit.own_bias(users, torch.tensor([0, 2, 1]))
    for row, (u, a) in enumerate(zip(users, [0, 2, 1])):
        torch.testing.assert_close(own[row], fit.biases[fit.fold[u], a])
    idx = torch.tensor([[0, 1], [2, 0], [1, 2]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    has_key = torch.tensor([True, False, True])
    sizes = torch.tensor([3.0, 3.0, 3.0])
    fused = fit.fused_bias(users, idx, weights, has_key, sizes)
    for row, u in enumerate(users):
        want = anchor_bias.fused(fit.biases[fit.fold[u]], idx[row : row + 1], weights[row : row + 1], has_key[row : row + 1], sizes)
        torch.testing.assert_close(fused[row : row + 1], want)


def test_a_cross_fitted_build_keeps_the_serving_tensors_and_trains_without_the_users_own_ratings():
    """A tiny build with a time prior and an anchor bias and 3 folds: the stored tensors count every
    train user, as without cross-fitting; training batches get the fold's prior, which puts less
    weight on the items the user goes on to like (their own ratings are no longer counted)."""
    from pmeta import load_config
    from pmeta.bank.build import build_model, time_prior_entries, with_positives
    from pmeta.bank.episodes import EpisodeSampler
    from pmeta.bank.meta_train import training_batch
    from pmeta.data import load_sample

    dataset = load_sample()
    config = load_config("tiny", overrides={"crossfit_folds": 3, "time_prior_weight": 2.0, "time_prior_bandwidth": 30.0, "anchor_bias_weight": 1.0})
    model, record = build_model(dataset, config)
    ids = {u: i for i, u in enumerate(dataset.ratings.user_ids)}
    positives = dataset.positives_by_user()
    train = with_positives(np.array(sorted(ids[u] for u in record["train_users"])), positives, config.min_positives)
    serving = time_prior_entries(dataset, config, train, 30.0, 2.0)
    torch.testing.assert_close(model.t.head["time_log_prior"], serving["time_log_prior"])
    assert model.crossfit is not None and model.crossfit.folds == 3 and set(model.crossfit.fold) == set(int(u) for u in train)
    assert model.t.anchor_bias is not None and model.crossfit.biases.shape == (3, *model.t.anchor_bias.shape)

    sampler = EpisodeSampler(positives, dataset.rated_by_user(), train, model.item_texts, config, seed=5, times=dataset.positive_times_by_user())
    episode = sampler.sample(16)
    batch = training_batch(model, episode)
    own = model.user_batch(episode.support).prior  # the serving prior: counts the users' own ratings
    torch.testing.assert_close(batch.prior, model.crossfit.prior(episode.users, [u.time for u in episode.support], "cpu"))
    targets, mask = episode.query_targets, episode.query_mask.bool()
    drop = (own.gather(1, targets) - batch.prior.gather(1, targets))[mask]
    print("mean drop of the prior at the query items:", float(drop.mean()))
    assert float(drop.mean()) > 0.5, float(drop.mean())  # measured: 3.96


def test_one_fold_is_refused():
    from pmeta import load_config
    from pmeta.errors import InvalidConfig

    with pytest.raises(InvalidConfig, match="crossfit_folds must be 0"):
        load_config("tiny", overrides={"crossfit_folds": 1})

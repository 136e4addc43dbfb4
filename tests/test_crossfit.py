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
        prior = time_prior.build(item[others], stamp[others], N_ITEMS, 30.0)
        want = 2.0 * time_prior.log_prior_at(prior, [float("nan") if t is None else t])[0]
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


def test_fold_priors_carry_the_banks_pseudo_ratings():
    events = _events()
    train = np.arange(8)
    fit = crossfit.build(3, 0, train, events, _positives(events, train), N_ITEMS, 30.0, 2.0, None, 1, 0.0, pseudo_ratings=300.0)
    user, item, stamp = events
    assert all(float(p["time_pseudo_ratings"]) == 300.0 for p in fit.priors)
    others = np.isin(user, [v for v in train if fit.fold[int(v)] != fit.fold[0]])
    want = 2.0 * time_prior.log_prior_at(time_prior.build(item[others], stamp[others], N_ITEMS, 30.0, pseudo_ratings=300.0), [50 * time_prior.DAY])[0]
    torch.testing.assert_close(fit.prior([0], [50 * time_prior.DAY], "cpu")[0], want.float())
    plain = crossfit.build(3, 0, train, events, _positives(events, train), N_ITEMS, 30.0, 2.0, None, 1, 0.0)
    assert not torch.allclose(fit.prior([0], [50 * time_prior.DAY], "cpu"), plain.prior([0], [50 * time_prior.DAY], "cpu"))


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


@pytest.fixture(scope="module")
def cross_fitted():
    """(model, build record, dataset, train users) of a tiny build with a time prior, an anchor bias and 3 folds."""
    from pmeta import load_config
    from pmeta.bank.build import build_model, with_positives
    from pmeta.data import load_sample

    dataset = load_sample()
    config = load_config("tiny", overrides={"crossfit_folds": 3, "time_prior_weight": 2.0, "time_prior_bandwidth": 30.0, "anchor_bias_weight": 1.0})
    model, record = build_model(dataset, config)
    ids = {u: i for i, u in enumerate(dataset.ratings.user_ids)}
    train = with_positives(np.array(sorted(ids[u] for u in record["train_users"])), dataset.positives_by_user(), config.min_positives)
    return model, record, dataset, train


def _episode(model, dataset, train, seed=5, users=16):
    from pmeta.bank.episodes import EpisodeSampler

    sampler = EpisodeSampler(dataset.positives_by_user(), dataset.rated_by_user(), train, model.item_texts, model.config, seed=seed, times=dataset.positive_times_by_user())
    return sampler.sample(users)


def test_a_cross_fitted_build_keeps_the_serving_tensors_and_trains_without_the_users_own_ratings(cross_fitted):
    """The stored tensors count every train user, as without cross-fitting; training batches get the
    fold's prior, which puts less weight on the items the user goes on to like (their own ratings
    are no longer counted)."""
    from pmeta.bank.build import time_prior_entries
    from pmeta.bank.meta_train import training_batch

    model, _, dataset, train = cross_fitted
    serving = time_prior_entries(dataset, model.config, train, 30.0, 2.0)
    assert {k for k in model.t.head if k.startswith("time_")} == set(serving)
    for key, value in serving.items():
        torch.testing.assert_close(model.t.head[key], value)
    fit = model.crossfit
    assert fit is not None and fit.folds == 3 and set(fit.fold) == set(int(u) for u in train)
    assert all(float(p["time_weight"]) == float(model.t.head["time_weight"]) == 2.0 for p in fit.priors)
    assert model.t.anchor_bias is not None and fit.biases.shape == (3, *model.t.anchor_bias.shape)
    assert fit.serving_bias is model.t.anchor_bias or torch.equal(fit.serving_bias, model.t.anchor_bias)

    episode = _episode(model, dataset, train)
    batch = training_batch(model, episode)
    own = model.user_batch(episode.support).prior  # the serving prior: counts the users' own ratings
    targets, mask = episode.query_targets, episode.query_mask.bool()
    drop = (own.gather(1, targets) - batch.prior.gather(1, targets))[mask]
    assert float(drop.mean()) > 0.5, float(drop.mean())  # measured: 3.96


def test_the_anchor_and_stack_stages_train_with_the_fold_bias(cross_fitted):
    """The anchor stage adds each user's own anchor's bias without their fold; the stack stage the
    retrieved anchors' fused bias without their fold, through the fusion weights (τ gets a gradient)."""
    from pmeta.bank.meta_train import anchor_stage, stack_stage
    from pmeta.fusion.fuse import fusion_weights

    model, _, dataset, train = cross_fitted
    episode = _episode(model, dataset, train, seed=6)
    n_anchors = int(model.t.anchor_keys.shape[0])
    assignment = {u: n % n_anchors for n, u in enumerate(episode.users)}
    anchors = torch.tensor([assignment[u] for u in episode.users])
    offset = anchor_stage(model, model.config, assignment).build(model, episode)[3]
    torch.testing.assert_close(offset, model.crossfit.own_bias(episode.users, anchors))
    assert not torch.allclose(offset, model.t.anchor_bias[anchors])

    model.t.log_temperature.grad = None
    model.t.log_temperature.requires_grad_(True)
    offset = stack_stage(model, model.config).build(model, episode)[3]
    keys = model.user_keys(episode.support)
    sims, idx = model.retrieve(keys)
    want = model.crossfit.fused_bias(episode.users, idx, fusion_weights(sims, model.temperature()), model.has_key(keys), model.t.anchor_sizes)
    torch.testing.assert_close(offset, want)
    assert not torch.allclose(offset, model.anchor_offset(keys, sims, idx))
    offset.sum().backward()
    assert model.t.log_temperature.grad is not None and float(model.t.log_temperature.grad) != 0.0


def test_users_outside_the_folds_get_the_serving_tensors(cross_fitted):
    model, _, dataset, train = cross_fitted
    fit = model.crossfit
    outside = [u for u in range(len(dataset.ratings.user_ids)) if u not in fit.fold][:3]
    inside = [int(train[0])]
    times = [float(dataset.ratings.timestamp[0])] * 4
    prior = fit.prior(outside + inside, times, "cpu")
    torch.testing.assert_close(prior[:3], time_prior.user_prior(model.t.head, times[:3]))
    torch.testing.assert_close(prior[3:], time_prior.user_prior(fit.priors[fit.fold[inside[0]]], times[3:]))
    anchors = torch.tensor([0, 1, 0, 1])
    torch.testing.assert_close(fit.own_bias(outside + inside, anchors)[:3], model.t.anchor_bias[anchors[:3]])
    bare = crossfit.CrossFit(fit.fold, fit.priors, fit.biases, {}, None)
    with pytest.raises(ValueError, match="outside the folds"):
        bare.prior(outside, times[:3], "cpu")


def test_an_opened_bank_rebuilds_the_builds_folds_for_prompt_maml(cross_fitted):
    """``pmeta eval`` gives a cross-fitted bank's model the build's folds and time priors again (from
    the build record), so prompt-MAML's meta-training on the train users is cross-fitted too; the
    time-prior choice is read from the record's collaborative_init when it has one."""
    from types import SimpleNamespace

    from pmeta.bank.build import bank_training_priors, training_priors
    from pmeta.eval.prompt_maml import PromptMAML
    from pmeta.eval.protocol import split_users
    from pmeta.eval.runner import model_for

    model, record, dataset, train = cross_fitted
    rebuilt = bank_training_priors(model, record, dataset)
    assert rebuilt.fold == model.crossfit.fold and rebuilt.biases is None
    for a, b in zip(rebuilt.priors, model.crossfit.priors):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    saved, model.crossfit = model.crossfit, None
    try:
        bank = SimpleNamespace(catalog=SimpleNamespace(item_ids=dataset.catalog.item_ids), config=model.config, record={}, model=model, build_record=record)
        opened, _ = model_for(bank, dataset, model.config.seed, None)
        assert opened.crossfit is not None and opened.crossfit.fold == saved.fold
        train_users, _ = split_users(dataset, seed=model.config.seed, test_fraction=model.config.test_fraction)
        assert any(int(u) not in saved.fold for u in train_users)  # validation users: the serving prior
        maml = PromptMAML(opened, outer_steps=2, inner_steps=1, batch_users=8).fit(dataset, train_users)
        assert len(maml.losses) == 2 and all(np.isfinite(maml.losses))
    finally:
        model.crossfit = saved

    # the onboarding path records the chosen bandwidth: the folds' tables use it
    fit = training_priors(dataset, model.config, train, dataset.positives_by_user(), {"time_prior": {"bandwidth_days": 90.0}}, {"time_weight": torch.tensor(1.0)}, None, 0, 0.0)
    user, item, stamp = dataset.ratings.user, dataset.ratings.item, dataset.ratings.timestamp
    keep = np.isin(user, [u for u in train if fit.fold[int(u)] != 0])
    torch.testing.assert_close(fit.priors[0]["time_shares"], time_prior.build(item[keep], stamp[keep], len(dataset.catalog), 90.0)["time_shares"])
    # a β per history size (stop 54) reaches every fold, and each user is weighted by their own history size
    sized = training_priors(dataset, model.config, train, dataset.positives_by_user(), {"time_prior": {"bandwidth_days": 90.0}}, {"time_weight": torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5])}, None, 0, 0.0)
    assert all(p["time_weight"].tolist() == [3.0, 2.0, 1.0, 1.0, 0.5] for p in sized.priors)
    users, times = [int(u) for u in train[:3]], [1e8, 2e8, 3e8]
    got = sized.prior(users, times, "cpu", [1, 4, 9])
    for row, (u, t, b) in enumerate(zip(users, times, (3.0, 1.0, 0.5))):
        torch.testing.assert_close(got[row], (b * time_prior.log_prior_at(sized.priors[sized.fold[u]], [t])[0]).float())
    with pytest.raises(ValueError, match="history sizes"):
        sized.prior(users, times, "cpu")


def test_one_fold_is_refused():
    from pmeta import load_config
    from pmeta.errors import InvalidConfig

    with pytest.raises(InvalidConfig, match="crossfit_folds must be 0"):
        load_config("tiny", overrides={"crossfit_folds": 1})

"""The onboarding regression (pmeta.bank.onboarding): exact closed form, protocol-shaped episodes,
and a choice of (λ, a) that follows the validation users."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmeta.bank import onboarding
from pmeta.eval.baselines import EASEBaseline
from pmeta.tasks import ranking


@pytest.mark.parametrize("episodes", [12, 50])  # fewer episodes than items: the dual form; more: the primal
def test_ridge_is_the_closed_form(episodes):
    rng = np.random.default_rng(0)
    x = (rng.random((episodes, 30)) < 0.2).astype(np.float32)
    y = (rng.random((episodes, 30)) < 0.3).astype(np.float32)
    w, mean = onboarding.ridge(x, y, lam=2.0)
    primal = np.linalg.solve(x.T.astype(np.float64) @ x + 2.0 * np.eye(30), x.T @ (y - y.mean(0)))
    torch.testing.assert_close(torch.from_numpy(w).double(), torch.from_numpy(primal), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(mean), torch.from_numpy(y.mean(0)))


def test_episodes_follow_the_protocol():
    position = np.arange(20)
    user = np.array([3, 1, 4, 15, 9, 2, 6, 5, 8, 7, 19, 18, 17, 16, 0, 11, 12])  # 17 positives in time order
    short = np.array([1, 2, 3, 4, 5])  # fewer than 6 positives: no episode
    x, y = onboarding.episodes([user, short], position)
    assert x.shape == (5, 20) and y.shape == (5, 20)
    for row, k in enumerate(onboarding.SUPPORT_SIZES):
        assert set(np.flatnonzero(x[row])) == set(user[:k].tolist())
        np.testing.assert_allclose(x[row][user[:k]], 1.0 / k)
        assert set(np.flatnonzero(y[row])) == set(user[5:15].tolist())  # positives 6..15, never 16 and 17


def test_combine_weight_zero_is_scaled_ease():
    rng = np.random.default_rng(1)
    ease = rng.normal(size=(8, 8)).astype(np.float32)
    x = rng.random((5, 8)).astype(np.float32)
    matrix, bias = onboarding.combine(ease, np.ones((8, 8), np.float32), np.ones(8, np.float32), x, 0.0)
    np.testing.assert_allclose(matrix, ease / (x @ ease).std(), rtol=1e-5)
    assert not bias.any()


def _synthetic(users: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every user starts with one of two 'sign-up' items and then likes that item's block; the rest
    of their history is uniform noise over the other items (so whole-history co-occurrence is weak)."""
    histories = []
    for _ in range(users):
        group = int(rng.integers(2))
        start = np.array([group])
        block = 2 + group * 10 + rng.permutation(10)[:10]  # items 2..11 or 12..21
        noise = 22 + rng.permutation(60)[:40]
        histories.append(np.concatenate([start, noise[:4], block, noise[4:]]))
    return histories


def test_fit_chooses_the_regression_when_first_positives_predict_the_next():
    rng = np.random.default_rng(0)
    n_items = 82
    fit_users, validation_users = _synthetic(80, rng), _synthetic(30, rng)
    kept = np.arange(n_items)

    def ease(histories):
        matrix = np.zeros((len(histories), n_items), np.float32)
        for row, items in enumerate(histories):
            matrix[row, items] = 1
        return EASEBaseline.closed_form(matrix.T @ matrix, 50.0)

    rated = [np.unique(h) for h in validation_users]
    chosen = onboarding.fit(fit_users, ease(fit_users), validation_users, rated, fit_users + validation_users, ease(fit_users + validation_users), kept, n_items)
    assert chosen.weight > 0, chosen.validation
    ease_only = chosen.validation["lam=0,a=0,pool=1"]
    assert max(chosen.validation.values()) > ease_only + 0.05
    # at full rank the towers' folding-in score is the combined score (bias included), scaled
    (history, item), scale, bias = ranking.matrix_factors(fit_users, n_items, n_items, chosen.matrix, kept, chosen.bias)
    support = torch.tensor([0])  # a user whose only positive is sign-up item 0
    folded = history[support].mean(0) @ item.T * scale + bias
    exact = (chosen.bias + chosen.matrix[0]) * scale
    torch.testing.assert_close(folded, torch.from_numpy(exact).float(), atol=1e-3, rtol=1e-3)
    assert set(torch.topk(folded[2:], 10).indices.add(2).tolist()) == set(range(2, 12))


def test_first_episodes_have_the_protocol_shape():
    from pmeta.bank.episodes import EpisodeSampler
    from pmeta.config import load_config

    positives = {0: np.arange(20), 1: np.arange(30, 34)}  # user 1 has fewer than 6 positives
    rated = {0: np.arange(25), 1: np.arange(30, 40)}
    texts = [f"item {i}" for i in range(40)]
    for start, check in (("first", True), ("any", False)):
        config = load_config("tiny", overrides={"episode_start": start})
        sampler = EpisodeSampler(positives, rated, np.array([0, 1]), texts, config, seed=0)
        shapes = set()
        for _ in range(30):
            episode = sampler.episode([0, 1])
            support = episode.support[0].liked_items
            query = episode.query_targets[0][episode.query_mask[0] > 0].tolist()
            shapes.add((tuple(support), tuple(query)))
            if check:
                assert support == list(range(len(support))) and 1 <= len(support) <= 5
                assert query == list(range(5, 15))
            short = episode.support[1].liked_items  # falls back to an "any" episode
            assert set(short) <= set(range(30, 34)) and len(short) >= 1
        assert (len(shapes) <= 5) == check  # "any" episodes start anywhere

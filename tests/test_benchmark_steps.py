"""The collaborative-step variants of benchmarks/anchor_bias_variants.py, behind the README's
"tried on validation users, not adopted" numbers: the closed-form step is the gradient step it
claims to be, and the cross-fitted learned step never scores a user with a W fitted on that user."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "anchor_bias_variants.py"


@pytest.fixture(scope="module")
def variants():
    spec = importlib.util.spec_from_file_location("anchor_bias_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def support_loss(c: torch.Tensor, bias: torch.Tensor, factors: torch.Tensor, support: list[int]) -> torch.Tensor:
    """Softmax cross-entropy of the support items, the support excluded from the normaliser."""
    scores = bias + c @ factors.T
    excluded = torch.zeros(len(scores), dtype=torch.bool)
    excluded[support] = True
    return torch.logsumexp(scores.masked_fill(excluded, float("-inf")), 0) - scores[support].mean()


def test_collaborative_steps_are_gradient_steps_on_the_user_vector(variants):
    generator = torch.Generator().manual_seed(0)
    n, r, support, alpha = 40, 5, [3, 17, 21], 0.7
    factors = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))[0]
    bias = torch.randn(n, generator=generator, dtype=torch.float64)
    c = torch.randn(r, generator=generator, dtype=torch.float64)
    expected_c = c.clone()
    for _ in range(2):
        leaf = expected_c.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(support_loss(leaf, bias, factors, support), [leaf])
        expected_c = expected_c - alpha * grad
    scores = (bias + c @ factors.T).numpy()
    got = variants.collaborative_steps(scores, np.array(support), factors.numpy(), alpha, steps=2)
    np.testing.assert_allclose(got, (bias + expected_c @ factors.T).numpy(), atol=1e-10)
    assert not np.allclose(got, scores)


def test_learned_step_is_cross_fitted_by_user(variants):
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(6), 2)
    n, r = 30, 4
    scores = rng.normal(size=(len(users), n))
    factors = np.linalg.qr(rng.normal(size=(n, r)))[0]
    supports = [rng.choice(n, 2, replace=False) for _ in users]
    queries = [rng.choice(n, 3, replace=False) for _ in users]
    out = variants.learned_step(scores, supports, queries, users, factors, diagonal=True, ridge=1e-3)
    assert out.shape == scores.shape and np.isfinite(out).all()
    assert not np.allclose(out, scores)
    # a user's scores come from a W fitted on the other half only: changing user 0's queries leaves
    # user 0's own scores unchanged and changes those of the users scored by the W it was fitted into
    scrambled = list(queries)
    scrambled[0] = np.setdiff1d(np.arange(n), queries[0])[:3]
    scrambled[1] = np.setdiff1d(np.arange(n), queries[1])[:3]
    again = variants.learned_step(scores, supports, scrambled, users, factors, diagonal=True, ridge=1e-3)
    np.testing.assert_allclose(again[users == 0], out[users == 0], atol=1e-9)
    assert not np.allclose(again[users != 0], out[users != 0])

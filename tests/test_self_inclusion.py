"""benchmarks/self_inclusion.py: its time prior, rebuilt from the bank's train users, is the stored
one (pseudo-ratings m included), so the gaps it reports are the bank's own prior's."""

from __future__ import annotations

import numpy as np
import pytest

from pmeta.tasks import time_prior

from test_time_prior_grid import eras


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("self_inclusion")


@pytest.mark.parametrize("pseudo", [0.0, 300.0])
def test_the_rebuilt_prior_is_the_stored_one_with_its_pseudo_ratings(script, pseudo):
    dataset = eras()
    train = np.arange(60)
    items, stamps = time_prior.rating_events(dataset, train)
    stored = {k: v.numpy() for k, v in time_prior.build(items, stamps, len(dataset.catalog), 60.0, pseudo_ratings=pseudo).items()}
    out = script.time_prior_inflation(dataset, train, stored, 60.0, 2.0, users=6, seed=0, folds=2, fit_seed=5)
    assert out["recomputed_max_abs_difference"] == 0.0
    if pseudo:  # the same prior without m differs: the check can fail
        plain = {k: v for k, v in stored.items() if k != "time_pseudo_ratings"}
        assert script.time_prior_inflation(dataset, train, plain, 60.0, 2.0, users=6, seed=0, folds=2, fit_seed=5)["recomputed_max_abs_difference"] == 0.0
        probe = np.linspace(float(stamps.min()), float(stamps.max()), 9)
        import torch

        with_m = time_prior.log_prior_at({k: torch.as_tensor(v) for k, v in stored.items()}, probe)
        without = time_prior.log_prior_at({k: torch.as_tensor(v) for k, v in plain.items()}, probe)
        assert float((with_m - without).abs().max()) > 0.01

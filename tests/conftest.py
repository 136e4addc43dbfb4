"""Shared fixtures: one tiny bank per test session, built on the shipped sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("PMETA_PROGRESS", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory) -> Path:
    from pmeta import build_bank, load_config
    from pmeta.data import load_sample

    path = tmp_path_factory.mktemp("banks") / "tiny"
    build_bank(load_sample(), path, load_config("tiny"))
    return path


@pytest.fixture(scope="session")
def opened_bank(tiny_bank):
    from pmeta import Bank

    return Bank.open(tiny_bank)


@pytest.fixture(scope="session")
def with_time_prior():
    """Factory: ``make(model, weight, events)`` -> a copy of a PmetaModel whose head also carries a
    time prior (h = 365 days) built from ``events`` random ratings; the source model is untouched."""
    from dataclasses import replace

    import numpy as np

    from pmeta.bank.model import PmetaModel
    from pmeta.tasks import time_prior

    def make(source, weight: float, events: int):
        n = len(source.item_texts)
        rng = np.random.default_rng(0)
        grid, table = time_prior.table(rng.integers(0, n, events), rng.integers(0, 10**8, events), n, 365.0)
        head = {**source.t.head, **time_prior.head_entries(grid, table, weight)}
        return PmetaModel(source.config, source.encoder, source.item_texts, replace(source.t, head=head), index=source.index)

    return make

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

"""Anchor indexes: exact flat, HNSW and IVF (FAISS), the automatic choice, recall against exact
search on clustered synthetic keys, and the serialised round trip the bank stores."""

from __future__ import annotations

import numpy as np
import pytest

from pmeta.bench import clustered_keys
from pmeta.config import BankConfig
from pmeta.fusion.index import AnchorIndex, choose_kind


@pytest.fixture(scope="module")
def data():
    return clustered_keys(4000, 200, dim=64, seed=3, per_cluster=100)


def recall_at(exact: np.ndarray, approx: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact, approx)]))


def test_auto_choice_by_size():
    assert choose_kind(9_999) == "flat"
    assert choose_kind(10_000) == "hnsw"
    assert choose_kind(199_999) == "hnsw"
    assert choose_kind(200_000) == "ivf"
    assert choose_kind(50, "ivf") == "ivf"
    assert choose_kind(10**6, "flat") == "flat"
    with pytest.raises(ValueError):
        choose_kind(10, "lsh")
    assert BankConfig().index == "auto"
    with pytest.raises(Exception):
        BankConfig(index="lsh")


def test_auto_builds_the_chosen_kind(data):
    keys, _ = data
    assert AnchorIndex.build(keys[:500]).kind == "flat"
    assert AnchorIndex.build(keys[:1000], flat_below=100, hnsw_below=5000).kind == "hnsw"
    assert AnchorIndex.build(keys, flat_below=100, hnsw_below=1000).kind == "ivf"


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall_and_round_trip(data, kind):
    keys, queries = data
    exact_sims, exact = AnchorIndex.build(keys, kind="flat").search(queries, 10)
    index = AnchorIndex.build(keys, kind=kind)
    assert index.kind == kind and len(index) == len(keys)
    sims, ids = index.search(queries, 10)
    assert recall_at(exact, ids) >= 0.95
    # an approximate index returns true inner products of the keys it finds, never better than exact
    assert np.all(sims[:, 0] <= exact_sims[:, 0] + 1e-5)
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    np.testing.assert_allclose(sims[:, 0], np.einsum("nd,nd->n", unit[ids[:, 0]], queries / np.linalg.norm(queries, axis=1, keepdims=True)), atol=1e-5)
    blob = index.to_bytes()
    again = AnchorIndex.from_bytes(blob)
    assert again.kind == kind and again.to_bytes() == blob  # search parameters are part of the bytes
    sims2, ids2 = again.search(queries, 10)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_allclose(sims2, sims)


def test_ivf_never_returns_missing_neighbours():
    keys, queries = clustered_keys(400, 20, dim=16, seed=1, per_cluster=10)
    index = AnchorIndex.build(keys, kind="ivf", nprobe=1)
    _, ids = index.search(queries, 50)
    assert (ids >= 0).all()
    assert all(len(set(row)) == 50 for row in ids)


def test_random_keys_are_unit_normalised_and_reproducible():
    a, qa = clustered_keys(300, 5, dim=32, seed=7)
    b, qb = clustered_keys(300, 5, dim=32, seed=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(qa, qb)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)

"""Retrieval of anchors by user embedding: a FAISS inner-product index over L2-normalised anchor keys.

Keys and queries are unit vectors, so inner product = cosine similarity. Three kinds:

* ``flat``: exact (``IndexFlatIP``); a query costs O(n·d).
* ``hnsw``: a graph index (``IndexHNSWFlat``, M = 32, efSearch = 128): fast queries, slow to build
  (about 80 s per 100k keys of d = 384 on one core), so it is the choice for mid-sized banks.
* ``ivf``: an inverted file (``IndexIVFFlat``, ~√n k-means lists, nprobe = 16): quick to build at
  millions of keys, ~1 ms per query at 1M keys.
* ``auto`` (the default): flat below ``flat_below`` keys (10k), HNSW up to ``hnsw_below`` (200k),
  IVF above. Recall@10 against exact search is measured by ``pmeta bench`` and tested.

The index is serialised with FAISS's own binary format (search parameters such as efSearch and
nprobe are part of it) into a bytes blob that the storage layer checksums before it is parsed.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")


def choose_kind(n: int, kind: str = "auto", flat_below: int = 10_000, hnsw_below: int = 200_000) -> str:
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    if n < flat_below:
        return "flat"
    return "hnsw" if n < hnsw_below else "ivf"


class AnchorIndex:
    def __init__(self, index: "faiss.Index") -> None:
        self.index = index

    @classmethod
    def build(
        cls,
        keys: np.ndarray,
        kind: str = "auto",
        flat_below: int = 10_000,
        hnsw_below: int = 200_000,
        hnsw_neighbors: int = 32,
        ef_search: int = 128,
        nprobe: int = 16,
        seed: int = 0,
    ) -> "AnchorIndex":
        keys = _unit(keys)
        n, dim = keys.shape
        kind = choose_kind(n, kind, flat_below, hnsw_below)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = ef_search
        else:
            # ~sqrt(n) lists, each trained on >= 39 points (FAISS's minimum for stable k-means)
            nlist = max(1, min(int(round(math.sqrt(n))), n // 39))
            # index_factory: the IVF index owns its coarse quantizer (a quantizer passed from Python
            # would be freed with its wrapper and crash serialisation)
            index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            sample = keys
            if n > nlist * 64:  # k-means on a sample: 64 points per list is plenty
                sample = keys[np.random.default_rng(seed).choice(n, nlist * 64, replace=False)]
            index.train(sample)
            index.nprobe = min(nprobe, nlist)
        index.add(keys)
        return cls(index)

    @property
    def kind(self) -> str:
        if isinstance(self.index, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(self.index, faiss.IndexIVF):
            return "ivf"
        return "flat"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k anchors for each query: (similarities (n, k) float32, positions (n, k) int64)."""
        k = min(k, len(self))
        queries = _unit(queries)
        sims, ids = self.index.search(queries, k)
        missing = np.flatnonzero((ids < 0).any(axis=1))
        if len(missing) and isinstance(self.index, faiss.IndexIVF):
            # the probed lists held fewer than k keys: search those queries in every list
            params = faiss.SearchParametersIVF(nprobe=self.index.nlist)
            sims[missing], ids[missing] = self.index.search(queries[missing], k, params=params)
        return sims, ids

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "AnchorIndex":
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(index)  # already the concrete class (IndexFlatIP, IndexHNSWFlat, IndexIVFFlat)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)

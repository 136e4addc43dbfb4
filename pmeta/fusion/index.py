"""Retrieval of anchors by user embedding: a FAISS inner-product index over L2-normalised anchor keys.

Keys and queries are unit vectors, so inner product = cosine similarity. Small banks use an exact
flat index; from ``approximate_above`` keys on, an HNSW index (recall is measured by ``pmeta bench``).
The index is serialised with FAISS's own binary format into a bytes blob that the storage layer
checksums before it is ever parsed.
"""

from __future__ import annotations

import faiss
import numpy as np


class AnchorIndex:
    def __init__(self, index: "faiss.Index") -> None:
        self.index = index

    @classmethod
    def build(cls, keys: np.ndarray, approximate_above: int = 50_000, hnsw_neighbors: int = 32) -> "AnchorIndex":
        keys = _unit(keys)
        dim = keys.shape[1]
        if len(keys) > approximate_above:
            index = faiss.IndexHNSWFlat(dim, hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = 64
        else:
            index = faiss.IndexFlatIP(dim)
        index.add(keys)
        return cls(index)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k anchors for each query: (similarities (n, k) float32, positions (n, k) int64)."""
        k = min(k, len(self))
        sims, ids = self.index.search(_unit(queries), k)
        return sims, ids

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "AnchorIndex":
        return cls(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)

"""BM25 over a handful of documents (a user's profile), with the maintained ``bm25s`` package.

Scoring is ``bm25s``' default Lucene variant, k1 = 1.5, b = 0.75:
``score(q, d) = Σ_{t ∈ q} idf(t) · tf(t,d) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl))`` (bm25s drops the
constant factor k1 + 1, which changes no ranking) with
``idf(t) = ln(1 + (N − n_t + 0.5)/(n_t + 0.5))``, which stays positive on tiny corpora (LaMP's
``rank_bm25.BM25Okapi`` idf goes negative for a term in more than half of five profile items).
Text is lower-cased, split into word tokens of two or more characters, English stop words removed.
Ties, including the all-zero scores of a query that shares no word with any document, go to the
**later** document first: profiles are kept oldest first, so recency breaks ties.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..data.lamp import LampExample


def _bm25s():
    """The bm25s module, with its logger quietened: bm25s sets it to DEBUG and logs every index build."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens (two characters or more), English stop words removed."""
    bm25s = _bm25s()
    if not texts:
        return []
    return bm25s.tokenize([str(text) for text in texts], return_ids=False, stopwords="en", show_progress=False)


class BM25Retriever:
    """A BM25 index over ``documents``; :meth:`scores` and :meth:`top_k` answer queries against it."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        bm25s = _bm25s()

        self.size = len(documents)
        self._index = None
        if self.size:
            tokens = tokenize(list(documents))
            if any(tokens):
                self._index = bm25s.BM25(k1=k1, b=b)
                self._index.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (float32, zeros when nothing matches)."""
        if self._index is None:
            return np.zeros(self.size, dtype=np.float32)
        words = tokenize([query])[0]
        if not words:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._index.get_scores(words), dtype=np.float32)[: self.size]

    def top_k(self, query: str, k: int) -> list[int]:
        """Indexes of the ``k`` best documents, best first (ties: later document first); all when k > size."""
        if k <= 0 or self.size == 0:
            return []
        scores = self.scores(query)
        # stable sort of the reversed scores, mapped back: equal scores keep "later index first"
        reversed_order = np.argsort(-scores[::-1], kind="stable")
        return [int(self.size - 1 - i) for i in reversed_order[:k]]


def bm25_top_k(query: str, documents: list[str], k: int) -> list[int]:
    """Indexes into ``documents`` of the ``k`` best BM25 matches for ``query``, best first.

    ``k`` larger than the number of documents returns them all (ranked); no documents, or ``k <= 0``, gives ``[]``.
    """
    return BM25Retriever(documents).top_k(query, k)


def retrieve_profile(task: str, example: "LampExample", k: int, profile: list[dict] | None = None) -> list[dict]:
    """The ``k`` profile items of ``example`` (or of ``profile``) that best match its input, best first.

    Documents are :func:`pmeta.data.lamp.retrieval_text` of each item and the query is
    :func:`pmeta.data.lamp.query_text` of the input, as LaMP's BM25 baseline builds them.
    """
    from ..data.lamp import query_text, retrieval_text

    items = example.profile if profile is None else profile
    ranked = bm25_top_k(query_text(task, example), [retrieval_text(task, item) for item in items], k)
    return [items[i] for i in ranked]

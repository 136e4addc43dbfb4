"""Retrieval of a user's most relevant profile items (BM25 through the ``bm25s`` package)."""

from .bm25 import BM25Retriever, bm25_top_k, retrieve_profile, tokenize

__all__ = ["BM25Retriever", "bm25_top_k", "retrieve_profile", "tokenize"]

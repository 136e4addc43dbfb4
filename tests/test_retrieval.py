"""BM25 retrieval of profile items: pinned scores, ranking edge cases, and LaMP's query/corpus texts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmeta.data.lamp import LampExample
from pmeta.retrieval import BM25Retriever, bm25_top_k, retrieve_profile, tokenize


def test_score_matches_the_lucene_formula_by_hand():
    docs = ["apple banana", "apple cherry cherry", "date"]
    scores = BM25Retriever(docs).scores("cherry")
    # N 3, n 1: idf = ln(1 + 2.5/1.5); doc 1: tf 2, |d| 3, avgdl 2 -> tf / (tf + 1.5 (0.25 + 0.75 * 3/2)) = 2 / 4.0625
    expected = math.log(1 + 2.5 / 1.5) * 2 / 4.0625
    assert scores.tolist() == pytest.approx([0.0, expected, 0.0], rel=1e-6)


def test_ranking_best_first_and_k_bounds():
    docs = ["cable noise hum", "bright guitar strings", "guitar strap", "strings strings strings guitar"]
    assert bm25_top_k("guitar strings", docs, 2) == [3, 1]
    ranked = bm25_top_k("guitar strings", docs, 10)  # k > len: every document, ranked
    assert sorted(ranked) == [0, 1, 2, 3] and ranked[:3] == [3, 1, 2]
    assert bm25_top_k("guitar", docs, 0) == []
    assert bm25_top_k("guitar", [], 3) == []


def test_ties_and_no_match_prefer_later_documents():
    docs = ["alpha", "beta", "gamma"]
    assert bm25_top_k("zeta", docs, 3) == [2, 1, 0]  # nothing matches: most recent first
    assert bm25_top_k("", docs, 2) == [2, 1]
    assert bm25_top_k("the of", docs, 1) == [2]  # stop words only
    assert bm25_top_k("alpha", ["alpha x", "beta", "alpha x"], 3) == [2, 0, 1]  # equal scores: later first
    assert bm25_top_k("alpha", ["", "the", "a"], 2) == [2, 1]  # documents without any token


def test_tokenize_lowercases_and_drops_stop_words():
    assert tokenize(["The Guitar's STRINGS, a b!"]) == [["guitar", "strings"]]
    assert tokenize([]) == []


def test_retrieve_profile_uses_lamp_query_and_corpus_texts():
    profile = [
        {"id": "1", "text": "the tuner clips on and holds pitch", "score": "5"},
        {"id": "2", "text": "strap broke after a week", "score": "1"},
        {"id": "3", "text": "cheap strap, leather smell", "score": "3"},
    ]
    example = LampExample("q", "What is the score of the following review on a scale of 1 to 5? review: this strap is leather", profile)
    # the query is the text after "review:"; the "score" field is not part of the corpus text
    assert [item["id"] for item in retrieve_profile("LaMP-3", example, 2)] == ["3", "2"]
    titles = [{"id": "a", "title": "Great tuner", "text": "accurate"}, {"id": "b", "title": "Fine", "text": "strings"}]
    news = LampExample("n", "Generate a headline for the following article: a tuner review", titles)
    assert [item["id"] for item in retrieve_profile("LaMP-4", news, 1)] == ["a"]  # LaMP-4 corpus holds the title too
    assert retrieve_profile("LaMP-3", example, 5, profile=[]) == []


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.lists(st.text(max_size=40), max_size=8), st.integers(-2, 12))
def test_top_k_is_a_ranked_prefix_of_distinct_indexes(query, documents, k):
    ranked = bm25_top_k(query, documents, k)
    assert len(ranked) == max(0, min(k, len(documents)))
    assert len(set(ranked)) == len(ranked) and all(0 <= i < len(documents) for i in ranked)
    if ranked:
        scores = BM25Retriever(documents).scores(query)
        assert all(scores[a] >= scores[b] for a, b in zip(ranked, ranked[1:]))

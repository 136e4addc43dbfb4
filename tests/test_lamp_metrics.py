"""LaMP metrics pinned on small hand-computed cases (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from pmeta.errors import InvalidData
from pmeta.eval.lamp_metrics import score


def test_citation_accuracy_and_macro_f1_by_hand():
    golds = {"a": "[1]", "b": "[2]", "c": "[1]", "d": "[2]"}
    predictions = {"a": "[1]", "b": "[1]", "c": " [1] ", "d": "I think [2]"}  # d is not a label: wrong
    result = score("LaMP-1", predictions, golds)
    # correct: a, c -> accuracy 2/4. "[1]": TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 0.8; "[2]": TP 0 -> F1 0. macro 0.4
    assert result == pytest.approx({"accuracy": 0.5, "f1": 0.4})


def test_movie_tagging_macro_f1_averages_over_all_fifteen_tags():
    # one correct answer: F1 1 for "comedy", 0 for the 14 tags never seen (LaMP passes labels=range(15))
    result = score("LaMP-2", {"x": "comedy"}, {"x": "comedy"})
    assert result == pytest.approx({"accuracy": 1.0, "f1": 1 / 15})
    result = score("LaMP_2", {"x": "comedy", "y": "sci-fi"}, {"x": "comedy", "y": "classic"})
    # comedy F1 1; sci-fi FP -> 0; classic FN -> 0: macro 1/15; accuracy 1/2
    assert result == pytest.approx({"accuracy": 0.5, "f1": 1 / 15})


def test_rating_mae_rmse_with_non_numeric_predictions_by_hand():
    golds = {"a": "5", "b": "1", "c": "3", "d": "4", "e": "2"}
    predictions = {"a": "4", "b": "1", "c": "three", "d": "five", "e": " 2.5 "}
    # errors: a 1; b 0; c: gold 3, |1-3| = |5-3| so LaMP picks 5 -> 2; d: gold 4, 1 is further -> 1 -> 3; e 0.5
    result = score("LaMP-3", predictions, golds)
    assert result["mae"] == pytest.approx((1 + 0 + 2 + 3 + 0.5) / 5)
    assert result["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4 + 9 + 0.25) / 5))


def test_rating_nan_and_out_of_range_predictions():
    # "nan" parses as a float but counts as non-numeric (gold 2: 5 is further -> error 3); "9" is kept as 9 (error 4)
    result = score("LaMP-3", {"a": "nan", "b": "9"}, {"a": "2", "b": "5"})
    assert result == pytest.approx({"mae": 3.5, "rmse": math.sqrt((9 + 16) / 2)})


def test_rouge_by_hand_and_without_stemming():
    golds = {"a": "the cat sat on the mat", "b": "Hello, World!", "c": "run dog", "d": "some title"}
    predictions = {"a": "mat the on sat cat the", "b": "hello world", "c": "running dogs", "d": ""}
    # a: all 6 unigrams match -> ROUGE-1 1.0; longest common subsequence "the on the" = 3 -> P = R = 1/2 -> 0.5
    # b: lower-cased, punctuation dropped -> 1.0 / 1.0. c: no stemming (as LaMP's evaluate defaults) -> 0 / 0. d: empty -> 0
    result = score("LaMP-4", predictions, golds)
    assert result == pytest.approx({"rouge-1": (1 + 1 + 0 + 0) / 4, "rouge-L": (0.5 + 1 + 0 + 0) / 4})


def test_rouge_partial_overlap():
    # tokens [the cat sat] vs [the cat sat on the mat]: overlap 3, P 1, R 1/2 -> F 2/3 for both ROUGE-1 and ROUGE-L
    result = score("LaMP-5", {"a": "The cat sat."}, {"a": "the cat sat on the mat"})
    assert result == pytest.approx({"rouge-1": 2 / 3, "rouge-L": 2 / 3})
    assert set(score("LaMP-7", {"a": "x"}, {"a": "x"})) == {"rouge-1", "rouge-L"}


@pytest.mark.parametrize(
    ("task", "predictions", "golds", "message"),
    [
        ("LaMP-3", {"a": "1"}, {"a": "1", "b": "2"}, "no prediction for id 'b'"),
        ("LaMP-3", {"a": "1", "z": "2"}, {"a": "1"}, "prediction id 'z' has no gold"),
        ("LaMP-4", {}, {}, "No LaMP-4 golds"),
        ("LaMP-1", {"a": "[1]"}, {"a": "[3]"}, "not one of the task's labels"),
        ("LaMP-3", {"a": "1"}, {"a": "five"}, "not a number"),
    ],
)
def test_invalid_inputs_raise_invalid_data(task, predictions, golds, message):
    with pytest.raises(InvalidData, match=message):
        score(task, predictions, golds)


@pytest.mark.parametrize(
    "task, predictions, golds",
    [
        ("LaMP-1", {"a": "[1]", "b": "[1]", "c": "x", "d": "[2]"}, {"a": "[1]", "b": "[2]", "c": "[1]", "d": "[2]"}),
        ("LaMP-3", {"a": "4", "b": "five", "c": "2.5", "d": "1"}, {"a": "5", "b": "3", "c": "1", "d": "1"}),
        ("LaMP-4", {"a": "great strings", "b": "", "c": "the amp hums", "d": "ok"}, {"a": "great strings here", "b": "fine", "c": "amp hums loudly", "d": "ok"}),
    ],
)
def test_per_user_terms_aggregate_to_the_scores(task, predictions, golds):
    """``per_user`` gives one term per user (sorted ids) whose ``aggregate`` is ``score``'s value, for
    every metric but macro-F1 (a function of the whole confusion matrix)."""
    from pmeta.eval.lamp_metrics import aggregate, per_user

    ids, terms = per_user(task, predictions, golds)
    scores = score(task, predictions, golds)
    assert ids == sorted(golds) and set(terms) == set(scores) - {"f1"}
    for metric, values in terms.items():
        assert values.shape == (4,) and aggregate(metric, values) == pytest.approx(scores[metric])

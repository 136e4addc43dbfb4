"""LaMP's metrics, computed the way LaMP's evaluation code computes them (``eval/evaluation.py`` and
``LaMP/metrics/*.py`` of LaMP-Benchmark/LaMP, which call Hugging Face ``evaluate``):

* LaMP-1, LaMP-2: predictions and golds are stripped and mapped to their index in the task's label list
  (anything else to -1); **accuracy**, and **macro-F1** over the task's labels (scikit-learn's ``f1_score``
  with ``labels=range(n_labels)``, ``average="macro"``; a label never predicted nor gold counts 0).
* LaMP-3: predictions parsed as floats after stripping; a non-numeric prediction counts as whichever of
  1 and 5 is further from the gold. **MAE** and **RMSE** (√ of the mean squared error).
* LaMP-4, 5, 7: **ROUGE-1** and **ROUGE-L** F-measure from Google's ``rouge-score`` package, default
  tokenizer, no stemming (``evaluate``'s rouge defaults), each gold as a one-reference list.

One deliberate difference: ``evaluate`` aggregates ROUGE with a bootstrap (the median of 1,000 resampled
means, unseeded); pmeta reports the plain mean those bootstraps estimate, so results are deterministic.
A prediction of ``nan``/``inf`` (which Python's ``float`` parses) counts as non-numeric here, where LaMP's
code would return NaN for the whole run.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..data.lamp import task_spec
from ..errors import InvalidData


def score(task: str, predictions: dict[str, str], golds: dict[str, str]) -> dict[str, float]:
    """The task's metrics (keys as in ``TaskSpec.metrics``) over the ids of ``golds``.

    Raises InvalidData when the two id sets differ, when there are no golds, or when a gold is not one of
    the task's labels (LaMP-1/2) or not a number (LaMP-3).
    """
    spec, _, predicted, gold = _checked(task, predictions, golds)
    if spec.kind == "classification":
        return _classification(spec.name, spec.labels or (), predicted, gold)
    return {metric: aggregate(metric, terms) for metric, terms in _terms(spec, predicted, gold).items()}


def per_user(task: str, predictions: dict[str, str], golds: dict[str, str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Each user's term of every metric that is an aggregate of per-user terms, in sorted id order:
    accuracy (0 or 1), the absolute error (MAE), the squared error (RMSE), ROUGE-1 and ROUGE-L.
    :func:`aggregate` of a metric's terms is :func:`score`'s value; macro-F1, a function of the
    whole confusion matrix, has none. For paired bootstraps over users."""
    spec, ids, predicted, gold = _checked(task, predictions, golds)
    if spec.kind == "classification":
        index = {label: i for i, label in enumerate(spec.labels or ())}
        bad = [g for g in gold if g.strip() not in index]
        if bad:
            raise InvalidData(f"{spec.name} gold {bad[0][:40]!r} is not one of the task's labels.")
        return ids, {"accuracy": np.asarray([float(index.get(p.strip(), -1) == index[g.strip()]) for p, g in zip(predicted, gold)])}
    return ids, _terms(spec, predicted, gold)


def aggregate(metric: str, terms: np.ndarray) -> float:
    """A metric from its per-user terms (:func:`per_user`): RMSE is √ of the mean squared error, the others means."""
    value = float(np.mean(terms))
    return math.sqrt(value) if metric == "rmse" else value


def _checked(task: str, predictions: dict[str, str], golds: dict[str, str]):
    spec = task_spec(task)
    if set(predictions) != set(golds):
        missing, extra = sorted(set(golds) - set(predictions)), sorted(set(predictions) - set(golds))
        detail = f"no prediction for id {missing[0]!r}" if missing else f"prediction id {extra[0]!r} has no gold"
        raise InvalidData(f"Prediction ids and gold ids do not match: {detail} ({len(missing)} missing, {len(extra)} extra).")
    if not golds:
        raise InvalidData(f"No {spec.name} golds to score.")
    ids = sorted(golds)
    return spec, ids, [str(predictions[i]) for i in ids], [str(golds[i]) for i in ids]


def _terms(spec, predicted: list[str], gold: list[str]) -> dict[str, np.ndarray]:
    return _rating(predicted, gold) if spec.kind == "rating" else _rouge(predicted, gold)


def _classification(name: str, labels: tuple[str, ...], predicted: list[str], gold: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    index = {label: i for i, label in enumerate(labels)}
    bad = [g for g in gold if g.strip() not in index]
    if bad:
        raise InvalidData(f"{name} gold {bad[0][:40]!r} is not one of the task's labels.")
    y_true = [index[g.strip()] for g in gold]
    y_pred = [index.get(p.strip(), -1) for p in predicted]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels absent from both lists: F1 0, as evaluate's f1 returns
        f1 = f1_score(y_true, y_pred, labels=list(range(len(labels))), average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "f1": float(f1)}


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _rating(predicted: list[str], gold: list[str]) -> dict[str, np.ndarray]:
    true = []
    for g in gold:
        value = _number(g)
        if value is None:
            raise InvalidData(f"LaMP-3 gold {g[:40]!r} is not a number.")
        true.append(value)
    pred = []
    for p, t in zip(predicted, true):
        value = _number(p)
        pred.append(value if value is not None else (1.0 if abs(1 - t) > abs(5 - t) else 5.0))
    errors = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return {"mae": np.abs(errors), "rmse": errors**2}  # per-user terms: see aggregate


def _rouge(predicted: list[str], gold: list[str]) -> dict[str, np.ndarray]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    ones, ells = [], []
    for p, g in zip(predicted, gold):
        result = scorer.score_multi([g.strip()], p.strip())
        ones.append(result["rouge1"].fmeasure)
        ells.append(result["rougeL"].fmeasure)
    return {"rouge-1": np.asarray(ones, dtype=np.float64), "rouge-L": np.asarray(ells, dtype=np.float64)}

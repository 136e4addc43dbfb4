"""Paired bootstrap comparisons of methods evaluated on the same users (``report["comparisons"]``).

A coldstart-v1 test set has about 120 users, so differences of a few thousandths of HR@10 are within
noise. :func:`paired_bootstrap` resamples the users (with replacement) of two methods' per-user
metrics, :func:`compare_methods` compares every pmeta method with its rivals in every (K, mode) cell,
and :func:`markdown_lines` renders the comparisons as report.md's tables.

A report makes many comparisons (3 K x 3 modes x 2 metrics per pmeta method and rival), so a CI that
excludes 0 in one cell can be chance. Each comparison also carries a two-sided bootstrap p-value and
its Holm adjustment (:func:`holm`) over the *family* of one pmeta method against one rival (every
cell and metric of that pair; the best classical baseline of each cell counts as one rival): a
margin whose ``p_holm`` is below 0.05 survives asking "does pmeta beat this rival anywhere?" of
every cell at once, with the family-wise error rate held at 5%.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .protocol import PerUser

#: Resamples of users per comparison.
BOOTSTRAP_RESAMPLES = 2000
#: The methods compared, each with every rival present in the run.
PMETA_METHODS = ("pmeta", "pmeta-reptile", "pmeta-no-steps")
#: Rivals always compared with; the best of :data:`CLASSICAL` in each cell is added.
RIVALS = ("prompt-maml", "per-user-lora")
#: The classical baselines; the one with the highest mean in a (K, mode) cell, per metric, is a rival.
CLASSICAL = ("popularity", "itemknn", "ease")
#: The metrics compared, and their names in report.md.
COMPARED_METRICS = {"hr@10": "HR@10", "ndcg@10": "nDCG@10"}
#: Family-wise error rate at which report.md marks a Holm-adjusted margin.
FAMILY_ALPHA = 0.05


def paired_bootstrap(a, b, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, strata=None) -> dict:
    """Compare per-user values ``a`` and ``b`` of two methods on the same users (same order).

    Returns ``difference`` (mean of ``a - b``), ``ci95`` (``[lo, hi]``: the 2.5th and 97.5th
    percentiles of the mean difference over ``resamples`` resamples of the users with replacement,
    drawn with ``numpy.random.default_rng(seed)``) and ``p_better`` (the share of resamples whose mean
    difference is > 0, a tie counting half: a bootstrap share, not a p-value; 0.5 for identical
    methods), and ``p_value``, the two-sided bootstrap p-value of "no difference" that matches the
    percentile CI: twice the share of resamples on the losing side of 0 (ties half), counted as
    ``(n + 1) / (resamples + 1)`` so that it is never 0, capped at 1. Deterministic for a seed; with
    no users every value is NaN. The interval and ``p_value`` are per comparison; :func:`holm`
    adjusts a family of p-values for their number.

    ``strata`` (one label per user, e.g. the seed whose test split the user came from) makes it a
    stratified bootstrap: each resample draws, with replacement, as many users from each stratum as
    it holds, so that pooled runs of several splits keep their sizes and only the within-split
    variation enters the interval.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired_bootstrap needs two 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if len(a) == 0:
        return {"difference": float("nan"), "ci95": [float("nan"), float("nan")], "p_better": float("nan"), "p_value": float("nan")}
    differences = a - b
    rng = np.random.default_rng(seed)
    if strata is None:
        picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    else:
        labels = np.asarray(strata)
        if labels.shape != differences.shape:
            raise ValueError(f"strata needs one label per user ({len(differences)}), got shape {labels.shape}")
        groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        picks = np.concatenate([group[rng.integers(0, len(group), size=(resamples, len(group)))] for group in groups], axis=1)
    means = differences[picks].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    ties = np.sum(means == 0)
    above, below = np.sum(means > 0) + 0.5 * ties, np.sum(means < 0) + 0.5 * ties
    p_value = min(1.0, 2 * (min(above, below) + 1) / (resamples + 1))
    return {"difference": float(differences.mean()), "ci95": [float(lo), float(hi)], "p_better": float(above / resamples), "p_value": float(p_value)}


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (Holm 1979), in the input order.

    The i-th smallest of m p-values becomes ``max over j <= i of min(1, (m - j + 1) p_(j))``; rejecting
    every hypothesis whose adjusted value is below alpha holds the family-wise error rate at alpha
    under any dependence between the tests (the cells of one report share their users). NaN stays NaN
    and does not count towards m.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm needs a 1-D sequence of p-values, got shape {p.shape}")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return [float(v) for v in adjusted]


def rival_label(versus: str) -> str:
    """How report.md names a rival: the classical baselines are one rival, ``best classical``."""
    return "best classical" if versus in CLASSICAL else versus


def best_classical(per_user: Mapping[str, PerUser], cell: tuple[int, str], metric: str) -> str | None:
    """The classical baseline with the highest mean ``metric`` in ``cell`` (the first on ties), if any ran."""
    present = [m for m in CLASSICAL if m in per_user]
    return max(present, key=lambda m: float(np.mean(per_user[m][cell][metric])), default=None)


def _compare(method: PerUser, versus: PerUser, cell: tuple[int, str], metric: str, resamples: int, seed: int, strata: str | None) -> dict:
    paired = ("user",) if strata is None else ("user", strata)
    if not all(np.array_equal(method[cell][key], versus[cell][key]) for key in paired):
        raise ValueError(f"cannot pair methods evaluated on different users in cell {cell}")
    labels = None if strata is None else method[cell][strata]
    return paired_bootstrap(method[cell][metric], versus[cell][metric], resamples=resamples, seed=seed, strata=labels)


def compare_methods(per_user: Mapping[str, PerUser], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, strata: str | None = None) -> list[dict]:
    """Paired bootstraps of every pmeta method present against each rival present, per cell and metric.

    ``per_user`` maps a method name to the cells :func:`pmeta.eval.protocol.evaluate` filled in its
    ``per_user`` argument (the same users for every method). The rivals of a cell are :data:`RIVALS` and the best of
    :data:`CLASSICAL` there for the metric. Returns rows ``method``, ``versus``, ``k``, ``mode``,
    ``metric``, ``users``, ``difference`` (method - versus), ``ci95``, ``p_better``, ``p_value`` and
    ``p_holm``: ``p_value`` adjusted by :func:`holm` over the rows of the same ``method`` and
    :func:`rival_label` of ``versus`` (every cell and metric of that pair).

    ``strata`` names a per-user array of the cells to stratify the bootstrap by, e.g. ``"seed"`` for
    test users pooled over several seeds' runs (``benchmarks/seeds.py``); it must match between the
    paired methods, as the users do.
    """
    comparisons = []
    for method in (m for m in PMETA_METHODS if m in per_user):
        for metric in COMPARED_METRICS:
            for cell in per_user[method]:
                rivals = [r for r in RIVALS if r in per_user] + [r for r in (best_classical(per_user, cell, metric),) if r is not None]
                for versus in rivals:
                    result = _compare(per_user[method], per_user[versus], cell, metric, resamples, seed, strata)
                    comparisons.append({"method": method, "versus": versus, "k": cell[0], "mode": cell[1], "metric": metric, "users": len(per_user[method][cell]["user"]), **result})
    families: dict[tuple[str, str], list[dict]] = {}
    for row in comparisons:
        families.setdefault((row["method"], rival_label(row["versus"])), []).append(row)
    for rows in families.values():
        for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
            row["p_holm"] = adjusted
    return comparisons


def signed(value: float) -> str:
    """``+0.006`` / ``−0.010`` (a typographic minus; a value that rounds to zero is ``+0.000``)."""
    return f"{round(value, 3) + 0.0:+.3f}".replace("-", "\u2212")


def comparison_cell(comparison: dict | None) -> str:
    """``+0.006 [−0.010, +0.022]``, bold when the CI excludes 0, then ``†`` when the Holm-adjusted p-value
    is below :data:`FAMILY_ALPHA`; the baseline's name for the best classical."""
    if comparison is None:
        return "—"
    lo, hi = comparison["ci95"]
    text = f"{signed(comparison['difference'])} [{signed(lo)}, {signed(hi)}]"
    if lo > 0 or hi < 0:
        text = f"**{text}**"
    if comparison.get("p_holm", 1.0) < FAMILY_ALPHA:
        text += " †"
    return f"{text} ({comparison['versus']})" if comparison["versus"] in CLASSICAL else text


def markdown_lines(comparisons: list[dict], resamples: int = BOOTSTRAP_RESAMPLES) -> list[str]:
    """report.md's section: per pmeta method and metric, a table of rows (rival, mode) x columns K."""
    if not comparisons:
        return []
    lines = [
        "## Paired differences (95% bootstrap CI over users)",
        "",
        f"Method minus rival, mean over the test users; 95% percentile CI from {resamples} resamples of the users. "
        "**Bold**: the CI excludes 0 (each interval on its own, not adjusted for the number of cells). "
        f"†: the margin holds after Holm's adjustment over every cell and metric of that method and rival "
        f"(two-sided bootstrap p-value, family-wise error rate {FAMILY_ALPHA:.0%}). "
        "*best classical*: the best of popularity, itemknn and ease in that cell (named), picked on these same users.",
        "",
    ]
    ks = sorted({c["k"] for c in comparisons})
    modes = list(dict.fromkeys(c["mode"] for c in comparisons))
    table = {(c["method"], c["metric"], rival_label(c["versus"]), c["mode"], c["k"]): c for c in comparisons}
    for method in dict.fromkeys(c["method"] for c in comparisons):
        for metric, title in COMPARED_METRICS.items():
            rivals = list(dict.fromkeys(rival_label(c["versus"]) for c in comparisons if c["method"] == method and c["metric"] == metric))
            lines += [f"### {method}: {title}", "", "| versus | mode | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
            for rival in rivals:
                for mode in modes:
                    lines.append(f"| {rival} | {mode} | " + " | ".join(comparison_cell(table.get((method, metric, rival, mode, k))) for k in ks) + " |")
            lines.append("")
    return lines

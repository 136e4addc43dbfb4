"""Fuzz target ``evaluation``: a generated dataset through the rest of ``pmeta eval movielens``:
the bank build on its train users, then every method, pmeta's included, on its test users, either
in-domain or with the bank built on another catalogue (``--bank`` transfer, items matched by title).

An input is the shape of a small dataset (catalogue size, users, how many ratings each, how many of
them positive, timestamps all equal, spread, random or negative, titles distinct, repeated or
without a year) and a bank config: the tiny preset with at most two steps of each stage, and the
collaborative init, its rank, the meta strategy, anchors, fused anchors, key space, fusion, inner
steps and cross-fitting drawn. The dataset itself comes from the input's seed, so hypothesis
shrinks the shape, not thousands of ratings. Half of the inputs are served on another catalogue
whose first half of titles are the bank's second half.

The target does what the command does: checks the cases (retrying with the modes the error
advises: uni99 and full, or full alone), builds the bank, opens it and runs every method of a full
report. The case check and the build may refuse the data with a one-line
:class:`~pmeta.errors.InvalidData`, and a refused build must leave no bank folder; everything after
them must succeed. A report must be
standard JSON, render as report.md, score every method on the same users with metrics in [0, 1],
store zero bytes per user for pmeta's rows and, on another catalogue, match every title the two
catalogues share. Anything else (another exception, a diverged build: the tiny preset has no early
stopping to hide one; any warning) is a bug. An input costs a few seconds (the build), so runs are
hundreds of inputs, not the readers' tens of thousands.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import in_advised_modes, one_line, target

#: Every method of a full report, with options that keep the rivals' training to a few steps.
METHOD_OPTIONS = {"prompt-maml": {"outer_steps": 2, "inner_steps": 1}, "per-user-lora": {"steps": 2, "rank": 2}}
PMETA_METHODS = ("pmeta-no-steps", "pmeta", "pmeta-reptile")


def evaluation_inputs():
    """``(dataset shape, bank config overrides, transfer)``, each shape a dict of small choices."""
    from hypothesis import strategies as st

    shape = st.fixed_dictionaries(
        {
            "seed": st.integers(0, 2**32 - 1),
            # sizes a case can come from, half of the time; any size, the other half
            "items": st.sampled_from([150, 30, 110]) | st.integers(1, 160),
            "users": st.sampled_from([40, 60]) | st.integers(2, 60),
            "most_rated": st.sampled_from([30, 40]) | st.integers(1, 40),
            "positives": st.sampled_from(["most", "half", "most", "few"]),
            "times": st.sampled_from(["equal", "spread", "random", "negative"]),
            "titles": st.sampled_from(["distinct", "repeated", "no-year"]),
        }
    )
    steps = st.sampled_from([0, 2])
    config = st.fixed_dictionaries(
        {
            "cf_init": st.sampled_from(["puresvd", "ease", "onboarding"]),
            "cf_rank": st.sampled_from([0, 4, 32]),
            "meta": st.sampled_from(["maml", "fomaml", "reptile"]),
            "anchors": st.sampled_from([1, 2, 4, 8]),
            "top_k": st.sampled_from([1, 3]),
            "key_space": st.sampled_from(["collaborative", "text"]),
            "fusion": st.sampled_from(["cat", "svd"]),
            "inner_steps": st.sampled_from([0, 1, 3]),
            "crossfit_folds": st.sampled_from([0, 0, 2]),
            "tower_steps": steps,
            "global_steps": steps,
            "anchor_steps": steps,
            "stack_steps": steps,
        }
    )
    return st.tuples(shape, config, st.booleans())


TITLES = {"distinct": "Film {i} ({year})", "repeated": "Film {short} (1990)", "no-year": "Ünï {i}"}


def make_dataset(shape: dict, name: str = "fuzz", id_prefix: str = "", title_offset: int = 0) -> Any:
    """A :class:`~pmeta.data.types.Dataset` of ``shape`` (see :func:`evaluation_inputs`); every
    user has at least one rating and no (user, item) pair repeats, as a reader guarantees. Item
    ``i`` has id ``id_prefix + i`` and the title of number ``i + title_offset`` in its kind."""
    from pmeta.data.types import Catalog, Dataset, Ratings

    rng = np.random.default_rng(shape["seed"])
    n_items, n_users = shape["items"], shape["users"]
    numbers = range(title_offset, title_offset + n_items)
    titles = [TITLES[shape["titles"]].format(i=i, short=i % 3, year=1950 + i % 70) for i in numbers]
    genres = [[["Drama"], ["Comedy", "Drama"], ["(no genres listed)"]][i % 3] for i in numbers]
    catalog = Catalog([f"{id_prefix}{i}" for i in range(n_items)], titles, genres)
    chance = {"most": [0.05, 0.15, 0.8], "half": [0.3, 0.2, 0.5], "few": [0.6, 0.3, 0.1]}[shape["positives"]]
    users, items, ratings, times = [], [], [], []
    for u in range(n_users):
        n = int(rng.integers(1, min(n_items, shape["most_rated"]) + 1))
        users.append(np.full(n, u))
        items.append(rng.choice(n_items, size=n, replace=False))
        ratings.append(rng.choice([1.0, 3.0, 4.5], size=n, p=chance))
        times.append({"equal": np.full(n, 1_000_000), "spread": 1_000_000 + 86_400 * (np.arange(n) + 30 * u), "random": rng.integers(0, 2**31, size=n), "negative": rng.integers(-(2**31), 0, size=n)}[shape["times"]])
    table = Ratings(np.concatenate(users).astype(np.int64), np.concatenate(items).astype(np.int64), np.concatenate(ratings).astype(np.float32), np.concatenate(times).astype(np.int64), [f"u{u}" for u in range(n_users)])
    return Dataset(name, "ml-latest", catalog, table, f"{shape['seed']:064x}")


def _cases(dataset, config) -> tuple[str, ...] | str:
    """The modes the run evaluates (all three, or those the case check advises), or ``"refused"``:
    what the CLI checks before it builds a bank."""
    from pmeta.errors import InvalidData
    from pmeta.eval.runner import evaluation_users

    try:
        return in_advised_modes(lambda modes: evaluation_users(dataset, modes, config.seed, config.test_fraction), ("uni99", "pop99", "full"))[1]
    except InvalidData as error:
        one_line(error)
        return "refused"


@target("evaluation", evaluation_inputs, "a small dataset: bank build, then every method of eval movielens (in-domain or transferred)", examples=200)
def fuzz_evaluation(value: Any) -> str:
    from pmeta import load_config
    from pmeta.bank.bank import Bank
    from pmeta.bank.build import build_bank
    from pmeta.errors import InvalidData
    from pmeta.eval.runner import DEFAULT_METHODS, markdown, run_movielens

    shape, overrides, transfer = value
    config = load_config("tiny", overrides=overrides)
    source = make_dataset(shape)
    # transfer: the target is another dataset of the same shape whose ids differ from the bank's;
    # its first half of titles are the source's second half (matched; a repeated title to its first)
    dataset = make_dataset({**shape, "seed": shape["seed"] ^ 1}, "fuzz-target", "m", title_offset=(shape["items"] + 1) // 2) if transfer else source
    modes = _cases(dataset, config)
    if modes == "refused":
        return "refused"
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = Path(folder, "bank")
        try:
            build_bank(source, path, config)
        except InvalidData as error:
            one_line(error)
            assert not path.exists(), f"a refused build left {sorted(p.name for p in path.iterdir())} in the bank folder"
            return "refused"
        bank = Bank.open(path)
        report = run_movielens(dataset, bank, list(DEFAULT_METHODS), (1, 3, 5), modes, seed=config.seed, reptile_bank=bank, options=METHOD_OPTIONS, resamples=20)
        json.dumps(report, allow_nan=False)  # report.json must be standard JSON: raises on a NaN
        markdown(report)
        if caught:
            raise AssertionError(f"unexpected warning: {caught[0].category.__name__}: {caught[0].message}")
    assert {row["method"] for row in report["results"]} == set(DEFAULT_METHODS)
    users = {row["users"] for row in report["results"]}
    assert len(users) == 1 and min(users) > 0, f"methods scored different users: {users}"
    for row in report["results"]:
        for metric in ("hr@10", "ndcg@10", "mrr"):
            assert 0.0 <= row[metric] <= 1.0, f"{row['method']} {metric} = {row[metric]}"  # False for NaN too
        assert math.isfinite(row["adapt_ms_p50"]) and 0.0 <= row["adapt_ms_p50"] <= row["adapt_ms_p95"], row
        if row["method"] in PMETA_METHODS:
            assert row["bytes_per_user"] == 0, f"{row['method']} stores {row['bytes_per_user']} bytes per user"
    assert (report["config"]["transfer"] is not None) == transfer
    if transfer:  # every target title the bank's catalogue holds is matched (none has another name)
        bank_titles = set(source.catalog.titles)
        shared = sum(title in bank_titles for title in dataset.catalog.titles)
        assert report["config"]["transfer"]["matched_items"] == shared, (shared, report["config"]["transfer"])
    return ("transfer-" if transfer else "") + ("evaluated" if len(modes) == 3 else "evaluated-" + ",".join(modes))

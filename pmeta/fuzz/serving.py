"""Fuzz target ``serving``: generated histories through an opened bank, the way a serving layer
calls it (``Bank.personalize_many`` in a batch, ``personalize`` one by one, ``rank``).

An input is 1–6 histories of 0–12 items each: catalogue ids (as strings or JSON integers), titles
(as stored, or re-cased and padded: they resolve to their first catalogue item), ids the catalogue
does not hold (with or without a text), free texts (any Unicode), ratings below and above the
positive threshold or none, timestamps or none; plus the call's options: ``ignore_unknown``, inner
``steps`` (the bank's, 0, 1 or 3), the batch size, ``top`` and a candidate list (catalogue ids,
repeated, history items among them, sometimes an unknown id).

What must hold, each checked against what the input says rather than what pmeta computes:

* the batch is refused with one :class:`~pmeta.errors.InvalidHistory` line exactly when a history
  names an unknown id without a text and ``ignore_unknown`` is off; otherwise every history gets a
  personalization, in the input order, for its user;
* its scores are ``-inf`` exactly at the catalogue items the history names (at any rating) and
  finite elsewhere; its adapter and anchor weights are finite, the weights a distribution over
  distinct anchors of the bank;
* a batched pass, a ``vmap`` pass with another batch size and one-by-one calls agree to 1e-4 in
  every score (float rounding only) and give each user adapters of the same shapes, whoever else
  is in the batch, doing the same (soft prompt and each LoRA pair's ``B @ A`` to 1e-4); the
  one-by-one calls repeated from two threads at once give the same scores bit for bit (a bank
  opened in bfloat16 is held to bf16's precision instead of 1e-4: 2⁻⁸ plus 2⁻⁸ of the score);
* ``rank(top)`` returns ``min(top, rankable)`` distinct items, best first, none from the history,
  starting at the best score; with candidates, only candidates, and an unknown candidate is one
  :class:`~pmeta.errors.InvalidRequest` line.

The bank is the one in ``$PMETA_FUZZ_BANK`` when it is set, otherwise a tiny-preset bank built
once per run on the shipped sample (about a minute), opened in ``$PMETA_FUZZ_PRECISION``
(``float32`` unless set, or ``bfloat16``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import one_line, target

KINDS = ("id", "int-id", "title", "recased-title", "id+text", "unknown", "unknown+text", "text")
RATINGS = (None, None, 0.0, 1.0, 3.5, 4.0, 5.0)
#: (absolute, relative) tolerance of the scores of batched, vmap and one-by-one passes, which differ
#: by float rounding only (Bank.personalize_many): 1e-4 in float32; under bf16 autocast, bf16's 8
#: significant bits, 2⁻⁸ (the tiny bank measured 3e-4 between a batch and one user, scores ~5).
#: Their adapters (prompt, B @ A) are compared with the absolute tolerance as both.
TOLERANCES = {"float32": (1e-4, 0.0), "bfloat16": (2**-8, 2**-8)}
_BANK: dict[str, Any] = {}


def serving_inputs():
    """``(histories, ignore_unknown, steps, batch_size, top, candidates)`` with catalogue positions
    (mapped onto the bank's catalogue when the target runs)."""
    from hypothesis import strategies as st

    position = st.integers(0, 10**6)
    free_text = st.text(min_size=1, max_size=60).filter(lambda text: text.strip() != "")
    # an unknown id without a text refuses the whole batch (unless ignore_unknown): 1 item in 36, so
    # that most batches are served
    kind = st.sampled_from([k for k in KINDS if k != "unknown"] * 5 + ["unknown"] * 1)
    item = st.tuples(kind, position, free_text, st.sampled_from(RATINGS), st.none() | st.integers(0, 2_000_000_000))
    history = st.lists(item, max_size=12)
    candidates = st.none() | st.tuples(st.lists(position, max_size=20), st.booleans(), st.lists(st.integers(0, 11), max_size=3))
    return st.tuples(st.lists(history, min_size=1, max_size=6), st.booleans(), st.sampled_from([None, 0, 1, 3]), st.integers(1, 4), st.integers(1, 30), candidates)


def bank():
    """The bank the target serves: ``$PMETA_FUZZ_BANK``, or a tiny bank built once on the sample,
    opened in ``$PMETA_FUZZ_PRECISION`` (float32 unless set; bfloat16 runs the encoder under bf16)."""
    if "bank" not in _BANK:
        from pmeta import Bank

        path = os.environ.get("PMETA_FUZZ_BANK")
        if not path:
            from pmeta import build_bank, load_config
            from pmeta.data import load_sample

            folder = tempfile.mkdtemp(prefix="pmeta-fuzz-")
            atexit.register(shutil.rmtree, folder, True)
            path = str(Path(folder, "bank"))
            build_bank(load_sample(), path, load_config("tiny"))
        _BANK["bank"] = Bank.open(path, precision=os.environ.get("PMETA_FUZZ_PRECISION", "float32"))
    return _BANK["bank"]


def render(value: tuple, catalog) -> tuple[list[dict], list[set[int]], bool]:
    """The input's histories as history.json dicts, the catalogue items each names, and whether
    one names an unknown id without a text (the oracle, written from the history.json rules)."""
    histories_in = value[0]
    n = len(catalog.item_ids)
    first_of_title: dict[str, int] = {}
    for index, title in enumerate(catalog.titles):
        first_of_title.setdefault(title.strip().casefold(), index)
    histories, named, unknown_without_text = [], [], False
    for number, items in enumerate(histories_in):
        rows, indexes, ids = [], set(), set()
        for kind, position, free_text, rating, timestamp in items:
            index = position % n
            row: dict[str, Any] = {}
            if kind in ("id", "int-id", "id+text"):
                item_id = catalog.item_ids[index]
                row["item_id"] = _as_json_integer(item_id) if kind == "int-id" else item_id
                if kind == "id+text":
                    row["text"] = free_text
            elif kind in ("title", "recased-title"):
                title = catalog.titles[index]
                if not title.strip():
                    continue
                row["text"] = title if kind == "title" else f"  {title.upper()} "
            elif kind in ("unknown", "unknown+text"):
                row["item_id"] = f"unknown-{position}"
                if kind == "unknown+text":
                    row["text"] = free_text
            else:
                row["text"] = free_text
            key = str(row.get("item_id", "")).strip()
            if key and key in ids:
                continue  # item ids are unique within a history (the parser's rule, fuzzed by ``history``)
            ids.add(key)
            if rating is not None:
                row["rating"] = rating
            if timestamp is not None:
                row["timestamp"] = timestamp
            rows.append(row)
            item_id = str(row["item_id"]).strip() if "item_id" in row else None
            if item_id is not None and item_id in catalog.index:
                indexes.add(catalog.index[item_id])
            elif "text" in row and row["text"].strip().casefold() in first_of_title:
                indexes.add(first_of_title[row["text"].strip().casefold()])
            elif "text" not in row:
                unknown_without_text = True
        histories.append({"user_id": f"user-{number}", "items": rows})
        named.append(indexes)
    return histories, named, unknown_without_text


@target("serving", serving_inputs, "histories through an opened bank: batched, vmap and one-by-one personalization, rank", examples=300)
def fuzz_serving(value: Any, served=None) -> str:
    from pmeta.errors import InvalidHistory, InvalidRequest

    served = served if served is not None else bank()
    catalog = served.catalog
    _, ignore_unknown, steps, batch_size, top, candidates = value
    histories, named, unknown_without_text = render(value, catalog)
    try:
        batched = served.personalize_many(histories, steps=steps, ignore_unknown=ignore_unknown, batch_size=batch_size)
    except InvalidHistory as error:
        one_line(error)
        assert unknown_without_text and not ignore_unknown, f"refused a valid batch: {error}"
        return "refused"
    assert not (unknown_without_text and not ignore_unknown), "an unknown id without a text was not refused"
    assert [p.user_id for p in batched] == [h["user_id"] for h in histories]
    vmapped = served.personalize_many(histories, steps=steps, ignore_unknown=ignore_unknown, batch_size=batch_size % 4 + 1, method="vmap")
    single = [served.personalize(h, steps=steps, ignore_unknown=ignore_unknown) for h in histories]
    with ThreadPoolExecutor(2) as pool:  # the same calls from two threads at once: the serial scores, bit for bit
        threaded = list(pool.map(lambda h: served.personalize(h, steps=steps, ignore_unknown=ignore_unknown), histories))
    for p, q in zip(single, threaded):
        assert np.array_equal(p.scores, q.scores), "the same call gave other scores (repeated, from two threads)"
    n_anchors = int(served.model.t.anchor_keys.shape[0])
    tolerance, relative = TOLERANCES[served.model.precision]
    for p, q, r, items in zip(batched, vmapped, single, named):
        history_items = np.zeros(len(catalog.item_ids), dtype=bool)
        history_items[sorted(items)] = True
        for other in (q, r):
            assert np.array_equal(np.isneginf(other.scores), np.isneginf(p.scores))
            _check_same_adapter(p.adapter, other.adapter, tolerance)
            gap = np.abs(other.scores[~history_items] - p.scores[~history_items]) - relative * np.abs(p.scores[~history_items])
            assert gap.max(initial=0.0) <= tolerance, "batched, vmap and one-by-one scores differ"
        assert np.array_equal(np.isneginf(p.scores), history_items), "-inf scores are not the history's items"
        assert np.isfinite(p.scores[~history_items]).all(), "a non-finite score outside the history"
        assert all(bool(t.isfinite().all()) for t in p.adapter.values()), "a non-finite adapter"
        if p.anchors:
            weights = np.array([a["weight"] for a in p.anchors])
            assert len({a["anchor"] for a in p.anchors}) == len(p.anchors) and all(0 <= a["anchor"] < n_anchors for a in p.anchors)
            assert np.isfinite(weights).all() and (weights >= 0).all() and abs(weights.sum() - 1) < 1e-4, weights
        _check_rank(p, top, None, history_items)
        if candidates is not None:
            positions, unknown_candidate, as_ints = candidates
            chosen: list[Any] = [catalog.item_ids[position % len(catalog.item_ids)] for position in positions]
            chosen = [_as_json_integer(c) if i in as_ints else c for i, c in enumerate(chosen)]
            if unknown_candidate:
                try:
                    p.rank(top, chosen + ["unknown-candidate"])
                except InvalidRequest as error:
                    one_line(error)
                else:
                    raise AssertionError("an unknown candidate was not refused")
            else:
                _check_rank(p, top, chosen, history_items)
    return "personalized"


def _as_json_integer(item_id: str) -> int | str:
    """A catalogue id as the JSON integer a caller may send instead (when it reads back the same)."""
    return int(item_id) if item_id.isdigit() and item_id == str(int(item_id)) else item_id


def _check_same_adapter(adapter: dict, other: dict, tolerance: float) -> None:
    """Same factor shapes (no padding from the batch) and the same effect: the soft prompt and each
    LoRA pair's ``B @ A`` (an SVD-fused bank's factors are defined up to sign)."""
    import torch

    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in other.items()}, "adapter shapes depend on the batch"
    for key in adapter:
        if key.endswith(".B"):
            continue
        x, y = (a[key] if key == "prompt" else a[key[:-2] + ".B"] @ a[key] for a in (adapter, other))
        assert torch.allclose(x, y, atol=tolerance, rtol=tolerance), f"batched, vmap and one-by-one adapters differ in {key}"


def _check_rank(p, top: int, candidates: list | None, history_items: np.ndarray) -> None:
    catalog = p.bank.catalog
    allowed = ~history_items
    if candidates is not None:
        allowed &= np.isin(np.arange(len(history_items)), [catalog.index[str(c)] for c in candidates])
    ranked = p.rank(top, candidates)
    indexes = [catalog.index[r.item_id] for r in ranked]
    assert len(ranked) == min(top, int(allowed.sum())), (len(ranked), top, int(allowed.sum()))
    assert len(set(indexes)) == len(indexes) and all(allowed[i] for i in indexes), "ranked a history item, a repeat or a non-candidate"
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True) and all(r.score == float(p.scores[i]) for r, i in zip(ranked, indexes))
    if ranked:
        assert scores[0] == float(p.scores[allowed].max()), "the first item is not the best"

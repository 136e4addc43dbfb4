"""Fuzz target ``text``: generated LaMP profiles through an opened text bank, the way a serving
layer calls it (``TextBank.personalize_many`` in a batch, ``personalize`` one by one, then
``prompt`` and ``predict`` per user).

An input is 1–4 histories (a ``{"user_id", "profile"}`` object or a bare profile list) of 0–8
profile items of the bank's task: ids as strings, integers, padded or free Unicode; every field the
task asks for as any Unicode text (empty included), LaMP-3 scores as "1".."5", integers, integral
floats or padded strings; dates as ``YYYY-MM-DD``, a year, an integer, an ISO date-time, free text
or none; now and then an extra key. About one choice in fifty is broken the way callers break
them: a repeated id (also an integer id equal to an earlier string id), a missing, empty,
boolean or float id, a missing or non-string field, a lone UTF-16 surrogate, a score outside 1..5,
a date of the wrong type, a user id with a path in it, an unknown key. Plus the call's options
(``steps``, ``max_items``, ``retrieve``, the input text), now and then out of range.

What must hold, each checked against the LaMP rules the input was generated under rather than
what pmeta computes:

* an option out of range is one :class:`~pmeta.errors.InvalidRequest` line; otherwise the batch
  is refused with one :class:`~pmeta.errors.InvalidHistory` line exactly when a history is broken;
  otherwise every history gets a personalization, in the input order, for its user;
* its profile is the history's items in time order (by date when every date orders, of one
  shape; else as given), the ``max_items`` most recent kept;
* it has anchors exactly when that profile is not empty, ``min(top_k, anchors)`` of them, a
  distribution over distinct anchors of the bank; its adapter is finite, each LoRA factor of rank
  (anchor rank × its anchors, or × every anchor for the zero-history prior, at most
  min(d_in, d_out) there) + the stack's rank,
  whoever else is in the batch;
* a batch and one-by-one calls agree to 1e-4 in every factor, and the one-by-one calls repeated
  from two threads at once give the same values bit for bit;
* a prompt without retrieval is the same for every user; with retrieval it holds at most
  ``retrieve`` items, each one of this user's kept profile items (nothing from another user of
  the batch, nothing ``max_items`` cut); an empty input or a lone surrogate in it is one
  ``InvalidRequest`` line;
* a prediction is one of the task's labels, a rating in [1, 5], or a string for generation tasks.

The bank is the one in ``$PMETA_FUZZ_TEXT_BANK`` when it is set, otherwise a tiny LaMP-3 bank
built once per run on hand-written files with a tiny random Llama (seconds; :mod:`.lamp_tiny`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import one_line, target

TOLERANCE = 1e-4  # a batch and one-by-one calls differ by float rounding only (padding, summation order)
BROKEN = 2  # in 100: the chance that one generated choice is a broken one
_BANK: dict[str, Any] = {}

# (valid values, broken values) of each generated choice
ID_KINDS = (["str", "int", "padded", "unicode"], ["repeat", "repeat-retyped", "missing", "empty", "bool", "float", "surrogate", "null"])
FIELD_KINDS = (["text", "text", "empty"], ["missing", "int", "surrogate", "null"])
SCORES = (["1", "2", "3", "4", "5", 1, 3, 5, 4.0, " 2 "], ["0", "6", 0, 2.5, True, None, "x", "nan", float("inf"), 10**400])
DATE_KINDS = (["ymd", "year", "int", "datetime", "free", "absent", "absent"], ["null", "float", "bool", "list"])
USER_KINDS = (["str", "int", "absent"], ["path", "space", "bool", "empty"])
SHAPES = (["object", "object", "object", "list"], ["extra-key", "number"])
STEPS = ([None, 0, 1, 2], [-1, 51, "2", True, 2.0])
MAX_ITEMS = ([None, None, 0, 1, 3, 100], [-1, 1.5, "3"])
RETRIEVE = ([None, 0, 1, 3], [-1, "1"])
INPUT_KINDS = (["prefixed", "prefixed", "free"], ["empty", "blank", "surrogate", "number"])


def _pool(kinds: tuple[list, list]) -> list[tuple[Any, bool]]:
    """``(value, broken?)`` pairs, the valid ones repeated so that a uniform draw is broken
    ``BROKEN`` times in 100 (uniform draws: hypothesis leans to a range's ends, not to a list's);
    ``1`` and ``True``, ``2`` and ``2.0`` compare equal, so the flag travels with the value."""
    valid, broken = kinds
    copies = max(1, round(len(broken) * (100 - BROKEN) / (BROKEN * len(valid))))
    return [(v, False) for v in valid] * copies + [(b, True) for b in broken]


def _choice(kinds: tuple[list, list]):
    """One of ``kinds``' values (see :func:`_pool`); shrinks to the first valid one."""
    from hypothesis import strategies as st

    return st.sampled_from(_pool(kinds)).map(lambda pair: pair[0])


def _option(kinds: tuple[list, list]):
    """``(value, broken?)``: an option's value with whether it is out of range."""
    from hypothesis import strategies as st

    return st.sampled_from(_pool(kinds))


def text_inputs():
    """``(histories, steps, max_items, retrieve, (input kind, text))``, each option a ``(value,
    broken?)`` pair; a history is ``(shape, user kind, number, items)`` and an item ``(id kind,
    number, free text, field kinds, score, date kind, date parts, extra key?)``."""
    from hypothesis import strategies as st

    free = st.text(max_size=60)
    date_parts = st.tuples(st.integers(1900, 2100), st.integers(1, 12), st.integers(1, 28), st.integers(0, 23), st.integers(0, 2_000_000_000))
    item = st.tuples(_choice(ID_KINDS), st.integers(0, 10**6), free, st.lists(_choice(FIELD_KINDS), min_size=2, max_size=2), _choice(SCORES), _choice(DATE_KINDS), date_parts, st.booleans())
    history = st.tuples(_choice(SHAPES), _choice(USER_KINDS), st.integers(0, 10**6), st.lists(item, max_size=8))
    query = st.tuples(_choice(INPUT_KINDS), free)
    return st.tuples(st.lists(history, min_size=1, max_size=4), _option(STEPS), _option(MAX_ITEMS), _option(RETRIEVE), query)


def bank():
    """The bank the target serves: ``$PMETA_FUZZ_TEXT_BANK``, or a tiny LaMP-3 bank built once."""
    if "bank" not in _BANK:
        from pmeta.text import TextBank

        path = os.environ.get("PMETA_FUZZ_TEXT_BANK")
        if not path:
            from pmeta.text import build_text_bank, load_text_config

            from .lamp_tiny import tiny_llama, write_lamp

            folder = Path(tempfile.mkdtemp(prefix="pmeta-fuzz-text-"))
            atexit.register(shutil.rmtree, folder, True)
            lm = tiny_llama(folder / "llama")
            path = str(folder / "bank")
            build_text_bank(write_lamp(folder / "lamp"), path, load_text_config("tiny", overrides={"task": "LaMP-3", "lm": str(lm)}))
        _BANK["bank"] = TextBank.open(path)
    return _BANK["bank"]


# ----------------------------------------------------------------------------------------- oracle
_ABSENT = object()  # a key the generated input leaves out


def _date(kind: str, parts: tuple, free: str) -> tuple[Any, tuple | None]:
    """``(the date value or a missing marker, its order key or None)``, from the LaMP date rules."""
    year, month, day, hour, number = parts
    if kind == "ymd":
        return f" {year}-{month:02d}-{day:02d}", (year, month, day)
    if kind == "year":
        return str(year), (year,)
    if kind == "int":
        return number, (number,)
    if kind == "datetime":
        return f"{year}-{month:02d}-{day:02d}T{hour:02d}:00:00", (year, month, day, hour, 0, 0, 0)
    if kind == "free":
        return f"{free} soon", None  # never a date: letters after it
    return {"null": None, "float": 1.5, "bool": False, "list": [2014], "absent": _ABSENT}[kind], None


def _score_ok(score: Any) -> bool:
    if isinstance(score, str):
        return score.strip() in ("1", "2", "3", "4", "5")
    return not isinstance(score, bool) and isinstance(score, (int, float)) and score in (1, 2, 3, 4, 5)


def render(value: tuple, task) -> tuple[list[Any], list[tuple[str, list[str]] | None]]:
    """The input's histories as Python objects, and per history ``(user id, kept profile ids in
    time order)`` or None when it is broken."""
    histories_in, _, (max_items, max_items_broken), _, _ = value
    histories, expected = [], []
    for shape, user_kind, user_number, items in histories_in:
        broken = shape in SHAPES[1] or (user_kind in USER_KINDS[1] and shape != "list")  # a bare list has no user id
        profile, ids, keys = [], [], []
        for id_kind, number, free, field_kinds, score, date_kind, parts, extra in items:
            row: dict[str, Any] = {}
            previous = profile[-1]["id"] if profile and "id" in profile[-1] else None
            item_id: Any = {"str": f"r{number}", "int": number, "padded": f" r{number} ", "unicode": f"{free}#{number}", "empty": "  ", "bool": True, "float": 1.5,
                            "surrogate": f"r{number}\udfff", "null": None, "missing": _ABSENT, "repeat": previous, "repeat-retyped": previous}.get(id_kind)  # fmt: skip
            if id_kind.startswith("repeat") and (previous is None or isinstance(previous, (bool, float))):
                item_id = f"r{number}"  # nothing to repeat: a plain id
            elif id_kind == "repeat-retyped" and isinstance(previous, int):
                item_id = str(previous)  # "5" repeats 5
            if item_id is not _ABSENT:
                row["id"] = item_id
            for name, kind in zip(task.profile_fields, field_kinds):
                if name == "score" and task.name == "LaMP-3":
                    row[name] = score
                    broken |= not _score_ok(score)
                    continue
                field = {"text": f"{free} {name}", "empty": "", "int": 7, "surrogate": f"{free}\udfff", "null": None, "missing": _ABSENT}[kind]
                if field is not _ABSENT:
                    row[name] = field
                broken |= kind in FIELD_KINDS[1]
            date, key = _date(date_kind, parts, free)
            if date is not _ABSENT:
                row["date"] = date
            broken |= date_kind in DATE_KINDS[1]
            if extra:
                row["source"] = "fuzz"  # an extra key: kept, never read
            good_id = isinstance(item_id, (str, int)) and not isinstance(item_id, bool) and str(item_id).strip() != "" and "\udfff" not in str(item_id)
            broken |= not good_id or str(item_id) in ids
            profile.append(row)
            ids.append(str(item_id) if good_id else "")
            keys.append(key)
        user_id = {"str": f"user-{user_number}", "int": user_number, "path": "../x", "space": "a b", "bool": True, "empty": "", "absent": _ABSENT}[user_kind]
        history: Any = {"profile": profile} if user_id is _ABSENT else {"user_id": user_id, "profile": profile}
        if shape == "list":
            history, user_id = profile, _ABSENT
        elif shape == "extra-key":
            history = {**history, "items": []}
        elif shape == "number":
            history = 42
        histories.append(history)
        if broken:
            expected.append(None)
            continue
        order = list(range(len(profile)))
        if keys and all(k is not None for k in keys) and len({len(k) for k in keys}) == 1:
            order.sort(key=lambda i: keys[i])
        kept = [ids[i] for i in order]
        if max_items is not None and not max_items_broken:  # (a broken max_items refuses the call)
            kept = kept[-max_items:] if max_items > 0 else []
        expected.append(("anonymous" if user_id is _ABSENT else str(user_id), kept))
    return histories, expected


def query_text(kind: str, free: str, prefix: str) -> Any:
    return {"prefixed": f"{prefix} {free} fine", "free": f"{free}!", "empty": "", "blank": " \n\t", "surrogate": f"{prefix} \udfff", "number": 42}[kind]


# ----------------------------------------------------------------------------------------- target
@target("text", text_inputs, "LaMP profiles through an opened text bank: batched and one-by-one personalization, prompts, predictions", examples=300)
def fuzz_text(value: Any, served=None) -> str:
    import torch

    from pmeta.data.lamp import profile_text
    from pmeta.errors import InvalidHistory, InvalidRequest
    from pmeta.text.prompts import RETRIEVED_HEADER

    served = served if served is not None else bank()
    task = served.model.spec
    _, (steps, steps_broken), (max_items, max_items_broken), retrieve, (input_kind, free) = value
    histories, expected = render(value, task)
    try:
        batched = served.personalize_many(histories, steps=steps, max_items=max_items)
    except InvalidRequest as error:
        one_line(error)
        assert steps_broken or max_items_broken, f"refused valid options: {error}"
        return "refused-request"
    except InvalidHistory as error:
        one_line(error)
        assert not (steps_broken or max_items_broken) and None in expected, f"refused a valid batch: {error}"
        return "refused"
    assert not (steps_broken or max_items_broken), f"steps={steps!r} or max_items={max_items!r} was not refused"
    assert None not in expected, f"a broken history was served: {histories}"
    single = [served.personalize(h, steps=steps, max_items=max_items) for h in histories]
    with ThreadPoolExecutor(2) as pool:  # the same calls from two threads at once: the serial values, bit for bit
        threaded = list(pool.map(lambda h: served.personalize(h, steps=steps, max_items=max_items), histories))
    n_anchors = int(served.model.t.anchor_keys.shape[0])
    t = served.model.t
    for p, one, again, (user_id, kept) in zip(batched, single, threaded, expected):
        assert p.user_id == one.user_id == user_id, (p.user_id, user_id)
        assert [str(item["id"]) for item in p.profile] == kept == [str(item["id"]) for item in one.profile], "not the history's items in time order, the most recent kept"
        assert bool(p.anchors) == bool(kept) == bool(one.anchors), "anchors without a profile, or none with one"
        if p.anchors:
            weights = [a["weight"] for a in p.anchors]
            assert len(p.anchors) == min(served.config.top_k, n_anchors), f"{len(p.anchors)} anchors retrieved"
            assert len({a["anchor"] for a in p.anchors}) == len(p.anchors) and all(0 <= a["anchor"] < n_anchors for a in p.anchors)
            assert all(w >= 0 for w in weights) and abs(sum(weights) - 1) < 1e-4, weights
        fused = len(p.anchors) if kept else n_anchors  # the zero-history prior fuses every anchor
        for key, tensor in p.adapter.items():
            assert tensor.shape == _expected_shape(t, key, fused, not kept), f"{key} has shape {tuple(tensor.shape)} with {fused} anchors fused"
            assert bool(tensor.isfinite().all()), f"a non-finite adapter value in {key}"
            assert torch.equal(one.adapter[key], again.adapter[key]), "the same call gave other values (repeated, from two threads)"
            assert one.adapter[key].shape == tensor.shape, f"{key} is {tuple(tensor.shape)} in the batch, {tuple(one.adapter[key].shape)} alone"
            assert torch.allclose(tensor, one.adapter[key], atol=TOLERANCE, rtol=TOLERANCE), f"a batch and one-by-one differ in {key}"
    _check_queries(batched, query_text(input_kind, free, served.config.input_prefix), retrieve, served.config, task, profile_text, RETRIEVED_HEADER)
    return "personalized"


def _expected_shape(tensors, key: str, fused: int, prior: bool) -> tuple[int, ...]:
    """A user's factor shape: the fused anchors' ranks, then the stack's (cat fusion is exact; the
    zero-history ``prior`` keeps its ΔW at rank ≤ min(d_in, d_out))."""
    own = tuple(tensors.stack_init[key].shape)
    if key == "prompt":
        return own
    target, side = key.rsplit(".", 1)
    d_out, anchor_rank = tensors.anchors[target + ".B"].shape[1:]
    d_in = tensors.anchors[target + ".A"].shape[2]
    rank = fused * anchor_rank
    if prior:
        rank = min(rank, d_in, d_out)
    return (rank + own[0], d_in) if side == "A" else (d_out, rank + own[1])


def _check_queries(personalized, text: Any, option: tuple[Any, bool], config, task, profile_text, header: str) -> None:
    from pmeta.errors import InvalidRequest

    retrieve, retrieve_broken = option
    broken = not isinstance(text, str) or not text.strip() or "\udfff" in text or retrieve_broken
    bare = None
    for p in personalized:
        if broken:
            for call in (p.prompt, p.predict):
                try:
                    call(text, retrieve)
                except InvalidRequest as error:
                    one_line(error)
                else:
                    raise AssertionError(f"{call.__name__} took input {text!r} with retrieve={retrieve!r}")
            continue
        plain = p.prompt(text, 0)
        bare = plain if bare is None else bare
        assert plain == bare, "a prompt without retrieval depends on the user"
        asked = config.retrieve if retrieve is None else retrieve
        prompt = p.prompt(text, retrieve)
        own = {profile_text(task.name, item, config.item_chars) for item in p.profile}
        if header in prompt and header not in text:
            block = prompt.split(header + "\n", 1)[1].split("\n\n", 1)[0]
            lines = block.split("\n")
            assert len(lines) <= min(asked, len(p.profile)), f"{len(lines)} items retrieved of {len(p.profile)}, asked {asked}"
            assert all(line.startswith("- ") and line[2:] in own for line in lines), "a retrieved item that is not this user's kept profile"
        if asked == 0 or not p.profile:
            assert prompt == plain, "a prompt with nothing to retrieve is not the plain prompt"
        prediction = p.predict(text, retrieve)
        assert isinstance(prediction, str), type(prediction)
        if task.kind == "rating":
            assert 1.0 <= float(prediction) <= 5.0, prediction
        elif task.kind == "classification":
            assert prediction in task.labels, prediction

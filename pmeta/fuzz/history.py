"""Fuzz target ``history``: the history.json parser (values) and reader (bytes)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from . import one_line, target

HISTORY_KEYS = ["user_id", "items", "item_id", "text", "rating", "timestamp", "extra"]


def history_inputs():
    """Arbitrary JSON values, history-shaped objects with hostile field values, their JSON text
    (with NaN/Infinity), and arbitrary bytes (binary, truncated, non-UTF-8)."""
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    json_values = st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(HISTORY_KEYS) | st.text(max_size=5), children, max_size=6),
        max_leaves=30,
    )
    item = st.fixed_dictionaries(
        {},
        optional={
            "item_id": st.one_of(st.text(max_size=140), st.integers(), st.booleans(), st.floats(), st.none(), st.lists(st.integers(), max_size=2)),
            "text": st.one_of(st.text(max_size=30), st.integers(), st.none()),
            "rating": st.one_of(st.floats(), st.integers(-10, 10), st.booleans(), st.text(max_size=3), st.none()),
            "timestamp": st.one_of(st.integers(), st.floats(), st.booleans(), st.none()),
        },
    )
    user_ids = st.one_of(st.text(max_size=140), st.integers(), st.sampled_from([".", "..", "a/b", "a\\b", "\x00", "é", "\u2028"]))
    shaped = st.fixed_dictionaries({"user_id": user_ids}, optional={"items": st.lists(item, max_size=8)})
    as_text = st.one_of(json_values, shaped).map(lambda value: json.dumps(value).encode("utf-8"))
    truncated = st.tuples(as_text, st.integers(min_value=0)).map(lambda pair: pair[0][: pair[1] % (len(pair[0]) + 1)])
    return st.one_of(json_values, shaped, as_text, truncated, st.binary(max_size=300))


@target("history", history_inputs, "history.json: parse_history on values, load_history on bytes")
def fuzz_history(value: Any) -> str:
    from pmeta.data.history import UserHistory, load_history, parse_history
    from pmeta.errors import InvalidHistory

    try:
        if isinstance(value, bytes):
            handle, name = tempfile.mkstemp(suffix=".json")
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(value)
                result = load_history(name)
            finally:
                os.unlink(name)
        else:
            result = parse_history(value)
    except InvalidHistory as error:
        one_line(error)
        return "rejected"
    if not isinstance(result, UserHistory):
        raise AssertionError(f"returned {type(result).__name__}, not a UserHistory")
    return "valid"

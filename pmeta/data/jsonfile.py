"""Reading user-supplied JSON files: bounded reads of regular files, and a strict ``json.loads``.

Shared by history.json (:mod:`pmeta.data.history`), text histories (:mod:`pmeta.text.history`) and
LaMP files (:mod:`pmeta.data.lamp`), so that each refuses the same things the same way:

* a path that is not a regular file (a FIFO would block forever, ``/dev/zero`` would fill memory);
* a file larger than the caller's limit, checked before reading and again after it;
* an object that repeats a key (``json`` keeps the last one silently, so data would be dropped);
* a string holding a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but not Unicode text: the
  tokenizers and ``print`` fail on it later, far from the file).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..checks import os_error_message
from ..errors import PmetaError

#: A ``\\uD800``-``\\uDFFF`` escape; only a text containing one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JSONContentError(ValueError):
    """A JSON text that parses but holds a repeated key or a string that is not valid Unicode."""


def read_regular_file(path: Path, max_bytes: int, error: type[PmetaError], kind: str) -> bytes:
    """The bytes of ``path``, after checking it exists, is a regular file and is at most ``max_bytes``.

    Raises ``error`` with one line; ``kind`` names the file in it ("history" gives "History file not
    found: ...", "History path is not a regular file: ...", "Cannot read history file ...").
    """
    label = kind[:1].upper() + kind[1:]
    try:
        exists, regular = path.exists(), path.is_file()
        size = path.stat().st_size if regular else 0
    except OSError as problem:  # a name too long, no permission on a folder (the public callers' as_path has refused NUL bytes)
        raise error(f"Cannot read {kind} file {str(path)[:200]}: {os_error_message(problem)}.") from None
    if not exists:
        raise error(f"{label} file not found: {path}.")
    if not regular:
        raise error(f"{label} path is not a regular file: {path}.")
    if size > max_bytes:
        raise error(f"{path}: {size} bytes is more than the limit of {max_bytes} bytes for a {kind} file.")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as problem:
        raise error(f"Cannot read {kind} file {path}: {problem.strerror or problem}.") from None
    if len(data) > max_bytes:  # it grew after the size check
        raise error(f"{path}: more than the limit of {max_bytes} bytes for a {kind} file.")
    return data


def load_history_json(path: Path, max_bytes: int, error: type[PmetaError], fields: str) -> Any:
    """The parsed JSON of a user's history file (history.json or a text history), every problem
    worded the same way in one line of ``error``: missing or not a regular file, over ``max_bytes``,
    not UTF-8, empty ("expected a JSON object with ``fields``"), not JSON (line and column), nested
    too deeply, or refused by :func:`strict_loads`."""
    data = read_regular_file(path, max_bytes, error, "history")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not UTF-8 text (invalid byte at offset {problem.start}).") from None
    if not text.strip():
        raise error(f"{path}: the file is empty; expected a JSON object with {fields}.")
    try:
        return strict_loads(text)
    except json.JSONDecodeError as problem:
        raise error(f"{path}: invalid JSON at line {problem.lineno} column {problem.colno}: {problem.msg}.") from None
    except RecursionError:
        raise error(f"{path}: the JSON is nested too deeply.") from None
    except ValueError as problem:  # a repeated key, a lone surrogate, an integer too long to convert
        raise error(f"{path}: invalid JSON: {problem}.") from None


def is_unicode_text(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (it then cannot be encoded, tokenized or printed)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONContentError(f"the key {key[:40]!r} appears twice in one object")
            seen.add(key)
    return obj


def _first_bad_string(obj: Any) -> str | None:
    """The first string (key or value) in ``obj`` that is not valid Unicode text, iteratively."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if not is_unicode_text(value):
                return value
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return None


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses repeated keys and lone surrogates (:class:`JSONContentError`).

    An integer too long to convert is a JSONContentError too, its message the first clause of
    Python's. ``JSONDecodeError`` and ``RecursionError`` pass through, so callers catch
    ``JSONDecodeError`` first, then ``ValueError``, whose text is a one-line reason.
    """
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, JSONContentError):
        raise
    except ValueError as error:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion: ...; use ..."
        raise JSONContentError((str(error).splitlines() or ["unreadable value"])[0].split(";")[0]) from None
    if _SURROGATE_ESCAPE.search(text):
        bad = _first_bad_string(obj)
        if bad is not None:
            shown = bad[:40].encode("ascii", "backslashreplace").decode("ascii")
            raise JSONContentError(f"the string '{shown}' holds a lone UTF-16 surrogate, so it is not Unicode text")
    return obj

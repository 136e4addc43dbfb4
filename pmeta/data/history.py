"""history.json: a user's few interactions, validated with pydantic, then resolved onto a catalogue.

    {"user_id": "u123",
     "items": [{"item_id": "2571", "rating": 5, "timestamp": 978300760},
               {"text": "a film not in the catalogue, by its title", "rating": 4}]}

An item names a catalogue id (``item_id``; JSON integers are accepted and become strings), a free
text (``text``, e.g. a title), or both (the text is used when the id is unknown). ``rating`` (0 to 5)
and ``timestamp`` (seconds since the epoch) are optional. An empty ``items`` list is valid.

Every problem raises :class:`~pmeta.errors.InvalidHistory` with one line that says what was wrong
and where: the file (or ``history``) and the JSON path, e.g. ``h.json: items[3].rating: ...``.
"""

from __future__ import annotations

import itertools
import math
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..checks import as_path, request_int
from ..errors import InvalidHistory
from .jsonfile import is_unicode_text, load_history_json
from .types import Catalog

#: Most items one history may hold (parse_history and load_history take ``max_items`` to change it).
MAX_ITEMS = 10_000
#: Largest history file load_history reads, in bytes.
MAX_BYTES = 10 * 1024 * 1024
MAX_TEXT_CHARS = 2000
MAX_ID_CHARS = 128
MAX_RATING = 5.0
MAX_TIMESTAMP = 2**63 - 1
UNKNOWN_IDS_SHOWN = 5
_NOT_UNICODE = "must be valid Unicode text (it holds a lone UTF-16 surrogate)"


def _short(value: Any) -> str:
    """repr of a value, cut to 40 characters (an integer too long to print is described instead)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return "with more than 38 digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(value: Any) -> str:
    """A short, one-line description of a JSON value, for error messages: "a string 'x'", "an array"."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}
    if value is None:
        return "null"
    kind = names.get(type(value), type(value).__name__)
    return f"{kind} {_short(value)}" if isinstance(value, (bool, int, float, str)) else kind


class HistoryItem(BaseModel):
    """One interaction: an ``item_id`` and/or a ``text``, with an optional rating and timestamp."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: Optional[str] = Field(None, description="Catalogue id; a JSON integer is accepted and becomes a string.")
    text: Optional[str] = Field(None, description=f"Free text naming the item, 1 to {MAX_TEXT_CHARS} characters.")
    rating: Optional[float] = Field(None, description="0 to 5; items rated below 4 are not positive signal.")
    timestamp: Optional[int] = Field(None, description="Seconds since the epoch (>= 0); orders the history.")

    @field_validator("item_id", mode="before")
    @classmethod
    def _item_id(cls, value: Any) -> Optional[str]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"must be a string or an integer, not {_describe(value)}")
        if isinstance(value, int) and value.bit_length() > 400:
            raise ValueError(f"must be 1 to {MAX_ID_CHARS} characters, not an integer of more than 120 digits")
        item_id = str(value).strip()
        if not is_unicode_text(item_id):
            raise ValueError(_NOT_UNICODE)
        if not 1 <= len(item_id) <= MAX_ID_CHARS:
            raise ValueError(f"must be 1 to {MAX_ID_CHARS} characters, not {len(item_id)}")
        return item_id

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Optional[str]:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {_describe(value)}")
        text = value.strip()
        if not is_unicode_text(text):
            raise ValueError(_NOT_UNICODE)
        if not 1 <= len(text) <= MAX_TEXT_CHARS:
            raise ValueError(f"must be 1 to {MAX_TEXT_CHARS} characters after stripping spaces, not {len(text)}")
        return text

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, value: Any) -> Optional[float]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number from 0 to 5, not {_describe(value)}")
        try:
            rating = float(value)
        except OverflowError:
            rating = math.inf
        if not (math.isfinite(rating) and 0 <= rating <= MAX_RATING):
            raise ValueError(f"must be a finite number from 0 to 5, not {_describe(value)}")
        return rating

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> Optional[int]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number of seconds, not {_describe(value)}")
        if not 0 <= value <= MAX_TIMESTAMP:
            raise ValueError(f"must be from 0 to {MAX_TIMESTAMP}, not {_describe(value)}")
        return value

    @model_validator(mode="after")
    def _names_an_item(self) -> HistoryItem:
        if self.item_id is None and self.text is None:
            raise ValueError("an item needs an item_id or a text")
        return self


class UserHistory(BaseModel):
    """A user id and the user's items (possibly none). ``item_id`` values are unique."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: str = Field(..., description=f"1 to {MAX_ID_CHARS} characters, not blank; no control or invisible format characters, '/' or '\\'.")
    items: list[HistoryItem] = Field(default_factory=list, description=f"At most {MAX_ITEMS} items unless told otherwise.")

    @field_validator("user_id", mode="before")
    @classmethod
    def _user_id(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {_describe(value)}")
        if not 1 <= len(value) <= MAX_ID_CHARS:
            raise ValueError(f"must be 1 to {MAX_ID_CHARS} characters, not {len(value)}")
        if not is_unicode_text(value):
            raise ValueError(_NOT_UNICODE)
        if any(ord(ch) < 32 or 127 <= ord(ch) < 160 or ch in "\u2028\u2029" for ch in value):
            raise ValueError("must not contain control characters")
        if any(unicodedata.category(ch) == "Cf" for ch in value):  # U+202E would reverse the printed line
            raise ValueError("must not contain invisible format characters (e.g. U+202E, U+200B)")
        if not value.strip():
            raise ValueError("must not be blank")
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError("must not be a path: no '/', '\\', '.' or '..'")
        return value

    @field_validator("items", mode="before")
    @classmethod
    def _within_limit(cls, value: Any, info: ValidationInfo) -> Any:
        limit = (info.context or {}).get("max_items", MAX_ITEMS)
        if not isinstance(value, (list, tuple, str, bytes, bytearray, Mapping)) and isinstance(value, Iterable):
            # another iterable (a generator, a range): read at most one past the limit, never all of it
            value = list(itertools.islice(value, limit + 1))
            if len(value) > limit:
                raise ValueError(f"more than the limit of {limit} items")
        if isinstance(value, (list, tuple)) and len(value) > limit:
            raise ValueError(f"{len(value)} items is more than the limit of {limit}")
        return value

    @field_validator("items", mode="after")
    @classmethod
    def _unique_ids(cls, items: list[HistoryItem]) -> list[HistoryItem]:
        first_position: dict[str, int] = {}
        for position, item in enumerate(items):
            if item.item_id is None:
                continue
            if item.item_id in first_position:
                raise ValueError(
                    f"item_id {_short(item.item_id)} appears twice, at items[{first_position[item.item_id]}] and items[{position}]"
                )
            first_position[item.item_id] = position
        return items


def parse_history(obj: Any, *, max_items: int = MAX_ITEMS) -> UserHistory:
    """Validate a Python object (e.g. parsed JSON) as a history.

    Raises InvalidHistory, with one line naming the JSON path, for anything that is not a valid
    history, and InvalidRequest for a ``max_items`` that is not a whole number >= 0.
    """
    return _validate(obj, request_int(max_items, "max_items", 0), source="history")


def load_history(path: str | Path, *, max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES, user_id: str | None = None) -> UserHistory:
    """Read and validate a history.json file (``user_id``, when given, replaces the file's, which may then be absent).

    Raises InvalidHistory (one line, naming the file) when the file is missing, not a regular file,
    larger than ``max_bytes``, not UTF-8, not JSON (with line and column), or not a valid history;
    InvalidRequest for limits that are not whole numbers >= 0.
    """
    max_items, max_bytes = request_int(max_items, "max_items", 0), request_int(max_bytes, "max_bytes", 0)
    path = as_path(path, "History file", InvalidHistory)
    obj = load_history_json(path, max_bytes, InvalidHistory, "user_id and items")
    if user_id is not None and isinstance(obj, dict):
        obj = {**obj, "user_id": user_id}
    return _validate(obj, max_items, source=str(path))


def _validate(obj: Any, max_items: int, source: str) -> UserHistory:
    if not isinstance(obj, dict):
        raise InvalidHistory(f"{source}: a history must be a JSON object with user_id and items, not {_describe(obj)}.")
    if "profile" in obj and "items" not in obj:
        raise InvalidHistory(f"{source}: this is a text bank's history (\"profile\"); a ranking bank reads items: {{\"user_id\", \"items\": [...]}}.")
    try:
        return UserHistory.model_validate(obj, context={"max_items": max_items})
    except ValidationError as error:
        problems = error.errors(include_url=False, include_input=False)
        first = problems[0]
        message = _problem_message(first)
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise InvalidHistory(f"{source}: {_json_path(first['loc'])}: {message}{more}.") from None
    except RecursionError:
        raise InvalidHistory(f"{source}: the history is nested too deeply.") from None


_PYDANTIC_MESSAGES = {
    "missing": "this required field is missing",
    "list_type": "must be an array",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
}


def _problem_message(problem: dict[str, Any]) -> str:
    """One short clause for a pydantic error: ours as raised, pydantic's own reworded for JSON users."""
    if problem["type"] == "extra_forbidden":
        fields = "user_id and items" if len(problem["loc"]) == 1 else "item_id, text, rating and timestamp"
        return f"unknown field (allowed: {fields})"
    if problem["type"] in _PYDANTIC_MESSAGES:
        return _PYDANTIC_MESSAGES[problem["type"]]
    return pydantic_clause(problem["msg"]).rstrip(".")


def pydantic_clause(message: str) -> str:
    """The first line of a pydantic error message, without the "Value error, " our validators get."""
    return (message.splitlines() or [""])[0].removeprefix("Value error, ")


def _json_path(loc: tuple[Any, ...]) -> str:
    """('items', 3, 'rating') -> 'items[3].rating'."""
    path = ""
    for part in loc:
        if isinstance(part, int) and path:
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


# ---------------------------------------------------------------------------------------- resolving
Entry = tuple[Optional[int], Optional[str], Optional[float], Optional[int]]


@dataclass(frozen=True)
class ResolvedHistory:
    """A history mapped onto a catalogue.

    ``entries`` are (catalogue index or None, free text or None, rating, timestamp) in time order:
    items with a timestamp first, by timestamp, then the others in file order. ``item_indexes`` and
    ``texts`` are the catalogue items and the free texts in that order, and ``ratings`` follows
    ``item_indexes + texts``.
    """

    user_id: str
    item_indexes: list[int]
    texts: list[str]
    ratings: list[Optional[float]]
    entries: list[Entry]


def resolve_history(history: UserHistory, catalog: Catalog, *, ignore_unknown: bool = False) -> ResolvedHistory:
    """Map a history's items onto ``catalog``.

    An item_id in the catalogue maps to its index. An item whose id is unknown (or absent) but has a
    text is a free-text item, unless the text equals a catalogue title (case-insensitive, stripped),
    which maps to that title's first item. An item that repeats a catalogue item already resolved
    (by id once and by title once: a repeated id is refused earlier) counts once, with the later
    timestamp's rating (the first in the file when neither is later), so the file's order does not
    decide. Raises InvalidHistory naming up to five unknown ids without text and their count,
    unless ``ignore_unknown`` (then those items are skipped).
    """
    titles: dict[str, int] | None = None
    entries: list[Entry] = []
    seen: dict[int, int] = {}  # catalogue index -> its position in entries
    unknown: list[str] = []
    for item in history.items:
        index = catalog.index.get(item.item_id) if item.item_id is not None else None
        if index is None and item.text is not None:
            titles = titles if titles is not None else _title_index(catalog)
            index = titles.get(item.text.casefold())
        if index is None and item.text is None:
            unknown.append(str(item.item_id))
            continue
        if index is not None:
            if index in seen:
                earlier = entries[seen[index]]
                if item.timestamp is not None and (earlier[3] is None or item.timestamp > earlier[3]):
                    entries[seen[index]] = (index, None, item.rating, item.timestamp)
                continue
            seen[index] = len(entries)
        entries.append((index, item.text if index is None else None, item.rating, item.timestamp))
    if unknown and not ignore_unknown:
        shown = ", ".join(_short(item_id) for item_id in unknown[:UNKNOWN_IDS_SHOWN])
        others = f" and {len(unknown) - UNKNOWN_IDS_SHOWN} more" if len(unknown) > UNKNOWN_IDS_SHOWN else ""
        ids = "1 item id is" if len(unknown) == 1 else f"{len(unknown)} item ids are"
        raise InvalidHistory(f"{ids} not in the catalogue and without text: {shown}{others} (--ignore-unknown, or ignore_unknown=True in the library, skips them).")
    entries.sort(key=lambda entry: (entry[3] is None, entry[3] or 0))
    catalogued = [entry for entry in entries if entry[0] is not None]
    free = [entry for entry in entries if entry[0] is None]
    return ResolvedHistory(
        user_id=history.user_id,
        item_indexes=[entry[0] for entry in catalogued],
        texts=[entry[1] for entry in free],
        ratings=[entry[2] for entry in catalogued + free],
        entries=entries,
    )


def _title_index(catalog: Catalog) -> dict[str, int]:
    """Stripped, case-folded title -> index of its first catalogue item."""
    index: dict[str, int] = {}
    for position, title in enumerate(catalog.titles):
        index.setdefault(title.strip().casefold(), position)
    return index

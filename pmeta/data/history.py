"""history.json: a user's few interactions, validated with pydantic.

    {"user_id": "u123",
     "items": [{"item_id": "2571", "rating": 5, "timestamp": 978300760},
               {"text": "a film not in the catalogue, by its title", "rating": 4}]}

An item is named by catalogue id (``item_id``; JSON integers are accepted), by free text
(``text``), or both (the text is used when the id is unknown to the bank). ``rating`` (0–5) and
``timestamp`` (seconds) are optional. An empty ``items`` list is valid: the user gets the
zero-history prior. Every problem raises :class:`~pmeta.errors.InvalidHistory` with one line that
says what and where (file, JSON path).
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator, model_validator

from ..errors import InvalidHistory
from .types import Catalog

MAX_ITEMS = 10_000
MAX_BYTES = 10 * 1024 * 1024


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: Optional[StrictStr | StrictInt] = Field(None, description="Catalogue id (string; JSON integers are accepted).")
    text: Optional[StrictStr] = Field(None, description="Free text naming the item (a title, a description).")
    rating: Optional[StrictFloat | StrictInt] = Field(None, description="0–5; items rated below 4 are not used as positive signal.")
    timestamp: Optional[StrictInt] = Field(None, ge=0, description="Seconds since the epoch; orders the history.")

    @field_validator("item_id")
    @classmethod
    def _id(cls, value):
        if value is None:
            return None
        value = str(value).strip()
        if not value or len(value) > 256:
            raise ValueError("item_id must be 1 to 256 characters")
        return value

    @field_validator("text")
    @classmethod
    def _text(cls, value):
        if value is None:
            return None
        value = value.strip()
        if not value or len(value) > 2000:
            raise ValueError("text must be 1 to 2000 characters")
        return value

    @field_validator("rating")
    @classmethod
    def _rating(cls, value):
        if value is None:
            return None
        value = float(value)
        if not math.isfinite(value) or not 0 <= value <= 5:
            raise ValueError("rating must be a finite number from 0 to 5")
        return value

    @model_validator(mode="after")
    def _named(self):
        if self.item_id is None and self.text is None:
            raise ValueError("an item needs an item_id or a text")
        return self


class UserHistory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: StrictStr = Field(..., description="1–128 characters; no control characters or path separators.")
    items: list[HistoryItem] = Field(default_factory=list)

    @field_validator("user_id")
    @classmethod
    def _user(cls, value: str) -> str:
        if not 1 <= len(value) <= 128:
            raise ValueError("user_id must be 1 to 128 characters")
        if value in {".", ".."} or "/" in value or "\\" in value:
            raise ValueError("user_id must not be a path or contain / or \\")
        if any(unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"} for ch in value):
            raise ValueError("user_id must not contain control characters")
        return value

    @model_validator(mode="after")
    def _unique(self):
        seen: set[str] = set()
        for item in self.items:
            if item.item_id is not None:
                if item.item_id in seen:
                    raise ValueError(f"item_id {item.item_id!r} appears more than once")
                seen.add(item.item_id)
        return self


def _where(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in {"str", "int", "float", "function-after[_id(), union[str,int]]"} or "[" in str(part):
            continue  # pydantic's union branch names
        else:
            path += f".{part}" if path else str(part)
    return path or "history"


def parse_history(obj: Any, *, max_items: int = MAX_ITEMS, source: str = "history") -> UserHistory:
    """Validate a Python object (parsed JSON) as a history. Raises InvalidHistory."""
    if not isinstance(obj, dict):
        raise InvalidHistory(f"{source}: a history must be a JSON object with user_id and items, not {type(obj).__name__}")
    items = obj.get("items")
    if isinstance(items, list) and len(items) > max_items:
        raise InvalidHistory(f"{source}: {len(items)} items is more than the limit of {max_items}")
    try:
        return UserHistory.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidHistory(f"{source}: {_where(first['loc'])}: {message}") from None
    except RecursionError:
        raise InvalidHistory(f"{source}: the JSON is nested too deeply") from None


def load_history(path: str | Path, *, max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES) -> UserHistory:
    """Read and validate a history.json file. Raises InvalidHistory (missing file, too large,
    not UTF-8, malformed JSON, schema violations), never anything else."""
    path = Path(path)
    try:
        if not path.exists():
            raise InvalidHistory(f"history file not found: {path}")
        if not path.is_file():
            raise InvalidHistory(f"history path is not a regular file: {path}")
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidHistory(f"{path}: {size} bytes is more than the limit of {max_bytes} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidHistory(f"cannot read history file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidHistory(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidHistory(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise InvalidHistory(f"{path}: the JSON is nested too deeply") from None
    return parse_history(obj, max_items=max_items, source=str(path))


@dataclass(frozen=True)
class ResolvedHistory:
    """A history mapped onto a catalogue. ``entries`` are (catalogue index or None, text or None,
    rating, timestamp) in time order (timestamped items first, by time; the rest in file order)."""

    user_id: str
    entries: list[tuple[Optional[int], Optional[str], Optional[float], Optional[int]]]

    @property
    def item_indexes(self) -> list[int]:
        return [e[0] for e in self.entries if e[0] is not None]

    @property
    def texts(self) -> list[str]:
        return [e[1] for e in self.entries if e[0] is None and e[1] is not None]


def resolve_history(history: UserHistory, catalog: Catalog, *, ignore_unknown: bool = False) -> ResolvedHistory:
    """Map item ids (and exact titles) to catalogue indexes.

    An unknown id that has a text becomes a free-text item; an unknown id without text raises
    InvalidHistory listing a few of them, unless ``ignore_unknown`` (then it is skipped).
    """
    titles = {title.strip().lower(): i for i, title in reversed(list(enumerate(catalog.titles)))}
    entries, unknown = [], []
    for item in history.items:
        index = catalog.index.get(item.item_id) if item.item_id is not None else None
        if index is None and item.text is not None:
            index = titles.get(item.text.strip().lower())
        if index is None and item.text is None:
            unknown.append(item.item_id)
            continue
        entries.append((index, item.text if index is None else None, item.rating, item.timestamp))
    if unknown and not ignore_unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        raise InvalidHistory(f"{len(unknown)} item id(s) not in the bank's catalogue and without text: {shown}{' …' if len(unknown) > 5 else ''} (use --ignore-unknown to skip them)")
    order = sorted(range(len(entries)), key=lambda i: (entries[i][3] is None, entries[i][3] or 0, i))
    return ResolvedHistory(history.user_id, [entries[i] for i in order])

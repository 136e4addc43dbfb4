"""The history of a text user: a LaMP profile, validated with pydantic.

    {"user_id": "u1",
     "profile": [{"id": "r1", "text": "Great strings, bright tone.", "score": "5", "date": "2014-02-28"}, ...]}

Profile items carry the fields of the bank's LaMP task (LaMP-3: ``text, score``; LaMP-4: ``title,
text``; ... see :mod:`pmeta.data.lamp`), an ``id`` and an optional ``date``; they are checked with the
LaMP reader's own rules and kept in time order; item ids are unique. An empty or absent profile is
valid (the zero-history prior), as an empty or absent ``items`` list is for a ranking history. A bare
profile list is accepted too. Every problem raises :class:`~pmeta.errors.InvalidHistory` with one line naming
the file and place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..checks import as_path
from ..data.history import pydantic_clause
from ..data.jsonfile import load_history_json
from ..data.lamp import parse_questions
from ..errors import InvalidData, InvalidHistory

MAX_PROFILE_ITEMS = 10_000
MAX_BYTES = 10 * 1024 * 1024
_USER_ID = re.compile(r"^[A-Za-z0-9_.:@+-]{1,128}$")


class TextHistory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: str = Field("anonymous", description="1-128 characters: letters, digits and _ . : @ + -")
    profile: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_PROFILE_ITEMS, description="The LaMP profile items (absent or [] for none).")

    @field_validator("user_id", mode="before")
    @classmethod
    def _user_id(cls, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"must be a string, not {type(value).__name__}")
        text = str(value)
        if not _USER_ID.match(text) or text in (".", ".."):
            raise ValueError("must be 1-128 characters of letters, digits and _ . : @ + - (no paths, spaces or control characters)")
        return text


def parse_text_history(data: Any, task: str, source: str = "history") -> tuple[TextHistory, list[dict]]:
    """Validate ``data`` (parsed JSON) for ``task``: (history, profile items checked and time-ordered)."""
    if isinstance(data, list):  # a bare profile list is accepted too
        data = {"profile": data}
    if not isinstance(data, dict):
        raise InvalidHistory(f"{source}: expected a JSON object {{\"user_id\", \"profile\": [...]}}, found {type(data).__name__}")
    if "items" in data and "profile" not in data:
        raise InvalidHistory(f"{source}: this is a ranking bank's history (\"items\"); a text bank reads a profile: {{\"user_id\", \"profile\": [...]}}")
    try:
        history = TextHistory(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "history"
        raise InvalidHistory(f"{source}: {where}: {pydantic_clause(first['msg'])}") from None
    except TypeError as exc:
        raise InvalidHistory(f"{source}: {exc}") from None
    try:
        parsed = parse_questions([{"id": "history", "input": "", "profile": list(history.profile)}], task, source)
    except InvalidData as exc:
        message = str(exc).replace("$[0].profile", "profile")
        raise InvalidHistory(message) from None
    first_position: dict[str, int] = {}
    for position, item in enumerate(history.profile):  # file order (parsed[0].profile is time-ordered)
        item_id = str(item["id"])  # parse_questions checked it is a string or an integer
        if item_id in first_position:
            shown = repr(item_id) if len(repr(item_id)) <= 40 else repr(item_id)[:37] + "..."
            raise InvalidHistory(
                f"{source}: profile: item id {shown} appears twice, at profile[{first_position[item_id]}] and profile[{position}]"
            )
        first_position[item_id] = position
    return history, parsed[0].profile


def load_text_history(path: str | Path, task: str) -> tuple[TextHistory, list[dict]]:
    """Read and validate a history file (a regular file of at most 10 MiB of UTF-8 JSON)."""
    path = as_path(path, "History file", InvalidHistory)
    obj = load_history_json(path, MAX_BYTES, InvalidHistory, "user_id and profile")
    return parse_text_history(obj, task, str(path))

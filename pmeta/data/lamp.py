"""The LaMP benchmark's file format (Salemi et al., ACL 2024), read and written exactly as published.

* ``{split}_questions.json``: a JSON list of ``{"id", "input", "profile": [{"id", ...task fields..., "date"?}]}``;
* ``{split}_outputs.json``: ``{"task": "LaMP_N", "golds": [{"id", "output"}]}`` (predictions use the same form).

Profile fields per task (PROTOCOL.md): LaMP-1 ``title, abstract``; LaMP-2 ``description, tag``; LaMP-3
``text, score``; LaMP-4 ``title, text``; LaMP-5 ``title, abstract``; LaMP-7 ``text``. Profiles are kept in
time order when every item has a date LaMP's own code can order (``"2014-02-28"``, ``"2016"``, an integer).

Every problem with a file raises :class:`~pmeta.errors.InvalidData` naming the file and the position in it
as a JSON path (``$[3].profile[0].score``). The retrieval texts (:func:`retrieval_text`, :func:`query_text`)
follow LaMP's own BM25 corpus and query makers (``LaMP/prompts/prompts.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..checks import as_path, os_error_message
from ..errors import InvalidConfig, InvalidData
from .jsonfile import is_unicode_text, read_regular_file, strict_loads

#: LaMP-2 (movie tagging): the 15 tags, in the order of LaMP's ``get_all_labels``.
LAMP2_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)  # fmt: skip

#: Split names accepted by :func:`load_split` (a plain name, never a path).
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TASK_NAME = re.compile(r"^(?:lamp[-_ ]?)?(\d+)$", re.IGNORECASE)
#: Largest LaMP JSON file read (the published files are at most a few hundred MB).
MAX_FILE_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class TaskSpec:
    """What one LaMP task looks like: its profile fields, label set and metrics."""

    name: str  # "LaMP-3"
    kind: str  # "classification" | "rating" | "generation"
    profile_fields: tuple[str, ...]  # the fields every profile item carries besides "id" (and "date")
    labels: tuple[str, ...] | None  # the allowed outputs of classification and rating tasks; None for generation
    metrics: tuple[str, ...]  # names of the keys pmeta.eval.lamp_metrics.score returns
    description: str = ""
    query_marker: str | None = field(default=None, repr=False)  # text after this marker is the retrieval query

    @property
    def official(self) -> str:
        """The name in LaMP's outputs files: ``"LaMP_3"``."""
        return self.name.replace("-", "_")


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("LaMP-1", "classification", ("title", "abstract"), ("[1]", "[2]"), ("accuracy", "f1"), "personalized citation identification", None),
        TaskSpec("LaMP-2", "classification", ("description", "tag"), LAMP2_TAGS, ("accuracy", "f1"), "personalized movie tagging", "description:"),
        TaskSpec("LaMP-3", "rating", ("text", "score"), ("1", "2", "3", "4", "5"), ("mae", "rmse"), "personalized product rating", "review:"),
        TaskSpec("LaMP-4", "generation", ("title", "text"), None, ("rouge-1", "rouge-L"), "personalized news headline generation", "article:"),
        TaskSpec("LaMP-5", "generation", ("title", "abstract"), None, ("rouge-1", "rouge-L"), "personalized scholarly title generation", "paper:"),
        TaskSpec("LaMP-7", "generation", ("text",), None, ("rouge-1", "rouge-L"), "personalized tweet paraphrasing", ":"),
    )
}


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name``: ``"LaMP-3"``, ``"LaMP_3"``, ``"lamp3"``, ``"lamp-3"`` or ``"3"``.

    Raises InvalidConfig for anything else (LaMP-6, whose data is not public, included).
    """
    match = _TASK_NAME.match(str(name).strip()) if isinstance(name, (str, int)) and not isinstance(name, bool) else None
    spec = TASKS.get(f"LaMP-{int(match.group(1))}") if match and len(match.group(1)) < 4 else None
    if spec is None:
        known = ", ".join(TASKS)
        raise InvalidConfig(f"Unknown LaMP task {str(name)[:40]!r}; pmeta reads {known} (LaMP-6 is not public).")
    return spec


@dataclass
class LampExample:
    """One question of a LaMP split: the input, the user's profile and (when an outputs file was read) the gold."""

    id: str
    input: str
    profile: list[dict]  # items as published ({"id", ...task fields..., "date"?}), oldest first when dated
    output: str | None = None


# ---------------------------------------------------------------------------------------- reading
def _load_json(path: Path) -> Any:
    data = read_regular_file(path, MAX_FILE_BYTES, InvalidData, "LaMP")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidData(f"{path} is not UTF-8 text (byte {error.start}), so it is not a LaMP JSON file.") from None
    try:
        return strict_loads(text)
    except json.JSONDecodeError as error:
        raise InvalidData(f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}).") from None
    except RecursionError:
        raise InvalidData(f"{path} nests JSON too deeply to be a LaMP file.") from None
    except ValueError as error:  # a repeated key, a lone surrogate, an integer too long to convert
        raise InvalidData(f"{path} is not a LaMP JSON file: {error}.") from None


def _text_field(value: Any, path: str | Path, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidData(f"{path} at {where}: expected a string, found {type(value).__name__}.")
    if not is_unicode_text(value):
        raise InvalidData(f"{path} at {where}: the string holds a lone UTF-16 surrogate, so it is not valid Unicode text.")
    return value


def _identifier(value: Any, path: str | Path, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidData(f"{path} at {where}: the id must be a string (or an integer), found {type(value).__name__}.")
    text = str(value)
    if not text.strip():
        raise InvalidData(f"{path} at {where}: the id is empty.")
    _text_field(text, path, where)
    return text


def date_key(value: Any) -> tuple | None:
    """A sortable key for a profile item's ``date``, or None when it cannot be ordered.

    Accepts what LaMP's recency ranker reads (integers joined by ``-``: ``"2014-02-28"``, ``"2016"``,
    an int) and ISO date-times (``"2014-02-28T10:00:00"``).
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return (value,)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if re.fullmatch(r"\d{1,12}(-\d{1,12})*", text):
        return tuple(int(part) for part in text.split("-"))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second, moment.microsecond)


def score_label(value: Any, path: str | Path, where: str) -> str:
    """LaMP-3 scores are published as strings "1".."5"; integers and integral floats are accepted too."""
    number: float | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number != int(number) or not 1 <= number <= 5:
        raise InvalidData(f"{path} at {where}: a LaMP-3 score must be one of 1, 2, 3, 4, 5, found {str(value)[:40]!r}.")
    return str(int(number))


def _profile_item(raw: Any, spec: TaskSpec, path: str | Path, where: str) -> dict:
    if not isinstance(raw, dict):
        raise InvalidData(f"{path} at {where}: a profile item must be a JSON object, found {type(raw).__name__}.")
    if "id" not in raw:
        raise InvalidData(f"{path} at {where}: the profile item has no 'id'.")
    item = dict(raw)
    item["id"] = _identifier(raw["id"], path, f"{where}.id")
    for name in spec.profile_fields:
        if name not in raw:
            fields = ", ".join(spec.profile_fields)
            raise InvalidData(f"{path} at {where}: missing field '{name}' ({spec.name} profile items need id, {fields}).")
        if name == "score" and spec.name == "LaMP-3":
            item[name] = score_label(raw[name], path, f"{where}.{name}")
        else:
            _text_field(raw[name], path, f"{where}.{name}")
    if "date" in raw:
        date = raw["date"]
        if isinstance(date, bool) or not isinstance(date, (str, int)):
            raise InvalidData(f"{path} at {where}.date: a date must be a string or an integer, found {type(date).__name__}.")
    return item


def _time_ordered(profile: list[dict]) -> list[dict]:
    """Stable sort by date when every item has an orderable date (of one shape); otherwise the given order."""
    keys = [date_key(item.get("date")) for item in profile]
    if not profile or any(key is None for key in keys) or len({len(key) for key in keys}) > 1:  # type: ignore[arg-type]
        return profile
    order = sorted(range(len(profile)), key=lambda i: keys[i])  # type: ignore[arg-type, return-value]
    return [profile[i] for i in order]


def parse_questions(data: Any, task: str, path: str | Path = "<questions>") -> list[LampExample]:
    """Validate already-parsed JSON as a LaMP questions file of ``task`` (see :func:`read_questions`)."""
    spec = task_spec(task)
    path = str(path)  # only named in messages
    if not isinstance(data, list):
        raise InvalidData(f"{path}: a LaMP questions file is a JSON list of questions, found {type(data).__name__}.")
    examples: list[LampExample] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        where = f"$[{index}]"
        if not isinstance(raw, dict):
            raise InvalidData(f"{path} at {where}: a question must be a JSON object, found {type(raw).__name__}.")
        for name in ("id", "input", "profile"):
            if name not in raw:
                raise InvalidData(f"{path} at {where}: the question has no '{name}' (questions need id, input, profile).")
        example_id = _identifier(raw["id"], path, f"{where}.id")
        if example_id in seen:
            raise InvalidData(f"{path} at {where}: question id {example_id!r} already appears at $[{seen[example_id]}].")
        seen[example_id] = index
        _text_field(raw["input"], path, f"{where}.input")
        if not isinstance(raw["profile"], list):
            raise InvalidData(f"{path} at {where}.profile: expected a list of profile items, found {type(raw['profile']).__name__}.")
        profile = [_profile_item(item, spec, path, f"{where}.profile[{j}]") for j, item in enumerate(raw["profile"])]
        examples.append(LampExample(example_id, raw["input"], _time_ordered(profile)))
    return examples


def read_questions(path: str | Path, task: str) -> list[LampExample]:
    """Read a LaMP ``*_questions.json`` file of ``task`` (any name :func:`task_spec` accepts).

    Checks every question has a unique ``id``, a string ``input`` and a ``profile`` list whose items carry
    ``id`` and the task's fields (strings; LaMP-3 scores 1-5, normalised to ``"1"``..``"5"``; item ids as
    strings). Extra fields are kept. Raises InvalidData naming the file and the JSON path of the problem,
    InvalidConfig for an unknown task.
    """
    task_spec(task)
    path = as_path(path, "LaMP questions file", InvalidData)
    return parse_questions(_load_json(path), task, path)


def parse_outputs(data: Any, path: str | Path = "<outputs>") -> tuple[str, dict[str, str]]:
    """Validate already-parsed JSON as a LaMP outputs (or predictions) file (see :func:`read_outputs`)."""
    path = str(path)  # only named in messages
    if not isinstance(data, dict) or "task" not in data or "golds" not in data:
        raise InvalidData(f'{path}: a LaMP outputs file is a JSON object {{"task": "LaMP_N", "golds": [...]}}.')
    try:
        spec = task_spec(data["task"]) if isinstance(data["task"], str) else None
    except InvalidConfig:
        spec = None
    if spec is None:
        raise InvalidData(f"{path} at $.task: unknown LaMP task {str(data['task'])[:40]!r}.")
    if not isinstance(data["golds"], list):
        raise InvalidData(f"{path} at $.golds: expected a list of {{id, output}} objects, found {type(data['golds']).__name__}.")
    outputs: dict[str, str] = {}
    for index, gold in enumerate(data["golds"]):
        where = f"$.golds[{index}]"
        if not isinstance(gold, dict) or "id" not in gold or "output" not in gold:
            raise InvalidData(f"{path} at {where}: expected an object with 'id' and 'output'.")
        gold_id = _identifier(gold["id"], path, f"{where}.id")
        if gold_id in outputs:
            raise InvalidData(f"{path} at {where}: id {gold_id!r} appears twice.")
        _text_field(gold["output"], path, f"{where}.output")
        outputs[gold_id] = gold["output"]
    return spec.official, outputs


def read_outputs(path: str | Path) -> tuple[str, dict[str, str]]:
    """Read a LaMP ``*_outputs.json`` (or predictions) file: ``("LaMP_3", {id: output})``.

    Raises InvalidData for a file that is not ``{"task": "LaMP_N", "golds": [{"id", "output"}]}`` with
    unique ids and string outputs.
    """
    path = as_path(path, "LaMP outputs file", InvalidData)
    return parse_outputs(_load_json(path), path)


def load_split(directory: str | Path, task: str, split: str) -> list[LampExample]:
    """Read ``{split}_questions.json`` of ``directory`` and, when present, join ``{split}_outputs.json`` by id.

    Raises InvalidData when the questions file is missing, when the outputs file names another task, or
    when the two files' ids differ.
    """
    spec = task_spec(task)
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
        raise InvalidConfig(f"A split is a plain name such as train, dev or test, not {str(split)[:40]!r}.")
    directory = as_path(directory, "LaMP data folder", InvalidData)
    questions_path, outputs_path = directory / f"{split}_questions.json", directory / f"{split}_outputs.json"
    try:
        has_questions, has_outputs = questions_path.is_file(), outputs_path.is_file()
    except OSError as error:  # a name too long
        raise InvalidData(f"Cannot read the LaMP data folder {str(directory)[:200]}: {os_error_message(error)}.") from None
    if not has_questions:
        raise InvalidData(f"{directory} has no {questions_path.name} (LaMP splits are {{split}}_questions.json files).")
    examples = read_questions(questions_path, spec.name)
    if not has_outputs:
        return examples
    official, outputs = read_outputs(outputs_path)
    if official != spec.official:
        raise InvalidData(f"{outputs_path} holds {official} outputs, but the task is {spec.name}.")
    missing = [example.id for example in examples if example.id not in outputs]
    extra = set(outputs) - {example.id for example in examples}
    if missing or extra:
        detail = f"no output for question id {missing[0]!r}" if missing else f"output id {sorted(extra)[0]!r} is not a question"
        raise InvalidData(f"{outputs_path} does not match {questions_path.name}: {detail} ({len(missing)} missing, {len(extra)} extra).")
    for example in examples:
        example.output = outputs[example.id]
    return examples


# ---------------------------------------------------------------------------------------- writing
def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, ensure_ascii=False)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_predictions(path: str | Path, task: str, predictions: dict[str, str]) -> None:
    """Write ``{"task": "LaMP_N", "golds": [{"id", "output"}]}`` (LaMP's predictions form), atomically.

    Raises InvalidData when an id or prediction is not a string.
    """
    spec = task_spec(task)
    golds = []
    for key, value in predictions.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidData(f"Predictions map string ids to string outputs; found {type(key).__name__} -> {type(value).__name__}.")
        golds.append({"id": key, "output": value})
    atomic_write_json(path, {"task": spec.official, "golds": golds})


# ---------------------------------------------------------------------------------------- texts
def _clip(text: str, max_chars: int | None) -> str:
    text = " ".join(str(text).split())
    if max_chars is not None and len(text) > max_chars:
        return text[: max(0, max_chars - 3)].rstrip() + "..."
    return text


def profile_text(task: str, item: dict, max_chars: int | None = None) -> str:
    """One profile item as text, for prompts and user embeddings (whitespace collapsed).

    LaMP-1 ``"{title}. {abstract}"``, LaMP-2 ``"{description} (tag: {tag})"``, LaMP-3 ``"{text} (rating: {score})"``,
    LaMP-4 and LaMP-5 ``"{text or abstract} (title: {title})"``, LaMP-7 ``"{text}"``. ``max_chars`` clips the
    long field (the one holding free text) so the label part always survives.
    """
    name = task_spec(task).name
    if name == "LaMP-1":
        return _clip(f"{item['title']}. {item['abstract']}", max_chars)
    suffix = {"LaMP-2": f" (tag: {item.get('tag')})", "LaMP-3": f" (rating: {item.get('score')})",
              "LaMP-4": f" (title: {item.get('title')})", "LaMP-5": f" (title: {item.get('title')})", "LaMP-7": ""}[name]  # fmt: skip
    body = {"LaMP-2": "description", "LaMP-3": "text", "LaMP-4": "text", "LaMP-5": "abstract", "LaMP-7": "text"}[name]
    budget = None if max_chars is None else max(0, max_chars - len(" ".join(suffix.split())) - 1)
    return _clip(item[body], budget) + (" " + " ".join(suffix.split()) if suffix else "")


def retrieval_text(task: str, item: dict) -> str:
    """A profile item as LaMP's BM25 corpus writes it (``LaMP/prompts/prompts.py``): the label is left out
    for classification and rating tasks (LaMP-2 description, LaMP-3 text), titles are kept for generation
    (LaMP-1 and LaMP-5 ``"{title} {abstract}"``, LaMP-4 ``"{title} {text}"``, LaMP-7 text)."""
    name = task_spec(task).name
    if name in ("LaMP-1", "LaMP-5"):
        return f"{item['title']} {item['abstract']}"
    if name == "LaMP-4":
        return f"{item['title']} {item['text']}"
    return str(item["description"] if name == "LaMP-2" else item["text"])


def query_text(task: str, example: LampExample | str) -> str:
    """The part of an input that retrieval should match, as LaMP's query makers extract it.

    LaMP-1: the two candidate titles (2nd and 3rd quoted strings); LaMP-2: after ``description:``;
    LaMP-3: after ``review:``; LaMP-4: after ``article:``; LaMP-5: after ``paper:``; LaMP-7: after the first
    colon. When the marker is absent (pmeta's Amazon-derived files use their own prompts) the text after the
    first colon is used, and the whole input when there is none.
    """
    spec = task_spec(task)
    text = example.input if isinstance(example, LampExample) else str(example)
    if spec.name == "LaMP-1":
        quoted = re.findall(r'"([^"]*)"', text)
        if len(quoted) >= 3:
            return f"{quoted[1]} {quoted[2]}"
    for marker in (spec.query_marker, ":"):
        if marker and marker in text:
            return text[text.index(marker) + len(marker) :].strip()
    return text.strip()


def truncate_profile(profile: list[dict], k: int) -> list[dict]:
    """The ``k`` most recent items, oldest first: by date when every item has an orderable date, else the last ``k``."""
    if k <= 0:
        return []
    return _time_ordered(list(profile))[-k:]

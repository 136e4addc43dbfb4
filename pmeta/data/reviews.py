"""Amazon 2014 review JSON lines turned into LaMP-format tasks, so the LaMP path runs on real data here.

Input: one JSON object per line with ``reviewerID, asin, reviewText, overall, summary, unixReviewTime``
(McAuley et al.'s 2014 dumps), as a ``.json`` file, a ``.json.gz`` or a ``.zip`` holding one such file.

Two tasks:

* ``rating`` (LaMP-3 style): input = LaMP-3's prompt around the review text, output = the stars
  ``"1"``..``"5"``; profile items ``{"id", "text", "score", "date", "asin"}``. Read it as ``LaMP-3``.
* ``title`` (LaMP-4/5 style): input = a prompt asking for the review's summary line given its text,
  output = the user's own summary; profile items ``{"id", "text", "title", "date", "asin"}``. Read it as ``LaMP-4``.

Users are split by user: the usable users' ids are sorted, permuted with ``numpy.random.default_rng(seed)``,
and the test users, then the dev users, are the first ``round(fraction · n_users)`` of that order among
users with at least ``k_max + 1`` reviews (so every cold-start user has exactly ``k_max`` profile items);
everyone else trains. For each user the **last** review by time (ties: file order) is the example and the
earlier ones are the profile, oldest first (a user's repeated reviews of one product count once, the
earliest, and an earlier review with the question's own text, which Amazon copies to a product's
variants under other ids, is left out of the profile, so a question's own review can never be in its
profile; ``meta.json`` counts both kinds of dropped reviews). Test and dev users keep only their ``k_max`` most recent
profile items (evaluation truncates further to K = 1, 3, 5; a user with such a copy has one item fewer);
train users keep up to ``max_profile``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import numbers
import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..checks import as_path, is_path_error, os_error_message, request_int
from ..errors import InvalidConfig, InvalidData
from .jsonfile import strict_loads
from .lamp import atomic_write_json, current_umask

RATING_PROMPT = (
    "What is the score of the following review on a scale of 1 to 5? "
    "just answer with 1, 2, 3, 4, or 5 without further explanation. review: {text}"
)  # LaMP-3's own wording, so LaMP's "review:" query extraction applies
TITLE_PROMPT = "Generate a title for the following product review: {text}"
TASK_NAMES = {"rating": "LaMP-3", "title": "LaMP-4"}
REQUIRED_FIELDS = ("reviewerID", "asin", "reviewText", "overall", "summary", "unixReviewTime")
GENERATOR = "pmeta data reviews-to-lamp"
LICENCE_NOTE = (
    "Derived from the Amazon product review data of McAuley et al. (2014/2015), research use; no redistribution "
    "licence is stated, so these files must not be committed or redistributed."
)


@dataclass(frozen=True)
class Review:
    user: str
    asin: str
    text: str
    stars: int
    summary: str
    time: int  # unixReviewTime, seconds
    line: int  # line number in the source, the tie-break for equal times


# ---------------------------------------------------------------------------------------- reading
def _open_lines(path: Path, stack: ExitStack) -> tuple[IO[bytes], str]:
    """A binary stream over the JSON lines of ``path`` and a name for messages (``zip!member``); the
    file, the archive and the stream are all closed by ``stack``."""
    try:
        handle = stack.enter_context(open(path, "rb"))
    except OSError as error:
        raise InvalidData(f"Cannot read {path}: {error.strerror or error}.") from None
    magic = handle.read(4)
    handle.seek(0)
    if magic.startswith(b"PK"):
        try:
            archive = stack.enter_context(zipfile.ZipFile(handle))
        except zipfile.BadZipFile:
            raise InvalidData(f"{path} starts like a zip archive but is not a readable zip file.") from None
        members = [info for info in archive.infolist() if not info.is_dir() and info.filename.lower().endswith((".json", ".jsonl"))]
        if len(members) != 1:
            names = ", ".join(info.filename for info in archive.infolist()[:5]) or "nothing"
            raise InvalidData(f"{path} should hold exactly one .json review file, but holds {names}.")
        try:
            return stack.enter_context(archive.open(members[0])), f"{path}!{members[0].filename}"
        except (RuntimeError, NotImplementedError) as error:  # encrypted, or a compression zipfile lacks
            reason = "it is encrypted (password-protected archives are not read)" if "encrypted" in str(error) else str(error).splitlines()[0][:80]
            raise InvalidData(f"{path}!{members[0].filename} cannot be read: {reason}.") from None
    if magic.startswith(b"\x1f\x8b"):
        return stack.enter_context(gzip.GzipFile(fileobj=handle)), str(path)
    return handle, str(path)


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record:
        raise InvalidData(f"{where}: missing field '{name}' (reviews need {', '.join(REQUIRED_FIELDS)}).")
    return record[name]


def _review(record: Any, where: str, number: int) -> Review:
    if not isinstance(record, dict):
        raise InvalidData(f"{where}: expected a JSON object per line, found {type(record).__name__}.")
    user, asin = _field(record, "reviewerID", where), _field(record, "asin", where)
    for name, value in (("reviewerID", user), ("asin", asin)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidData(f"{where}: '{name}' must be a non-empty string.")
    text, summary = _field(record, "reviewText", where), _field(record, "summary", where)
    for name, value in (("reviewText", text), ("summary", summary)):
        if not isinstance(value, str):
            raise InvalidData(f"{where}: '{name}' must be a string, found {type(value).__name__}.")
    stars = _field(record, "overall", where)
    if isinstance(stars, bool) or not isinstance(stars, (int, float)) or not math.isfinite(stars) or stars != int(stars) or not 1 <= stars <= 5:
        raise InvalidData(f"{where}: 'overall' must be a star rating 1-5, found {str(stars)[:20]!r}.")
    moment = _field(record, "unixReviewTime", where)
    if isinstance(moment, bool) or not isinstance(moment, int) or not 0 <= moment < 2**40:
        raise InvalidData(f"{where}: 'unixReviewTime' must be a non-negative integer (seconds), found {str(moment)[:20]!r}.")
    return Review(user.strip(), asin.strip(), text.strip(), int(stars), summary.strip(), moment, number)


def read_reviews(path: str | Path) -> list[Review]:
    """Every review of an Amazon 2014 JSON-lines file (``.json``, ``.json.gz`` or a ``.zip`` holding one).

    Raises InvalidData for a missing or unreadable file, a broken archive, a line that is not a JSON
    object, a missing field or a field of the wrong type (file and line named), and a file without reviews.
    """
    path = as_path(path, "Review file", InvalidData)
    _check_input(path)
    reviews: list[Review] = []
    with ExitStack() as stack:
        stream, name = _open_lines(path, stack)
        try:
            for number, raw in enumerate(_lines(stream, name), start=1):
                if not raw.strip():
                    continue
                where = f"{name} line {number}"
                try:
                    record = strict_loads(raw)
                except json.JSONDecodeError as error:
                    raise InvalidData(f"{where}: not a JSON object ({error.msg}); expected Amazon review JSON lines.") from None
                except RecursionError:
                    raise InvalidData(f"{where}: JSON nested too deeply.") from None
                except ValueError as error:  # a repeated key, a lone surrogate, an integer too long to convert
                    raise InvalidData(f"{where}: {error}.") from None
                reviews.append(_review(record, where, number))
        except (OSError, EOFError, zipfile.BadZipFile, gzip.BadGzipFile) as error:
            raise InvalidData(f"{name}: cannot read the compressed data ({error}).") from None
    if not reviews:
        raise InvalidData(f"{name} holds no reviews.")
    return reviews


def _check_input(path: Path) -> None:
    """Raise InvalidData, in one accurate line, unless ``path`` is an existing regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        broken = path.is_symlink()
        raise InvalidData(f"Review file not found: {path}" + (" (a symbolic link to a missing file)." if broken else ".")) from None
    except NotADirectoryError:
        raise InvalidData(f"Review file not found: {path} (a part of the path is a file, not a directory).") from None
    except OSError as error:  # no permission on a parent folder, a name too long
        raise InvalidData(f"Cannot read {str(path)[:200]}: {os_error_message(error)}.") from None
    if stat.S_ISDIR(mode):
        raise InvalidData(f"{path} is a directory, not a review file; give the .json, .json.gz or .zip file itself.")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"
        raise InvalidData(f"{path} is {kind}, not a regular review file (.json, .json.gz or .zip).")


def _lines(stream: IO[bytes], name: str) -> Iterator[str]:
    for number, raw in enumerate(stream, start=1):
        if b"\0" in raw:
            raise InvalidData(f"{name} line {number}: binary data, not JSON lines.")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidData(f"{name} line {number}: not UTF-8 text, so not Amazon review JSON lines.") from None


# ---------------------------------------------------------------------------------------- converting
def _clip(text: str, max_chars: int) -> str:
    """Collapse whitespace and cut at a word boundary to at most ``max_chars`` characters."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars // 2 else cut


def _date(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d")


def _profile_item(task: str, user: str, position: int, review: Review, max_text_chars: int) -> dict:
    item = {"id": f"{user}-{position}", "text": _clip(review.text, max_text_chars)}
    if task == "rating":
        item["score"] = str(review.stars)
    else:
        item["title"] = " ".join(review.summary.split())
    item["date"] = _date(review.time)
    item["asin"] = review.asin
    return item


def _question(task: str, user: str, reviews: list[Review], profile_cap: int, max_text_chars: int) -> tuple[dict, dict, int]:
    """The user's question (the last review), gold and profile (the earlier reviews, the most recent
    ``profile_cap``), and how many earlier reviews were dropped as copies of the question's own text
    (as the files carry it: clipped to ``max_text_chars``): Amazon copies a review to the variants of
    a product (other ids), which would put the question's text, and its gold, into its profile."""
    *history, last = reviews

    own = _clip(last.text, max_text_chars)  # the text as the files carry it: white space collapsed, clipped
    kept = [review for review in history if _clip(review.text, max_text_chars) != own]
    profile = [_profile_item(task, user, i, review, max_text_chars) for i, review in enumerate(kept)][-profile_cap:]
    text = _clip(last.text, max_text_chars)
    prompt = RATING_PROMPT if task == "rating" else TITLE_PROMPT
    output = str(last.stars) if task == "rating" else " ".join(last.summary.split())
    return {"id": user, "input": prompt.format(text=text), "profile": profile}, {"id": user, "output": output}, len(history) - len(kept)


def _usable(task: str, review: Review) -> bool:
    return bool(review.text) and (task == "rating" or bool(review.summary.strip()))


def reviews_to_lamp(
    input_path: str | Path,
    task: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    dev_fraction: float = 0.1,
    k_max: int = 5,
    min_reviews: int = 2,
    max_users: int | None = None,
    max_text_chars: int = 2000,
    max_profile: int = 100,
) -> dict:
    """Convert Amazon review JSON lines into a LaMP task directory; returns the counts (also in ``meta.json``).

    Writes ``{train,dev,test}_questions.json`` and ``{train,dev,test}_outputs.json`` in LaMP's published
    form, ``meta.json`` (counts, source, settings, licence) and a short ``README.md``. The directory is built
    beside ``out_dir`` and renamed into place, so an error leaves nothing half-written; an existing
    ``out_dir`` is replaced only when it is empty or an earlier output of this converter.

    ``min_reviews``: users with fewer usable reviews (non-empty text, and for ``title`` a non-empty
    summary) are left out. ``max_users``: keep the first N users of the seeded order (small runs).
    ``max_text_chars``: review texts are clipped at a word boundary. ``max_profile``: cap on a train
    user's profile (most recent items).

    Raises InvalidConfig for bad settings, InvalidData for malformed input or an unusable ``out_dir``.
    """
    started = time.perf_counter()
    if not isinstance(task, str) or task not in TASK_NAMES:
        raise InvalidConfig(f"Unknown review task {str(task)[:40]!r}; choose rating or title.")
    fractions = (test_fraction, dev_fraction)
    if not all(isinstance(f, numbers.Real) and not isinstance(f, (bool, np.bool_)) for f in fractions):
        raise InvalidConfig("test_fraction and dev_fraction must be numbers in [0, 1).")
    test_fraction, dev_fraction = float(test_fraction), float(dev_fraction)
    if not (0 <= test_fraction < 1 and 0 <= dev_fraction < 1 and test_fraction + dev_fraction < 1):
        raise InvalidConfig("test_fraction and dev_fraction must be in [0, 1) and sum to less than 1.")
    # whole numbers (numpy ones too) as Python ints: they go into meta.json
    seed = request_int(seed, "seed", 0, error=InvalidConfig)
    k_max, max_profile = request_int(k_max, "k_max", 1, error=InvalidConfig), request_int(max_profile, "max_profile", 1, error=InvalidConfig)
    min_reviews, max_text_chars = request_int(min_reviews, "min_reviews", 2, error=InvalidConfig), request_int(max_text_chars, "max_text_chars", 20, error=InvalidConfig)
    max_users = None if max_users is None else request_int(max_users, "max_users", 1, error=InvalidConfig)
    out_dir = as_path(out_dir, "out_dir", InvalidData)
    input_path = as_path(input_path, "Review file", InvalidData)
    _check_out_dir(out_dir)

    reviews = read_reviews(input_path)
    by_user: dict[str, list[Review]] = {}
    dropped = 0
    for review in reviews:
        if _usable(task, review):
            by_user.setdefault(review.user, []).append(review)
        else:
            dropped += 1
    repeated = 0
    for user, history in by_user.items():
        history.sort(key=lambda r: (r.time, r.line))
        # one review per product and user (the earliest): a repeated review would put a question's
        # own text and gold into its profile
        first: dict[str, Review] = {}
        for review in history:
            first.setdefault(review.asin, review)
        repeated += len(history) - len(first)
        by_user[user] = list(first.values())  # still in time order
    eligible = sorted(user for user, history in by_user.items() if len(history) >= min_reviews)
    if not eligible:
        raise InvalidData(f"{input_path}: no user has {min_reviews} or more usable reviews.")
    order = [eligible[i] for i in np.random.default_rng(seed).permutation(len(eligible))]
    if max_users is not None:
        order = order[:max_users]
    n_test, n_dev = round(test_fraction * len(order)), round(dev_fraction * len(order))
    cold_candidates = [user for user in order if len(by_user[user]) >= k_max + 1]
    test_users = cold_candidates[:n_test]
    dev_users = cold_candidates[n_test : n_test + n_dev]
    held = set(test_users) | set(dev_users)
    splits = {"train": [user for user in order if user not in held], "dev": dev_users, "test": test_users}

    files: dict[str, Any] = {}
    counts: dict[str, Any] = {"task": task, "lamp_task": TASK_NAMES[task], "reviews_read": len(reviews), "reviews_unusable": dropped,
                              "reviews_repeated": repeated, "reviews_copying_the_question": 0, "splits": {}}  # fmt: skip
    official = TASK_NAMES[task].replace("-", "_")
    for split, users in splits.items():
        cap = max_profile if split == "train" else k_max
        questions, golds = [], []
        for user in sorted(users):
            question, gold, copies = _question(task, user, by_user[user], cap, max_text_chars)
            counts["reviews_copying_the_question"] += copies
            questions.append(question)
            golds.append(gold)
        files[f"{split}_questions.json"] = questions
        files[f"{split}_outputs.json"] = {"task": official, "golds": golds}
        sizes = [len(q["profile"]) for q in questions]
        counts["splits"][split] = {
            "users": len(users),
            "profile_items": int(sum(sizes)),
            "avg_profile": round(float(np.mean(sizes)), 3) if sizes else 0.0,
            "min_profile": int(min(sizes)) if sizes else 0,
            "max_profile": int(max(sizes)) if sizes else 0,
        }
    counts["users"] = sum(len(users) for users in splits.values())
    meta = {
        "generator": GENERATOR,
        "source": {"file": input_path.name, "sha256": _sha256(input_path)},
        "settings": {"task": task, "seed": seed, "test_fraction": test_fraction, "dev_fraction": dev_fraction, "k_max": k_max,
                     "min_reviews": min_reviews, "max_users": max_users, "max_text_chars": max_text_chars, "max_profile": max_profile},  # fmt: skip
        "counts": counts,
        "licence": LICENCE_NOTE,
    }
    _publish(out_dir, files, meta)
    counts["seconds"] = round(time.perf_counter() - started, 3)
    return counts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:  # removed or made unreadable while it was being converted
        raise InvalidData(f"Cannot read {path}: {error.strerror or error}.") from None
    return digest.hexdigest()


#: Every file the converter writes; a folder holding anything else is never replaced.
OUTPUT_FILES = frozenset(
    [f"{split}_{kind}.json" for split in ("train", "dev", "test") for kind in ("questions", "outputs")] + ["meta.json", "README.md"]
)


def _is_previous_output(out_dir: Path) -> bool:
    """True when ``out_dir`` holds only this converter's files (so replacing it loses nothing else)."""
    try:
        if any(entry.name not in OUTPUT_FILES or not entry.is_file() for entry in out_dir.iterdir()):
            return False
        return json.loads((out_dir / "meta.json").read_text("utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir: Path) -> None:
    try:
        exists, is_dir = out_dir.exists(), out_dir.is_dir()
        filled = is_dir and any(out_dir.iterdir())
    except OSError as error:  # a name too long, no permission to list it
        raise InvalidData(f"Cannot use {str(out_dir)[:200]} as the output folder: {os_error_message(error)}.") from None
    if exists:
        if not is_dir:
            raise InvalidData(f"{out_dir} exists and is not a directory.")
        if filled and not _is_previous_output(out_dir):
            raise InvalidData(
                f"{out_dir} is not empty and is not an earlier reviews-to-lamp output (or holds other files too); choose another --out."
            )


def _readme(meta: dict) -> str:
    counts, settings = meta["counts"], meta["settings"]
    rows = "\n".join(f"| {split} | {c['users']} | {c['avg_profile']} |" for split, c in counts["splits"].items())
    return (
        f"# {settings['task']} task in LaMP format ({counts['lamp_task']} style)\n\n"
        f"Made by `{GENERATOR}` from `{meta['source']['file']}` (sha256 {meta['source']['sha256']}).\n"
        f"Read it with `pmeta.data.lamp.load_split(DIR, \"{counts['lamp_task']}\", split)`.\n\n"
        f"| split | users | avg profile items |\n|---|---|---|\n{rows}\n\n"
        f"Test and dev users keep their {settings['k_max']} most recent profile items (cold start).\n\n"
        f"Licence: {meta['licence']}\n"
    )


def _publish(out_dir: Path, files: dict[str, Any], meta: dict) -> None:
    """Write every file into a private folder beside ``out_dir``, then rename it into place."""
    try:
        parent = out_dir.resolve().parent
    except (OSError, RuntimeError) as error:  # RuntimeError: a loop of symbolic links (Python 3.11)
        raise InvalidData(f"Cannot use {str(out_dir)[:200]} as the output folder: {os_error_message(error) if isinstance(error, OSError) else error}.") from None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as error:
        if not is_path_error(error):
            raise  # a full disk, an I/O error: the machine's state, not bad input
        raise InvalidData(f"Cannot write {str(out_dir)[:200]}: {os_error_message(error)}.") from None
    os.chmod(staging, 0o777 & ~current_umask())
    old: Path | None = None
    try:
        for name, data in files.items():
            atomic_write_json(staging / name, data)
        atomic_write_json(staging / "meta.json", meta)
        (staging / "README.md").write_text(_readme(meta), encoding="utf-8")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
    except BaseException:
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

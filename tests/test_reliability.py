"""Robustness and integrity of pmeta as a whole (issue 5).

* bad input: every case of the issue's list through the CLI: one line on stderr, exit code 2, no
  traceback, nothing written;
* crash safety: ``pmeta bank build`` killed with SIGKILL at seeded random moments,
  including the publishing steps (10 kills by default, 20 with PMETA_TEST_KILLS=20); after every
  kill the active version opens and verifies;
* corruption: a flipped byte at seeded offsets of every bank file is detected and named;
* concurrency: 8 threads x 100 ``personalize`` calls equal the serial results bitwise; reader
  processes keep working while a build publishes; a second concurrent build gets ``BankBusy``;
* determinism: the same data, seed and config give bitwise-identical bank tensors;
* safety: no pickle, ``torch.load`` only with ``weights_only=True``.

The builds use a "micro" config (2 anchors, a handful of steps) on the first 80 users of the
shipped ml-latest-small sample (with its whole catalogue, whose embeddings are cached), so that a
build takes seconds.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pmeta import Bank, build_bank, load_config
from pmeta.data import read_movielens
from pmeta.data.sample import SAMPLE_DIR
from pmeta.errors import BankIntegrityError, PmetaError
from pmeta.storage import BankStore

REPO = Path(__file__).resolve().parents[1]
MICRO_TOML = """\
[bank]
validate_stages = false
early_stopping = false
anchors = 2
prompt_length = 4
tower_steps = 5
tower_rounds = 1
tower_batch_users = 16
meta_batch_users = 4
global_steps = 2
anchor_steps = 1
stack_steps = 1
"""
MICRO_USERS = 80
# SIGKILLs of the kill campaign: 10 in the default suite (CI), 20 for the full campaign
# (`PMETA_TEST_KILLS=20 python -m pytest tests/test_reliability.py -k "kill_9 or concurrent or readers"`).
KILLS = int(os.environ.get("PMETA_TEST_KILLS", "10"))
# how the kills are spread over the moments they hit, per 20 kills
PHASE_SHARES = {"anytime": 7, "training": 4, "writing": 3, "manifest": 3, "renamed": 3}


def kill_phases(kills: int) -> list[str]:
    """``kills`` moments (9 at least) in PHASE_SHARES's proportions, each publishing moment at least twice (so
    10 kills: 2 of each; 20: exactly PHASE_SHARES); "anytime" takes what is left, at least once."""
    counts = {phase: max(2, round(share * kills / 20)) for phase, share in PHASE_SHARES.items() if phase != "anytime"}
    counts["anytime"] = max(1, kills - sum(counts.values()))
    return [phase for phase in PHASE_SHARES for _ in range(counts[phase])]


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "PMETA_PROGRESS": "0"}
# The kill campaign runs the real CLI with fsync slowed to 30 ms (a slow disk), which widens the
# publishing steps enough for the test to see each of them and kill the build right there.
SLOW_FSYNC_CLI = (
    "import os, sys, time\n"
    "_fsync = os.fsync\n"
    "os.fsync = lambda fd: (time.sleep(0.03), _fsync(fd))[1]\n"
    "from pmeta.cli import app\n"
    "sys.argv[0] = 'pmeta'\n"
    "app()\n"
)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A MovieLens directory with the sample's first users and whole catalogue, and the config."""
    root = tmp_path_factory.mktemp("micro")
    data = root / "ml"
    data.mkdir()
    shutil.copy(SAMPLE_DIR / "movies.csv", data / "movies.csv")
    with open(SAMPLE_DIR / "ratings.csv", encoding="utf-8") as source, open(data / "ratings.csv", "w", encoding="utf-8") as target:
        for number, line in enumerate(source):
            if number == 0 or int(line.split(",", 1)[0]) <= MICRO_USERS:
                target.write(line)
    config = root / "micro.toml"
    config.write_text(MICRO_TOML)
    return {"data": data, "config": config, "root": root}


@pytest.fixture(scope="module")
def micro_bank(micro) -> Path:
    """Built in this process with the thread count the CLI builds use (``--threads 2``): bitwise
    determinism holds for a given thread count, and other test modules change torch's."""
    path = micro["root"] / "bank"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_bank(read_movielens(micro["data"]), path, load_config("default", micro["config"]))
    finally:
        torch.set_num_threads(threads)
    return path


def cli(*args: str):
    from pmeta.cli import app

    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, fragment: str | None = None) -> str:
    """Exit code 2, exactly one non-empty line on stderr, no traceback, no escaped exception."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if fragment is not None:
        assert fragment.lower() in lines[0].lower(), lines[0]
    return lines[0]


def tree_state(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime (empty when ``path`` does not exist)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- bad input: adapt
def _write(content: bytes | str):
    def make(directory: Path) -> Path:
        path = directory / "h.json"
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    return make


def _many_items(count: int, pad: int = 0):
    def make(directory: Path) -> Path:
        path = directory / "h.json"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write('{"user_id": "u", "items": [')
            handle.write(",".join(f'{{"item_id": "{i}"{" " * pad}}}' for i in range(count)))
            handle.write("]}")
        return path

    return make


def _history(user_id: object = "u", items: object = None):
    return _write(json.dumps({"user_id": user_id, "items": [{"item_id": "1", "rating": 5}] if items is None else items}))


def _random_bytes(directory: Path) -> Path:
    path = directory / "h.json"
    path.write_bytes(random.Random(5).randbytes(4096))
    return path


BAD_HISTORIES = {
    # id: (how to make the --history path, extra CLI args, a fragment the error line must hold)
    "missing-file": (lambda d: d / "nope.json", [], "not found"),
    "directory": (lambda d: d, [], "not a regular file"),
    "empty-file": (_write(""), [], "empty"),
    "truncated-json": (_write('{"user_id": "u", "items": [{"item_id": "1", "rat'), [], "invalid JSON at line 1"),
    "top-level-array": (_write('[{"item_id": "1"}]'), [], "must be a JSON object"),
    "top-level-string": (_write('"u123"'), [], "must be a JSON object"),
    "top-level-null": (_write("null"), [], "must be a JSON object"),
    "items-not-a-list": (_history(items={"item_id": "1"}), [], "items: must be an array"),
    "user-id-number": (_history(user_id=42), [], "user_id: must be a string"),
    "rating-string": (_history(items=[{"item_id": "1", "rating": "five"}]), [], "items[0].rating"),
    "timestamp-string": (_history(items=[{"item_id": "1", "timestamp": "yesterday"}]), [], "items[0].timestamp"),
    "item-id-list": (_history(items=[{"item_id": [1]}]), [], "items[0].item_id"),
    "unknown-field": (_history(items=[{"item_id": "1", "colour": "red"}]), [], "unknown field"),
    "rating-nan": (_write('{"user_id": "u", "items": [{"item_id": "1", "rating": NaN}]}'), [], "finite"),
    "rating-infinity": (_write('{"user_id": "u", "items": [{"item_id": "1", "rating": Infinity}]}'), [], "finite"),
    "rating-minus-infinity": (_write('{"user_id": "u", "items": [{"item_id": "1", "rating": -Infinity}]}'), [], "finite"),
    "rating-1e999": (_write('{"user_id": "u", "items": [{"item_id": "1", "rating": 1e999}]}'), [], "finite"),
    "rating-too-high": (_history(items=[{"item_id": "1", "rating": 6}]), [], "0 to 5"),
    "rating-negative": (_history(items=[{"item_id": "1", "rating": -1}]), [], "0 to 5"),
    "unknown-ids": (_history(items=[{"item_id": f"nope-{i}"} for i in range(7)]), [], "'nope-0', 'nope-1'"),
    "duplicate-items": (_history(items=[{"item_id": "1"}, {"item_id": "2"}, {"item_id": "1"}]), [], "appears twice"),
    "latin-1": (_write('{"user_id": "café"}'.encode("latin-1")), [], "not UTF-8"),
    "utf-16": (_write('{"user_id": "u"}'.encode("utf-16")), [], "not UTF-8"),
    "binary-png": (_write(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))), [], "not UTF-8"),
    "random-bytes": (_random_bytes, [], "h.json"),
    "nul-bytes": (_write(b'{"user_id": "u"\x00\x00}'), [], "invalid JSON"),
    "deeply-nested": (_write("[" * 200_000), [], "h.json"),
    "huge-integer": (_write('{"user_id": "u", "items": [{"item_id": ' + "9" * 5000 + "}]}"), [], "invalid JSON"),
    "two-million-items": (_many_items(2_000_000), [], "limit of 10485760 bytes"),
    "over-item-limit": (_many_items(10_001), [], "limit of 10000"),
    "user-id-path": (_history(user_id="../../etc/passwd"), [], "must not be a path"),
    "user-id-backslash": (_history(user_id="..\\..\\x"), [], "must not be a path"),
    "user-id-control": (_history(user_id="a\u0000b\u001b[31m"), [], "control characters"),
    "user-id-newline": (_history(user_id="a\nb"), [], "control characters"),
    "user-id-empty": (_history(user_id=""), [], "1 to 128"),
    "user-id-blank": (_history(user_id="   "), [], "must not be blank"),
    "user-id-bidi-override": (_history(user_id="u\u202eevil"), [], "invisible format characters"),
    "user-id-zero-width": (_history(user_id="u\u200bv"), [], "invisible format characters"),
    "user-id-huge": (_history(user_id="x" * 100_000), [], "1 to 128"),
    "user-option-path": (_history(), ["--user", "../x"], "must not be a path"),
    "user-option-control": (_history(), ["--user", "a\rb"], "control characters"),
    "top-zero": (_history(), ["--top", "0"], "--top"),
    "steps-not-a-number": (_history(), ["--steps", "two"], "--steps"),
    "steps-too-many": (_history(), ["--steps", "1000000000"], "less than or equal to 50"),
}


@pytest.mark.parametrize("case", list(BAD_HISTORIES))
def test_bad_histories_give_one_line_and_exit_2(micro_bank, tmp_path, case):
    make, extra, fragment = BAD_HISTORIES[case]
    history = make(tmp_path)
    before = tree_state(micro_bank)
    result = cli("adapt", "--bank", str(micro_bank), "--history", str(history), *extra)
    line = assert_one_line_error(result, fragment)
    assert len(line) < 400, line
    assert tree_state(micro_bank) == before  # nothing written into the bank


def test_valid_edge_cases_work(micro_bank, tmp_path):
    empty = _history(items=[])(tmp_path)  # the zero-history prior
    result = cli("adapt", "--bank", str(micro_bank), "--history", str(empty), "--json", "--top", "3")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["anchors"] == [] and len(json.loads(result.stdout)["recommendations"]) == 3
    unknown = _history(items=[{"item_id": "nope"}, {"item_id": "1", "rating": 5}])(tmp_path)
    result = cli("adapt", "--bank", str(micro_bank), "--history", str(unknown), "--ignore-unknown", "--json")
    assert result.exit_code == 0, result.stderr


# --------------------------------------------------------------------- bad input: build, bank, db
def _data_dir(files: dict[str, bytes | str]):
    def make(directory: Path) -> Path:
        data = directory / "data"
        data.mkdir()
        for name, content in files.items():
            (data / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return data

    return make


def _config(content: bytes | str):
    def make(directory: Path) -> Path:
        path = directory / "bank.toml"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return make


MOVIES = "movieId,title,genres\n1,Toy Story (1995),Animation\n2,Jumanji (1995),Adventure\n"
BAD_BUILDS = {
    # id: (function of tmp_path -> CLI args after "bank build --out OUT", fragment)
    "data-missing": (lambda d: ["--data", str(d / "nope")], "not found"),
    "data-is-a-file": (lambda d: ["--data", str(_config("x")(d))], "MovieLens"),
    "data-empty-dir": (lambda d: ["--data", str(_data_dir({})(d))], "no MovieLens files"),
    "data-truncated-ratings": (lambda d: ["--data", str(_data_dir({"movies.csv": MOVIES, "ratings.csv": "userId,movieId,rating,timestamp\n1,1,5.0,1\n1,2"})(d))], "line 3"),
    "data-nan-rating": (lambda d: ["--data", str(_data_dir({"movies.csv": MOVIES, "ratings.csv": "userId,movieId,rating,timestamp\n1,1,nan,1\n"})(d))], "not a finite number"),
    "data-binary": (lambda d: ["--data", str(_data_dir({"movies.csv": MOVIES, "ratings.csv": b"\x00\x01\x02" * 100})(d))], "binary"),
    "data-latin-1": (lambda d: ["--data", str(_data_dir({"movies.csv": "movieId,title,genres\n1,Caf\xe9 (1995),Drama\n".encode("latin-1"), "ratings.csv": "userId,movieId,rating,timestamp\n1,1,5,1\n"})(d))], "UTF-8"),
    "data-no-ratings": (lambda d: ["--data", str(_data_dir({"movies.csv": MOVIES, "ratings.csv": "userId,movieId,rating,timestamp\n"})(d))], "no ratings"),
    "data-negative-rating": (lambda d: ["--data", str(_data_dir({"movies.csv": MOVIES, "ratings.csv": "userId,movieId,rating,timestamp\n1,1,5,1\n1,2,-3,2\n"})(d))], "line 3: the rating '-3' is out of range"),
    # fails inside the build, after the bank folder was created: the folder goes too
    "data-one-user": (lambda d: ["--data", str(_data_dir({"movies.csv": MOVIES, "ratings.csv": "userId,movieId,rating,timestamp\n1,1,5,1\n1,2,5,2\n"})(d))], "it needs at least 2"),
    "task-without-lamp": (lambda d: ["--task", "LaMP-3"], "--task applies to text banks"),
    "lm-without-lamp": (lambda d: ["--lm", "gpt2"], "--lm applies to text banks"),
    "format-unknown": (lambda d: ["--data", str(_data_dir({"movies.csv": MOVIES, "ratings.csv": "userId,movieId,rating,timestamp\n1,1,5,1\n"})(d)), "--format", "ml-99"], "format"),
    "format-without-data": (lambda d: ["--format", "ml-100k"], "needs --data"),
    "format-unknown-without-data": (lambda d: ["--format", "ml-99"], "format"),
    "config-missing": (lambda d: ["--config", str(d / "nope.toml")], "not found"),
    "config-directory": (lambda d: ["--config", str(d)], "config"),
    "config-invalid-toml": (lambda d: ["--config", str(_config("[bank\nanchors = 3")(d))], "cannot read config"),
    "config-not-utf8": (lambda d: ["--config", str(_config(b"anchors = 3 # \xff\xfe")(d))], "cannot read config"),
    "config-unknown-key": (lambda d: ["--config", str(_config("[bank]\nanchor = 3\n")(d))], "anchor"),
    "config-wrong-type": (lambda d: ["--config", str(_config('[bank]\nanchors = "many"\n')(d))], "anchors"),
    "config-nan": (lambda d: ["--config", str(_config("[bank]\ntemperature = nan\n")(d))], "temperature"),
    "config-inf": (lambda d: ["--config", str(_config("[bank]\ninner_lr = inf\n")(d))], "inner_lr"),
    "config-bank-not-a-table": (lambda d: ["--config", str(_config("bank = 3\n")(d))], "bank"),
    "config-out-of-range": (lambda d: ["--config", str(_config("[bank]\nanchors = 0\n")(d))], "anchors"),
    "config-support-above-positives": (lambda d: ["--config", str(_config("[bank]\nsupport_min = 3\n")(d))], "min_positives must be >= support_min + 1"),
    "config-support-max-below-min": (lambda d: ["--config", str(_config("[bank]\nsupport_min = 3\nsupport_max = 2\nmin_positives = 4\n")(d))], "support_max must be >= support_min"),
    "config-one-crossfit-fold": (lambda d: ["--config", str(_config("[bank]\ncrossfit_folds = 1\n")(d))], "crossfit_folds must be 0 (off) or at least 2"),
    "option-out-of-range": (lambda d: ["--anchors", "-1"], "anchors"),
    "preset-unknown": (lambda d: ["--preset", "huge"], "preset"),
    "option-not-a-number": (lambda d: ["--anchors", "abc"], "--anchors"),
    "option-below-parser-range": (lambda d: ["--seed", "-1"], "--seed"),
    "option-misspelt": (lambda d: ["--anchor", "3"], "no such option"),
    "db-not-a-url": (lambda d: ["--db", "not a url"], "database URL"),
    "db-unknown-driver": (lambda d: ["--db", "nosuchdb://u@localhost/x"], "database URL"),
    "db-unreachable": (lambda d: ["--db", "postgresql+psycopg://u@127.0.0.1:1/x"], "cannot reach"),
}


@pytest.mark.parametrize("case", list(BAD_BUILDS))
def test_bad_build_inputs_give_one_line_and_write_nothing(tmp_path, case):
    args, fragment = BAD_BUILDS[case]
    out = tmp_path / "out-bank"
    result = cli("bank", "build", "--out", str(out), "--quiet", *args(tmp_path))
    assert_one_line_error(result, fragment)
    assert not out.exists()  # nothing created, not even an empty directory


def test_build_outputs_that_cannot_be_used(tmp_path, micro_bank):
    missing_parent = tmp_path / "no" / "such" / "dir" / "bank"
    assert_one_line_error(cli("bank", "build", "--out", str(missing_parent), "--quiet"), "does not exist")
    assert not (tmp_path / "no").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_one_line_error(cli("bank", "build", "--out", str(a_file), "--quiet"), "not a directory")
    assert_one_line_error(cli("bank", "build", "--out", str(a_file / "bank"), "--quiet"), f"{a_file} is not a directory")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert_one_line_error(cli("bank", "build", "--out", str(tmp_path / "mine"), "--quiet"), "refusing")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def _garbage_db(directory: Path) -> Path:
    bank = directory / "garbage"
    bank.mkdir()
    (bank / "bank.db").write_bytes(random.Random(1).randbytes(8192))
    return bank


BAD_BANKS = {
    "missing": (lambda d: d / "nope", "not a pmeta bank"),
    "a-file": (lambda d: _config("x")(d), "not a directory"),
    "empty-dir": (lambda d: d, "no bank.db"),
    "garbage-db": (_garbage_db, "bank.db"),
}


@pytest.mark.parametrize("command", ["adapt", "info", "verify"])
@pytest.mark.parametrize("case", list(BAD_BANKS))
def test_bad_banks_give_one_line(tmp_path, case, command):
    make, fragment = BAD_BANKS[case]
    directory = tmp_path / "d"
    directory.mkdir()
    bank = make(directory)
    before = tree_state(tmp_path)
    if command == "adapt":
        history = tmp_path / "h.json"
        history.write_text('{"user_id": "u"}')
        before = tree_state(tmp_path)
        result = cli("adapt", "--bank", str(bank), "--history", str(history))
    else:
        result = cli("bank", command, str(bank))
    assert_one_line_error(result, fragment)
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("url, fragment", [("not a url", "database URL"), ("postgresql+psycopg://u@127.0.0.1:1/x", "cannot reach")])
def test_bad_db_urls_for_readers(micro_bank, url, fragment):
    assert_one_line_error(cli("bank", "info", str(micro_bank), "--db", url), fragment)
    assert_one_line_error(cli("bank", "verify", str(micro_bank), "--db", url), fragment)


# ------------------------------------------------------------------------------------- corruption
def flip(path: Path, offset: int) -> None:
    mode = path.stat().st_mode
    path.chmod(0o644)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x10]))
    path.chmod(mode)


def test_a_flipped_byte_in_any_bank_file_is_detected(micro_bank, tmp_path):
    """Every file of the version folder (manifest included), at 6 seeded offsets each (first and
    last byte among them): Bank.open raises BankIntegrityError naming the file, and the CLI
    prints one line naming it and exits 2. Flipping the byte back makes the bank whole again."""
    bank = tmp_path / "bank"
    shutil.copytree(micro_bank, bank)
    version = BankStore(bank).open().id
    folder = bank / "versions" / version
    names = sorted(p.name for p in folder.iterdir())
    assert {"manifest.json", "tensors.safetensors", "anchors.faiss", "catalog.json", "build.json"} <= set(names)
    history = tmp_path / "h.json"
    history.write_text('{"user_id": "u", "items": [{"item_id": "1", "rating": 5}]}')
    rng = random.Random(42)
    detected = tried = 0
    for name in names:
        size = (folder / name).stat().st_size
        offsets = sorted({0, size - 1, *(rng.randrange(size) for _ in range(4))})
        for number, offset in enumerate(offsets):
            flip(folder / name, offset)
            tried += 1
            with pytest.raises(BankIntegrityError, match=re.escape(f"versions/{version}/{name}")):
                Bank.open(bank)
            if number == 0:  # the CLI, once per file
                assert_one_line_error(cli("bank", "verify", str(bank)), f"{version}/{name}")
                assert_one_line_error(cli("adapt", "--bank", str(bank), "--history", str(history)), f"{version}/{name}")
            detected += 1
            flip(folder / name, offset)
    assert detected == tried >= 6 * 5
    assert BankStore(bank).verify()["ok"]
    Bank.open(bank)
    print(f"\n[reliability] version files: {detected}/{tried} single-byte corruptions detected")


def test_a_flipped_byte_in_the_database_is_detected_or_harmless(micro_bank, tmp_path):
    """bank.db at 40 seeded offsets: opening either raises a typed error (corrupt page, record
    checksum, active pointer, ...) or gives the very same record (a byte SQLite does not use)."""
    bank = tmp_path / "bank"
    shutil.copytree(micro_bank, bank)
    with BankStore(bank) as store:
        expected = store.open().record
    db = bank / "bank.db"
    rng = random.Random(7)
    size = db.stat().st_size
    offsets = sorted({*range(16, 100, 12), *(rng.randrange(100, size) for _ in range(33))})
    outcomes = {"detected": 0, "harmless": 0}
    for offset in offsets:
        original = db.read_bytes()
        flip(db, offset)
        try:
            with BankStore(bank) as store:
                record = store.open().record
        except PmetaError as error:
            assert "\n" not in str(error)
            outcomes["detected"] += 1
            result = cli("bank", "verify", str(bank))
            assert_one_line_error(result)
        else:
            assert record == expected, f"byte {offset} of bank.db changed the record silently"
            outcomes["harmless"] += 1
        db.write_bytes(original)
    assert outcomes["detected"] >= 1
    assert BankStore(bank).verify()["ok"]
    print(f"\n[reliability] bank.db: {len(offsets)} flipped bytes, {outcomes}")


def test_the_record_checksum_catches_a_changed_row(micro_bank, tmp_path):
    import sqlite3

    bank = tmp_path / "bank"
    shutil.copytree(micro_bank, bank)
    connection = sqlite3.connect(bank / "bank.db")
    connection.execute("UPDATE held_out_users SET user_id = user_id || 'x' WHERE rowid = (SELECT min(rowid) FROM held_out_users)")
    connection.commit()
    connection.close()
    with pytest.raises(BankIntegrityError, match="bank.db: the record of version .* does not match its checksum"):
        Bank.open(bank)
    assert_one_line_error(cli("bank", "verify", str(bank)), "does not match its checksum")


# ------------------------------------------------------------------------------------- concurrency
def test_8_threads_x_100_personalize_calls_equal_the_serial_run(micro_bank, run_threads):
    bank = Bank.open(micro_bank)
    catalog = bank.catalog.item_ids
    rng = random.Random(3)
    histories = []
    for user in range(25):
        items = rng.sample(catalog[:400], rng.randint(0, 4))
        histories.append({"user_id": f"u{user}", "items": [{"item_id": i, "rating": rng.choice([3, 4, 5])} for i in items]})
    serial = [bank.personalize(h) for h in histories]

    mismatches: list[str] = []
    calls = [0] * 8

    def worker(thread: int) -> None:
        for call in range(100):
            index = (thread * 7 + call) % len(histories)
            got = bank.personalize(histories[index])
            want = serial[index]
            same = np.array_equal(got.scores, want.scores) and got.anchors == want.anchors
            same = same and got.adapter.keys() == want.adapter.keys() and all(torch.equal(got.adapter[k], want.adapter[k]) for k in want.adapter)
            if not same:
                mismatches.append(f"thread {thread} call {call} user {index}")
            calls[thread] += 1

    run_threads(worker, 8)
    assert sum(calls) == 800 and not mismatches, mismatches[:5]


READER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from pmeta import Bank
    bank_path, stop_file = sys.argv[1], sys.argv[2]
    history = {"user_id": "r", "items": [{"item_id": "1", "rating": 5}, {"item_id": "50", "rating": 4}]}
    rounds = 0
    while True:
        stopping = __import__("os").path.exists(stop_file)
        try:
            bank = Bank.open(bank_path)
            top = bank.personalize(history).rank(3)
            print(json.dumps({"version": bank.version, "ok": len(top) == 3}), flush=True)
        except BaseException as error:
            print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        rounds += 1
        if stopping:
            break
    """
)


def _versions_dir_state(bank: Path) -> tuple[set[str], set[str]]:
    names = {p.name for p in (bank / "versions").iterdir()} if (bank / "versions").exists() else set()
    return {n for n in names if n.startswith(".tmp-")}, {n for n in names if not n.startswith(".tmp-")}


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300.0, poll: float = 0.002) -> bool:
    """Poll ``predicate`` until it holds (True) or the process ends / the timeout passes (False)."""
    def holds() -> bool:
        try:
            return bool(predicate())
        except OSError:  # a folder renamed or removed while we looked
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holds():
            return True
        if process.poll() is not None:
            return holds()
        time.sleep(poll)
    return False


def _cli_build(bank: Path, micro, *extra: str) -> subprocess.Popen:
    args = ["bank", "build", "--data", str(micro["data"]), "--config", str(micro["config"]), "--out", str(bank), "--quiet", *extra]
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_FSYNC_CLI, "--threads", "2", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )


@pytest.fixture(scope="module")
def campaign(micro, micro_bank, tmp_path_factory):
    """Kill ``pmeta bank build`` >= KILLS times at seeded moments, then build once more while reader
    processes open and personalize, and a second build tries to start. Returns what happened."""
    bank = tmp_path_factory.mktemp("campaign") / "bank"
    shutil.copytree(micro_bank, bank)
    first = BankStore(bank).open().id
    rng = random.Random(20261124)
    phases = kill_phases(KILLS)
    rng.shuffle(phases)
    log: list[dict] = []
    active = first
    kills = 0
    attempt = 0
    while kills < KILLS and attempt < KILLS * 2:
        phase = phases[attempt % len(phases)]
        attempt += 1
        tmp_before, done_before = _versions_dir_state(bank)
        process = _cli_build(bank, micro)
        try:
            if phase == "anytime":
                time.sleep(rng.uniform(0.0, 8.0))
            elif phase == "training":
                _wait_for(lambda: bool(_versions_dir_state(bank)[0] - tmp_before), process, poll=0.02)
                time.sleep(rng.uniform(0.0, 2.0))
            elif phase == "writing":
                _wait_for(lambda: any(any(p.iterdir()) for p in (bank / "versions").glob(".tmp-*") if p.name not in tmp_before and p.is_dir()), process)
                time.sleep(rng.uniform(0.0, 0.1))
            elif phase == "manifest":
                _wait_for(lambda: any((p / "manifest.json").exists() for p in (bank / "versions").glob(".tmp-*") if p.name not in tmp_before), process)
            elif phase == "renamed":
                _wait_for(lambda: bool(_versions_dir_state(bank)[1] - done_before), process)
            finished = process.poll() is not None
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            stdout, stderr = process.communicate()
        killed = process.returncode == -signal.SIGKILL and not finished
        assert killed or process.returncode == 0, stderr[-2000:]
        kills += killed
        with BankStore(bank) as store:
            reader = store.open()  # verifies every file
            new_versions = [v["id"] for v in store.versions() if v["id"] not in (active,) and v["id"] > active]
            assert reader.id == active or reader.id in new_versions, (reader.id, active)
            assert store.verify()["ok"]
            info = store.info()
        Bank.open(bank)  # the serving object opens too
        log.append({"phase": phase, "killed": killed, "active_before": active, "active_after": reader.id,
                    "tmp_dirs": info["tmp_dirs"], "orphans": info["orphans"]})
        active = reader.id

    # One more build, to completion, with two reader processes and a competing build.
    stop = bank.parent / "stop"
    readers = [
        subprocess.Popen([sys.executable, "-c", READER, str(bank), str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(2)
    ]
    for reader in readers:  # wait until each reader has opened the bank once
        line = reader.stdout.readline()
        assert line, reader.stderr.read()
        reader.first_line = line
    before_final = active
    tmp_before, _ = _versions_dir_state(bank)  # leftovers of killed builds do not count: wait for this build's own folder
    final = _cli_build(bank, micro)
    assert _wait_for(lambda: bool(_versions_dir_state(bank)[0] - tmp_before), final, poll=0.02)
    rival = subprocess.run([sys.executable, "-m", "pmeta", "bank", "build", "--data", str(micro["data"]), "--config", str(micro["config"]), "--out", str(bank), "--quiet"],
                           capture_output=True, text=True, env=ENV, timeout=300)
    final_out, final_err = final.communicate(timeout=600)
    stop.write_text("stop")
    reader_lines = []
    for reader in readers:
        out, err = reader.communicate(timeout=300)
        reader_lines += [json.loads(line) for line in [reader.first_line, *out.splitlines()] if line.strip()]
        assert reader.returncode == 0, err[-2000:]
    return {
        "bank": bank, "first": first, "log": log, "kills": kills, "before_final": before_final,
        "final": final, "final_out": final_out, "final_err": final_err, "rival": rival, "readers": reader_lines,
    }


def test_kill_9_at_random_moments_never_breaks_the_bank(campaign):
    log = campaign["log"]
    assert campaign["kills"] >= KILLS
    killed_phases = {entry["phase"] for entry in log if entry["killed"]}
    assert {"training", "writing", "manifest", "renamed"} <= killed_phases, log
    for entry in log:  # killed before its commit (the last step), a build never changes the active version
        if entry["killed"] and entry["phase"] in ("training", "writing", "manifest"):
            assert entry["active_after"] == entry["active_before"], entry
    final = campaign["final"]
    assert final.returncode == 0, campaign["final_err"][-2000:]
    with BankStore(campaign["bank"]) as store:
        info = store.info()
        assert info["active"] != campaign["before_final"] and info["tmp_dirs"] == []
        assert store.verify(all_versions=True)["ok"]
    summary = {phase: sum(1 for e in log if e["phase"] == phase and e["killed"]) for phase in sorted(killed_phases)}
    print(f"\n[reliability] {campaign['kills']} SIGKILLs survived ({summary}); {len(info['orphans'])} orphan folder(s) left, never opened")


def test_a_second_concurrent_build_gets_bank_busy(campaign):
    rival = campaign["rival"]
    assert rival.returncode == 2, rival.stderr
    lines = [line for line in rival.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another build is publishing into" in lines[0] and "Traceback" not in rival.stderr
    assert BankStore(campaign["bank"]).verify()["ok"]


def test_readers_see_the_old_or_the_new_version_never_an_error(campaign):
    lines = campaign["readers"]
    errors = [line for line in lines if "error" in line]
    assert not errors, errors[:3]
    new = BankStore(campaign["bank"]).info()["active"]
    seen = [line["version"] for line in lines]
    assert set(seen) <= {campaign["before_final"], new} and all(line["ok"] for line in lines)
    assert new in seen  # the readers kept going past the switch
    print(f"\n[reliability] readers: {len(lines)} opens+personalize during the build, versions seen {sorted(set(seen))}")


# ------------------------------------------------------------------------------------- determinism
def _tensors(bank: Path, version: str | None = None):
    reader = BankStore(bank).open(version)
    return reader.read_tensors("tensors.safetensors"), reader.read_bytes("anchors.faiss"), reader.read_json("catalog.json")


def test_same_data_seed_and_config_give_bitwise_identical_tensors(campaign, micro_bank):
    """The in-process build (micro_bank) and the CLI build in another process after the kills."""
    a_tensors, a_index, a_catalog = _tensors(micro_bank)
    b_tensors, b_index, b_catalog = _tensors(campaign["bank"])
    assert a_tensors.keys() == b_tensors.keys() and len(a_tensors) > 10
    different = [k for k in a_tensors if not (a_tensors[k].dtype == b_tensors[k].dtype and torch.equal(a_tensors[k], b_tensors[k]))]
    assert not different, different
    assert a_index == b_index and a_catalog == b_catalog


# ------------------------------------------------------------------------------------------ safety
UNSAFE = [
    (re.compile(r"\bimport\s+(c?pickle|dill|joblib|shelve|marshal)\b|\bfrom\s+(c?pickle|dill|joblib|shelve|marshal)\b"), "a pickle-family module"),
    (re.compile(r"\bpickle\.|\bcloudpickle\b"), "pickle"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
    (re.compile(r"yaml\.load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
]


def test_no_unsafe_deserialization_in_pmeta():
    problems = []
    for path in sorted((REPO / "pmeta").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(REPO)
        for pattern, what in UNSAFE:
            for match in pattern.finditer(text):
                problems.append(f"{where}:{text.count(chr(10), 0, match.start()) + 1}: {what}")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : match.start() + 400]
            depth, end = 0, len(call)
            for position, char in enumerate(call):
                depth += char == "("
                depth -= char == ")"
                if depth == 0 and char == ")":
                    end = position
                    break
            if "weights_only=True" not in call[:end]:
                problems.append(f"{where}:{text.count(chr(10), 0, match.start()) + 1}: torch.load without weights_only=True")
    assert not problems, problems


def test_the_faiss_index_is_parsed_only_after_its_checksum(micro_bank, tmp_path, monkeypatch):
    """The bytes handed to FAISS are the very bytes whose sha256 was checked: a file changed after
    BankStore.open verified it is refused before any parser sees it."""
    import pmeta.fusion.index as index_module

    bank = tmp_path / "bank"
    shutil.copytree(micro_bank, bank)
    reader = BankStore(bank).open()
    flip(reader.dir / "anchors.faiss", 100)  # after the verification of open()
    parsed = []
    monkeypatch.setattr(index_module.faiss, "deserialize_index", lambda data: parsed.append(data))
    with pytest.raises(BankIntegrityError, match="anchors.faiss does not match its checksum"):
        reader.read_bytes("anchors.faiss")
    with pytest.raises(BankIntegrityError, match="tensors.safetensors|anchors.faiss"):
        flip(reader.dir / "tensors.safetensors", 100)
        reader.read_tensors("tensors.safetensors")
    assert parsed == []


def test_preset_tiny_is_bitwise_reproducible(tiny_bank, tmp_path):
    """``--preset tiny`` on the shipped sample, built a second time (in this process, at the thread
    count of every test process; under xdist the session's bank may come from the other worker):
    every tensor, the FAISS index and the catalogue are identical to the session's bank."""
    from pmeta.data import load_sample

    again = tmp_path / "tiny-again"
    build_bank(load_sample(), again, load_config("tiny"))
    a_tensors, a_index, a_catalog = _tensors(tiny_bank)
    b_tensors, b_index, b_catalog = _tensors(again)
    assert a_tensors.keys() == b_tensors.keys()
    different = [k for k in a_tensors if not (a_tensors[k].dtype == b_tensors[k].dtype and torch.equal(a_tensors[k], b_tensors[k]))]
    assert not different, different
    assert a_index == b_index and a_catalog == b_catalog

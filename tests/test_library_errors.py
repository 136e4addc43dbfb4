"""Bad arguments to the library API raise pmeta's typed errors, never a bare TypeError / OSError /
AttributeError from inside, never a months-long loop, and never leave a half-made bank folder.

The cases come from a black-box probe of the public API (395 calls): paths of the wrong type or that
the operating system refuses, limits and step counts of the wrong type or size, configs and
datasets of the wrong type, a config file whose top-level keys a [bank] table would hide, and a
batch of histories with one bad history in it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import pmeta
from pmeta.errors import BankNotFound, InvalidConfig, InvalidData, InvalidHistory, InvalidRequest

GOOD = {"user_id": "u1", "items": [{"item_id": "2571", "rating": 5}]}
#: A directory name longer than any file system allows (ENAMETOOLONG), and one under /proc, where
#: nothing can be created, not even by root.
TOO_LONG = "a" * 300
UNWRITABLE = Path("/proc/pmeta-test-cannot-exist/bank")


class BytesPath:
    """An os.PathLike whose __fspath__ gives bytes, which pathlib refuses with a bare TypeError."""

    def __fspath__(self) -> bytes:
        return b"/tmp"


@pytest.mark.parametrize("value", [3, None, b"bank", ["bank"], 2.5, BytesPath()], ids=["int", "None", "bytes", "list", "float", "bytes-pathlike"])
def test_a_path_of_the_wrong_type_is_a_typed_error(value, tmp_path):
    from pmeta.data import read_movielens
    from pmeta.data.lamp import load_split
    from pmeta.data.reviews import read_reviews, reviews_to_lamp
    from pmeta.text import TextBank, load_text_history

    for call, error in (
        (lambda: pmeta.Bank.open(value), InvalidRequest),
        (lambda: TextBank.open(value), InvalidRequest),
        (lambda: pmeta.load_history(value), InvalidHistory),
        (lambda: load_text_history(value, "LaMP-3"), InvalidHistory),
        (lambda: pmeta.load_config("tiny", file=value), InvalidConfig),
        (lambda: load_split(value, "LaMP-3", "train"), InvalidData),
        (lambda: read_movielens(value), InvalidData),
        (lambda: read_reviews(value), InvalidData),
        (lambda: reviews_to_lamp(value, "rating", tmp_path / "out"), InvalidData),
        (lambda: reviews_to_lamp(tmp_path / "in.json", "rating", value), InvalidData),
    ):
        if value is None and error is InvalidConfig:
            continue  # file=None is "no config file"
        with pytest.raises(error, match="must be a path"):
            call()


def test_nul_bytes_and_paths_the_system_refuses_are_typed_errors(tmp_path):
    with pytest.raises(InvalidRequest, match="NUL byte"):
        pmeta.Bank.open(str(tmp_path / "a\x00b"))
    with pytest.raises(InvalidHistory, match="NUL byte"):
        pmeta.load_history(str(tmp_path / "h\x00.json"))
    with pytest.raises(BankNotFound, match="not a pmeta bank: .*(too long|File name)"):
        pmeta.Bank.open(tmp_path / TOO_LONG)
    with pytest.raises(InvalidConfig, match="database URL must be a str"):
        pmeta.Bank.open(tmp_path, db_url=3)


def test_dataset_paths_the_system_refuses_are_data_errors(tmp_path):
    from pmeta.data import read_movielens
    from pmeta.data.reviews import read_reviews, reviews_to_lamp

    for call in (lambda p: read_movielens(p), lambda p: read_reviews(p)):
        with pytest.raises(InvalidData, match="NUL byte"):
            call(str(tmp_path / "a\x00b"))
        with pytest.raises(InvalidData, match="Cannot read .*(too long|File name)"):
            call(tmp_path / TOO_LONG / "x")
    with pytest.raises(InvalidData, match="Cannot use .* as the output folder: .*(too long|File name)"):
        reviews_to_lamp(tmp_path / "in.json", "rating", tmp_path / TOO_LONG / "out")
    from pmeta.data.lamp import load_split, parse_questions

    with pytest.raises(InvalidData, match="Cannot read the LaMP data folder .*(too long|File name)"):
        load_split(tmp_path / TOO_LONG, "LaMP-3", "train")
    with pytest.raises(InvalidData, match="^3: a LaMP questions file is a JSON list"):  # a label of any type is only named
        parse_questions({}, "LaMP-3", 3)


@pytest.mark.parametrize("out", [TOO_LONG, UNWRITABLE], ids=["name-too-long", "under-proc"])
def test_a_build_into_a_path_the_system_refuses_is_a_typed_error_and_writes_nothing(tmp_path, out):
    from pmeta.data import load_sample

    target = tmp_path / out if isinstance(out, str) else out
    before = sorted(tmp_path.iterdir())
    with pytest.raises(InvalidRequest, match="cannot (build a bank at|create the bank folder)"):
        pmeta.build_bank(load_sample(), target, pmeta.load_config("tiny"))
    assert sorted(tmp_path.iterdir()) == before
    assert not os.path.exists(target)  # (os.path.exists, not Path.exists: a name too long is simply absent)


def test_a_full_disk_while_creating_a_bank_stays_an_os_error(tmp_path, monkeypatch):
    """Only errors about the path itself are the caller's InvalidRequest; ENOSPC / EIO are the machine's."""
    import errno

    from pmeta.data import load_sample

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == "bank":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OSError, match="No space left") as raised:
        pmeta.build_bank(load_sample(), tmp_path / "bank", pmeta.load_config("tiny"))
    assert not isinstance(raised.value, InvalidRequest)
    assert not (tmp_path / "bank").exists()


def test_build_bank_refuses_a_dataset_or_config_of_the_wrong_type_before_any_work(tmp_path):
    from pmeta.data import load_sample

    out = tmp_path / "bank"
    with pytest.raises(InvalidRequest, match=r"dataset must be a pmeta Dataset \(.*\), not str"):
        pmeta.build_bank("not a dataset", out, pmeta.load_config("tiny"))
    for config in (None, {"anchors": 2}, "tiny"):
        with pytest.raises(InvalidConfig, match="config must be a BankConfig"):
            pmeta.build_bank(load_sample(), out, config)
    with pytest.raises(InvalidRequest, match="must be a path"):
        pmeta.build_bank(load_sample(), 3, pmeta.load_config("tiny"))
    assert not out.exists()


@pytest.mark.parametrize("value", ["3", None, -1, 1.5, True])
def test_history_limits_of_the_wrong_type_or_sign_are_request_errors(value, tmp_path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps(GOOD))
    with pytest.raises(InvalidRequest, match="max_items must be a whole number >= 0"):
        pmeta.parse_history(GOOD, max_items=value)
    with pytest.raises(InvalidRequest, match="max_items must be a whole number >= 0"):
        pmeta.load_history(path, max_items=value)
    with pytest.raises(InvalidRequest, match="max_bytes must be a whole number >= 0"):
        pmeta.load_history(path, max_bytes=value)
    assert pmeta.parse_history(GOOD, max_items=1).user_id == "u1"  # the limits themselves still work
    with pytest.raises(InvalidHistory, match="more than the limit of 0"):
        pmeta.parse_history(GOOD, max_items=0)


def test_presets_and_overrides_of_the_wrong_type_are_config_errors():
    with pytest.raises(InvalidConfig, match="unknown preset of type list"):
        pmeta.load_config(["tiny"])
    for overrides in ("x", [("anchors", 2)], {1: 2}, 5):
        with pytest.raises(InvalidConfig, match="overrides must be a mapping of option names"):
            pmeta.load_config("tiny", overrides=overrides)
    assert pmeta.load_config("tiny", overrides={"anchors": 3}).anchors == 3


def test_a_config_file_never_drops_keys_silently(tmp_path):
    mixed = tmp_path / "mixed.toml"
    mixed.write_text("inner_steps = 7\n\n[bank]\nanchors = 8\n")
    with pytest.raises(InvalidConfig, match=r"'inner_steps' outside the \[bank\] table"):
        pmeta.load_config("tiny", file=mixed)
    other = tmp_path / "other.toml"
    other.write_text("[bank]\nanchors = 8\n\n[tool]\nx = 1\n")
    with pytest.raises(InvalidConfig, match=r"'tool' outside the \[bank\] table"):
        pmeta.load_config("tiny", file=other)
    for text in ("inner_steps = 7\nanchors = 8\n", "[bank]\ninner_steps = 7\nanchors = 8\n"):
        both = tmp_path / "both.toml"
        both.write_text(text)
        config = pmeta.load_config("tiny", file=both)
        assert (config.inner_steps, config.anchors) == (7, 8)


def test_steps_are_bounded_per_call(opened_bank):
    from pmeta.config import MAX_INNER_STEPS

    for steps in (MAX_INNER_STEPS + 1, 10**9, -1, "3", 2.5, True):
        with pytest.raises(InvalidRequest, match=f"steps must be a whole number from 0 to {MAX_INNER_STEPS}"):
            opened_bank.personalize(GOOD, steps=steps)
    assert len(opened_bank.personalize(GOOD, steps=MAX_INNER_STEPS).rank(top=3)) == 3


def test_other_request_arguments_are_checked(opened_bank):
    for value in ("no", 1, None):
        with pytest.raises(InvalidRequest, match=f"ignore_unknown must be True or False, got {value!r}"):
            opened_bank.personalize(GOOD, ignore_unknown=value)
    for batch_size in (0, "16", 1.5):
        with pytest.raises(InvalidRequest, match="batch_size must be a whole number >= 1"):
            opened_bank.personalize_many([GOOD], batch_size=batch_size)
    p = opened_bank.personalize(GOOD)
    for top in (0, -1, 1.5, "3", True):
        with pytest.raises(InvalidRequest, match="top must be a whole number >= 1"):
            p.rank(top=top)


def test_a_bad_history_in_a_batch_is_named_by_its_position(opened_bank):
    bad = {"user_id": "u3", "items": [{"item_id": "no-such-movie", "rating": 5}]}
    with pytest.raises(InvalidHistory, match=r"^histories\[2\]: .*no-such-movie"):
        opened_bank.personalize_many([GOOD, GOOD, bad])
    with pytest.raises(InvalidHistory, match=r"^histories\[0\]: history: user_id"):
        opened_bank.personalize_many([{"items": []}, GOOD])
    with pytest.raises(InvalidHistory) as single:  # one history: the message is the history's own
        opened_bank.personalize(bad)
    assert not str(single.value).startswith("histories[")
    assert opened_bank.personalize_many([]) == []


def test_numpy_whole_numbers_and_flags_are_accepted_like_python_ones(opened_bank):
    """A serving layer often holds numpy scalars: np.int64 steps / top / batch_size and an np.bool_
    flag rank exactly as the Python values do; a numpy float is still not a whole number."""
    expected = opened_bank.personalize(GOOD, steps=2).rank(top=4)
    got = opened_bank.personalize_many([GOOD], steps=np.int64(2), batch_size=np.int32(4), ignore_unknown=np.bool_(False))[0].rank(top=np.int64(4))
    assert [(r.item_id, r.score) for r in got] == [(r.item_id, r.score) for r in expected]
    with pytest.raises(InvalidRequest, match="steps must be a whole number"):
        opened_bank.personalize(GOOD, steps=np.float64(2.0))
    with pytest.raises(InvalidRequest, match="steps must be a whole number from 0 to 50, got 99"):  # the value, not "int64"
        opened_bank.personalize(GOOD, steps=np.int64(99))
    for flag in (np.array([True]), 1):
        with pytest.raises(InvalidRequest, match="ignore_unknown must be True or False"):
            opened_bank.personalize(GOOD, ignore_unknown=flag)
    ids = ["318", "296", "356"]
    by_str = opened_bank.personalize(GOOD).rank(top=3, candidates=ids)
    by_numpy = opened_bank.personalize(GOOD).rank(top=3, candidates=np.array([int(i) for i in ids]))
    assert [(r.item_id, r.score) for r in by_numpy] == [(r.item_id, r.score) for r in by_str]


def test_a_failed_safetensors_write_is_the_os_error_it_is(tmp_path):
    """safetensors reports a failed write as its own SafetensorError (not an OSError); save_tensors
    gives it back its errno. Checked with a real one: a 4 KiB file-size limit in a child process
    (EFBIG, which is not a path error, so build_bank / export_peft leave it an OSError)."""
    import subprocess
    import sys

    child = f"""
import errno, resource, signal, torch
from pmeta.checks import is_path_error
from pmeta.storage.tensor_file import save_tensors
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_tensors({{"x": torch.zeros(10_000)}}, {str(tmp_path / "big.safetensors")!r})
except OSError as error:
    print(type(error).__name__, error.errno == errno.EFBIG, is_path_error(error), error.filename)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["OSError", "True", "False", str(tmp_path / "big.safetensors")], done.stdout + done.stderr

    from safetensors import SafetensorError

    from pmeta.storage.tensor_file import as_os_error

    with pytest.raises(SafetensorError, match="not an os error"):  # anything else passes through untouched
        with as_os_error(tmp_path):
            raise SafetensorError("not an os error")


def test_batch_sizes_beyond_any_machine_are_config_errors():
    """meta_batch_users / tower_batch_users of 10^12 passed validation and failed allocating memory."""
    for key in ("meta_batch_users", "tower_batch_users"):
        with pytest.raises(InvalidConfig, match=key):
            pmeta.load_config("tiny", overrides={key: 10**12})
        assert getattr(pmeta.load_config("tiny", overrides={key: 4096}), key) == 4096

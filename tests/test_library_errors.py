"""Bad arguments to the library API raise pmeta's typed errors, never a bare TypeError / OSError /
AttributeError from inside, never a months-long loop, and never leave a half-made bank folder.

The cases come from a black-box probe of the public API (395 calls): paths of the wrong type or that
the operating system refuses, limits and step counts of the wrong type or size, configs and
datasets of the wrong type, a config file whose top-level keys a [bank] table would hide, and a
batch of histories with one bad history in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pmeta
from pmeta.errors import BankNotFound, InvalidConfig, InvalidData, InvalidHistory, InvalidRequest

GOOD = {"user_id": "u1", "items": [{"item_id": "2571", "rating": 5}]}
#: A directory name longer than any file system allows (ENAMETOOLONG), and one under /proc, where
#: nothing can be created, not even by root.
TOO_LONG = "a" * 300
UNWRITABLE = Path("/proc/pmeta-test-cannot-exist/bank")


@pytest.mark.parametrize("value", [3, None, b"bank", ["bank"], 2.5])
def test_a_path_of_the_wrong_type_is_a_typed_error(value, tmp_path):
    from pmeta.data.lamp import load_split
    from pmeta.text import TextBank, load_text_history

    for call, error in (
        (lambda: pmeta.Bank.open(value), InvalidRequest),
        (lambda: TextBank.open(value), InvalidRequest),
        (lambda: pmeta.load_history(value), InvalidHistory),
        (lambda: load_text_history(value, "LaMP-3"), InvalidHistory),
        (lambda: pmeta.load_config("tiny", file=value), InvalidConfig),
        (lambda: load_split(value, "LaMP-3", "train"), InvalidData),
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


@pytest.mark.parametrize("out", [TOO_LONG, UNWRITABLE], ids=["name-too-long", "under-proc"])
def test_a_build_into_a_path_the_system_refuses_is_a_typed_error_and_writes_nothing(tmp_path, out):
    from pmeta.data import load_sample

    target = tmp_path / out if isinstance(out, str) else out
    before = sorted(tmp_path.iterdir())
    with pytest.raises(InvalidRequest, match="cannot (build a bank at|create the bank folder)"):
        pmeta.build_bank(load_sample(), target, pmeta.load_config("tiny"))
    assert sorted(tmp_path.iterdir()) == before


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
        with pytest.raises(InvalidRequest, match="ignore_unknown must be True or False"):
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

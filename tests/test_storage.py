"""Bank storage: atomic versions, checksums, locking, crash safety, round trips.

Every test that uses the ``store`` fixture runs twice: on SQLite (the default) and on a real
PostgreSQL server started on loopback (``tests/pgserver.py``; skipped with the reason where the
PostgreSQL binaries are missing)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pmeta.storage.store as store_module
from pmeta.errors import BankBusy, BankIntegrityError, BankNotFound, InvalidConfig
from pmeta.storage import BankStore, sha256_file
from pmeta.storage.manifest import verify_dir, write_manifest
from pgserver import postgres_server  # noqa: F401 - a fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
FILES = ("tensors.safetensors", "anchors.faiss", "catalog.json")


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt": torch.randn(4, 8, generator=generator),
        "lora.A": torch.randn(2, 8, generator=generator).to(torch.bfloat16),
        "lora.B": torch.randn(8, 2, generator=generator).t(),  # non-contiguous on purpose
        "positions": torch.arange(5, dtype=torch.int64) * seed,
    }


def build(store: BankStore, seed: int = 0) -> str:
    with store.new_version() as writer:
        writer.write_tensors("tensors.safetensors", make_tensors(seed))
        writer.write_bytes("anchors.faiss", bytes([seed % 256]) * 100 + bytes(range(256)))
        writer.write_json("catalog.json", {"items": ["a", "b", "ç"], "seed": seed})
        return writer.publish(
            config={"seed": seed, "inner": {"steps": 3, "lr": 0.1}},
            dataset_name="toy",
            dataset_fingerprint=f"fp-{seed}",
            anchors=[{"n_users": 3, "label": "first"}, {"n_users": 5, "label": "second", "medoid_user": "u7"}],
            held_out_users=["u2", "u1", "u2"],
            notes=f"build {seed}",
        )


def tmp_dirs(store: BankStore) -> list[str]:
    return [p.name for p in store.versions_dir.glob(".tmp-*")]


def flip_byte(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    """None (SQLite inside the bank) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture
def store(tmp_path: Path, db_url: str | None) -> BankStore:
    with BankStore(tmp_path / "bank", db_url) as bank:
        yield bank


# --------------------------------------------------------------------------- versions and reads


def test_publishing_two_versions_switches_the_active_one(store: BankStore) -> None:
    first = build(store, seed=1)
    assert store.open().id == first
    second = build(store, seed=2)
    assert second != first
    assert store.open().id == second
    assert store.open(first).record["config"]["seed"] == 1  # the old version stays readable

    summaries = store.versions()
    assert [v["id"] for v in summaries] == [first, second]
    assert [v["active"] for v in summaries] == [False, True]
    info = store.info()
    assert info["active"] == second
    assert info["orphans"] == [] and info["tmp_dirs"] == []
    assert info["bytes"] == store.bank_bytes() >= sum(v["bytes"] for v in summaries) > 0  # + bank.db on SQLite
    assert sorted(p.name for p in store.versions_dir.iterdir()) == sorted([first, second])


def test_round_trip_is_exact(store: BankStore) -> None:
    version_id = build(store, seed=3)
    reader = store.open()
    assert reader.id == version_id and reader.dir == store.versions_dir / version_id
    assert set(reader.files) == set(FILES)

    loaded = reader.read_tensors("tensors.safetensors")
    expected = make_tensors(3)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert reader.read_json("catalog.json") == {"items": ["a", "b", "ç"], "seed": 3}
    assert reader.read_bytes("anchors.faiss") == bytes([3]) * 100 + bytes(range(256))

    record = reader.record
    assert record["config"] == {"seed": 3, "inner": {"steps": 3, "lr": 0.1}}
    assert record["dataset_name"] == "toy" and record["dataset_fingerprint"] == "fp-3"
    assert record["notes"] == "build 3" and record["n_anchors"] == 2
    assert record["anchors"] == [
        {"position": 0, "n_users": 3, "label": "first"},
        {"position": 1, "n_users": 5, "label": "second", "medoid_user": "u7"},
    ]
    assert record["held_out_users"] == ["u1", "u2"]
    assert record["manifest_sha256"] == sha256_file(reader.dir / "manifest.json")
    manifest = json.loads((reader.dir / "manifest.json").read_text())
    assert manifest["format"] == "pmeta-bank/1" and manifest["version"] == version_id
    assert manifest["files"]["catalog.json"]["bytes"] == (reader.dir / "catalog.json").stat().st_size
    with pytest.raises(FileNotFoundError):
        reader.read_bytes("nothing.bin")


def test_a_second_store_on_the_same_database_url_sees_the_same_bank(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    version_id = build(BankStore(tmp_path / "bank", db_url=url))
    assert not (tmp_path / "bank" / "bank.db").exists()
    assert BankStore(tmp_path / "bank", db_url=url).open().id == version_id
    with pytest.raises(BankNotFound, match="missing.db"):
        BankStore(tmp_path / "bank", db_url=f"sqlite:///{tmp_path / 'missing.db'}").open()
    assert not (tmp_path / "missing.db").exists()


def test_one_database_holds_one_bank(tmp_path: Path, db_url: str | None) -> None:
    url = db_url or f"sqlite:///{tmp_path / 'shared.db'}"
    first = build(BankStore(tmp_path / "a", db_url=url))
    with pytest.raises(InvalidConfig, match="already holds another bank: none of its 1 version"):
        build(BankStore(tmp_path / "b", db_url=url), seed=1)
    assert not (tmp_path / "b").exists()  # refused before the second bank's folder is created
    assert BankStore(tmp_path / "a", db_url=url).open().id == first  # the first bank is untouched
    second = build(BankStore(tmp_path / "a", db_url=url), seed=2)  # its own directory may publish again
    assert BankStore(tmp_path / "a", db_url=url).open().id == second


# ----------------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("name", [*FILES, "manifest.json"])
def test_a_flipped_byte_in_any_file_is_named(store: BankStore, name: str) -> None:
    version_id = build(store)
    target = store.versions_dir / version_id / name
    flip_byte(target)
    with pytest.raises(BankIntegrityError, match=re.escape(f"versions/{version_id}/{name} does not match its checksum")):
        store.open()
    report = store.verify()
    assert not report["ok"]
    assert report["versions"][0]["files"][name] != "ok"
    assert all(name in error for error in report["versions"][0]["errors"])

    flip_byte(target)  # flipping the same bit back restores the file
    assert store.open().id == version_id
    assert store.verify()["ok"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "extra.txt").write_text("hello"), "extra.txt is not listed in the manifest"),
        (lambda folder: (folder / "catalog.json").unlink(), "catalog.json is missing"),
        (lambda folder: os.truncate(folder / "anchors.faiss", 10), "anchors.faiss does not match its recorded size"),
        (lambda folder: (folder / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda folder: (folder / "extra").mkdir(), "extra/ is an empty folder"),
        (lambda folder: (folder / "a" / "b").mkdir(parents=True), "a/ is an empty folder"),
    ],
    ids=["extra-file", "missing-file", "truncated-file", "missing-manifest", "empty-folder", "nested-empty-folders"],
)
def test_added_missing_or_truncated_files_fail_verification(store: BankStore, damage, message: str) -> None:
    version_id = build(store)
    damage(store.versions_dir / version_id)
    with pytest.raises(BankIntegrityError, match=re.escape(f"versions/{version_id}/{message}")):
        store.open()
    assert not store.verify()["ok"]


def test_empty_folders_are_found_below_files_and_links_are_not_emptiness(tmp_path: Path) -> None:
    from pmeta.storage.manifest import empty_folders, write_manifest

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c" / "d").mkdir(parents=True)
    (tmp_path / "c" / "file").write_text("x")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "link").symlink_to(tmp_path / "c")
    assert empty_folders(tmp_path) == ["a", "a/b", "c/d"]
    with pytest.raises(ValueError, match="a is an empty folder"):
        write_manifest(tmp_path, "v")
    assert not (tmp_path / "manifest.json").exists()


def test_a_folder_that_cannot_be_listed_fails_verification(store: BankStore, monkeypatch) -> None:
    """os.walk skips a folder it cannot list, and with it whatever the folder holds (an unlisted file
    would pass): a check reports it instead. Tests run as root here, where permissions do not stop
    a listing, so the refusal is simulated at os.scandir."""
    from pmeta.storage.manifest import list_files, write_manifest

    version_id = build(store)
    hidden = store.versions_dir / version_id / "hidden"
    hidden.mkdir()
    (hidden / "payload.bin").write_bytes(b"x")
    real_scandir = os.scandir

    def refusing(refused: Path):
        def scandir(path=".", *args):
            if Path(path) == refused:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path, *args)

        return scandir

    monkeypatch.setattr(os, "scandir", refusing(hidden))
    with pytest.raises(BankIntegrityError, match=re.escape(f"versions/{version_id}/hidden/ cannot be listed (Permission denied)")):
        store.open()
    report = store.verify()
    assert not report["ok"] and any("hidden/ cannot be listed" in error for error in report["versions"][0]["errors"])
    with pytest.raises(PermissionError):
        list_files(hidden.parent)
    with pytest.raises(PermissionError):
        write_manifest(hidden.parent, "other")
    monkeypatch.setattr(os, "scandir", refusing(hidden.parent))  # the version folder itself
    with pytest.raises(BankIntegrityError, match=re.escape(f"bank folder versions/{version_id}/ cannot be listed (Permission denied)")):
        store.open()
    monkeypatch.undo()
    with pytest.raises(BankIntegrityError, match="hidden/payload.bin is not listed in the manifest"):
        store.open()


def test_verify_reports_every_version_without_raising(store: BankStore) -> None:
    first, second = build(store, seed=1), build(store, seed=2)
    flip_byte(store.versions_dir / first / "catalog.json")
    assert store.verify()["ok"]  # only the active version by default
    report = store.verify(all_versions=True)
    assert not report["ok"]
    by_id = {entry["id"]: entry for entry in report["versions"]}
    assert by_id[second]["ok"] and not by_id[first]["ok"]
    assert by_id[first]["files"]["tensors.safetensors"] == "ok"
    assert "checksum" in by_id[first]["files"]["catalog.json"]


@settings(max_examples=40, deadline=None)
@given(
    contents=st.dictionaries(st.sampled_from(["a.bin", "b.json", "sub/c.txt"]), st.binary(min_size=1, max_size=64), min_size=1),
    which=st.integers(min_value=0),
    offset=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_verify_dir_detects_any_single_byte_change(contents: dict[str, bytes], which: int, offset: int, mask: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "v1"
        for name, data in contents.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        manifest_sha256 = write_manifest(folder, "v1")
        assert sorted(verify_dir(folder, manifest_sha256)) == sorted(contents)

        name = sorted([*contents, "manifest.json"])[which % (len(contents) + 1)]
        data = bytearray((folder / name).read_bytes())
        data[offset % len(data)] ^= mask
        (folder / name).write_bytes(bytes(data))
        with pytest.raises(BankIntegrityError, match=re.escape(f"versions/v1/{name} ")):
            verify_dir(folder, manifest_sha256)


# ------------------------------------------------------------------------------ not a bank


def test_opening_a_missing_path_raises_and_creates_nothing(tmp_path: Path) -> None:
    missing = BankStore(tmp_path / "nope")
    for call in (missing.open, missing.versions, missing.info, missing.verify, missing.bank_bytes):
        with pytest.raises(BankNotFound, match="not a pmeta bank"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_opening_an_empty_directory_or_a_file_raises_and_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankNotFound, match=re.escape("(no bank.db)")):
        BankStore(tmp_path / "empty").open()
    with pytest.raises(BankNotFound):
        BankStore(tmp_path / "empty").info()
    assert list((tmp_path / "empty").iterdir()) == []

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BankNotFound, match="not a directory"):
        BankStore(tmp_path / "file.txt").open()
    with pytest.raises(BankNotFound, match="not a directory"):
        BankStore(tmp_path / "file.txt").new_version()


def test_a_database_that_is_not_a_bank_is_not_found(tmp_path: Path) -> None:
    import sqlite3

    (tmp_path / "other").mkdir()
    connection = sqlite3.connect(tmp_path / "other" / "bank.db")
    connection.execute("create table t (x int)")
    connection.commit()
    connection.close()
    with pytest.raises(BankNotFound, match="no bank tables"):
        BankStore(tmp_path / "other").open()


def test_a_bank_without_an_active_version_is_not_found(store: BankStore) -> None:
    store.path.mkdir()  # an empty folder the user made: a build that publishes nothing keeps it
    with store.new_version():
        pass  # creates the schema, publishes nothing
    with pytest.raises(BankNotFound, match="no active version"):
        store.open()
    assert store.info()["active"] is None and store.versions() == []


def test_building_into_an_unrelated_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BankNotFound, match="refusing"):
        BankStore(tmp_path).new_version()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_an_unknown_version_is_not_found(store: BankStore) -> None:
    build(store)
    with pytest.raises(BankNotFound, match="no version"):
        store.open("20000101T000000-000000")


# ------------------------------------------------------------------------- locking and failure


def test_a_second_writer_gets_bank_busy(store: BankStore) -> None:
    with store.new_version() as writer:
        with pytest.raises(BankBusy, match="another build is publishing into"):
            store.new_version()
        with pytest.raises(BankBusy):
            BankStore(store.path, store.db_url).new_version()  # another store object, another file descriptor
        writer.write_json("catalog.json", {})
        writer.publish(config={}, dataset_name="toy", dataset_fingerprint="x", anchors=[], held_out_users=[])
    with store.new_version():  # released at exit
        pass


def test_readers_work_while_a_version_is_being_built(store: BankStore) -> None:
    first = build(store)
    with store.new_version() as writer:
        writer.write_json("catalog.json", {"partial": True})
        assert store.open().id == first
        assert store.verify()["ok"]


def test_an_exception_inside_the_writer_keeps_the_old_version(store: BankStore) -> None:
    first = build(store)
    with pytest.raises(RuntimeError, match="boom"):
        with store.new_version() as writer:
            writer.write_tensors("tensors.safetensors", make_tensors(9))
            raise RuntimeError("boom")
    assert store.open().id == first
    assert tmp_dirs(store) == []
    second = build(store, seed=2)
    assert store.open().id == second and tmp_dirs(store) == []


def test_a_first_build_that_publishes_nothing_leaves_no_bank_folder(store: BankStore) -> None:
    """The folder this build created goes with it (lock file and SQLite database included), after an
    exception or a failed publish alike; a folder that was there before stays."""
    assert not store.path.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with store.new_version() as writer:
            writer.write_json("catalog.json", {})
            raise RuntimeError("boom")
    assert not store.path.exists()
    with store.new_version() as writer:
        writer.write_json("catalog.json", {})
        with pytest.raises(InvalidConfig):
            writer.publish(config={"x": object()}, dataset_name="t", dataset_fingerprint="f", anchors=[], held_out_users=[])
    assert not store.path.exists()
    first = build(store)  # the path is free for a real build
    assert store.open().id == first


def test_leaving_without_publishing_discards_the_folder(store: BankStore) -> None:
    first = build(store)
    with store.new_version() as writer:
        writer.write_json("catalog.json", {})
        assert writer.dir.is_dir()
    assert not writer.dir.exists() and tmp_dirs(store) == []
    assert store.open().id == first


def test_a_failure_in_the_database_transaction_rolls_everything_back(store: BankStore, monkeypatch) -> None:
    first = build(store)
    real_record = store_module._record_version

    def record_then_fail(session, *args):
        real_record(session, *args)
        session.flush()
        raise OSError("database went away")

    monkeypatch.setattr(store_module, "_record_version", record_then_fail)
    with pytest.raises(OSError, match="went away"):
        build(store, seed=2)
    monkeypatch.undo()
    assert store.open().id == first
    assert [v["id"] for v in store.versions()] == [first]
    assert [p.name for p in store.versions_dir.iterdir()] == [first]


def test_a_bad_config_is_refused_and_nothing_is_published(store: BankStore) -> None:
    first = build(store)
    with store.new_version() as writer:
        writer.write_json("catalog.json", {})
        with pytest.raises(InvalidConfig):
            writer.publish(config={"x": object()}, dataset_name="t", dataset_fingerprint="f", anchors=[], held_out_users=[])
        with pytest.raises(RuntimeError, match="failed"):
            writer.write_json("again.json", {})
    assert store.open().id == first and tmp_dirs(store) == []


@pytest.mark.parametrize("name", ["", "../escape", "/absolute", "a//b", "./x", "manifest.json"])
def test_writer_rejects_bad_file_names(store: BankStore, name: str) -> None:
    with store.new_version() as writer:
        with pytest.raises(ValueError):
            writer.write_bytes(name, b"x")


KILLED_BUILDER = textwrap.dedent(
    """
    import sys, time
    import pmeta.storage.store as store_module
    from pmeta.storage import BankStore

    writer = BankStore(sys.argv[1], sys.argv[3] if sys.argv[3] != "-" else None).new_version()
    writer.write_bytes("anchors.faiss", bytes(range(256)) * 64)
    writer.write_json("catalog.json", {"items": list(range(100))})

    def announce_and_stall(*args):
        print(writer.id, flush=True)
        time.sleep(60)

    if sys.argv[2] == "before-publish":
        announce_and_stall()
    else:  # stall inside publish(), after the rename and before the database commit
        store_module._record_version = announce_and_stall
    writer.publish(config={}, dataset_name="toy", dataset_fingerprint="x", anchors=[], held_out_users=[])
    """
)


@pytest.mark.parametrize("moment", ["before-publish", "before-commit"])
def test_kill_9_of_a_builder_leaves_the_bank_usable(store: BankStore, moment: str) -> None:
    first = build(store)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILDER, str(store.path), moment, store.db_url if store.db_url.startswith("postgresql") else "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        killed_id = process.stdout.readline().strip()
        assert killed_id, process.stderr.read()
        with pytest.raises(BankBusy):
            store.new_version()  # the builder holds the lock while it lives
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    if moment == "before-publish":
        assert tmp_dirs(store) == [f".tmp-{killed_id}"]
    else:
        assert store.info()["orphans"] == [killed_id]  # renamed, never recorded, never opened
    assert store.open().id == first
    assert store.verify()["ok"]

    second = build(store, seed=2)  # the kernel released the dead builder's lock
    assert store.open().id == second
    assert tmp_dirs(store) == []
    assert [v["id"] for v in store.versions()] == [first, second]


# ------------------------------------------------------------- races and interruptions (review at stop 45)


def fill(writer, seed: int = 0) -> None:
    writer.write_json("catalog.json", {"seed": seed})


def publish(writer, seed: int = 0) -> str:
    return writer.publish(config={"seed": seed}, dataset_name="toy", dataset_fingerprint=f"fp-{seed}", anchors=[{"n_users": 1}], held_out_users=["u1"])


def test_a_lock_file_replaced_while_a_build_takes_it_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A build that opened the lock file of a bank folder being removed (by a failed first build)
    and got its lock once the file was gone does not hold the lock of the bank at that path."""
    lock_path = tmp_path / ".lock"
    lock_path.write_bytes(b"")
    real_flock = store_module.fcntl.flock

    def replaced_meanwhile(fd, operation):
        lock_path.unlink()
        lock_path.write_bytes(b"")  # a new bank's lock file, another inode
        return real_flock(fd, operation)

    monkeypatch.setattr(store_module.fcntl, "flock", replaced_meanwhile)
    with pytest.raises(BankBusy, match="removed .* while this one started"):
        store_module._acquire_lock(lock_path, tmp_path)
    monkeypatch.undo()
    lock_path.unlink()
    with pytest.raises(BankBusy, match="removed .* while this one started"):  # the folder went
        store_module._acquire_lock(tmp_path / "gone" / ".lock", tmp_path / "gone")
    store_module._release_lock(store_module._acquire_lock(lock_path, tmp_path))  # a lock file that stays: taken


def test_a_failed_first_build_never_removes_a_bank_built_meanwhile(tmp_path: Path, monkeypatch) -> None:
    """The failed first build renames its folder away before removing it: a build that starts at the
    path in between makes its own bank there, which the removal leaves alone."""
    path = tmp_path / "bank"
    real_remove = store_module._remove
    built: list[str] = []

    def remove(target: Path) -> None:
        if target.parent == tmp_path and target.name.startswith(".pmeta-removing-"):
            assert not path.exists()  # renamed away first
            built.append(build(BankStore(path), seed=3))  # another builder, meanwhile
        real_remove(target)

    monkeypatch.setattr(store_module, "_remove", remove)
    with pytest.raises(RuntimeError, match="training failed"):
        with BankStore(path).new_version() as writer:
            fill(writer)
            raise RuntimeError("training failed")
    assert len(built) == 1 and BankStore(path).open().id == built[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


def test_a_failed_first_build_leaves_a_folder_replaced_while_it_ran_alone(tmp_path: Path) -> None:
    """The bank folder of a first build is moved away by hand while it runs and another build makes a
    bank at the path: the first build's failure removes neither (its lock file is no longer the one
    at the path), and publishing into the replaced folder is refused."""
    path, moved = tmp_path / "bank", tmp_path / "moved"
    with pytest.raises(RuntimeError, match="training failed"):
        with BankStore(path).new_version() as writer:
            fill(writer)
            path.rename(moved)
            other = build(BankStore(path), seed=3)
            raise RuntimeError("training failed")
    assert BankStore(path).open().id == other and moved.is_dir()
    with BankStore(path).new_version() as writer:
        fill(writer)
        path.rename(moved / "second")
        again = build(BankStore(path), seed=4)
        with pytest.raises(BankBusy, match="moved or replaced while this build ran"):
            publish(writer)
        assert repr(writer).endswith("failed)")
    store = BankStore(path)
    assert store.open().id == again and [v["id"] for v in store.versions()] == [again]


def test_a_lock_path_that_cannot_be_read_keeps_the_builds_own_error_and_the_folder(tmp_path: Path) -> None:
    """``BANK/.lock`` turned into a link to itself while a first build runs: stat fails (a link
    loop), which counts as "not our lock": the build's own error comes out, the folder stays, and
    publishing is refused with BankBusy rather than an OSError."""
    path = tmp_path / "bank"
    with pytest.raises(RuntimeError, match="training failed"):
        with BankStore(path).new_version() as writer:
            fill(writer)
            (path / ".lock").unlink()
            (path / ".lock").symlink_to(path / ".lock")
            raise RuntimeError("training failed")
    assert path.is_dir() and (path / ".lock").is_symlink()
    (path / ".lock").unlink()
    with BankStore(path).new_version() as writer:
        fill(writer)
        (path / ".lock").unlink()
        (path / ".lock").symlink_to(path / ".lock")
        with pytest.raises(BankBusy, match="moved or replaced"):
            publish(writer)


def test_a_folder_replaced_while_publish_writes_its_files_records_nothing_in_the_new_bank(tmp_path: Path, monkeypatch) -> None:
    """The bank folder is moved away after publish renamed the version into versions/ and another
    bank is built at the path before the commit: the commit is refused (BankBusy) and the database
    at the path, the other bank's, records nothing of it."""
    path, moved = tmp_path / "bank", tmp_path / "moved"
    first = build(BankStore(path))
    real_fsync_dirs = store_module._fsync_dirs
    other: list[str] = []
    swapped: list[bool] = []

    def fsync_dirs(root, recursive=True):
        real_fsync_dirs(root, recursive)
        if not recursive and not swapped:  # versions/, after the rename: the last step before the commit
            swapped.append(True)
            path.rename(moved)
            other.append(build(BankStore(path), seed=7))

    with BankStore(path).new_version() as writer:
        fill(writer, seed=1)
        monkeypatch.setattr(store_module, "_fsync_dirs", fsync_dirs)
        with pytest.raises(BankBusy, match="moved or replaced"):
            publish(writer, seed=1)
        monkeypatch.undo()
    store = BankStore(path)
    assert [v["id"] for v in store.versions()] == other and store.open().id == other[0]
    assert [v["id"] for v in BankStore(moved).versions()] == [first] and BankStore(moved).open().id == first


def test_a_lock_file_replaced_under_a_running_build_refuses_its_publish(tmp_path: Path) -> None:
    """Someone removes the lock file of a bank while a build holds it (a second build could then
    lock the new file): the first build's publish is refused, its folder removed, and the active
    version stays."""
    path = tmp_path / "bank"
    first = build(BankStore(path))
    with BankStore(path).new_version() as writer:
        fill(writer, seed=1)
        (path / ".lock").unlink()
        (path / ".lock").write_bytes(b"")
        with pytest.raises(BankBusy, match="moved or replaced"):
            publish(writer, seed=1)
        assert not writer.dir.exists()
    store = BankStore(path)
    assert store.open().id == first and [v["id"] for v in store.versions()] == [first]
    assert not [p for p in (path / "versions").iterdir() if p.name.startswith(".tmp-")]
    assert build(store, seed=2) != first  # the new lock file serves the next build


def _at_revision_0001(bank: Path) -> None:
    import sqlite3

    connection = sqlite3.connect(bank / "bank.db")
    connection.execute("ALTER TABLE bank_versions DROP COLUMN record_sha256")
    connection.execute("UPDATE alembic_version SET version_num = '0001'")
    connection.commit()
    connection.close()


def _columns(bank: Path) -> tuple[list[str], list[str]]:
    import sqlite3

    connection = sqlite3.connect(bank / "bank.db")
    try:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(bank_versions)")]
        return columns, [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    finally:
        connection.close()


def test_an_interrupted_schema_upgrade_on_sqlite_leaves_the_database_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """The upgrade's ALTER TABLE and its revision bump commit together or not at all."""
    from pmeta.storage import migrate

    first = build(BankStore(tmp_path / "bank"))
    _at_revision_0001(tmp_path / "bank")
    real_upgrade = migrate.command.upgrade

    def upgrade_then_die(config, revision):
        real_upgrade(config, revision)
        raise KeyboardInterrupt  # Ctrl-C after the DDL, before the commit

    monkeypatch.setattr(migrate.command, "upgrade", upgrade_then_die)
    with pytest.raises(KeyboardInterrupt):
        BankStore(tmp_path / "bank").open()
    monkeypatch.undo()
    columns, revision = _columns(tmp_path / "bank")
    assert "record_sha256" not in columns and revision == ["0001"]  # rolled back whole
    with BankStore(tmp_path / "bank") as store:
        assert store.open().id == first and store.verify()["ok"]
    columns, revision = _columns(tmp_path / "bank")
    assert "record_sha256" in columns and revision == [store_module.migrate.head()]


def _back_to_revision_0002(bank: Path, null_checksum_of: str, created_at: str | None = None) -> None:
    """What a bank published before revision 0002 and upgraded to 0002 looks like: that version's
    checksum NULL (and, to simulate damage, its ``created_at`` replaced)."""
    import sqlite3

    connection = sqlite3.connect(bank / "bank.db")
    connection.execute("UPDATE bank_versions SET record_sha256 = NULL WHERE id = ?", (null_checksum_of,))
    if created_at is not None:
        connection.execute("UPDATE bank_versions SET created_at = ? WHERE id = ?", (created_at, null_checksum_of))
    connection.execute("UPDATE alembic_version SET version_num = '0002'")
    connection.commit()
    connection.close()


def test_a_read_only_bank_at_revision_0002_opens_as_before(tmp_path: Path) -> None:
    """A bank that cannot be written stays at 0002 and is read as the pmeta that wrote it read it:
    its versions from before 0002 open without the record check; the database is not touched."""
    old, new = build(BankStore(tmp_path / "bank"), seed=1), build(BankStore(tmp_path / "bank"), seed=2)
    _back_to_revision_0002(tmp_path / "bank", old)
    before = (tmp_path / "bank" / "bank.db").read_bytes()
    read_only = f"sqlite:///file:{tmp_path / 'bank' / 'bank.db'}?mode=ro&uri=true"
    with BankStore(tmp_path / "bank", read_only) as store:
        assert store.open().id == new and store.open(old).id == old
        assert store.verify(all_versions=True)["ok"]
    assert (tmp_path / "bank" / "bank.db").read_bytes() == before
    assert _columns(tmp_path / "bank")[1] == ["0002"]
    with BankStore(tmp_path / "bank") as store:  # writable: upgraded, the checksum filled in
        assert store.open(old).id == old and store.verify(all_versions=True)["ok"]
    assert _columns(tmp_path / "bank")[1] == [store_module.migrate.head()]


def test_a_read_only_bank_at_revision_0003_still_refuses_a_null_checksum(tmp_path: Path) -> None:
    import sqlite3

    version = build(BankStore(tmp_path / "bank"))
    connection = sqlite3.connect(tmp_path / "bank" / "bank.db")
    connection.execute("UPDATE bank_versions SET record_sha256 = NULL")
    connection.commit()
    connection.close()
    read_only = f"sqlite:///file:{tmp_path / 'bank' / 'bank.db'}?mode=ro&uri=true"
    with pytest.raises(BankIntegrityError, match=f"the record of version {version} has no checksum"):
        BankStore(tmp_path / "bank", read_only).open()


def test_a_damaged_old_record_is_left_unfilled_and_refused_alone(tmp_path: Path) -> None:
    """Revision 0003 cannot hash a row whose date no longer parses: it leaves that checksum NULL,
    the upgrade goes through, the other versions open and verify reports the damaged one."""
    old, new = build(BankStore(tmp_path / "bank"), seed=1), build(BankStore(tmp_path / "bank"), seed=2)
    _back_to_revision_0002(tmp_path / "bank", old, created_at="garbage")
    with BankStore(tmp_path / "bank") as store:
        assert store.open().id == new
        report = store.verify(all_versions=True)
    by_id = {entry["id"]: entry for entry in report["versions"]}
    assert by_id[new]["ok"] and not by_id[old]["ok"]
    assert any(f"record of version {old} holds an unreadable value" in error for error in by_id[old]["errors"])
    assert _columns(tmp_path / "bank")[1] == [store_module.migrate.head()]


def test_revision_0003_refuses_to_run_offline(tmp_path: Path) -> None:
    """It computes checksums from the stored rows, which an offline (SQL script) run cannot read."""
    from alembic import command

    from pmeta.storage import migrate

    config = migrate.alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(RuntimeError, match="run it on a database"):
        command.upgrade(config, "0002:0003", sql=True)


def test_concurrent_upgrades_of_an_outdated_bank_run_one_after_the_other(tmp_path: Path) -> None:
    """Processes opening an outdated bank at once each open it; one upgrades, the others wait for it."""
    first = build(BankStore(tmp_path / "bank"))
    _at_revision_0001(tmp_path / "bank")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from pmeta.storage import BankStore
        print(BankStore({str(tmp_path / 'bank')!r}).open().id)
    """)
    children = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [child.communicate(timeout=120) for child in children]
    assert [out.strip() for out, _ in results] == [first] * 4, [err[-400:] for _, err in results]


def test_an_error_after_the_commit_keeps_the_new_version_and_its_folder(store: BankStore, monkeypatch) -> None:
    import sqlalchemy.orm

    build(store)
    real_close = sqlalchemy.orm.Session.close
    calls = []

    def close_then_interrupt(self):
        real_close(self)
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt  # Ctrl-C once the commit is done

    writer = store.new_version()
    fill(writer, 1)
    monkeypatch.setattr(sqlalchemy.orm.Session, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        publish(writer, 1)
    monkeypatch.undo()
    writer.close()
    assert store.open().id == writer.id and store.verify(all_versions=True)["ok"]


@pytest.mark.parametrize("landed", [True, False])
def test_a_failed_commit_keeps_the_new_folder_active_exactly_when_the_version_was_recorded(tmp_path: Path, landed: bool) -> None:
    """A commit whose acknowledgement is lost (it landed) keeps the new version active; one that did
    not land leaves the previous version active and the new folder as an orphan."""
    import sqlite3

    store = BankStore(tmp_path / "bank")
    first = build(store)
    writer = store.new_version()
    fill(writer, 1)
    dialect = store._get_engine().dialect
    real_commit = dialect.do_commit

    def fail(dbapi_connection) -> None:
        dialect.do_commit = real_commit
        if landed:
            real_commit(dbapi_connection)
        raise sqlite3.OperationalError("disk I/O error")

    dialect.do_commit = fail
    with pytest.raises(BankIntegrityError, match="disk I/O error"):
        publish(writer, 1)
    dialect.do_commit = real_commit
    writer.close()
    assert store.open().id == (writer.id if landed else first)
    # the folder stays either way (a commit may land after its connection dropped): unrecorded, an orphan
    assert sorted(p.name for p in store.versions_dir.iterdir()) == sorted({first, writer.id})
    assert store.info()["orphans"] == ([] if landed else [writer.id])
    store.close()


def test_two_first_builds_into_one_shared_database_cannot_both_publish(tmp_path: Path) -> None:
    """Both pass the owner check when they start (neither has published); the publish checks again."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = BankStore(tmp_path / "a", url), BankStore(tmp_path / "b", url)
    writer_a, writer_b = a.new_version(), b.new_version()
    fill(writer_a), fill(writer_b, 1)
    first = publish(writer_a)
    with pytest.raises(InvalidConfig, match="already holds another bank"):
        publish(writer_b, 1)
    writer_a.close(), writer_b.close()
    assert a.open().id == first and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("INSERT INTO alembic_version VALUES ('0001')", "unusable schema revision record: .*more than one head"),
    ],
)
def test_a_broken_revision_table_is_a_typed_error(tmp_path: Path, statement: str, message: str) -> None:
    import sqlite3

    from typer.testing import CliRunner

    from pmeta.cli import app

    build(BankStore(tmp_path / "bank"))
    connection = sqlite3.connect(tmp_path / "bank" / "bank.db")
    connection.execute(statement)
    connection.commit()
    connection.close()
    with pytest.raises(BankIntegrityError, match=message):
        BankStore(tmp_path / "bank").open()
    result = CliRunner().invoke(app, ["bank", "verify", str(tmp_path / "bank")])
    assert result.exit_code == 2 and "Traceback" not in result.output and re.search(message, result.output), result.output


def test_a_config_that_is_not_an_object_is_refused_even_with_a_matching_checksum(tmp_path: Path) -> None:
    from sqlalchemy.orm import Session

    store = BankStore(tmp_path / "bank")
    version_id = build(store)
    with Session(store._get_engine()) as session, session.begin():
        row = session.get(store_module.BankVersion, version_id)
        row.config_json = "[]"
        anchors = list(session.scalars(store_module.select(store_module.Anchor).where(store_module.Anchor.version_id == version_id)))
        row.record_sha256 = store_module.record_sha256(row, anchors, ["u1", "u2"])
    with pytest.raises(BankIntegrityError, match="config is a JSON list"):
        store.open()
    store.close()


def test_an_unwritable_versions_folder_is_a_typed_error(store: BankStore, monkeypatch) -> None:
    import errno

    from pmeta.errors import InvalidRequest

    first = build(store)

    def denied(_versions_dir):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store_module, "_new_version_id", denied)
    with pytest.raises(InvalidRequest, match="cannot write into .*versions: Permission denied"):
        store.new_version()
    monkeypatch.undo()
    assert store.open().id == first
    with store.new_version():  # the lock was released
        pass


@pytest.mark.parametrize("column", [True, False])
def test_an_empty_revision_table_left_by_a_killed_older_upgrade_is_repaired(tmp_path: Path, column: bool) -> None:
    """Before its DDL was transactional, an upgrade killed after Alembic created ``alembic_version``
    left the bank tables beside an empty one; opening stamps the revision the tables show and upgrades."""
    import sqlite3

    first = build(BankStore(tmp_path / "bank"))
    connection = sqlite3.connect(tmp_path / "bank" / "bank.db")
    connection.execute("DELETE FROM alembic_version")
    if not column:
        connection.execute("ALTER TABLE bank_versions DROP COLUMN record_sha256")
    connection.commit()
    connection.close()
    with BankStore(tmp_path / "bank") as store:
        assert store.open().id == first and store.verify()["ok"]
    columns, revision = _columns(tmp_path / "bank")
    assert "record_sha256" in columns and revision == [store_module.migrate.head()]


def test_a_broken_link_as_the_bank_path_is_not_a_bank(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(BankNotFound, match="a broken link or not a directory"):
        BankStore(tmp_path / "link").new_version()
    assert not (tmp_path / "nowhere").exists()


def test_a_failed_first_build_removes_a_bank_folder_with_the_longest_name(tmp_path: Path) -> None:
    path = tmp_path / ("b" * 250)
    with pytest.raises(RuntimeError, match="boom"):
        with BankStore(path).new_version() as writer:
            fill(writer)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_listing_versions_walks_their_folders_after_the_read_transaction(tmp_path: Path, monkeypatch) -> None:
    """The folder sizes are summed outside the read transaction, whose SQLite shared lock would keep a
    publish waiting for as long as the walk takes."""
    import sqlite3

    store = BankStore(tmp_path / "bank")
    build(store)
    real_tree_bytes = store_module._tree_bytes
    outcomes = []

    def probe(root: Path) -> int:
        writer = sqlite3.connect(tmp_path / "bank" / "bank.db", timeout=0.2, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE bank_versions SET notes = notes")
            writer.execute("COMMIT")
            outcomes.append("committed")
        except sqlite3.OperationalError as error:
            outcomes.append(str(error))
        finally:
            writer.close()
        return real_tree_bytes(root)

    monkeypatch.setattr(store_module, "_tree_bytes", probe)
    assert len(store.versions()) == 1
    assert outcomes == ["committed"]
    store.close()

"""A bank directory: immutable, checksummed version folders plus a metadata database.

Layout::

    BANK/bank.db                      metadata (SQLite by default; any SQLAlchemy URL by ``db_url=``)
    BANK/versions/<version_id>/       one immutable folder per published version + manifest.json
    BANK/versions/.tmp-<version_id>/  a version being built (removed on failure or by the next build)
    BANK/.lock                        builders hold an exclusive ``flock`` on it while they write

Publishing is crash-safe: files are written into a private temporary folder, fsynced, listed in a
checksummed manifest, renamed into place, and only then recorded and made active in one database
transaction, which checks again that the database holds no other bank. Until that commit the
previous active version stays active; a killed builder leaves at most a ``.tmp-*`` folder (removed
by the next build) or, if killed between the rename and the commit, an unrecorded folder that
:meth:`BankStore.info` reports under ``orphans`` and nothing ever opens. Readers take no lock: a
published folder never changes, and every open verifies it.

The metadata database's schema is managed by Alembic (:mod:`pmeta.storage.migrate`): a build
brings it to the newest revision under the build lock, and opening an out-of-date bank upgrades
it (the one time a reader writes: one transaction, which concurrent upgraders wait for). One
database holds one bank: a build refuses a database whose recorded versions all live in another
bank directory. On PostgreSQL a build also holds a session advisory lock, so two builds into one
database exclude each other even where the bank folder's ``flock`` does not reach (two machines
sharing the bank folder). Each version's database record (its row, anchors and held-out users)
carries a sha256 that every open checks; database errors surface as typed errors:
:class:`BankIntegrityError` for a corrupt database, :class:`BankUnavailable` for one that cannot
be reached, :class:`BankBusy` for one locked too long.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, make_url, select, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from pmeta.checks import as_path, is_path_error, os_error_message
from pmeta.errors import BankBusy, BankIntegrityError, BankNotFound, BankUnavailable, InvalidConfig, InvalidRequest, PmetaError
from pmeta.storage import migrate
from pmeta.storage.db import ACTIVE, ActiveVersion, Anchor, BankVersion, HeldOutUser, as_utc, for_writing, make_engine, record_sha256
from pmeta.storage.manifest import MANIFEST_NAME, check_dir, list_files, verified_entries, write_manifest
from pmeta.storage.tensor_file import save_tensors

if TYPE_CHECKING:
    import torch

DB_NAME = "bank.db"
LOCK_NAME = ".lock"
VERSIONS_NAME = "versions"
TMP_PREFIX = ".tmp-"
#: PostgreSQL session advisory lock key held by a build ("pmeta-bl").
BUILD_LOCK_KEY = 0x706D6574612D626C


class BankStore:
    """A bank directory and its metadata database.

    ``path`` is the bank directory; ``db_url`` defaults to ``sqlite:///<abs path>/bank.db``.
    Creating a ``BankStore`` touches nothing on disk: only :meth:`new_version` creates a bank.
    """

    def __init__(self, path: str | os.PathLike[str], db_url: str | None = None) -> None:
        self.path = as_path(path, "bank folder", InvalidRequest).absolute()
        if db_url is not None and not isinstance(db_url, str):
            raise InvalidConfig(f"a database URL must be a str, not {type(db_url).__name__}")
        self.db_url = db_url or f"sqlite:///{self.path / DB_NAME}"
        try:
            make_url(self.db_url)
        except Exception:  # noqa: BLE001 - sqlalchemy raises ArgumentError (and ValueError on odd ports)
            raise InvalidConfig(f"not a database URL: {_hide_url_password(self.db_url)} (expected e.g. postgresql+psycopg://user@host/db)") from None
        self._engine: Engine | None = None
        self._schema_seen = False
        # True while the database stays at revision 0002 because it could not be upgraded (read-only):
        # a NULL record checksum is then a version published before 0002, opened without the check.
        self._unfilled_checksums = False

    def __repr__(self) -> str:
        return f"BankStore({str(self.path)!r})"

    def __enter__(self) -> BankStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Dispose of the database engine (it is re-created on the next use)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._schema_seen = False
            self._unfilled_checksums = False

    @property
    def versions_dir(self) -> Path:
        return self.path / VERSIONS_NAME

    # ----------------------------------------------------------------------------------- writing

    def new_version(self) -> VersionWriter:
        """Start building a new version; use the result as a context manager.

        Creates the bank (directory, ``versions/``, database schema) on first use, takes an
        exclusive non-blocking lock on ``BANK/.lock``, removes stale ``versions/.tmp-*`` folders
        and creates ``versions/.tmp-<id>``.

        Raises :class:`BankBusy` if another build holds the lock, and :class:`BankNotFound` if
        ``path`` is a file, or a non-empty directory that does not look like a bank (so that a
        typo never scatters bank files into an unrelated folder).
        """
        try:
            self._check_buildable()
        except PmetaError:  # BankNotFound is an OSError too
            raise
        except OSError as error:  # a name too long, a loop of links
            if not is_path_error(error):
                raise
            raise InvalidRequest(f"cannot build a bank at {self.path}: {os_error_message(error)}") from None
        db_lock: Connection | None = None
        with self._db_errors():  # a bad URL or an unreachable server fails before anything is created
            db_lock = _acquire_db_lock(self._get_engine(), self)
        try:
            self._check_database_owner()
            try:
                self.path.mkdir(parents=True)
                created_bank = True  # by this build: a first build that fails removes it
            except FileExistsError:
                created_bank = False
                if not self.path.is_dir():  # a link to nothing, or a file that appeared meanwhile
                    raise BankNotFound(f"not a pmeta bank: {self.path} (a broken link or not a directory)") from None
            except OSError as error:  # a read-only or virtual file system, no permission
                if not is_path_error(error):
                    raise  # a full disk, an I/O error
                raise InvalidRequest(f"cannot create the bank folder {self.path}: {os_error_message(error)}") from None
            lock = _acquire_lock(self.path / LOCK_NAME, self.path)
        except BaseException:
            _release_db_lock(db_lock)
            raise
        try:
            with self._db_errors():
                state = _upgrade(self._get_engine(), self)
                if state.startswith("unknown:"):
                    raise BankIntegrityError(_unknown_revision(self, state))
            self._schema_seen = True
            try:
                self.versions_dir.mkdir(exist_ok=True)
                for stale in self.versions_dir.glob(TMP_PREFIX + "*"):
                    _remove(stale)
                version_id = _new_version_id(self.versions_dir)
                tmp_dir = self.versions_dir / (TMP_PREFIX + version_id)
                tmp_dir.mkdir()
            except OSError as error:
                if not is_path_error(error):
                    raise  # a full disk, an I/O error
                raise InvalidRequest(f"cannot write into {self.versions_dir}: {os_error_message(error)}") from None
        except BaseException:
            _release_db_lock(db_lock)
            _release_lock(lock)
            raise
        return VersionWriter(self, version_id, tmp_dir, lock, db_lock, created_bank)

    def _check_database_owner(self) -> None:
        """One database holds one bank: refuse a database whose versions all live in another directory.

        Versions record folder names only, so a second bank directory publishing into the same
        database would move the first one's active pointer to a folder it does not have. The bank's
        own ``bank.db`` is owned by construction and not read here (it may not exist yet).
        :meth:`VersionWriter.publish` checks again in its transaction: two first builds sharing a
        database that is not PostgreSQL (whose builds exclude each other) both pass this check.
        """
        if _sqlite_file(self.db_url) == self.path / DB_NAME:
            return
        with self._db_errors():
            engine = self._get_engine()
            with engine.connect() as connection:
                state = migrate.schema_state(connection)
            if state in ("empty", "partial") or state.startswith("unknown:"):
                return  # a new database (or one the upgrade below refuses)
            with Session(engine) as session:
                self._check_owner_in(session)

    def _check_owner_in(self, session: Session) -> None:
        """The owner check on ``session``'s view of the database; the bank's own ``bank.db`` passes."""
        if _sqlite_file(self.db_url) == self.path / DB_NAME:
            return
        recorded = list(session.scalars(select(BankVersion.id)))
        if recorded and not any((self.versions_dir / version).is_dir() for version in recorded):
            raise InvalidConfig(
                f"database {self._db_label()} already holds another bank: none of its {len(recorded)} version(s) "
                f"is in {self.versions_dir} (one database holds one bank; give this bank its own database)"
            )

    def _check_buildable(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise BankNotFound(f"not a pmeta bank: {self.path} (not a directory)")
        if self.path.is_dir():
            entries = {entry.name for entry in self.path.iterdir()}
            if entries and not entries & {VERSIONS_NAME, DB_NAME, LOCK_NAME}:
                raise BankNotFound(
                    f"not a pmeta bank: {self.path} (a non-empty directory without {VERSIONS_NAME}/; "
                    "refusing to build a bank into it)"
                )

    # ----------------------------------------------------------------------------------- reading

    def open(self, version: str | None = None) -> VersionReader:
        """Open ``version`` (the active version by default) after verifying its folder.

        Raises :class:`BankNotFound` if the path is not a bank, has no active version, or has no
        such version; :class:`BankIntegrityError` if the version's folder is missing or any file
        (manifest included) does not match its checksum, or an unlisted file is present.
        Never creates a file or database.
        """
        record = self.record(version)
        version = record["id"]
        folder = self.versions_dir / version
        if not folder.is_dir():
            raise BankIntegrityError(
                f"bank version {version} is recorded but {VERSIONS_NAME}/{version} is missing"
            )
        entries = verified_entries(folder, record["manifest_sha256"])
        return VersionReader(version, folder, record, entries)

    def record(self, version: str | None = None) -> dict[str, Any]:
        """The checksummed database record of ``version`` (the active one by default), without
        reading its folder: cheap enough to dispatch on (e.g. the bank's kind); :meth:`open`
        verifies the files. Raises like :meth:`open` for a missing bank, version or record."""
        engine = self._engine_for_reading()
        with self._db_errors(), Session(engine) as session:
            wanted_active = version is None
            if version is None:
                version = _active_id(session)
                if version is None:
                    raise BankNotFound(f"not a pmeta bank: {self.path} (no active version)")
            record = _load_record(session, version, self._db_label(), self._unfilled_checksums)
            if record is None:
                if wanted_active:
                    raise BankIntegrityError(f"bank database {self._db_label()} is corrupt: the active version {version!r} has no record")
                raise BankNotFound(f"bank {self.path} has no version {version!r}")
        return record

    def versions(self) -> list[dict[str, Any]]:
        """Summaries of every published version, oldest first: id, created_at, dataset_name,
        dataset_fingerprint, n_anchors, notes, manifest_sha256, active (bool), bytes.
        Raises :class:`BankNotFound` if the path is not a bank."""
        engine = self._engine_for_reading()
        with self._db_errors(), Session(engine) as session:
            active = _active_id(session)
            rows = session.scalars(select(BankVersion).order_by(BankVersion.created_at, BankVersion.id))
            summaries = [
                {
                    "id": row.id,
                    "created_at": as_utc(row.created_at).isoformat(),
                    "dataset_name": row.dataset_name,
                    "dataset_fingerprint": row.dataset_fingerprint,
                    "n_anchors": row.n_anchors,
                    "notes": row.notes,
                    "manifest_sha256": row.manifest_sha256,
                    "active": row.id == active,
                }
                for row in rows
            ]
        # the folders are walked after the read transaction ends: it holds SQLite's shared lock,
        # which would keep a publish waiting for as long as the walk takes
        return [{**summary, "bytes": _tree_bytes(self.versions_dir / summary["id"])} for summary in summaries]

    def info(self) -> dict[str, Any]:
        """Overview of the bank: path, db_url (password hidden), active version id (or None),
        versions (as :meth:`versions`), total bytes on disk, ``orphans`` (version folders that no
        database row records, left by a build killed between rename and commit) and ``tmp_dirs``
        (builds in progress or killed). Raises :class:`BankNotFound` if the path is not a bank."""
        versions = self.versions()
        recorded = {entry["id"] for entry in versions}
        folders = sorted(p.name for p in self.versions_dir.iterdir()) if self.versions_dir.is_dir() else []
        return {
            "path": str(self.path),
            "db_url": make_url(self.db_url).render_as_string(hide_password=True),
            "active": next((entry["id"] for entry in versions if entry["active"]), None),
            "versions": versions,
            "bytes": self.bank_bytes(),
            "orphans": [name for name in folders if not name.startswith(TMP_PREFIX) and name not in recorded],
            "tmp_dirs": [name for name in folders if name.startswith(TMP_PREFIX)],
        }

    def verify(self, all_versions: bool = False) -> dict[str, Any]:
        """Check the active version (or every version) file by file, without raising for bad files.

        Returns ``{"path", "ok", "versions": [{"id", "active", "ok", "files": {name: "ok" or the
        problem}, "errors": [problem, ...]}, ...]}``. Raises :class:`BankNotFound` if the path is
        not a bank, or if it has no active version and ``all_versions`` is false.
        """
        engine = self._engine_for_reading()
        database_errors: list[str] = []
        with self._db_errors(), Session(engine) as session:
            database_errors = _database_problems(session, self._db_label())
            active = _active_id(session)
            rows = session.execute(
                select(BankVersion.id, BankVersion.manifest_sha256).order_by(BankVersion.created_at, BankVersion.id)
            ).all()
            record_errors: dict[str, str] = {}
            for row in rows:
                try:
                    if _load_record(session, row.id, self._db_label(), self._unfilled_checksums) is None:
                        record_errors[row.id] = f"bank database {self._db_label()} has no record of version {row.id}"
                except BankIntegrityError as error:
                    record_errors[row.id] = str(error)
                except (ValueError, TypeError, OverflowError) as error:  # e.g. a date that no longer parses
                    record_errors[row.id] = f"bank database {self._db_label()}: the record of version {row.id} holds an unreadable value: {_first_line(error)}"
            if active is not None and active not in {row.id for row in rows}:
                database_errors.append(f"bank database {self._db_label()} is corrupt: the active version {active!r} has no record")
        if not all_versions:
            if active is None:
                raise BankNotFound(f"not a pmeta bank: {self.path} (no active version)")
            rows = [row for row in rows if row.id == active]
        checked = []
        for version_id, manifest_sha256 in rows:
            folder = self.versions_dir / version_id
            if folder.is_dir():
                problems = check_dir(folder, manifest_sha256)
                errors = [problem for problem in problems.values() if problem is not None]
            else:
                problems = {}
                errors = [f"bank version {version_id} is recorded but {VERSIONS_NAME}/{version_id} is missing"]
            if version_id in record_errors:
                errors.insert(0, record_errors[version_id])
            checked.append(
                {
                    "id": version_id,
                    "active": version_id == active,
                    "ok": not errors,
                    "files": {name: problem or "ok" for name, problem in problems.items()},
                    "errors": errors,
                }
            )
        return {
            "path": str(self.path),
            "ok": not database_errors and all(entry["ok"] for entry in checked),
            "database": {"url": self._db_label(), "ok": not database_errors, "errors": database_errors},
            "versions": checked,
        }

    def bank_bytes(self) -> int:
        """Total size in bytes of the files under the bank directory (database included when it
        lives there). Raises :class:`BankNotFound` if the path is not a directory."""
        if not self.path.is_dir():
            raise BankNotFound(f"not a pmeta bank: {self.path} (not a directory)")
        return _tree_bytes(self.path)

    # ---------------------------------------------------------------------------------- database

    def _get_engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.db_url)
        return self._engine

    def _engine_for_reading(self) -> Engine:
        """The engine, after checking that the bank exists; never creates a database file."""
        try:
            is_dir = self.path.is_dir()
        except OSError as error:  # a name too long
            raise BankNotFound(f"not a pmeta bank: {self.path} ({os_error_message(error)})") from None
        if not is_dir:
            raise BankNotFound(f"not a pmeta bank: {self.path} (not a directory)")
        sqlite_file = _sqlite_file(self.db_url)
        if sqlite_file is not None and not sqlite_file.is_file():
            shown = DB_NAME if sqlite_file == self.path / DB_NAME else str(sqlite_file)
            raise BankNotFound(f"not a pmeta bank: {self.path} (no {shown})")
        engine = self._get_engine()
        if not self._schema_seen:
            with self._db_errors():
                with engine.connect() as connection:
                    state = migrate.schema_state(connection)
                if state in ("empty", "partial"):
                    raise BankNotFound(f"not a pmeta bank: {self.path} (its database has no bank tables)")
                if state.startswith("unknown:"):
                    raise BankIntegrityError(_unknown_revision(self, state))
                if state in ("outdated", "no-revision"):
                    try:
                        _upgrade(engine, self)
                    except DBAPIError as error:
                        # a read-only bank (file, mount or database role) at revision 0002 has the
                        # current tables: read it as the pmeta that wrote it did
                        if not _read_only(error) or not _at_checksum_revision(engine):
                            raise
                        self._unfilled_checksums = True
            self._schema_seen = True
        return engine

    def _db_label(self) -> str:
        """The database as shown in messages: ``bank.db`` for the default, else the URL without password."""
        sqlite_file = _sqlite_file(self.db_url)
        if sqlite_file is not None and sqlite_file == self.path / DB_NAME:
            return DB_NAME
        return _hide_url_password(self.db_url)

    @contextmanager
    def _db_errors(self) -> Iterator[None]:
        """Turn database driver errors into pmeta's typed errors, with one line naming the database."""
        try:
            yield
        except PmetaError:
            raise
        except DBAPIError as error:
            raise _typed_db_error(error, self) from None
        except SQLAlchemyError as error:
            raise BankIntegrityError(f"bank database {self._db_label()} cannot be read: {_first_line(error)}") from None
        except CommandError as error:  # Alembic: e.g. several rows in alembic_version
            raise BankIntegrityError(f"bank database {self._db_label()} has an unusable schema revision record: {_first_line(error)}") from None
        except (ValueError, TypeError, OverflowError) as error:  # a stored value that no longer parses
            raise BankIntegrityError(f"bank database {self._db_label()} holds an unreadable value: {_first_line(error)}") from None


def bank_kind(path: str | Path, db_url: str | None = None, version: str | None = None) -> str:
    """"text" or "movielens": the kind of the bank's active (or given) version, from its checksummed
    database record (the files are verified by the open that follows)."""
    record = BankStore(path, db_url).record(version)
    return "text" if record["config"].get("kind") == "text" else "movielens"


class VersionWriter:
    """A version being built in ``versions/.tmp-<id>``; holds the bank's build lock.

    Write files with :meth:`write_tensors`, :meth:`write_json`, :meth:`write_bytes`, or write to
    :meth:`path` directly, then :meth:`publish`. Leaving the ``with`` block (or calling
    :meth:`close`) without publishing discards the folder; either way the lock is released.
    File names are relative POSIX paths (``"tensors.safetensors"``, ``"extra/catalog.json"``).
    """

    def __init__(self, store: BankStore, version_id: str, tmp_dir: Path, lock: IO[bytes], db_lock: Connection | None = None, created_bank: bool = False) -> None:
        self.id = version_id
        self._created_bank = created_bank  # this build created the bank folder: a failure removes it
        self.dir = tmp_dir
        self._store = store
        self._lock: IO[bytes] | None = lock
        self._db_lock = db_lock
        self._state = "open"  # open -> published | discarded | failed | uncertain (a commit that may have landed)

    def __repr__(self) -> str:
        return f"VersionWriter({self.id!r}, {self._state})"

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Discard the folder unless published, and release the lock. Safe to call twice.

        If this build created the bank folder and publishes nothing, the whole folder goes (lock
        file and SQLite database included, while the lock is still held): a failed first build
        leaves no empty bank behind. The folder is first renamed away, so a build that starts
        meanwhile makes a bank of its own at the path, which this removal never touches; and it is
        removed only while the lock this writer holds is still the lock file at the bank's path (a
        folder moved or replaced by hand while the build ran is left alone)."""
        try:
            if self._state == "open":
                _remove(self.dir)
                self._state = "discarded"
            if self._created_bank and self._state in ("discarded", "failed"):
                self._created_bank = False
                self._store.close()
                if self._lock is not None and _is_lock_at(self._lock, self._store.path / LOCK_NAME):
                    _remove_bank_folder(self._store.path)
        finally:
            _release_db_lock(self._db_lock)
            self._db_lock = None
            if self._lock is not None:
                _release_lock(self._lock)
                self._lock = None

    def path(self, name: str) -> Path:
        """Absolute path for file ``name`` in the folder being built (parent folders created).
        Raises ``ValueError`` for names that are absolute, contain ``..``, or are ``manifest.json``,
        and ``RuntimeError`` once the writer is published or closed."""
        self._check_open()
        _check_name(name)
        target = self.dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Save ``tensors`` with safetensors (detached, moved to CPU, made contiguous; tensors
        that share memory are copied so that each is stored on its own)."""
        prepared: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for key, tensor in tensors.items():
            tensor = tensor.detach().cpu().contiguous()
            storage = tensor.untyped_storage().data_ptr()
            if storage in storages and tensor.numel() > 0:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            prepared[key] = tensor
        target = self.path(name)
        save_tensors(prepared, target)
        return target

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as UTF-8 JSON (numpy/torch scalars and arrays as lists, paths as strings).
        Raises ``TypeError`` for values JSON cannot hold."""
        target = self.path(name)
        target.write_text(_to_json(obj, indent=2), encoding="utf-8")
        return target

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write raw bytes (e.g. a serialised FAISS index)."""
        target = self.path(name)
        target.write_bytes(bytes(data))
        return target

    def publish(
        self,
        *,
        config: Mapping[str, Any],
        dataset_name: str,
        dataset_fingerprint: str,
        anchors: list[Mapping[str, Any]],
        held_out_users: Iterable[str],
        notes: str = "",
    ) -> str:
        """Make the version durable, record it and make it active; return its id.

        Steps: fsync every file, write the manifest, make files read-only, fsync the folder,
        rename ``.tmp-<id>`` to ``versions/<id>``, fsync ``versions/``, then one database
        transaction inserts the version row, its anchors (``position`` defaults to the list index;
        ``n_users`` and ``label`` have columns; further keys are kept as JSON) and its held-out
        users, and points ``active`` at it.

        If anything fails before the commit, the folder is removed, the previous active version
        stays active, and the error propagates. If the commit itself fails, the folder stays: it is
        the new active version if the commit landed (a lost acknowledgement can hide one), else an
        orphan that :meth:`BankStore.info` reports and nothing opens; after the commit, an error
        (say, closing the session) still propagates, but the new version stays published and
        active. Errors propagate as :class:`InvalidConfig` for a config JSON cannot hold,
        ``ValueError``/``TypeError`` for malformed anchors, :class:`BankBusy` when the bank folder
        was moved or replaced while the build ran (its lock file is no longer the one this writer
        holds), database errors as raised.
        """
        self._check_open()
        if not self._lock_still_here():
            _remove(self.dir)
            self._state = "failed"
            raise self._moved()
        final = self._store.versions_dir / self.id
        created: Path = self.dir
        committing = committed = False
        try:
            try:
                config_json = _to_json(dict(config), sort_keys=True)
            except (TypeError, ValueError) as error:
                raise InvalidConfig(f"bank config cannot be stored as JSON: {error}") from error
            anchor_rows = _anchor_rows(self.id, anchors)
            users = list(dict.fromkeys(str(user) for user in held_out_users))
            if not list_files(self.dir):
                raise ValueError(f"version {self.id} has no files to publish")

            _fsync_files(self.dir)
            manifest_sha256 = write_manifest(self.dir, self.id)
            _make_read_only(self.dir)
            _fsync_dirs(self.dir)
            os.rename(self.dir, final)
            created = final
            _fsync_dirs(self._store.versions_dir, recursive=False)

            version = BankVersion(
                id=self.id,
                created_at=datetime.now(timezone.utc),
                config_json=config_json,
                dataset_name=str(dataset_name),
                dataset_fingerprint=str(dataset_fingerprint),
                manifest_sha256=manifest_sha256,
                n_anchors=len(anchor_rows),
                notes=str(notes),
            )
            held_out = [HeldOutUser(version_id=self.id, user_id=user) for user in users]
            version.record_sha256 = record_sha256(version, anchor_rows, users)
            with self._store._db_errors(), Session(for_writing(self._store._get_engine())) as session:
                with session.begin():
                    if not self._lock_still_here():  # moved while the files were written: not this bank's database
                        raise self._moved()
                    self._store._check_owner_in(session)
                    _record_version(session, version, anchor_rows, held_out)
                    committing = True  # leaving this block commits: a failure from here may follow a commit
                committed = True
        except BaseException:
            if committing:  # the commit may have landed, or may still (a server finishing it after the
                # connection dropped): the folder stays, the active version if recorded, else an orphan
                self.dir = final
                self._state = "published" if committed or self._recorded() else "uncertain"
            else:
                _remove(created)
                self._state = "failed"
            raise
        self.dir = final
        self._state = "published"
        return self.id

    def _lock_still_here(self) -> bool:
        """Whether the lock this writer holds is still the lock file at the bank's path (no lock held:
        nothing to compare, True)."""
        return self._lock is None or _is_lock_at(self._lock, self._store.path / LOCK_NAME)

    def _moved(self) -> BankBusy:
        # the writer's folder moved with the bank's and is left there (removal acts at the path, which
        # now holds another bank or nothing); a later build into the moved folder removes it as stale
        return BankBusy(f"the bank folder {self._store.path} was moved or replaced while this build ran; nothing was published, build again")

    def _recorded(self) -> bool | None:
        """Whether this version's row is in the database, asked on a fresh connection (None: cannot
        tell); it decides the writer's state only, never whether the folder is removed."""
        try:
            with Session(self._store._get_engine()) as session:
                return session.get(BankVersion, self.id) is not None
        except Exception:  # noqa: BLE001 - an unreachable database: unknown
            return None

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"version writer {self.id} is {self._state}; start a new version")


class VersionReader:
    """A verified, published version: ``id``, ``dir``, ``record`` and its files.

    ``record`` holds the version row (``config`` parsed from JSON), ``anchors`` (dicts ordered by
    position) and ``held_out_users`` (sorted). Reading takes no lock. Every ``read_*`` reads the
    file's bytes once and checks them against the manifest's sha256 before parsing them, so a file
    changed after :meth:`BankStore.open` verified it is refused, never parsed.
    """

    def __init__(self, version_id: str, directory: Path, record: dict[str, Any], entries: Mapping[str, str]) -> None:
        self.id = version_id
        self.dir = directory
        self.record = record
        self.files = tuple(entries)
        self._sha256 = dict(entries)

    def __repr__(self) -> str:
        return f"VersionReader({self.id!r})"

    def path(self, name: str) -> Path:
        """Path of file ``name``. Raises ``FileNotFoundError`` if the version has no such file."""
        if name not in self.files:
            raise FileNotFoundError(f"bank version {self.id} has no file {name!r}")
        return self.dir / name

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Load a safetensors file as CPU tensors (after checking its bytes)."""
        from safetensors.torch import load

        data = self.read_bytes(name)
        try:
            return load(data)
        except Exception as error:  # noqa: BLE001 - checksummed yet unparsable: written by something else
            raise BankIntegrityError(f"bank file versions/{self.id}/{name} is not a safetensors file: {_first_line(error)}") from None

    def read_json(self, name: str) -> Any:
        """Parse a UTF-8 JSON file (after checking its bytes)."""
        try:
            return json.loads(self.read_bytes(name).decode("utf-8"))
        except ValueError as error:
            raise BankIntegrityError(f"bank file versions/{self.id}/{name} is not UTF-8 JSON: {_first_line(error)}") from None

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes, checked against the manifest's sha256. Raises ``FileNotFoundError``
        for a name the version does not have, :class:`BankIntegrityError` for changed bytes."""
        path = self.path(name)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BankIntegrityError(f"bank file versions/{self.id}/{name} cannot be read: {error.strerror or error}") from None
        if hashlib.sha256(data).hexdigest() != self._sha256[name]:
            raise BankIntegrityError(f"bank file versions/{self.id}/{name} does not match its checksum")
        return data


# ------------------------------------------------------------------------------------ helpers


def _record_version(
    session: Session, version: BankVersion, anchors: list[Anchor], held_out: list[HeldOutUser]
) -> None:
    """Insert a version with its anchors and held-out users and make it the active one."""
    session.add(version)
    session.flush()
    session.add_all(anchors)
    session.add_all(held_out)
    active = session.get(ActiveVersion, ACTIVE)
    if active is None:
        session.add(ActiveVersion(name=ACTIVE, version_id=version.id, updated_at=version.created_at))
    else:
        active.version_id = version.id
        active.updated_at = version.created_at


def _active_id(session: Session) -> str | None:
    active = session.get(ActiveVersion, ACTIVE)
    return None if active is None else active.version_id


def _load_record(
    session: Session, version_id: str, db_label: str = DB_NAME, unfilled_checksums: bool = False
) -> dict[str, Any] | None:
    """The version's record, after checking it against its ``record_sha256``. A NULL checksum is
    damage, except with ``unfilled_checksums`` (a database left at revision 0002, see
    :meth:`BankStore._engine_for_reading`), where it marks a version published before 0002."""
    row = session.get(BankVersion, version_id)
    if row is None:
        return None
    anchor_rows = list(session.scalars(select(Anchor).where(Anchor.version_id == version_id).order_by(Anchor.position)))
    held_out = list(
        session.scalars(
            select(HeldOutUser.user_id).where(HeldOutUser.version_id == version_id).order_by(HeldOutUser.user_id)
        )
    )
    # Revision 0003 filled in the checksum of every version published before 0002, so NULL is damage
    # too. The checksum guards against damage, not against someone who can write the database (who
    # could as well recompute it).
    if row.record_sha256 is None and not unfilled_checksums:
        raise BankIntegrityError(f"bank database {db_label}: the record of version {version_id} has no checksum")
    if row.record_sha256 is not None and row.record_sha256 != record_sha256(row, anchor_rows, held_out):
        raise BankIntegrityError(f"bank database {db_label}: the record of version {version_id} does not match its checksum")
    try:
        config = json.loads(row.config_json)
        if not isinstance(config, dict):
            raise TypeError(f"its config is a JSON {type(config).__name__}, not an object")
        anchors = [
            {"position": a.position, "n_users": a.n_users, "label": a.label, **json.loads(a.attrs_json or "{}")}
            for a in anchor_rows
        ]
    except (ValueError, TypeError) as error:
        raise BankIntegrityError(f"bank version {version_id} has unreadable JSON in its database: {error}") from None
    return {
        "id": row.id,
        "created_at": as_utc(row.created_at).isoformat(),
        "config": config,
        "dataset_name": row.dataset_name,
        "dataset_fingerprint": row.dataset_fingerprint,
        "manifest_sha256": row.manifest_sha256,
        "n_anchors": row.n_anchors,
        "notes": row.notes,
        "anchors": anchors,
        "held_out_users": held_out,
    }


def _read_only(error: DBAPIError) -> bool:
    """Whether a write failed because the database may only be read: a read-only SQLite file or
    mount, a PostgreSQL role without write grants, a read-only transaction or replica."""
    reason = str(error.orig if error.orig is not None else error).lower()
    return any(mark in reason for mark in ("readonly", "read-only", "permission denied", "attempt to write"))


def _at_checksum_revision(engine: Engine) -> bool:
    """Whether the database is at revision 0002 (whose tables are the current ones)."""
    try:
        with engine.connect() as connection:
            return migrate.current_revision(connection) == migrate.CHECKSUM_REVISION
    except (DBAPIError, CommandError):
        return False


def _database_problems(session: Session, db_label: str) -> list[str]:
    """SQLite's own structural check (``PRAGMA integrity_check``); other backends check themselves."""
    if session.get_bind().dialect.name != "sqlite":
        return []
    rows = [str(row[0]) for row in session.execute(text("PRAGMA integrity_check")).all()]
    if rows == ["ok"]:
        return []
    return [f"bank database {db_label} is corrupt: {rows[0]}" + (f" (and {len(rows) - 1} more problems)" if len(rows) > 1 else "")]


def _upgrade(engine: Engine, store: BankStore) -> str:
    """Run the migrations; a concurrent upgrade that won the race is fine."""
    try:
        return migrate.upgrade(engine)
    except migrate.SchemaError as error:
        if error.state.startswith("unknown:"):
            raise BankIntegrityError(_unknown_revision(store, error.state)) from None
        raise BankNotFound(f"not a pmeta bank: {store.path} (its database has only some of the bank tables)") from None
    except DBAPIError:
        with engine.connect() as connection:
            if migrate.schema_state(connection) == "current":
                return "current"
        raise


def _unknown_revision(store: BankStore, state: str) -> str:
    return (
        f"bank database {store._db_label()} is at schema revision {state.split(':', 1)[1]!r}, which this pmeta "
        f"does not know (newest: {migrate.head()}); use the pmeta that wrote it, or a newer one"
    )


def _typed_db_error(error: DBAPIError, store: BankStore) -> PmetaError:
    label = store._db_label()
    reason = _first_line(error.orig) if error.orig is not None else _first_line(error)
    dialect = make_url(store.db_url).get_backend_name()
    if dialect == "sqlite":
        if "locked" in reason or "busy" in reason:
            return BankBusy(f"bank database {label} is locked by another process: {reason}")
        if "readonly" in reason or "unable to open" in reason or "permission" in reason.lower():
            return BankUnavailable(f"cannot use bank database {label}: {reason}")
        return BankIntegrityError(f"bank database {label} is corrupt or unreadable: {reason}")
    if error.connection_invalidated or isinstance(error, (OperationalError, InterfaceError)):
        return BankUnavailable(f"cannot reach bank database {label}: {reason}")
    return BankIntegrityError(f"bank database {label} cannot be read: {reason}")


def _first_line(error: BaseException | object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _hide_url_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.rsplit("@", 1)[-1]


def _acquire_db_lock(engine: Engine, store: BankStore) -> Connection | None:
    """On PostgreSQL, a connection holding the bank's build advisory lock (None elsewhere)."""
    if engine.dialect.name != "postgresql":
        return None
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        taken = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": BUILD_LOCK_KEY}).scalar()
    except BaseException:
        connection.close()
        raise
    if not taken:
        connection.close()
        raise BankBusy(f"another build is publishing into the bank database {store._db_label()}")
    return connection


def _release_db_lock(connection: Connection | None) -> None:
    if connection is None:
        return
    try:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": BUILD_LOCK_KEY})
    except SQLAlchemyError:
        pass  # closing the session releases it too
    finally:
        connection.close()


def _anchor_rows(version_id: str, anchors: Iterable[Mapping[str, Any]]) -> list[Anchor]:
    rows: list[Anchor] = []
    positions: set[int] = set()
    for index, anchor in enumerate(anchors):
        if not isinstance(anchor, Mapping):
            raise TypeError(f"anchor {index} must be a dict, not {type(anchor).__name__}")
        attrs = dict(anchor)
        position = int(attrs.pop("position", index))
        if position in positions:
            raise ValueError(f"two anchors have position {position}")
        positions.add(position)
        rows.append(
            Anchor(
                version_id=version_id,
                position=position,
                n_users=int(attrs.pop("n_users", 0)),
                label=str(attrs.pop("label", "")),
                attrs_json=_to_json(attrs, sort_keys=True),
            )
        )
    return rows


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _to_json(obj: Any, **options: Any) -> str:
    return json.dumps(obj, default=_json_default, ensure_ascii=False, **options)


def _check_name(name: str) -> None:
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(part in ("", ".", "..") for part in parts) or "\x00" in name:
        raise ValueError(f"invalid bank file name {name!r}: use a relative path such as 'tensors.safetensors'")
    if name == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} is written by publish(), not by hand")


def _sqlite_file(db_url: str) -> Path | None:
    """The database file of a file-backed SQLite URL, else None."""
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).absolute()


def _acquire_lock(lock_path: Path, bank: Path) -> IO[bytes]:
    """An exclusive lock on ``lock_path``, held by the returned open file.

    The lock counts only while the file is still the one at ``lock_path``: a failed first build
    removes the bank folder, lock file included, and a build that opened the old file (or found
    the folder gone) must not go on as if it held the new bank's lock."""
    moved = BankBusy(f"another build removed {bank} while this one started; try again")
    try:
        handle = open(lock_path, "ab")
    except FileNotFoundError:
        raise moved from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BankBusy(f"another build is publishing into {bank}") from None
    except BaseException:
        handle.close()
        raise
    try:
        same = _is_lock_at(handle, lock_path)
    except BaseException:
        _release_lock(handle)
        raise
    if not same:
        _release_lock(handle)
        raise moved
    return handle


def _is_lock_at(handle: IO[bytes], lock_path: Path) -> bool:
    """Whether the open lock file ``handle`` is still the file at ``lock_path`` (same device and
    inode; False when nothing is there): a lock held on a file that was moved or removed, with the
    folder around it, is not the lock of whatever bank is at the path now.
    Any error reading either (a link loop at the path, a stale NFS handle, no permission) counts as
    not the same: the callers then leave the folder alone and refuse to publish."""
    try:
        held, there = os.fstat(handle.fileno()), os.stat(lock_path)
    except (OSError, ValueError):  # ValueError: a handle already closed
        return False
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def _release_lock(handle: IO[bytes]) -> None:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def _new_version_id(versions_dir: Path) -> str:
    while True:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        version_id = f"{stamp}-{secrets.token_hex(3)}"
        if not (versions_dir / version_id).exists() and not (versions_dir / (TMP_PREFIX + version_id)).exists():
            return version_id


def _remove_bank_folder(path: Path) -> None:
    """Rename ``path`` to a hidden sibling, then remove that (see :meth:`VersionWriter.close`)."""
    doomed = path.with_name(f".pmeta-removing-{secrets.token_hex(4)}")  # short: any bank name fits
    try:
        os.rename(path, doomed)
    except OSError:
        return  # left as it is: a bank folder without a version, which a later build reuses
    _remove(doomed)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _fsync_files(root: Path) -> None:
    for full in list_files(root).values():
        if full.is_file() and not full.is_symlink():
            with open(full, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dirs(root: Path, recursive: bool = True) -> None:
    folders = [Path(current) for current, _, _ in os.walk(root)] if recursive else [root]
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_read_only(root: Path) -> None:
    for full in list_files(root).values():
        if full.is_file() and not full.is_symlink():
            full.chmod(0o444)


def _tree_bytes(root: Path) -> int:
    total = 0
    for current, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(current, name)).st_size
            except FileNotFoundError:
                pass
    return total

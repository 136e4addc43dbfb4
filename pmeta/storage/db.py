"""Metadata database of a bank: SQLAlchemy 2 declarative models, the single home of the schema.

Tables:

- ``bank_versions``: one row per published version (config, dataset, manifest checksum, ...);
- ``anchors``: the anchors of a version, by position in the anchor tensors;
- ``held_out_users``: PROTOCOL test users of a version, recorded so they are never trained on;
- ``active_version``: a single row (``name = "active"``) pointing at the version readers open.

The models are plain, backend-neutral SQLAlchemy: SQLite by default, any SQLAlchemy URL
(PostgreSQL, ...) by choice. The schema is created and upgraded by the Alembic migrations in
``pmeta/storage/migrations`` (see :mod:`pmeta.storage.migrate`); a test checks that the migrated
schema equals these models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import DateTime, Engine, ForeignKey, Integer, String, Text, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pmeta.errors import InvalidConfig

ACTIVE = "active"
#: Execution option of :func:`for_writing`.
WRITE_OPTION = "pmeta_write"


class Base(DeclarativeBase):
    """Declarative base holding the bank schema's metadata."""


class BankVersion(Base):
    __tablename__ = "bank_versions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    config_json: Mapped[str] = mapped_column(Text)
    dataset_name: Mapped[str] = mapped_column(String(255))
    dataset_fingerprint: Mapped[str] = mapped_column(String(255))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    n_anchors: Mapped[int] = mapped_column(Integer)
    notes: Mapped[str] = mapped_column(Text, default="")
    # sha256 over the version's whole record (this row, its anchors and held-out users), checked
    # on every open (:func:`record_sha256`). Revision 0002 added it and revision 0003 filled it in
    # for the versions published before; since then NULL is damage and opening refuses it (a
    # read-only database left at 0002 is read as before).
    record_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)


class Anchor(Base):
    __tablename__ = "anchors"

    version_id: Mapped[str] = mapped_column(ForeignKey("bank_versions.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    n_users: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(Text, default="")
    # Any further JSON-serialisable attributes of the anchor (medoid user, key norm, ...).
    attrs_json: Mapped[str] = mapped_column(Text, default="{}")


class HeldOutUser(Base):
    __tablename__ = "held_out_users"

    version_id: Mapped[str] = mapped_column(ForeignKey("bank_versions.id"), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)


class ActiveVersion(Base):
    __tablename__ = "active_version"

    name: Mapped[str] = mapped_column(String(32), primary_key=True, default=ACTIVE)
    version_id: Mapped[str] = mapped_column(ForeignKey("bank_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


TABLE_NAMES = tuple(Base.metadata.tables)


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``. On SQLite, foreign keys are enforced, writers wait for locks
    up to 30 s, and every transaction is a real one, DDL included (:func:`for_writing` gives one
    that takes the write lock first); other backends get SQLAlchemy's defaults plus a 10 s connect
    timeout and a liveness check of pooled connections. Connecting is lazy: nothing is created
    until the engine is first used. Raises :class:`~pmeta.errors.InvalidConfig` for a malformed URL
    or a backend whose driver is not installed."""
    try:
        backend = make_url(url).get_backend_name()
        is_sqlite = backend == "sqlite"
        if is_sqlite:
            engine = create_engine(url, connect_args={"timeout": 30})
        elif backend == "postgresql":
            engine = create_engine(url, connect_args={"connect_timeout": 10}, pool_pre_ping=True)
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError) as error:  # NoSuchModuleError is an ArgumentError
        shown = _hide_password(url)
        raise InvalidConfig(f"cannot use database URL {shown}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:
            # Python's sqlite3 opens a transaction only before INSERT/UPDATE/DELETE, so DDL (a schema
            # upgrade's ALTER TABLE) would commit on its own; pmeta issues BEGIN itself (below).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(WRITE_OPTION) else "BEGIN")

    return engine


def for_writing(engine: Engine) -> Engine:
    """``engine`` whose transactions take SQLite's write lock when they begin (``BEGIN IMMEDIATE``),
    so that what a transaction reads before it writes cannot change under it; other backends are
    unchanged (pmeta serialises their writers with advisory locks)."""
    return engine.execution_options(**{WRITE_OPTION: True})


def _hide_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials part
        return url.split("@")[-1] if "@" in url else url


def as_utc(moment: datetime) -> datetime:
    """``moment`` with UTC as its zone where the backend returned it without one (SQLite)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def record_sha256(version: Any, anchors: Iterable[Any], held_out_users: Iterable[str]) -> str:
    """sha256 of a canonical JSON form of a version's record: the row (its own checksum aside),
    its anchors by position and its held-out users sorted. ``version`` and ``anchors`` are
    :class:`BankVersion` and :class:`Anchor` rows, or any rows with their columns as attributes
    (the migration that fills the checksum in reads them with SQLAlchemy Core)."""
    record = {
        "id": version.id,
        "created_at": as_utc(version.created_at).astimezone(timezone.utc).isoformat(),
        "config_json": version.config_json,
        "dataset_name": version.dataset_name,
        "dataset_fingerprint": version.dataset_fingerprint,
        "manifest_sha256": version.manifest_sha256,
        "n_anchors": version.n_anchors,
        "notes": version.notes,
        "anchors": sorted([a.position, a.n_users, a.label, a.attrs_json] for a in anchors),
        "held_out_users": sorted(held_out_users),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=True).encode()).hexdigest()

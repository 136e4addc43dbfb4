"""Metadata database of a bank: SQLAlchemy 2 declarative models, the single home of the schema.

Tables:

- ``bank_versions``: one row per published version (config, dataset, manifest checksum, ...);
- ``anchors``: the anchors of a version, by position in the anchor tensors;
- ``held_out_users``: PROTOCOL test users of a version, recorded so they are never trained on;
- ``active_version``: a single row (``name = "active"``) pointing at the version readers open.

The models are plain, backend-neutral SQLAlchemy: SQLite by default, any SQLAlchemy URL
(PostgreSQL, ...) by choice. Alembic migrations, when they come, start from these definitions.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Engine, ForeignKey, Integer, String, Text, create_engine, event, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ACTIVE = "active"


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
    """Create an engine for ``url``. On SQLite, foreign keys are enforced and writers wait for
    locks up to 30 s; other backends get SQLAlchemy's defaults. Connecting is lazy: nothing is
    created until the engine is first used."""
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    engine = create_engine(url, connect_args={"timeout": 30} if is_sqlite else {})
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _enforce_foreign_keys(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def create_schema(engine: Engine) -> None:
    """Create any missing bank table (``metadata.create_all``; existing tables are left alone)."""
    Base.metadata.create_all(engine)

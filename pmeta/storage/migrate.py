"""Schema migrations of the bank metadata database, run by pmeta itself through Alembic.

:func:`upgrade` brings a database to the newest revision (``HEAD``): an empty database gets every
table, a bank made before pmeta used Alembic (the tables of revision 0001 and no
``alembic_version``) is stamped at 0001 and upgraded, and a current one is left alone. Builders
call it under the bank's build lock; readers call :func:`schema_state` and only upgrade an
out-of-date bank. The whole upgrade, DDL included, is one transaction: an upgrade killed half
way leaves the database as it was. On PostgreSQL it holds a transaction-scoped advisory lock, so
that processes sharing one server never migrate at the same time; on SQLite it begins with
``BEGIN IMMEDIATE`` (:func:`pmeta.storage.db.for_writing`, on engines made by
:func:`pmeta.storage.db.make_engine`), so a second upgrader waits, then finds the schema current.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from pmeta.storage.db import for_writing

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The revision whose tables banks made before Alembic already have.
BASELINE = "0001"
#: Tables of the baseline revision.
BASELINE_TABLES = frozenset({"bank_versions", "anchors", "held_out_users", "active_version"})
#: The revision that added ``bank_versions.record_sha256``.
CHECKSUM_REVISION = "0002"
#: PostgreSQL advisory lock key of schema upgrades ("pmeta-mg").
MIGRATION_LOCK_KEY = 0x706D6574612D6D67
#: The version table Alembic keeps the revision in.
VERSION_TABLE = "alembic_version"


class SchemaError(RuntimeError):
    """A database :func:`upgrade` will not touch; ``state`` is its :func:`schema_state`."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the bundled migrations (no ini file); ``connection`` is used as is."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def head() -> str:
    """The newest revision id."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def current_revision(connection: Connection) -> str | None:
    """The revision recorded in ``alembic_version`` (None where there is none)."""
    return MigrationContext.configure(connection).get_current_revision()


def schema_state(connection: Connection) -> str:
    """``"current"``, ``"outdated"`` (a known older revision, or a pre-Alembic bank), ``"empty"``
    (no bank table; other applications' tables may exist), ``"partial"`` (some bank tables but
    not all, and no revision), ``"no-revision"`` (bank tables beside an empty ``alembic_version``,
    which :func:`upgrade` repairs) or ``"unknown:<rev>"`` (a revision this pmeta does not know,
    e.g. written by a newer pmeta).
    Raises Alembic's ``CommandError`` where ``alembic_version`` holds several revisions."""
    revision = current_revision(connection)
    if revision == head():
        return "current"
    if revision is not None:
        return "outdated" if revision in known_revisions() else f"unknown:{revision}"
    tables = set(inspect(connection).get_table_names())
    if BASELINE_TABLES <= tables:
        # an empty alembic_version: an upgrade by a pmeta without transactional DDL on SQLite, killed
        # after creating it (upgrade() stamps the revision the tables show)
        return "no-revision" if VERSION_TABLE in tables else "outdated"
    return "partial" if tables & BASELINE_TABLES else "empty"


def upgrade(engine: Engine) -> str:
    """Bring the database to :func:`head` in one transaction; return the state found before.

    Raises :class:`SchemaError` for a database with only some of the bank tables or an unknown
    revision (the storage layer turns these into typed errors)."""
    with for_writing(engine).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        state = schema_state(connection)
        if state == "current":
            return state
        if state == "partial" or state.startswith("unknown:"):
            raise SchemaError(state)
        config = alembic_config(connection)
        if state == "no-revision":  # an upgrade by an older pmeta killed after creating alembic_version
            columns = {column["name"] for column in inspect(connection).get_columns("bank_versions")}
            command.stamp(config, CHECKSUM_REVISION if "record_sha256" in columns else BASELINE)
        elif state == "outdated" and MigrationContext.configure(connection).get_current_revision() is None:
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
        return state

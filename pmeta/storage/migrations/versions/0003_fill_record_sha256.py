"""Fill in ``record_sha256`` for the versions published before revision 0002.

Those versions were opened without the record check; from this revision on every version has a
checksum and opening refuses a NULL one. A row too damaged to hash (an unreadable date) keeps
NULL, so that version alone is refused and the others still open; each row is read on its own for
that reason. A database that cannot be written (read-only) stays at 0002 and is read as before
(``BankStore._engine_for_reading``). The checksum is computed from the record as it stands at the
upgrade, so it guards against damage from then on (as 0002's did for new versions). Its format is
a frozen copy of :func:`pmeta.storage.db.record_sha256`, on purpose: a migration must not change
with later code.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The tables as of this revision (Core, not the ORM models, which may change later).
versions = sa.table(
    "bank_versions",
    sa.column("id", sa.String),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("config_json", sa.Text),
    sa.column("dataset_name", sa.String),
    sa.column("dataset_fingerprint", sa.String),
    sa.column("manifest_sha256", sa.String),
    sa.column("n_anchors", sa.Integer),
    sa.column("notes", sa.Text),
    sa.column("record_sha256", sa.String),
)
anchors = sa.table(
    "anchors",
    sa.column("version_id", sa.String),
    sa.column("position", sa.Integer),
    sa.column("n_users", sa.Integer),
    sa.column("label", sa.Text),
    sa.column("attrs_json", sa.Text),
)
held_out = sa.table("held_out_users", sa.column("version_id", sa.String), sa.column("user_id", sa.String))


def record_sha256(version, anchor_rows, held_out_users) -> str:
    """The checksum format of revision 0002, frozen here (``pmeta.storage.db.record_sha256`` is
    the live one; a later change of its format gets its own migration, recomputing every row)."""
    created = version.created_at
    if not isinstance(created, datetime):
        raise TypeError(f"created_at is {created!r}")
    created = created.replace(tzinfo=timezone.utc) if created.tzinfo is None else created
    record = {
        "id": version.id,
        "created_at": created.astimezone(timezone.utc).isoformat(),
        "config_json": version.config_json,
        "dataset_name": version.dataset_name,
        "dataset_fingerprint": version.dataset_fingerprint,
        "manifest_sha256": version.manifest_sha256,
        "n_anchors": version.n_anchors,
        "notes": version.notes,
        "anchors": sorted([a.position, a.n_users, a.label, a.attrs_json] for a in anchor_rows),
        "held_out_users": sorted(held_out_users),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def upgrade() -> None:
    if context.is_offline_mode():
        raise RuntimeError("revision 0003 computes checksums from the stored rows; run it on a database (pmeta does on open)")
    connection = op.get_bind()
    for version_id in connection.execute(sa.select(versions.c.id).where(versions.c.record_sha256.is_(None))).scalars().all():
        try:
            row = connection.execute(sa.select(versions).where(versions.c.id == version_id)).one()
            anchor_rows = connection.execute(sa.select(anchors).where(anchors.c.version_id == version_id)).all()
            users = connection.execute(sa.select(held_out.c.user_id).where(held_out.c.version_id == version_id)).scalars().all()
            checksum = record_sha256(row, anchor_rows, users)
        except (ValueError, TypeError):  # a damaged row stays NULL: opening refuses that version alone
            continue
        connection.execute(versions.update().where(versions.c.id == version_id).values(record_sha256=checksum))


def downgrade() -> None:
    """Nothing to undo: a filled-in checksum is what 0002 would have written."""

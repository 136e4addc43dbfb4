"""Fill in ``record_sha256`` for the versions published before revision 0002.

Those versions were opened without the record check; from this revision on every version has a
checksum and opening refuses a NULL one. The checksum is computed from the record as it stands at
the upgrade, so it guards against damage from then on (as 0002's did for new versions).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pmeta.storage.db import record_sha256

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


def upgrade() -> None:
    connection = op.get_bind()
    for row in connection.execute(sa.select(versions).where(versions.c.record_sha256.is_(None))).all():
        anchor_rows = connection.execute(sa.select(anchors).where(anchors.c.version_id == row.id)).all()
        users = connection.execute(sa.select(held_out.c.user_id).where(held_out.c.version_id == row.id)).scalars().all()
        connection.execute(
            versions.update().where(versions.c.id == row.id).values(record_sha256=record_sha256(row, anchor_rows, users))
        )


def downgrade() -> None:
    """Nothing to undo: a filled-in checksum is what 0002 would have written."""

"""The initial bank schema: versions, anchors, held-out users, the active-version pointer.

Banks made before pmeta used Alembic have exactly these tables and no ``alembic_version``; they
are stamped at this revision and upgraded from here.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bank_versions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("dataset_name", sa.String(255), nullable=False),
        sa.Column("dataset_fingerprint", sa.String(255), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("n_anchors", sa.Integer(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
    )
    op.create_table(
        "anchors",
        sa.Column("version_id", sa.String(64), sa.ForeignKey("bank_versions.id"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("n_users", sa.Integer(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("attrs_json", sa.Text(), nullable=False),
    )
    op.create_table(
        "held_out_users",
        sa.Column("version_id", sa.String(64), sa.ForeignKey("bank_versions.id"), primary_key=True),
        sa.Column("user_id", sa.String(255), primary_key=True),
    )
    op.create_table(
        "active_version",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("version_id", sa.String(64), sa.ForeignKey("bank_versions.id"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("active_version", "held_out_users", "anchors", "bank_versions"):
        op.drop_table(table)

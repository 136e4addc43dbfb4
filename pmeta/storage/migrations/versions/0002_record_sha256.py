"""A checksum over each version's database record (row, anchors, held-out users).

Versions published before this revision keep NULL and are opened without the record check.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("bank_versions", sa.Column("record_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bank_versions") as batch:
        batch.drop_column("record_sha256")

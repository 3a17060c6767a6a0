"""A refused file is recorded once: unique (sha256, original_name) among rejected rows.

The plain sha256 index goes: the partial unique indexes on live rows and on rejected
rows serve every lookup by checksum, and each index costs writes on every insert.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WHERE = "state = 'rejected'"


def upgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(
            "uq_files_rejected",
            ["sha256", "original_name"],
            unique=True,
            sqlite_where=sa.text(WHERE),
            postgresql_where=sa.text(WHERE),
        )
        batch_op.drop_index("ix_files_sha256")


def downgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index("ix_files_sha256", ["sha256"], unique=False)
        batch_op.drop_index("uq_files_rejected")

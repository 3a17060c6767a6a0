"""Fixity audits: ``fixity_checks``, one row per archived file re-read and checked.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from obsflow.catalog.schema import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fixity_checks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "file_id",
            sa.Integer(),
            sa.ForeignKey("files.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("checked_at", UTCDateTime(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("found_sha256", sa.String(64), nullable=True),
        sa.Column("bytes_read", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_fixity_checks_checked_at", "fixity_checks", ["checked_at"])
    op.create_index("ix_fixity_checks_file", "fixity_checks", ["file_id", "checked_at"])


def downgrade() -> None:
    op.drop_index("ix_fixity_checks_file", table_name="fixity_checks")
    op.drop_index("ix_fixity_checks_checked_at", table_name="fixity_checks")
    op.drop_table("fixity_checks")

"""The processes that write to the catalog, and their health: ``processes``.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from obsflow.catalog.schema import UTCDateTime

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "processes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=True),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started", UTCDateTime(), nullable=False),
        sa.Column("heartbeat", UTCDateTime(), nullable=False),
        sa.Column("interval_seconds", sa.Float(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("health", sa.Text(), nullable=False),
    )
    op.create_index("ix_processes_heartbeat", "processes", ["heartbeat"])


def downgrade() -> None:
    op.drop_index("ix_processes_heartbeat", table_name="processes")
    op.drop_table("processes")

"""When a queued run was handed to its executor: ``runs.dispatched_at``.

The daemon hands each queued run to the executor once (a broker must not receive the
same run on every pass of the tracker); the moment it did is kept on the run, and
cleared whenever the run is queued again (an expired lease, a retry, a shutdown), so
that it is handed over again exactly once.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from obsflow.catalog.schema import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("dispatched_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("dispatched_at")

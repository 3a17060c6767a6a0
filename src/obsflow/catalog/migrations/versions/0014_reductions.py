"""On-demand reductions: ``reductions``, ``reduction_runs``, ``reduction_results``.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from obsflow.catalog.schema import UTCDateTime

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reductions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("runs_request", sa.String(64), nullable=False),
        sa.Column("parameters", sa.Text(), nullable=False),
        sa.Column("inputs", sa.Text(), nullable=False),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("priority", sa.String(8), nullable=False, server_default=sa.text("'normal'")),
        sa.Column("input_bytes", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("expired_at", UTCDateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_reductions_owner", "reductions", ["owner"])
    op.create_index("ix_reductions_key", "reductions", ["key"])
    op.create_index("ix_reductions_phase", "reductions", ["phase"])
    op.create_table(
        "reduction_runs",
        sa.Column(
            "reduction_id",
            sa.Integer(),
            sa.ForeignKey("reductions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("final", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_reduction_runs_run", "reduction_runs", ["run_id"])
    op.create_table(
        "reduction_results",
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("product", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reduction_results")
    op.drop_index("ix_reduction_runs_run", table_name="reduction_runs")
    op.drop_table("reduction_runs")
    op.drop_index("ix_reductions_phase", table_name="reductions")
    op.drop_index("ix_reductions_key", table_name="reductions")
    op.drop_index("ix_reductions_owner", table_name="reductions")
    op.drop_table("reductions")

"""Processing: runs, their inputs and steps, the tracker's groups and cursor, provenance.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from obsflow.catalog.schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("files", sa.Column("made_by_run", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_files_made_by_run"), "files", ["made_by_run"])
    op.create_index("ix_files_product_night", "files", ["product", "night"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("group_key", sa.Text(), nullable=False),
        sa.Column("night", sa.Date(), nullable=True),
        sa.Column("input_hash", sa.String(64), nullable=False),
        sa.Column("request", sa.String(64), server_default=sa.text("''"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("degraded", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("overrides", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("work_dir", sa.Text(), nullable=True),
        sa.Column("log_path", sa.Text(), nullable=True),
        sa.Column("profile", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint(
            "pipeline",
            "group_key",
            "input_hash",
            "request",
            name=op.f("uq_runs_pipeline_group_key_input_hash_request"),
        ),
    )
    op.create_index(op.f("ix_runs_night"), "runs", ["night"])
    op.create_index(op.f("ix_runs_state"), "runs", ["state"])
    op.create_index("ix_runs_pipeline_group", "runs", ["pipeline", "group_key"])
    op.create_table(
        "run_inputs",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("input", sa.String(64), nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_inputs_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_run_inputs_file_id_files")
        ),
        sa.PrimaryKeyConstraint("run_id", "input", "file_id", name=op.f("pk_run_inputs")),
    )
    op.create_index("ix_run_inputs_file_id", "run_inputs", ["file_id"])
    op.create_table(
        "run_steps",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("argv", sa.Text(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("exit_status", sa.Integer(), nullable=True),
        sa.Column("stdout_tail", sa.Text(), nullable=True),
        sa.Column("stderr_tail", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_steps_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "step", name=op.f("pk_run_steps")),
    )
    op.create_table(
        "tracker_groups",
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("group_key", sa.Text(), nullable=False),
        sa.Column("night", sa.Date(), nullable=False),
        sa.Column("primary_file_id", sa.Integer(), nullable=False),
        sa.Column("due_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "group_key", name=op.f("pk_tracker_groups")),
    )
    op.create_index(op.f("ix_tracker_groups_night"), "tracker_groups", ["night"])
    op.create_index(op.f("ix_tracker_groups_due_at"), "tracker_groups", ["due_at"])
    op.create_table(
        "tracker_cursor",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("last_file_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tracker_cursor")),
    )


def downgrade() -> None:
    op.drop_table("tracker_cursor")
    op.drop_index(op.f("ix_tracker_groups_due_at"), table_name="tracker_groups")
    op.drop_index(op.f("ix_tracker_groups_night"), table_name="tracker_groups")
    op.drop_table("tracker_groups")
    op.drop_table("run_steps")
    op.drop_index("ix_run_inputs_file_id", table_name="run_inputs")
    op.drop_table("run_inputs")
    op.drop_index("ix_runs_pipeline_group", table_name="runs")
    op.drop_index(op.f("ix_runs_state"), table_name="runs")
    op.drop_index(op.f("ix_runs_night"), table_name="runs")
    op.drop_table("runs")
    op.drop_index("ix_files_product_night", table_name="files")
    op.drop_index(op.f("ix_files_made_by_run"), table_name="files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("made_by_run")

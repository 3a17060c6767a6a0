"""The tracker's inbox; the products' longest spans; tags in start order.

* A per-file ``tracked`` mark instead of a cursor over file IDs: a cursor moved past an
  ID whose transaction had not committed yet when concurrent writers (PostgreSQL)
  committed out of ID order, and that file never started its runs.
* ``spans``: the longest a file of each product lasts, the lower bound that keeps
  time-range lookups on the (product, start) index (:mod:`obsflow.catalog.spans`).
* ``tags.start_utc`` (the file's start, copied) and indexes (tag, start, file) and
  (tag, file): a tag's files in either order straight from an index.
* ``tokens.instruments``: the instruments whose frames a token may transfer.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from obsflow.catalog.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UNTRACKED = "tracked = false"


def upgrade() -> None:
    op.add_column(
        "files", sa.Column("tracked", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    # what the cursor had passed is tracked; the rest waits for the tracker
    op.execute(
        "UPDATE files SET tracked = true WHERE id <= "
        "(SELECT coalesce(max(last_file_id), 0) FROM tracker_cursor)"
    )
    op.create_index(
        "ix_files_untracked",
        "files",
        ["id"],
        sqlite_where=sa.text(UNTRACKED),
        postgresql_where=sa.text(UNTRACKED),
    )
    op.drop_table("tracker_cursor")
    op.create_table(
        "spans",
        sa.Column("product", sa.String(64), nullable=False),
        sa.Column("longest_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("product", name=op.f("pk_spans")),
    )
    if op.get_bind().dialect.name == "postgresql":
        seconds = "extract(epoch FROM max(stop_utc - start_utc))"
    else:
        seconds = "max((julianday(stop_utc) - julianday(start_utc)) * 86400.0)"
    op.execute(
        f"INSERT INTO spans (product, longest_seconds) SELECT product, {seconds} FROM files "
        "WHERE product IS NOT NULL AND start_utc IS NOT NULL AND stop_utc IS NOT NULL "
        "GROUP BY product"
    )
    op.add_column("tags", sa.Column("start_utc", UTCDateTime(), nullable=True))
    op.execute(
        "UPDATE tags SET start_utc = (SELECT start_utc FROM files WHERE files.id = tags.file_id)"
    )
    op.drop_index("ix_tags_tag", table_name="tags")
    op.create_index("ix_tags_tag_start_utc_file_id", "tags", ["tag", "start_utc", "file_id"])
    op.create_index("ix_tags_tag_file_id", "tags", ["tag", "file_id"])
    op.add_column(
        "tokens",
        sa.Column("instruments", sa.Text(), server_default=sa.text("'[]'"), nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("instruments")
    op.drop_index("ix_tags_tag_file_id", table_name="tags")
    op.drop_index("ix_tags_tag_start_utc_file_id", table_name="tags")
    op.create_index("ix_tags_tag", "tags", ["tag"])
    with op.batch_alter_table("tags") as batch:
        batch.drop_column("start_utc")
    op.drop_table("spans")
    op.create_table(
        "tracker_cursor",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("last_file_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tracker_cursor")),
    )
    op.execute(
        "INSERT INTO tracker_cursor (name, last_file_id) "
        "SELECT 'tracker', coalesce(min(id) - 1, (SELECT coalesce(max(id), 0) FROM files)) "
        "FROM files WHERE tracked = false"
    )
    op.drop_index("ix_files_untracked", table_name="files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("tracked")

"""initial catalog: files, keywords, tags, ledger, ingest queue

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 02:23:14.547205
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from obsflow.catalog.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("archive_id", sa.String(length=96), nullable=True),
        sa.Column("product", sa.String(length=64), nullable=True),
        sa.Column("instrument", sa.String(length=64), nullable=True),
        sa.Column("level", sa.Integer(), nullable=True),
        sa.Column("original_name", sa.String(length=255), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("start_utc", UTCDateTime(), nullable=True),
        sa.Column("stop_utc", UTCDateTime(), nullable=True),
        sa.Column("start_mjd", sa.Float(), nullable=True),
        sa.Column("stop_mjd", sa.Float(), nullable=True),
        sa.Column("night", sa.Date(), nullable=True),
        sa.Column("exptime", sa.Float(), nullable=True),
        sa.Column("ra", sa.Float(), nullable=True),
        sa.Column("dec", sa.Float(), nullable=True),
        sa.Column("object", sa.String(length=128), nullable=True),
        sa.Column("frame_type", sa.String(length=32), nullable=True),
        sa.Column("filter", sa.String(length=32), nullable=True),
        sa.Column("program", sa.String(length=64), nullable=True),
        sa.Column("observer", sa.String(length=128), nullable=True),
        sa.Column("telescope", sa.String(length=64), nullable=True),
        sa.Column("proprietary_until", UTCDateTime(), nullable=True),
        sa.Column("cache_path", sa.Text(), nullable=True),
        sa.Column("archive_path", sa.Text(), nullable=True),
        sa.Column("quarantine_path", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("superseded_by", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["superseded_by"], ["files.id"], name=op.f("fk_files_superseded_by_files")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
        sa.UniqueConstraint("archive_id", name=op.f("uq_files_archive_id")),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_files_instrument"), ["instrument"], unique=False)
        batch_op.create_index(batch_op.f("ix_files_night"), ["night"], unique=False)
        batch_op.create_index(batch_op.f("ix_files_object"), ["object"], unique=False)
        batch_op.create_index(batch_op.f("ix_files_original_name"), ["original_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_files_product"), ["product"], unique=False)
        batch_op.create_index("ix_files_product_start", ["product", "start_utc"], unique=False)
        batch_op.create_index(batch_op.f("ix_files_program"), ["program"], unique=False)
        batch_op.create_index("ix_files_sha256", ["sha256"], unique=False)
        batch_op.create_index("ix_files_start_stop", ["start_utc", "stop_utc"], unique=False)
        batch_op.create_index(batch_op.f("ix_files_state"), ["state"], unique=False)
        batch_op.create_index(
            "uq_files_sha256_live",
            ["sha256"],
            unique=True,
            sqlite_where=sa.text("state <> 'rejected'"),
            postgresql_where=sa.text("state <> 'rejected'"),
        )

    op.create_table(
        "ingest_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires", UTCDateTime(), nullable=True),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_ingest_requests_file_id_files")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_requests")),
        sa.UniqueConstraint("file_id", name=op.f("uq_ingest_requests_file_id")),
    )
    with op.batch_alter_table("ingest_requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ingest_requests_state_next", ["state", "next_attempt_at"], unique=False
        )

    op.create_table(
        "keywords",
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=72), nullable=False),
        sa.Column("kind", sa.String(length=1), nullable=False),
        sa.Column("value_text", sa.Text(), nullable=True),
        sa.Column("value_num", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_keywords_file_id_files"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("file_id", "name", name=op.f("pk_keywords")),
    )
    with op.batch_alter_table("keywords", schema=None) as batch_op:
        batch_op.create_index("ix_keywords_name_num", ["name", "value_num"], unique=False)
        batch_op.create_index("ix_keywords_name_text", ["name", "value_text"], unique=False)

    op.create_table(
        "ledger",
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_ledger_file_id_files"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("file_id", "event", name=op.f("pk_ledger")),
    )
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.create_index("ix_ledger_event_at", ["event", "at"], unique=False)

    op.create_table(
        "tags",
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_tags_file_id_files"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("file_id", "tag", name=op.f("pk_tags")),
    )
    with op.batch_alter_table("tags", schema=None) as batch_op:
        batch_op.create_index("ix_tags_tag", ["tag"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("tags", schema=None) as batch_op:
        batch_op.drop_index("ix_tags_tag")

    op.drop_table("tags")
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_event_at")

    op.drop_table("ledger")
    with op.batch_alter_table("keywords", schema=None) as batch_op:
        batch_op.drop_index("ix_keywords_name_text")
        batch_op.drop_index("ix_keywords_name_num")

    op.drop_table("keywords")
    with op.batch_alter_table("ingest_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_ingest_requests_state_next")

    op.drop_table("ingest_requests")
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_files_sha256_live",
            sqlite_where=sa.text("state <> 'rejected'"),
            postgresql_where=sa.text("state <> 'rejected'"),
        )
        batch_op.drop_index(batch_op.f("ix_files_state"))
        batch_op.drop_index("ix_files_start_stop")
        batch_op.drop_index("ix_files_sha256")
        batch_op.drop_index(batch_op.f("ix_files_program"))
        batch_op.drop_index("ix_files_product_start")
        batch_op.drop_index(batch_op.f("ix_files_product"))
        batch_op.drop_index(batch_op.f("ix_files_original_name"))
        batch_op.drop_index(batch_op.f("ix_files_object"))
        batch_op.drop_index(batch_op.f("ix_files_night"))
        batch_op.drop_index(batch_op.f("ix_files_instrument"))

    op.drop_table("files")

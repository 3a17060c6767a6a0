"""The archive service: virtual files and access times, pins, API tokens.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from obsflow.catalog.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "files", sa.Column("virtual", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("files", sa.Column("last_access", UTCDateTime(), nullable=True))
    op.create_index("ix_files_virtual_last_access", "files", ["virtual", "last_access"])
    op.create_table(
        "pins",
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_pins_file_id_files"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("file_id", "holder", name=op.f("pk_pins")),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("programs", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_tokens_token_hash")),
    )


def downgrade() -> None:
    op.drop_table("tokens")
    op.drop_table("pins")
    op.drop_index("ix_files_virtual_last_access", table_name="files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("last_access")
        batch.drop_column("virtual")

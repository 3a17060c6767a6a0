"""The index a cone search reads: ``ix_files_dec_ra`` on ``files (dec, ra)``.

Revision ID: 0012
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_files_dec_ra", "files", ["dec", "ra"])


def downgrade() -> None:
    op.drop_index("ix_files_dec_ra", table_name="files")

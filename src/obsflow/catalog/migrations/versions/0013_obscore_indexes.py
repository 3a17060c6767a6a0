"""An index for the IVOA services' time searches: ``files.start_mjd`` (ObsCore's
``t_min``). Cone searches' declination band uses 0012's ``(dec, ra)`` index.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_files_start_mjd", "files", ["start_mjd"])


def downgrade() -> None:
    op.drop_index("ix_files_start_mjd", table_name="files")

"""What receipt learned of a file's name, kept on its row: ``files.name_groups``.

The named regex groups of the file name that recognised its product (e.g. ``date``,
``frame``), as JSON, written once at receipt; the tracker and the executor read them
instead of recognising the name again.

Rows recorded before this revision are left NULL: filling them in would need the
registry (a site's YAML files), which a migration does not have. Readers recognise
the name again for a NULL row only (:func:`obsflow.processing.inputs.name_groups`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("files", sa.Column("name_groups", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_column("name_groups")

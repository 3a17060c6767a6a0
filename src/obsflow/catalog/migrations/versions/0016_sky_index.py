"""The sky index of cone searches (:mod:`obsflow.catalog.sky`): on SQLite an R*Tree,
``files_sky``, kept by triggers on ``files`` and filled from its rows; on PostgreSQL
q3c's index on ``q3c_ang2ipix(ra, dec)`` if the server has the extension (else the
(dec, ra) btree of 0012 goes on serving, and the log says so).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

from obsflow.catalog import sky

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sky.create(op.get_bind())


def downgrade() -> None:
    sky.drop(op.get_bind())

"""Alembic environment: obsflow always passes an open connection in ``attributes``."""

from __future__ import annotations

from alembic import context

from obsflow.catalog.schema import metadata
from obsflow.catalog.sky import is_sky_name

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    # the sky index's tables and index are the migrations' alone (schema.py has none)
    include_name=lambda name, _type, _parents: not is_sky_name(name),
)
with context.begin_transaction():
    context.run_migrations()

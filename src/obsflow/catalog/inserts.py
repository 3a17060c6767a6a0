"""INSERTs that skip the rows already there, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from sqlalchemy import Connection, Insert, Table
from sqlalchemy.dialects import postgresql, sqlite


def insert_new(conn: Connection, table: Table) -> Insert:
    """An INSERT into ``table`` that skips rows whose primary key exists (races included)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()

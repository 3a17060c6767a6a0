"""The sky index: where the files point, indexed for cone searches (TAP's ``CONTAINS``
and ``INTERSECTS``, which :mod:`obsflow.ivoa.adql` turns into a prefilter from this
index, then the exact distance).

- **SQLite**: an R*Tree, ``files_sky`` (its ``id`` is ``files.id``; a position is a box
  of no size), kept by triggers on ``files``: inserting a row, changing its ``ra`` or
  ``dec`` and deleting it change the index in the same transaction, whatever statement
  does it. A query asks it for the bounding boxes of a circle (:func:`boxes`: the RA
  window split at 0/360, the whole circle of RA when the circle holds a pole).
- **PostgreSQL**: q3c's index on ``q3c_ang2ipix(ra, dec)`` when the server has the q3c
  extension (Debian: ``postgresql-NN-q3c``); ``q3c_radial_query`` reads it. Without
  it, the catalog works as before on the ``(dec, ra)`` btree of migration 0012 (a band
  of declination), and says so in the log once, when migrated. pgSphere was the first
  choice, but Debian 12's package (1.2.0) cannot be created on PostgreSQL 15.20
  ("commutator operator @> is already the commutator of operator <@").

Migration 0016 makes the index (and fills it from the existing rows); :func:`kind` says
which one a catalog has.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

__all__ = ["TABLE", "Box", "SkyIndex", "boxes", "create", "drop", "is_sky_name", "kind"]

TABLE: Final = "files_sky"
"""SQLite's R*Tree (with its shadow tables ``files_sky_node``, ``_rowid``, ``_parent``)."""
Q3C_INDEX: Final = "ix_files_q3c"
MARGIN_DEG: Final = 1e-9
"""Added to a prefilter's radius: a point the exact test accepts is never left out of
the index's answer by rounding (the R*Tree rounds its 32-bit bounds outwards itself)."""

_SQLITE: Final = (
    f"CREATE VIRTUAL TABLE {TABLE} USING rtree(id, ra_min, ra_max, dec_min, dec_max)",
    f"""CREATE TRIGGER {TABLE}_insert AFTER INSERT ON files
    WHEN new.ra IS NOT NULL AND new.dec IS NOT NULL
    BEGIN
        INSERT INTO {TABLE} VALUES (new.id, new.ra, new.ra, new.dec, new.dec);
    END""",
    f"""CREATE TRIGGER {TABLE}_update AFTER UPDATE OF ra, dec ON files
    BEGIN
        DELETE FROM {TABLE} WHERE id = old.id;
        INSERT INTO {TABLE} SELECT new.id, new.ra, new.ra, new.dec, new.dec
            WHERE new.ra IS NOT NULL AND new.dec IS NOT NULL;
    END""",
    f"""CREATE TRIGGER {TABLE}_delete AFTER DELETE ON files
    BEGIN
        DELETE FROM {TABLE} WHERE id = old.id;
    END""",
    f"""INSERT INTO {TABLE} SELECT id, ra, ra, dec, dec FROM files
    WHERE ra IS NOT NULL AND dec IS NOT NULL""",
)


class SkyIndex(StrEnum):
    """The index a catalog's cone searches read."""

    RTREE = "rtree"
    """SQLite's R*Tree ``files_sky``."""
    Q3C = "q3c"
    """PostgreSQL's q3c index ``ix_files_q3c``."""
    NONE = "none"
    """Only the ``(dec, ra)`` btree: a band of declination."""


def create(conn: Connection) -> SkyIndex:
    """Make the catalog's sky index and fill it from its rows (migration 0016)."""
    if conn.dialect.name == "sqlite":
        for statement in _SQLITE:
            conn.execute(text(statement))
        return SkyIndex.RTREE
    if not _q3c_visible(conn):
        installed = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'q3c'")).first()
        available = conn.execute(
            text("SELECT 1 FROM pg_available_extensions WHERE name = 'q3c'")
        ).first()
        if installed is not None or available is None:
            log.info(
                "catalog: %s; cone searches use the (dec, ra) index",
                "q3c is installed in a schema not on this catalog's search_path"
                if installed is not None
                else "this PostgreSQL server has no q3c extension (Debian: postgresql-NN-q3c)",
            )
            return SkyIndex.NONE
        try:
            with conn.begin_nested():
                conn.execute(text("CREATE EXTENSION q3c"))
        except DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            log.warning(
                "catalog: cannot create the q3c extension (%s); cone searches use the "
                "(dec, ra) index. A superuser can run CREATE EXTENSION q3c, then "
                "CREATE INDEX %s ON files (q3c_ang2ipix(ra, dec))",
                reason,
                Q3C_INDEX,
            )
            return SkyIndex.NONE
    conn.execute(text(f"CREATE INDEX {Q3C_INDEX} ON files (q3c_ang2ipix(ra, dec))"))
    return SkyIndex.Q3C


def _q3c_visible(conn: Connection) -> bool:
    """q3c's functions are callable by their bare names here (on the search_path)."""
    found = conn.execute(
        text(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('q3c_ang2ipix', 'q3c_radial_query') "
            "AND pg_function_is_visible(oid)"
        )
    ).scalar()
    return bool(found)


def drop(conn: Connection) -> None:
    """Undo :func:`create` (the q3c extension stays: other tables may use it)."""
    if conn.dialect.name == "sqlite":
        for name in ("insert", "update", "delete"):
            conn.execute(text(f"DROP TRIGGER IF EXISTS {TABLE}_{name}"))
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
    else:
        conn.execute(text(f"DROP INDEX IF EXISTS {Q3C_INDEX}"))


def kind(conn: Connection) -> SkyIndex:
    """The sky index this catalog has."""
    if conn.dialect.name == "sqlite":
        found = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :n"), {"n": TABLE}
        ).first()
        return SkyIndex.RTREE if found else SkyIndex.NONE
    found = conn.execute(
        text(
            "SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = 'files' AND indexname = :n"
        ),
        {"n": Q3C_INDEX},
    ).first()
    return SkyIndex.Q3C if found else SkyIndex.NONE


def is_sky_name(name: str | None) -> bool:
    """Whether ``name`` is a table or index of the sky index (which ``schema.py`` does
    not declare: Alembic's comparison leaves them out)."""
    return name is not None and (name == Q3C_INDEX or name.startswith(TABLE))


@dataclass(frozen=True)
class Box:
    """A window of RA and a band of dec, degrees (``ra_min <= ra_max``)."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float


def boxes(ra: float, dec: float, radius: float) -> tuple[Box, ...]:
    """Boxes that together hold every position within ``radius`` degrees of (``ra``,
    ``dec``), RA in [0, 360]: one box, or two where the window crosses RA 0/360; the
    whole circle of RA when the circle holds a pole (or is wider than the sky)."""
    r = radius + MARGIN_DEG
    low, high = max(dec - r, -90.0), min(dec + r, 90.0)
    if low <= -90.0 or high >= 90.0 or r >= 90.0:
        return (Box(0.0, 360.0, low, high),)
    # the RA half-width of the circle at its widest (no pole inside: |dec| + r < 90)
    ratio = math.sin(math.radians(r)) / math.cos(math.radians(dec))
    if ratio >= 1.0:
        return (Box(0.0, 360.0, low, high),)
    half = math.degrees(math.asin(ratio)) + MARGIN_DEG
    centre = ra % 360.0
    start, end = centre - half, centre + half
    if start < 0.0:
        return (Box(start + 360.0, 360.0, low, high), Box(0.0, end, low, high))
    if end > 360.0:
        return (Box(start, 360.0, low, high), Box(0.0, end - 360.0, low, high))
    return (Box(start, end, low, high),)

"""The one query of files: a :class:`~obsflow.catalog.records.FileQuery` as SQL.

:meth:`obsflow.catalog.Catalog.find` runs it for ``obsflow find``, the REST listing
(``GET /api/v1/files``) and every other caller, so a filter means the same thing
everywhere. Each filter is chosen to stay on an index at a million files:

- a time range is bounded below by the longest span of the product
  (:func:`obsflow.catalog.spans.overlapping`), so the index on start reads only the
  files near the window;
- a tag reads the tag's own index, in start order (``(tag, start_utc, file_id)``) or in
  ID order (``(tag, file_id)``);
- header keywords are looked up by ``(name, value)`` in their two indexes;
- a cone reads the index on ``(dec, ra)``: the band of declinations the circle spans
  and, unless it holds a pole, the window of right ascensions (two, when it wraps at
  0/360), then keeps the files at most the radius away, computed exactly
  (:func:`cone_is`).

Also here, the other read the listing needs: how many listed files carry each tag.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

from sqlalchemy import ColumnElement, Connection, Select, and_, func, or_, select, true

from obsflow.catalog import schema, spans
from obsflow.catalog.records import Cone, FileOrder, FileQuery, KeywordIs

files = schema.files
_NUMBER: Final = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_EQUAL: Final = ("product", "instrument", "object", "archive_id", "original_name", "night")
_EQUAL_TOO: Final = ("program", "level", "filter", "frame_type")
SEPARATION: Final = "obsflow_separation"
"""The SQL function SQLite connections get (:func:`separation`); PostgreSQL computes
the same formula with its own functions."""


def statement(conn: Connection, query: FileQuery) -> Select[Any]:
    """The SELECT of the rows of the files ``query`` asks for, in its order, at most its
    limit. Reads the product's span on ``conn`` for a time range (so run the statement
    in the same transaction)."""
    stmt = select(files)
    where: list[ColumnElement[bool]] = []
    if query.after is not None:
        where.append(files.c.id > query.after)
    if query.live_only:
        where += [schema.is_live(), files.c.archive_id.is_not(None)]
    for name in (*_EQUAL, *_EQUAL_TOO):
        value = getattr(query, name)
        if value is not None:
            where.append(files.c[name] == value)
    if query.state is not None:
        where.append(files.c.state == query.state.value)
    if not query.include_superseded:
        where.append(files.c.superseded_by.is_(None))
    where += [keyword_is(k) for k in query.keywords]
    if query.exptime_min is not None:
        where.append(files.c.exptime >= query.exptime_min)
    if query.exptime_max is not None:
        where.append(files.c.exptime <= query.exptime_max)
    if query.cone is not None:
        where.append(cone_is(conn.dialect.name, query.cone))
    if query.readable_by is not None:
        where.append(query.readable_by.sql(files.c.proprietary_until, files.c.program))
    by_time = query.since is not None or query.until is not None
    order: list[ColumnElement[Any]]
    if query.order is FileOrder.START:
        order = [files.c.start_utc, files.c.id]
    elif by_time:
        # SQLite: not from the ID index (which would read every older file of the
        # product), but from the time range's, then sorted
        order = [files.c.id + 0]
    else:
        order = [files.c.id]
    if query.tag is not None:
        # from the tag's index: reads the first ``limit`` files of a common tag, and only
        # the files of a rare one
        tags = schema.tags
        stmt = stmt.join(tags, and_(tags.c.file_id == files.c.id, tags.c.tag == query.tag))
        if query.order is FileOrder.START:
            order = [tags.c.start_utc, tags.c.file_id]
        else:
            order = [tags.c.file_id]
            if query.after is not None:
                where.append(tags.c.file_id > query.after)
    where += spans.overlapping(conn, query.product, query.since, query.until)
    stmt = stmt.where(and_(true(), *where)).order_by(*order)
    return stmt if query.limit is None else stmt.limit(query.limit)


def keyword_is(wanted: KeywordIs) -> ColumnElement[bool]:
    """The files that have header keyword ``wanted.name`` with ``wanted.value`` (as text,
    or as the number it reads as)."""
    kw = schema.keywords
    match: ColumnElement[bool] = kw.c.value_text == wanted.value
    if _NUMBER.fullmatch(wanted.value) and math.isfinite(number := float(wanted.value)):
        match = or_(kw.c.value_num == number, match)
    return files.c.id.in_(select(kw.c.file_id).where(kw.c.name == wanted.name, match))


def cone_is(dialect: str, cone: Cone) -> ColumnElement[bool]:
    """The files within ``cone``: an indexed box around it (a band of dec; a window of
    RA, split in two where it crosses 0/360; the whole circle of RA when the cone holds
    a pole), then the exact angular distance (the haversine formula, in SQL)."""
    ra, dec = files.c.ra, files.c.dec
    low, high = cone.dec - cone.radius, cone.dec + cone.radius
    box: list[ColumnElement[bool]] = [dec >= max(low, -90.0), dec <= min(high, 90.0)]
    if low > -90.0 and high < 90.0:
        # the RA half-width of the circle at its widest (< 90: no pole inside)
        ratio = math.sin(math.radians(cone.radius)) / math.cos(math.radians(cone.dec))
        half = math.degrees(math.asin(min(1.0, ratio)))
        start, end = cone.ra - half, cone.ra + half
        if start < 0.0:
            box.append(or_(ra >= start + 360.0, ra <= end))
        elif end >= 360.0:
            box.append(or_(ra >= start, ra <= end - 360.0))
        else:
            box.append(ra.between(start, end))
    distance: ColumnElement[Any]
    if dialect == "sqlite":
        distance = getattr(func, SEPARATION)(ra, dec, cone.ra, cone.dec)
    else:
        distance = _haversine_sql(ra, dec, cone.ra, cone.dec)
    return and_(ra.is_not(None), *box, distance <= cone.radius)


def separation(ra1: float | None, dec1: float | None, ra2: float, dec2: float) -> float | None:
    """The angle between two positions, in degrees (the haversine formula: accurate at
    small angles, where cones are drawn); None if a position is missing. SQLite's
    :data:`SEPARATION` (SQLite may be built without trigonometry)."""
    if ra1 is None or dec1 is None:
        return None
    d1, d2 = math.radians(dec1), math.radians(dec2)
    a = (
        math.sin((d2 - d1) / 2) ** 2
        + math.cos(d1) * math.cos(d2) * math.sin(math.radians(ra2 - ra1) / 2) ** 2
    )
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(a))))


def _haversine_sql(
    ra: ColumnElement[Any], dec: ColumnElement[Any], ra0: float, dec0: float
) -> ColumnElement[Any]:
    """:func:`separation` in PostgreSQL's SQL."""
    d0 = math.radians(dec0)
    d1 = func.radians(dec)
    a = func.power(func.sin((d0 - d1) / 2), 2) + func.cos(d1) * math.cos(d0) * func.power(
        func.sin(func.radians(ra0 - ra) / 2), 2
    )
    return func.degrees(2 * func.asin(func.least(1.0, func.sqrt(a))))


def tag_counts(conn: Connection) -> list[tuple[str, int]]:
    """Every tag with how many live files with an archive ID carry it, by tag."""
    tags = schema.tags
    stmt = (
        select(tags.c.tag, func.count())
        .join(files, files.c.id == tags.c.file_id)
        .where(schema.is_live(), files.c.archive_id.is_not(None))
        .group_by(tags.c.tag)
        .order_by(tags.c.tag)
    )
    return [(str(tag), int(count)) for tag, count in conn.execute(stmt)]

"""How long the longest file of each product lasts (stop − start).

A time-range lookup asks for files that overlap ``[since, until]``: ``stop >= since and
start <= until``. An index on start alone answers ``start <= until`` by reading every
older file too; with the longest span of the product known, ``start >= since − longest``
bounds it from below, and the lookup reads only the files near the window, at any size of
catalog. A plain row per product, widened in the transaction that records a longer file
(an interval tree would be exact, but neither SQLite nor PostgreSQL has one that the
catalog's other indexes could share).

Spans only grow, so a value read once is a lower bound for ever: a recorder remembers
what it has seen (:class:`Spans`) and writes only when a file is longer than that, which
is almost never after the first files of a product.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from obsflow.catalog import schema

spans = schema.spans
Span = tuple[str | None, datetime | None, datetime | None]
"""A recorded file's product, start and stop."""


class Spans:
    """The longest span of each product, as far as this process knows (a lower bound)."""

    def __init__(self) -> None:
        self._known: dict[str, float] = {}
        self._lock = threading.Lock()

    def widen(self, conn: Connection, files: Iterable[Span]) -> dict[str, float]:
        """Record, inside the caller's transaction, the span of each of ``files``
        ((product, start, stop) of the files recorded) that is longer than its product's
        known span; returns what it wrote, for :meth:`remember` once the transaction has
        committed."""
        longest: dict[str, float] = {}
        for product, start, stop in files:
            if product is None or start is None or stop is None:
                continue
            seconds = max(0.0, (stop - start).total_seconds())
            with self._lock:
                if seconds <= self._known.get(product, -1.0):
                    continue
            longest[product] = max(seconds, longest.get(product, 0.0))
        if not longest:
            return {}
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        for product, seconds in sorted(longest.items()):  # (a fixed order: no deadlock)
            statement = dialect.insert(spans).values(product=product, longest_seconds=seconds)
            statement = statement.on_conflict_do_update(
                index_elements=[spans.c.product],
                set_={"longest_seconds": statement.excluded.longest_seconds},
                where=spans.c.longest_seconds < statement.excluded.longest_seconds,
            )
            conn.execute(statement)
        return longest

    def remember(self, written: Mapping[str, float]) -> None:
        """What :meth:`widen` wrote, now committed (never before: a rolled-back widening
        remembered would never be written again)."""
        with self._lock:
            for product, seconds in written.items():
                self._known[product] = max(seconds, self._known.get(product, 0.0))


def longest(conn: Connection, product: str | None) -> float | None:
    """The longest span of ``product`` (of any product if None), in seconds; None if no
    file of it has both a start and a stop."""
    column = spans.c.longest_seconds
    if product is None:
        value = conn.execute(select(column).order_by(column.desc()).limit(1)).scalar()
    else:
        value = conn.execute(select(column).where(spans.c.product == product)).scalar()
    return None if value is None else float(value)


def overlapping(
    conn: Connection, product: str | None, since: datetime | None, until: datetime | None
) -> list[ColumnElement[bool]]:
    """The conditions for files (of ``product``, if given) whose [start, stop] overlaps
    [since, until], bounded so that an index on start reads only the files near it."""
    files = schema.files
    conditions: list[ColumnElement[bool]] = []
    if since is not None:
        seconds = longest(conn, product) or 0.0
        conditions.append(files.c.stop_utc >= since)
        try:
            earliest = since - timedelta(seconds=seconds)
        except OverflowError:  # since is near the first time there is: no bound below
            earliest = datetime.min.replace(tzinfo=since.tzinfo)
        conditions.append(files.c.start_utc >= earliest)
    if until is not None:
        conditions.append(files.c.start_utc <= until)
    return conditions

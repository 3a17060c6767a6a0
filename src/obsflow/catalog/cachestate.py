"""The cache's state in the catalog: whose bytes are in the cache, when each file was
last read, and who pins it there.

The catalog, not memory, is the cache's index. A live file whose row is not
``virtual`` and has a ``cache_path`` has its bytes in the cache (:func:`in_cache`);
its ``last_access`` orders eviction (index ``ix_files_virtual_last_access``); a row of
``pins`` keeps it there. :class:`CacheState` holds the statements the archive's
:mod:`~obsflow.archive.fetch` and :mod:`~obsflow.archive.eviction` run, each named for
what it does; the moves of bytes that go with a row's change happen inside the
transaction of :meth:`CacheState.restoring` or :meth:`CacheState.evicting`, so that
they are undone with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    Connection,
    RowMapping,
    and_,
    case,
    delete,
    exists,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import FromClause

from obsflow.catalog import Catalog, schema
from obsflow.catalog.inserts import insert_new
from obsflow.states import FileState, LedgerEvent

files = schema.files
pins = schema.pins
ledger = schema.ledger

STAMP_CHUNK: Final = 2000
"""Rows per transaction when never-read files are given their cached time."""
PIN_CHUNK: Final = 500
"""File IDs looked up per statement when pinning."""


def in_cache(table: FromClause) -> ColumnElement[bool]:
    """Rows whose bytes are in the cache: live, with a cache path, not virtual."""
    return and_(
        table.c.virtual == false(),
        table.c.cache_path.is_not(None),
        table.c.state != literal_column("'rejected'"),
    )


_CACHED = in_cache(files)
_PINNED = exists().where(pins.c.file_id == files.c.id)
# what eviction needs of a file
_CANDIDATE = (
    files.c.id,
    files.c.archive_id,
    files.c.size,
    files.c.state,
    files.c.cache_path,
    files.c.last_access,
)


@dataclass(frozen=True)
class Resident:
    """Where a live file's bytes are, as fetch needs to know it."""

    id: int
    archive_id: str
    state: FileState
    virtual: bool
    cache_path: str | None
    archive_path: str | None
    sha256: str
    last_access: datetime | None


@dataclass(frozen=True)
class Candidate:
    """A file in the cache that eviction may take (if archived and not pinned)."""

    id: int
    archive_id: str
    size: int
    state: FileState
    cache_path: str
    last_access: datetime | None
    pinned: bool = False

    @classmethod
    def of(cls, m: RowMapping) -> Candidate:
        return cls(
            id=m["id"],
            archive_id=m["archive_id"],
            size=m["size"],
            state=FileState(m["state"]),
            cache_path=m["cache_path"],
            last_access=m["last_access"],
            pinned=bool(m.get("pinned", False)),
        )


@dataclass(frozen=True)
class CacheFigures:
    """The cache at one moment, from the catalog (live files not virtual are in it)."""

    files: int
    bytes: int
    virtual: int
    """Files evicted from the cache: metadata kept, bytes in the archive only."""
    pinned: int
    """Files with at least one pin."""
    unarchived_bytes: int
    """Bytes of cached files not archived yet: they cannot be evicted."""

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "virtual": self.virtual,
            "pinned": self.pinned,
            "unarchived_bytes": self.unarchived_bytes,
        }


def cache_figures(conn: Connection) -> CacheFigures:
    """The cache's figures, read on ``conn`` (two statements: run them in one
    transaction for one moment's figures)."""
    unarchived = and_(_CACHED, files.c.state != FileState.ARCHIVED.value)
    cached, size, virtual, unarchived_bytes = conn.execute(
        select(
            func.count(case((_CACHED, 1))),
            func.coalesce(func.sum(case((_CACHED, files.c.size), else_=0)), 0),
            func.count(case((and_(files.c.virtual == true(), schema.is_live()), 1))),
            func.coalesce(func.sum(case((unarchived, files.c.size), else_=0)), 0),
        )
    ).one()
    pinned = conn.execute(select(func.count(func.distinct(pins.c.file_id)))).scalar_one()
    return CacheFigures(int(cached), int(size), int(virtual), int(pinned), int(unarchived_bytes))


class Restoring:
    """A file's row, locked for its restore in a write transaction
    (:meth:`CacheState.restoring`)."""

    def __init__(self, conn: Connection, file_id: int, virtual: bool) -> None:
        self._conn = conn
        self.file_id = file_id
        self.virtual = virtual
        """Whether the row is virtual, read under the lock."""

    def mark_cached(self, cache_path: str, now: datetime) -> None:
        """The file's bytes are (about to be) at ``cache_path`` again, read ``now``."""
        self._conn.execute(
            update(files)
            .where(files.c.id == self.file_id)
            .values(virtual=False, last_access=now, cache_path=cache_path)
        )


class Evicting:
    """A write transaction in which files are made virtual (:meth:`CacheState.evicting`)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def mark_virtual(self, candidate: Candidate) -> bool:
        """Make the file virtual unless it was evicted, read, pinned or un-archived since
        ``candidate`` was read; whether it was."""
        stmt = (
            update(files)
            .where(
                files.c.id == candidate.id,
                files.c.virtual == false(),
                files.c.state == FileState.ARCHIVED.value,
                files.c.last_access == candidate.last_access,
                ~_PINNED,
            )
            .values(virtual=True)
        )
        return bool(self._conn.execute(stmt).rowcount == 1)


class CacheState:
    """The cache's rows in one catalog: residence, last access, pins."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # ------------------------------------------------------------ one file

    def resident(self, archive_id: str) -> Resident | None:
        """Where the live file with this archive ID has its bytes (None: no such file)."""
        stmt = select(
            files.c.id,
            files.c.archive_id,
            files.c.state,
            files.c.virtual,
            files.c.cache_path,
            files.c.archive_path,
            files.c.sha256,
            files.c.last_access,
        ).where(files.c.archive_id == archive_id, schema.is_live())
        with self.catalog.read() as conn:
            found = conn.execute(stmt).first()
        if found is None:
            return None
        m = found._mapping
        return Resident(**{**m, "state": FileState(m["state"]), "virtual": bool(m["virtual"])})

    def touch(self, file_id: int, now: datetime) -> bool:
        """Record that the file was read ``now``; False if it is virtual (evicted)."""
        stmt = (
            update(files)
            .where(files.c.id == file_id, files.c.virtual == false())
            .values(last_access=now)
        )
        with self.catalog.write() as conn:
            return bool(conn.execute(stmt).rowcount == 1)

    @contextmanager
    def restoring(self, file_id: int) -> Iterator[Restoring]:
        """A write transaction holding the file's row lock (PostgreSQL's row lock,
        SQLite's write lock: it orders a restore with eviction); it commits when the
        ``with`` block ends, and rolls back if the block raises."""
        with self.catalog.write() as conn:
            current = conn.execute(
                select(files.c.virtual).where(files.c.id == file_id).with_for_update()
            ).one()
            yield Restoring(conn, file_id, bool(current.virtual))

    # ------------------------------------------------------------ the whole cache

    def cached_bytes(self) -> int:
        """The bytes of every file in the cache (one SUM)."""
        with self.catalog.read() as conn:
            return int(
                conn.execute(
                    select(func.coalesce(func.sum(files.c.size), 0)).where(_CACHED)
                ).scalar_one()
            )

    def figures(self) -> CacheFigures:
        """The cache's figures, in one read transaction."""
        with self.catalog.read() as conn:
            return cache_figures(conn)

    def stamp_never_read(self, now: datetime) -> None:
        """Give the cached files never read a ``last_access``: when they were cached (their
        ledger's ``cached`` stamp, else ``archived``, else ``now``); in transactions of
        :data:`STAMP_CHUNK` rows."""
        cached_at = (
            select(func.min(ledger.c.at))
            .where(
                ledger.c.file_id == files.c.id,
                ledger.c.event.in_([LedgerEvent.CACHED.value, LedgerEvent.ARCHIVED.value]),
            )
            .scalar_subquery()
        )
        unread = files.alias("unread")
        ids = (
            select(unread.c.id)
            .where(in_cache(unread), unread.c.last_access.is_(None))
            .limit(STAMP_CHUNK)
            .scalar_subquery()
        )
        stmt = (
            update(files)
            .where(files.c.id.in_(ids))
            .values(last_access=func.coalesce(cached_at, literal(now, schema.UTCDateTime())))
        )
        while True:
            with self.catalog.write() as conn:
                if conn.execute(stmt).rowcount < STAMP_CHUNK:
                    return

    def least_recently_read(self, until: datetime, chunk: int) -> Iterator[Candidate]:
        """The cached files read at or before ``until``, least recently read first, with
        whether each is pinned; read ``chunk`` rows at a time (keyset pagination over
        ``(last_access, id)``; no transaction is held between chunks)."""
        pinned = _PINNED.label("pinned")
        base = select(*_CANDIDATE, pinned).where(
            _CACHED, files.c.last_access.is_not(None), files.c.last_access <= until
        )
        stmt = base
        while True:
            with self.catalog.read() as conn:
                rows = list(
                    conn.execute(stmt.order_by(files.c.last_access, files.c.id).limit(chunk))
                )
            yield from (Candidate.of(row._mapping) for row in rows)
            if len(rows) < chunk:
                return
            at, last_id = rows[-1].last_access, rows[-1].id
            stmt = base.where(
                or_(
                    files.c.last_access > at,
                    and_(files.c.last_access == at, files.c.id > last_id),
                )
            )

    def archived_before(self, before: datetime, limit: int) -> list[Candidate]:
        """Up to ``limit`` cached, unpinned files archived at or before ``before`` (by
        their ledger's ``archived`` stamp), in ID order."""
        old = exists().where(
            ledger.c.file_id == files.c.id,
            ledger.c.event == LedgerEvent.ARCHIVED.value,
            ledger.c.at <= before,
        )
        stmt = (
            select(*_CANDIDATE)
            .where(_CACHED, files.c.state == FileState.ARCHIVED.value, old)
            .where(~_PINNED)
            .order_by(files.c.id)
            .limit(limit)
        )
        with self.catalog.read() as conn:
            return [Candidate.of(row._mapping) for row in conn.execute(stmt)]

    @contextmanager
    def evicting(self) -> Iterator[Evicting]:
        """A write transaction to make files virtual in (see :class:`Evicting`); it
        commits when the ``with`` block ends, and rolls back if the block raises."""
        with self.catalog.write() as conn:
            yield Evicting(conn)

    # ------------------------------------------------------------ pins

    def pin(
        self,
        file_ids: Sequence[int],
        holder: str,
        now: datetime,
        conn: Connection | None = None,
    ) -> None:
        """Pin the files with these row IDs for ``holder`` (idempotent; in ``conn``'s
        transaction if given); IDs no file has are ignored."""
        wanted = sorted(set(file_ids))
        if not wanted:
            return
        if conn is None:
            with self.catalog.write() as own:
                self.pin(wanted, holder, now, own)
            return
        for start in range(0, len(wanted), PIN_CHUNK):
            chunk = wanted[start : start + PIN_CHUNK]
            known = conn.execute(select(files.c.id).where(files.c.id.in_(chunk))).scalars()
            rows = [{"file_id": i, "holder": holder, "at": now} for i in known]
            if rows:
                conn.execute(insert_new(conn, pins), rows)

    def unpin(self, file_id: int, holder: str | None = None) -> int:
        """Drop ``holder``'s pin of the file (None: every holder's); how many went."""
        stmt = delete(pins).where(pins.c.file_id == file_id)
        if holder is not None:
            stmt = stmt.where(pins.c.holder == holder)
        with self.catalog.write() as conn:
            return int(conn.execute(stmt).rowcount)

    def unpin_holder(self, holder: str, conn: Connection | None = None) -> int:
        """Drop every pin of ``holder`` (in ``conn``'s transaction if given); how many went."""
        if conn is None:
            with self.catalog.write() as own:
                return self.unpin_holder(holder, own)
        return int(conn.execute(delete(pins).where(pins.c.holder == holder)).rowcount)

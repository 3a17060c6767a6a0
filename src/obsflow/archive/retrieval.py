"""Retrieval: one way to a file's bytes for runs, the API and the CLI, and the cache policy.

:meth:`Retriever.fetch` turns an archive ID into a local path: the cached copy, or the
archived copy restored into the cache (its sha256 checked against the catalog before
it is placed). :meth:`Retriever.trim` keeps the cache within its budget by evicting the
least recently accessed archived files: an evicted file becomes *virtual* (its row, tags
and keywords stay; ``find`` still finds it) and ``fetch`` brings it back.

The catalog, not memory, is the cache's index: the cache's size is a ``SUM`` query and
eviction walks the files in ``last_access`` order in chunks (index
``ix_files_virtual_last_access``), so a cache of a million files costs no memory here.

Rules of the cache:

- Only ``archived`` files are evicted (the archive holds their bytes); a file still
  ``cached`` or ``failed`` is never touched, nor one pinned by anyone (``pins``: a run
  while it reads its inputs, ``run:12``; an operator, ``operator``).
- A file never read has no ``last_access``; for the eviction order it counts as read
  when it was cached (its ledger's ``cached`` stamp, else ``archived``, else the trim's
  own time): :meth:`Retriever.trim` writes that time into the rows first, so that the
  order is one index walk. A fresh frame is therefore not the first to go, whatever
  older files have been read since.
- Every move of bytes (evict: the cached file to a temp file; restore: a verified temp
  file into place) happens inside the catalog transaction that records it and is undone
  if that transaction does not commit. A crash in between leaves either a row not
  virtual whose cached file is missing (``fetch`` restores it from the archive: it
  heals any such row, whoever deleted the file) or a virtual row whose file is present
  (the next ``fetch`` restores it over itself); never a row whose bytes are lost.

Tags (``obsflow tag add|rm``) are kept here too: they are the cache's lookups by tag.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Insert,
    Row,
    Table,
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
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import FromClause

from obsflow.archive.cache import Cache
from obsflow.archive.storage import Storage
from obsflow.catalog import Catalog, schema
from obsflow.errors import ObsflowError, StorageError
from obsflow.settings import CachePolicy
from obsflow.states import FileState, LedgerEvent

log = logging.getLogger(__name__)

files = schema.files
pins = schema.pins
tags = schema.tags

TOUCH_SECONDS = 60.0
"""A hit writes ``last_access`` at most once per this many seconds per file."""
WALK_CHUNK = 500
"""Rows read per step of the eviction walk (and evicted per transaction, at most)."""
STAMP_CHUNK = 2000
"""Rows per transaction when trim gives never-read files their cached time."""
COPY_CHUNK = 1 << 20
TAG_PATTERN = re.compile(r"[\w.:-]{1,64}")
"""What a tag may be: as in the registry (``^[\\w.:-]{1,64}$``)."""
HOLDER_MAX = 64


class NotFoundError(ObsflowError):
    """No live file has this archive ID (unknown, or refused and quarantined)."""

    def __init__(self, archive_id: str) -> None:
        self.archive_id = archive_id
        super().__init__(f"no file with archive ID {archive_id!r}")


class InvalidTagError(ObsflowError):
    """A tag is not a short word of letters, digits and ``_ . : -``."""


@dataclass(frozen=True)
class CacheStatus:
    """The cache at one moment, from the catalog (files not virtual are in the cache)."""

    files: int
    bytes: int
    virtual: int
    pinned: int
    """Files with at least one pin."""
    budget: int | None
    low_water: int | None
    unarchived_bytes: int
    """Bytes of cached files not archived yet: they cannot be evicted."""

    @property
    def over_budget(self) -> bool:
        return self.budget is not None and self.bytes > self.budget

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "virtual": self.virtual,
            "pinned": self.pinned,
            "budget": self.budget,
            "low_water": self.low_water,
            "unarchived_bytes": self.unarchived_bytes,
            "over_budget": self.over_budget,
        }


@dataclass(frozen=True)
class TrimReport:
    evicted: int
    freed_bytes: int
    remaining_bytes: int
    skipped_pinned: int
    """Archived files the walk passed over, still over the target, because pinned."""
    skipped_unarchived: int = 0
    """Files the walk passed over, still over the target, because not archived yet."""
    target: int | None = None
    """The size trimmed to (None: no budget and none given, nothing done)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Row:
    id: int
    archive_id: str
    state: FileState
    virtual: bool
    cache_path: str | None
    archive_path: str | None
    sha256: str
    last_access: datetime | None


def _in_cache(table: FromClause) -> ColumnElement[bool]:
    """Rows whose bytes are in the cache: live, with a cache path, not virtual."""
    return and_(
        table.c.virtual == false(),
        table.c.cache_path.is_not(None),
        table.c.state != literal_column("'rejected'"),
    )


_CACHED = _in_cache(files)
# what eviction needs of a file (Retriever._evict)
_EVICTABLE = (
    files.c.id,
    files.c.archive_id,
    files.c.size,
    files.c.state,
    files.c.cache_path,
    files.c.last_access,
)


class Retriever:
    """Fetch, trim, pin: the cache policy over one catalog, cache and archive storage."""

    def __init__(
        self,
        catalog: Catalog,
        cache: Cache,
        storage: Storage,
        policy: CachePolicy,
        clock: Callable[[], datetime],
    ) -> None:
        self.catalog = catalog
        self.cache = cache
        self.storage = storage
        self.policy = policy
        self.clock = clock

    # ------------------------------------------------------------ fetch

    def fetch(self, archive_id: str) -> Path:
        """The local path of the file's bytes: from the cache, or restored from the
        archive into the cache (checksum verified). :class:`NotFoundError` for an
        unknown or refused file; :class:`StorageError` when the bytes cannot be had.

        A hit records the access (one UPDATE, at most once a minute per file). The path
        holds the bytes until a trim evicts them: open it at once (an open descriptor
        outlives eviction), or pin the file for longer (runs pin their inputs)."""
        row = self._row(archive_id)
        if not row.virtual and row.cache_path is not None:
            path = self.cache.path(row.cache_path)
            still_cached = self._touch(row)
            if still_cached and path.is_file():
                return path
            if still_cached:
                log.warning(
                    "%s: its cached copy %s is missing; restoring it from the archive",
                    archive_id,
                    path,
                    extra={"archive_id": archive_id},
                )
        return self._restore(row)

    def _row(self, archive_id: str) -> _Row:
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
            raise NotFoundError(archive_id)
        m = found._mapping
        return _Row(**{**m, "state": FileState(m["state"]), "virtual": bool(m["virtual"])})

    def _touch(self, row: _Row) -> bool:
        """Record a hit (at most once a minute per file); False if the file was evicted
        since ``row`` was read."""
        now = self.clock()
        if row.last_access is not None and now - row.last_access < timedelta(seconds=TOUCH_SECONDS):
            return True
        stmt = (
            update(files)
            .where(files.c.id == row.id, files.c.virtual == false())
            .values(last_access=now)
        )
        with self.catalog.write() as conn:
            return conn.execute(stmt).rowcount == 1

    def _restore(self, row: _Row) -> Path:
        if row.state is not FileState.ARCHIVED or row.archive_path is None:
            where = self.cache.path(row.cache_path) if row.cache_path else "the cache"
            raise StorageError(
                f"{row.archive_id}: its cached copy {where} is missing and it is not "
                f"archived yet (state {row.state.value}): nowhere to restore it from"
            )
        key = row.cache_path or row.archive_path
        target = self.cache.path(key)
        temp = self.cache.temp_file()
        try:
            got = self._copy_out(row, temp)
            if got != row.sha256:
                raise StorageError(
                    f"{row.archive_id}: the archived copy at "
                    f"{self.storage.describe(row.archive_path)} has sha256 {got}, the catalog "
                    f"says {row.sha256}; nothing restored into the cache"
                )
            placed = False
            try:
                with self.catalog.write() as conn:
                    # the row lock (PostgreSQL; SQLite's write lock) orders this with trim
                    current = conn.execute(
                        select(files.c.virtual).where(files.c.id == row.id).with_for_update()
                    ).one()
                    if not current.virtual and target.is_file():
                        return target  # a concurrent fetch restored it first
                    conn.execute(
                        update(files)
                        .where(files.c.id == row.id)
                        .values(virtual=False, last_access=self.clock(), cache_path=key)
                    )
                    self.cache.place(temp, key)
                    placed = True
            except BaseException:
                if placed:  # the catalog still says virtual: take the bytes back out
                    self.cache.unplace(key, temp)
                raise
        finally:
            temp.unlink(missing_ok=True)
        log.info(
            "restored %s from the archive into the cache",
            row.archive_id,
            extra={"archive_id": row.archive_id},
        )
        return target

    def _copy_out(self, row: _Row, temp: Path) -> str:
        """Copy the archived bytes into ``temp`` (fsynced); return their sha256."""
        assert row.archive_path is not None
        digest = hashlib.sha256()
        try:
            with self.storage.open(row.archive_path) as src, temp.open("wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except (OSError, StorageError) as exc:
            raise StorageError(
                f"{row.archive_id}: cannot restore it from the archive: {exc}"
            ) from exc
        return digest.hexdigest()

    # ------------------------------------------------------------ size and status

    def cached_bytes(self) -> int:
        """The bytes of every file in the cache (one SUM over the catalog)."""
        with self.catalog.read() as conn:
            return int(
                conn.execute(
                    select(func.coalesce(func.sum(files.c.size), 0)).where(_CACHED)
                ).scalar_one()
            )

    def over_budget(self) -> bool:
        budget = self.policy.budget_bytes
        return budget is not None and self.cached_bytes() > budget

    def status(self) -> CacheStatus:
        unarchived = and_(_CACHED, files.c.state != FileState.ARCHIVED.value)
        stmt = select(
            func.count(case((_CACHED, 1))),
            func.coalesce(func.sum(case((_CACHED, files.c.size), else_=0)), 0),
            func.count(case((and_(files.c.virtual == true(), schema.is_live()), 1))),
            func.coalesce(func.sum(case((unarchived, files.c.size), else_=0)), 0),
        )
        with self.catalog.read() as conn:
            cached, size, virtual, unarchived_bytes = conn.execute(stmt).one()
            pinned = conn.execute(select(func.count(func.distinct(pins.c.file_id)))).scalar_one()
        return CacheStatus(
            files=int(cached),
            bytes=int(size),
            virtual=int(virtual),
            pinned=int(pinned),
            budget=self.policy.budget_bytes,
            low_water=self.policy.low_water,
            unarchived_bytes=int(unarchived_bytes),
        )

    # ------------------------------------------------------------ trim

    def trim(self, to_bytes: int | None = None) -> TrimReport:
        """Evict the least recently accessed archived, unpinned files until the cache
        holds at most ``to_bytes`` (default: the policy's low-water mark; with neither,
        nothing is done)."""
        if to_bytes is not None and to_bytes < 0:
            raise ValueError(f"cannot trim the cache to {to_bytes} bytes")
        target = to_bytes if to_bytes is not None else self.policy.low_water
        total = self.cached_bytes()
        if target is None or total <= target:
            return TrimReport(0, 0, total, 0, target=target)
        started = self.clock()
        self._stamp_never_read(started)
        evicted = freed = skipped_pinned = skipped_unarchived = 0
        victims: list[Row[Any]] = []
        projected = total  # what the cache will hold once ``victims`` are evicted

        def evict() -> None:
            nonlocal evicted, freed, total, projected
            for row in self._evict(victims):
                evicted += 1
                freed += row.size
                total -= row.size
            victims.clear()
            projected = total  # a victim read or pinned meanwhile was not evicted

        for row in self._walk(started):
            if row.state != FileState.ARCHIVED.value:
                skipped_unarchived += 1
            elif row.pinned:
                skipped_pinned += 1
            else:
                victims.append(row)
                projected -= row.size
            if projected <= target or len(victims) >= WALK_CHUNK:
                evict()
                if total <= target:
                    break
        evict()
        remaining = self.cached_bytes()
        log.info(
            "trimmed the cache to %d bytes (target %d): evicted %d file(s), %d bytes; "
            "passed over %d pinned and %d unarchived",
            remaining,
            target,
            evicted,
            freed,
            skipped_pinned,
            skipped_unarchived,
        )
        return TrimReport(
            evicted, freed, remaining, skipped_pinned, skipped_unarchived, target=target
        )

    def expire(self, archived_before: datetime) -> int:
        """Evict the cached files archived at or before ``archived_before``, pinned ones
        excepted (an agent's retention: its copies go once the archive server has
        confirmed them); returns how many."""
        led = schema.ledger
        old = exists().where(
            led.c.file_id == files.c.id,
            led.c.event == LedgerEvent.ARCHIVED.value,
            led.c.at <= archived_before,
        )
        stmt = (
            select(*_EVICTABLE)
            .where(_CACHED, files.c.state == FileState.ARCHIVED.value, old)
            .where(~exists().where(pins.c.file_id == files.c.id))
            .order_by(files.c.id)
            .limit(WALK_CHUNK)
        )
        total = 0
        while True:
            with self.catalog.read() as conn:
                rows: list[Row[Any]] = list(conn.execute(stmt))
            evicted = self._evict(rows)
            total += len(evicted)
            if len(rows) < WALK_CHUNK or not evicted:
                return total

    def _stamp_never_read(self, now: datetime) -> None:
        """Give cached files never read a ``last_access``: when they were cached."""
        led = schema.ledger
        cached_at = (
            select(func.min(led.c.at))
            .where(
                led.c.file_id == files.c.id,
                led.c.event.in_([LedgerEvent.CACHED.value, LedgerEvent.ARCHIVED.value]),
            )
            .scalar_subquery()
        )
        unread = files.alias("unread")
        ids = (
            select(unread.c.id)
            .where(_in_cache(unread), unread.c.last_access.is_(None))
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

    def _walk(self, until: datetime) -> Iterator[Row[Any]]:
        """The cached files read at or before ``until``, least recently read first, read
        in chunks (keyset pagination over ``(last_access, id)``; no transaction is held
        between chunks)."""
        pinned = exists().where(pins.c.file_id == files.c.id).label("pinned")
        base = select(*_EVICTABLE, pinned).where(
            _CACHED, files.c.last_access.is_not(None), files.c.last_access <= until
        )
        stmt = base
        while True:
            with self.catalog.read() as conn:
                chunk = list(
                    conn.execute(stmt.order_by(files.c.last_access, files.c.id).limit(WALK_CHUNK))
                )
            yield from chunk
            if len(chunk) < WALK_CHUNK:
                return
            at, last_id = chunk[-1].last_access, chunk[-1].id
            stmt = base.where(
                or_(
                    files.c.last_access > at,
                    and_(files.c.last_access == at, files.c.id > last_id),
                )
            )

    def _evict(self, victims: Sequence[Row[Any]]) -> list[Row[Any]]:
        """Make ``victims`` virtual; return those evicted (a file read, pinned or evicted
        since the walk saw it is left alone).

        Order: in one transaction, mark the row virtual, then move its cached file to a
        temp file; commit; then delete the temp file. A crash before the commit leaves
        the row not virtual and its file in ``cache/.tmp`` (``fetch`` restores it from
        the archive; the temp file is cleaned); after, a virtual row and a temp file.
        The archive holds the bytes throughout: only archived files get here.
        """
        if not victims:
            return []
        moved: list[tuple[Row[Any], Path | None]] = []
        try:
            with self.catalog.write() as conn:
                for row in victims:
                    stmt = (
                        update(files)
                        .where(
                            files.c.id == row.id,
                            files.c.virtual == false(),
                            files.c.state == FileState.ARCHIVED.value,
                            files.c.last_access == row.last_access,
                            ~exists().where(pins.c.file_id == files.c.id),
                        )
                        .values(virtual=True)
                    )
                    if conn.execute(stmt).rowcount != 1:
                        continue
                    temp = self.cache.temp_file()
                    try:
                        os.replace(self.cache.path(row.cache_path), temp)
                    except FileNotFoundError:  # gone already (by hand): virtual all the same
                        moved.append((row, None))
                    else:
                        moved.append((row, temp))
        except BaseException:
            for row, aside in reversed(moved):
                if aside is not None:
                    self.cache.place(aside, row.cache_path)
            raise
        for row, aside in moved:
            if aside is not None:
                aside.unlink(missing_ok=True)
            log.debug("evicted %s", row.archive_id, extra={"archive_id": row.archive_id})
        return [row for row, _ in moved]

    # ------------------------------------------------------------ pins

    def pin(self, archive_id: str, holder: str) -> None:
        """Keep the file in the cache for ``holder`` until unpinned (idempotent)."""
        self.pin_ids([self._file_id(archive_id)], holder)

    def unpin(self, archive_id: str, holder: str | None = None) -> int:
        """Drop ``holder``'s pin of the file (None: every holder's); return how many."""
        stmt = delete(pins).where(pins.c.file_id == self._file_id(archive_id))
        if holder is not None:
            stmt = stmt.where(pins.c.holder == holder)
        with self.catalog.write() as conn:
            return conn.execute(stmt).rowcount

    def pin_ids(self, file_ids: Sequence[int], holder: str) -> None:
        """Pin files by row ID for ``holder`` (a run pins its inputs as ``run:ID``);
        IDs no file has are ignored."""
        _check_holder(holder)
        now = self.clock()
        wanted = sorted(set(file_ids))
        with self.catalog.write() as conn:
            for start in range(0, len(wanted), WALK_CHUNK):
                chunk = wanted[start : start + WALK_CHUNK]
                known = conn.execute(select(files.c.id).where(files.c.id.in_(chunk))).scalars()
                rows = [{"file_id": i, "holder": holder, "at": now} for i in known]
                if rows:
                    conn.execute(_insert_new(conn, pins), rows)

    def unpin_holder(self, holder: str) -> int:
        """Drop every pin of ``holder`` (a finished run's); return how many."""
        with self.catalog.write() as conn:
            return conn.execute(delete(pins).where(pins.c.holder == holder)).rowcount

    # ------------------------------------------------------------ tags

    def add_tag(self, archive_id: str, tag: str) -> bool:
        """Tag the file; False if it had the tag already."""
        check_tag(tag)
        file_id = self._file_id(archive_id)
        with self.catalog.write() as conn:
            start = select(files.c.start_utc).where(files.c.id == file_id).scalar_subquery()
            stmt = (
                _insert_new(conn, tags)
                .values(file_id=file_id, tag=tag, start_utc=start)
                .returning(tags.c.tag)
            )
            return conn.execute(stmt).first() is not None  # (rowcount is -1 on psycopg)

    def remove_tag(self, archive_id: str, tag: str) -> bool:
        """Remove the tag from the file; False if it did not have it."""
        check_tag(tag)
        file_id = self._file_id(archive_id)
        with self.catalog.write() as conn:
            stmt = delete(tags).where(tags.c.file_id == file_id, tags.c.tag == tag)
            return conn.execute(stmt).rowcount > 0

    def _file_id(self, archive_id: str) -> int:
        with self.catalog.read() as conn:
            found = conn.execute(
                select(files.c.id).where(files.c.archive_id == archive_id, schema.is_live())
            ).scalar()
        if found is None:
            raise NotFoundError(archive_id)
        return int(found)


def check_tag(tag: str) -> str:
    """``tag`` if it is a valid tag, else :class:`InvalidTagError` naming it."""
    if not TAG_PATTERN.fullmatch(tag):
        raise InvalidTagError(
            f"invalid tag {tag!r}: expected 1 to 64 letters, digits or '_', '.', ':', '-'"
        )
    return tag


def _check_holder(holder: str) -> None:
    if not 0 < len(holder) <= HOLDER_MAX or not holder.isprintable():
        raise ValueError(
            f"invalid pin holder {holder!r}: expected 1 to {HOLDER_MAX} printable characters"
        )


def _insert_new(conn: Connection, table: Table) -> Insert:
    """An INSERT that skips rows whose primary key exists (races included)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()

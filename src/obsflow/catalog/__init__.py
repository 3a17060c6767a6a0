"""The catalog: the archive's source of truth, in SQLite (default) or PostgreSQL.

:class:`Catalog` owns the engine, applies the Alembic migrations, and offers the
few operations the stations need: receipt records a cached file and its ingest
request in one transaction (:meth:`Catalog.record_cached`) or a rejection;
the ingest queue lives in :mod:`obsflow.catalog.queue`; ``find``/``show``/``status``
read through :meth:`Catalog.find`, :meth:`Catalog.ledger`, :meth:`Catalog.counts`.
:meth:`Catalog.find` is the one query of files (:mod:`obsflow.catalog.search`), for the
commands and the REST listing alike; API tokens are kept by :mod:`obsflow.catalog.tokens`.

SQLite runs in WAL mode with a busy timeout, and write transactions start with
``BEGIN IMMEDIATE`` so that a read-then-write transaction never fails on a
snapshot upgrade while another process (the daemon, ``obsflow ingest``) writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import operator
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from obsflow.catalog import batch, schema, search, sky, spans
from obsflow.catalog.batch import CacheEntry, Recorded
from obsflow.catalog.records import FileOrder, FileQuery, FileRecord, KeywordIs, LedgerEntry
from obsflow.errors import CatalogError, CatalogUnavailableError, SchemaError
from obsflow.states import FileState, LedgerEvent

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
_REVISION: Final = re.compile(r"""^revision\s*=\s*["']([^"']+)["']""", re.MULTILINE)
SCHEMA_REVISION = "0016"
"""The newest migration; a test checks it is Alembic's head."""
MIGRATION_WAIT_SECONDS = 120.0
"""How long opening a catalog waits for another process's migration of it."""
MIGRATION_LOCK_KEY = 0x0B5F_1017
"""PostgreSQL advisory lock key under which obsflow migrates a database."""
_PG_TRY_LOCK = text(f"SELECT pg_try_advisory_lock({MIGRATION_LOCK_KEY})")
_PG_UNLOCK = text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")

__all__ = [
    "CacheEntry",
    "Catalog",
    "FileOrder",
    "FileQuery",
    "FileRecord",
    "KeywordIs",
    "LedgerEntry",
    "NewFile",
    "Recorded",
]


@dataclass(frozen=True)
class NewFile:
    """Everything receipt knows about a file it is about to record."""

    product: str | None
    instrument: str | None
    level: int | None
    original_name: str
    source_path: str
    size: int
    sha256: str
    start: datetime | None = None
    stop: datetime | None = None
    start_mjd: float | None = None
    stop_mjd: float | None = None
    night: date | None = None
    exptime: float | None = None
    ra: float | None = None
    dec: float | None = None
    object: str | None = None
    frame_type: str | None = None
    filter: str | None = None
    program: str | None = None
    observer: str | None = None
    telescope: str | None = None
    proprietary_until: datetime | None = None
    tags: tuple[str, ...] = ()
    keywords: Mapping[str, Any] | None = None
    name_groups: Mapping[str, str] | None = None
    """The named regex groups of the file name, from its recognition (None: unrecognised)."""
    made_by_run: int | None = None
    """The pipeline run that made this file (provenance), if one did."""


class Catalog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self.spans = spans.Spans()
        self._sky: sky.SkyIndex | None = None
        # SQLite allows one writer; its busy handler waits by sleeping in growing steps
        # (1, 2, 5, 10 ... ms). Writers of this process queue on a lock instead, which wakes
        # the next at once, and writers of other processes (the executor's workers, the
        # command beside the daemon) on an flock of a file beside the database, which the
        # kernel hands over at once too.
        self._write_lock: AbstractContextManager[object] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )
        database = engine.url.database if self.is_sqlite else None
        self._file_lock: int | None = None
        if database and database != ":memory:" and not database.startswith("file:"):
            self._file_lock = os.open(f"{database}-writelock", os.O_CREAT | os.O_RDWR, 0o644)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        migrate: bool = True,
        upgrade: bool = True,
        wait_seconds: float = MIGRATION_WAIT_SECONDS,
    ) -> Catalog:
        """Connect to ``url`` and bring its schema up to date (see :meth:`migrate`;
        ``upgrade`` False: create a new catalog's schema, but refuse an older one)."""
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
            _configure_sqlite(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        catalog = cls(engine)
        if migrate:
            try:
                catalog.migrate(wait_seconds=wait_seconds, upgrade=upgrade)
            except BaseException:
                catalog.close()
                raise
        return catalog

    @property
    def sky_index(self) -> sky.SkyIndex:
        """The index this catalog's cone searches read (:mod:`obsflow.catalog.sky`)."""
        if self._sky is None:
            with self.engine.connect() as conn:
                self._sky = sky.kind(conn)
        return self._sky

    def migrate(
        self, *, wait_seconds: float = MIGRATION_WAIT_SECONDS, upgrade: bool = True
    ) -> None:
        """Bring the schema to :data:`SCHEMA_REVISION` (Alembic is loaded only if needed).

        A new (empty) catalog is always made at the newest schema; an older one is
        upgraded only if ``upgrade`` (``obsflow migrate``), else a :class:`SchemaError`
        says to back it up and migrate it. A catalog made by a newer obsflow (a revision
        this one does not know) is always a :class:`SchemaError`.

        Safe when several processes open one catalog at once (the daemon, a command,
        workers): a catalog already at head is only read (under WAL a read never waits
        for a writer). Otherwise the migration runs under a lock across processes (the
        writers' flock on SQLite, an advisory lock on PostgreSQL); a process that finds
        the lock taken waits for it, up to ``wait_seconds``, saying so in the log, then
        finds the schema at head and has nothing to do.
        """
        try:
            found = self.revision()
            if found == SCHEMA_REVISION and self._journal_ok():
                return
            self._check_revision(found, upgrade)
            with self._migration_lock(wait_seconds) as conn:
                if self.is_sqlite:
                    # Set once, here, under the lock (it is a property of the database
                    # file, kept across connections), outside any transaction.
                    driver: Any = conn.connection.driver_connection
                    driver.execute("PRAGMA journal_mode=WAL").close()
                if _revision(conn) == SCHEMA_REVISION:
                    return  # another process migrated it while this one waited
                self._check_revision(_revision(conn), upgrade)
                from alembic import command
                from alembic.config import Config

                config = Config()
                config.set_main_option("script_location", str(MIGRATIONS))
                with conn.execution_options(obsflow_immediate=True).begin():
                    config.attributes["connection"] = conn
                    command.upgrade(config, "head")
                self._sky = None
                log.info("catalog %s migrated to schema %s", self.engine.url, SCHEMA_REVISION)
        except (OperationalError, InterfaceError) as exc:
            raise CatalogUnavailableError(
                f"cannot open the catalog at {self.engine.url!r}: {exc.orig}"
            ) from exc

    def _check_revision(self, found: str | None, upgrade: bool) -> None:
        """Refuse a schema this obsflow does not know, or an older one unless ``upgrade``."""
        if found is None or found == SCHEMA_REVISION:
            return
        where = self.engine.url.render_as_string(hide_password=True)
        if found not in _known_revisions():
            raise SchemaError(
                f"the catalog at {where} is at schema {found}, which this obsflow does not "
                f"know (it reads {SCHEMA_REVISION}): a newer obsflow made it; upgrade obsflow"
            )
        if not upgrade:
            raise SchemaError(
                f"the catalog at {where} is at schema {found}; this obsflow needs "
                f"{SCHEMA_REVISION}: back it up ('obsflow backup DIR'), then run "
                "'obsflow migrate' (the CHANGELOG's upgrade notes say what changes)"
            )

    def _journal_ok(self) -> bool:
        """SQLite's journal is WAL (a read of the connection's mode takes no lock)."""
        if not self.is_sqlite or self.engine.url.database in (None, "", ":memory:"):
            return True
        with self.engine.connect() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        return str(mode).lower() == "wal"

    @contextmanager
    def _migration_lock(self, wait_seconds: float) -> Iterator[Connection]:
        """A connection holding the lock that serialises migrations across processes:
        the writers' flock on SQLite, a session advisory lock on PostgreSQL (a
        transaction's would end with the migration's first commit)."""
        deadline = time.monotonic() + wait_seconds
        waited = False

        def wait_or_give_up() -> None:
            nonlocal waited
            if not waited:
                log.info("catalog %s: another process is migrating it; waiting", self.engine.url)
                waited = True
            if time.monotonic() > deadline:
                raise CatalogUnavailableError(
                    f"cannot open the catalog at {self.engine.url!r}: another process held "
                    f"its migration lock for over {wait_seconds:g} s"
                )
            time.sleep(0.05)

        def try_flock(lock: int) -> bool:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        with self._write_lock, self.engine.connect() as conn:
            if self._file_lock is not None:
                while not try_flock(self._file_lock):
                    wait_or_give_up()
            elif not self.is_sqlite:
                while not conn.execute(_PG_TRY_LOCK).scalar():
                    wait_or_give_up()
                conn.commit()
            if waited:
                log.info("catalog %s: the other process is done", self.engine.url)
            try:
                yield conn
            finally:
                if conn.in_transaction():
                    conn.rollback()
                if self._file_lock is not None:
                    fcntl.flock(self._file_lock, fcntl.LOCK_UN)
                elif not self.is_sqlite:
                    conn.execute(_PG_UNLOCK)
                    conn.commit()

    def revision(self) -> str | None:
        """The schema revision the database is at (None for an empty database)."""
        with self.engine.connect() as conn:
            return _revision(conn)

    def close(self) -> None:
        self.engine.dispose()
        if self._file_lock is not None:
            os.close(self._file_lock)
            self._file_lock = None

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        with self._write_lock, self._across_processes(), self.engine.connect() as plain:
            conn = plain.execution_options(obsflow_immediate=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _across_processes(self) -> Iterator[None]:
        if self._file_lock is None:
            yield
            return
        fcntl.flock(self._file_lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._file_lock, fcntl.LOCK_UN)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # ------------------------------------------------------------ receipt

    def record_cached(
        self,
        new: NewFile,
        make_archive_id: Callable[[int], str],
        cache_path: Callable[[str], str],
        place: Callable[[str], object],
        ledger: Mapping[LedgerEvent, datetime],
        now: datetime,
        unplace: Callable[[str], object] = lambda archive_id: None,
    ) -> Recorded:
        """Record one file in the cache with its ingest request, in ONE transaction.

        ``make_archive_id(bump)`` gives candidate IDs (bump 0, 1, ... past collisions);
        ``place(archive_id)`` moves the bytes into the cache and runs inside the
        transaction after every insert succeeded, so a row never exists without its
        bytes. The same bytes already live → ``duplicate`` and nothing is written.
        """
        entry = CacheEntry(new, make_archive_id, cache_path, place, unplace, ledger)
        return self.record_cached_many([entry], now)[0]

    def record_cached_many(self, entries: Sequence[CacheEntry], now: datetime) -> list[Recorded]:
        """Record a batch of files, each as :meth:`record_cached` would, in one transaction.

        If the transaction fails, every placement made in it is undone before the
        error propagates; a conflict with a concurrent writer (PostgreSQL) retries.
        """
        for _attempt in range(20):
            placed: list[tuple[CacheEntry, str]] = []
            try:
                with self.write() as conn:
                    recorded = batch.record(conn, entries, now, placed)
                    widened = self.spans.widen(
                        conn, [(e.new.product, e.new.start, e.new.stop) for e in entries]
                    )
                self.spans.remember(widened)
                return recorded
            except BaseException as exc:
                for entry, archive_id in reversed(placed):
                    entry.unplace(archive_id)
                if not isinstance(exc, IntegrityError):
                    raise
                # another writer took one of these archive IDs or these bytes between our
                # read and our insert (PostgreSQL); look again
                log.debug("catalog race recording %d file(s); retrying", len(entries))
        raise CatalogError(
            f"could not record {len(entries)} file(s): too many concurrent conflicts"
        )

    def sweep(self, cache_paths: Sequence[str], remove: Callable[[str], object]) -> list[str]:
        """Call ``remove`` on each of ``cache_paths`` that no file row claims; return them.

        Runs while no recorder can be between moving a file into the cache and
        committing its row (SQLite's write lock; an exclusive advisory lock on
        PostgreSQL), so what it removes is truly left over from an interrupted one.
        """
        files = schema.files
        removed: list[str] = []
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": batch.PLACEMENT_LOCK}
                )
            for start in range(0, len(cache_paths), 500):
                chunk = list(cache_paths[start : start + 500])
                known = set(
                    conn.execute(
                        select(files.c.cache_path).where(files.c.cache_path.in_(chunk))
                    ).scalars()
                )
                for path in chunk:
                    if path not in known:
                        remove(path)
                        removed.append(path)
        return removed

    def record_rejected(
        self,
        new: NewFile,
        reason: str,
        quarantine_path: str | None,
        ledger: Mapping[LedgerEvent, datetime],
    ) -> int | None:
        """Record a refused file (state ``rejected``) with its reason; return its row ID,
        or None when these bytes under this name were recorded rejected already."""
        values = batch.file_values(new)
        values.update(
            state=FileState.REJECTED.value, reason=reason, quarantine_path=quarantine_path
        )
        try:
            with self.write() as conn:
                key = conn.execute(insert(schema.files).values(**values)).inserted_primary_key
                widened = self.spans.widen(conn, [(new.product, new.start, new.stop)])
                assert key is not None
                file_id = int(key[0])
                stamps = [
                    {"file_id": file_id, "event": e.value, "at": at} for e, at in ledger.items()
                ]
                if stamps:
                    conn.execute(insert(schema.ledger), stamps)
                self.spans.remember(widened)
                return file_id
        except IntegrityError:
            return None

    def rejected_before(self, sha256: str, original_name: str) -> str | None:
        """The quarantine path of an earlier rejection of these very bytes under this name."""
        files = schema.files
        with self.read() as conn:
            row = conn.execute(
                select(files.c.quarantine_path).where(
                    files.c.sha256 == sha256,
                    files.c.original_name == original_name,
                    schema.is_rejected(),
                )
            ).first()
        return None if row is None else (row.quarantine_path or "")

    # ------------------------------------------------------------ queries

    def find(self, query: FileQuery) -> list[FileRecord]:
        """The files ``query`` asks for, in its order: the one query of files, for
        ``obsflow find``, the REST listing and the rest (see :mod:`obsflow.catalog.search`)."""
        with self.read() as conn:
            rows = conn.execute(search.statement(conn, query)).all()
            return self._records(conn, rows)

    def tag_counts(self) -> list[tuple[str, int]]:
        """Every tag with how many live files with an archive ID carry it, by tag."""
        with self.read() as conn:
            return search.tag_counts(conn)

    def untracked(self, limit: int) -> list[FileRecord]:
        """Files the tracker has not read yet (live or not), oldest first: the files table
        is the tracker's durable inbox. A row is visible here once its transaction has
        committed, whatever order concurrent writers commit in."""
        files = schema.files
        stmt = select(files).where(schema.is_untracked()).order_by(files.c.id).limit(limit)
        with self.read() as conn:
            rows = conn.execute(stmt).all()
            return self._records(conn, rows)

    def mark_tracked(self, file_ids: Sequence[int]) -> None:
        """The tracker has read these files (and queued what they made ready)."""
        files = schema.files
        with self.write() as conn:
            conn.execute(update(files).where(files.c.id.in_(file_ids)).values(tracked=True))

    def of_night(self, product: str, night: date) -> list[FileRecord]:
        """The live, current (not superseded) files of one product and night, in the order
        they were recorded: the tracker's candidates. Unsorted in SQL, so that the planner
        takes the (product, night) index whatever the table's statistics say."""
        files = schema.files
        stmt = select(files).where(
            files.c.product == product,
            files.c.night == night,
            files.c.superseded_by.is_(None),
            schema.is_live(),
        )
        with self.read() as conn:
            rows = sorted(conn.execute(stmt).all(), key=lambda r: int(r.id))
            return self._records(conn, rows)

    def records(self, file_ids: Sequence[int], conn: Connection | None = None) -> list[FileRecord]:
        """The files with these IDs, in ID order (read in ``conn``'s transaction if given)."""
        if not file_ids:
            return []
        if conn is None:
            with self.read() as own:
                return self.records(file_ids, own)
        files = schema.files
        found: list[FileRecord] = []
        for chunk in _chunks(sorted(set(file_ids)), 500):
            rows = conn.execute(select(files).where(files.c.id.in_(chunk))).all()
            found += self._records(conn, sorted(rows, key=lambda r: int(r.id)))
        return found

    def get(self, archive_id: str) -> FileRecord | None:
        found = self.find(FileQuery(archive_id=archive_id))
        return found[0] if found else None

    def file_id(self, archive_id: str) -> int | None:
        """The row ID of the live file with this archive ID (None: no such file, or only
        a refused one): the one lookup behind tagging or pinning a file by its archive ID."""
        files = schema.files
        stmt = select(files.c.id).where(files.c.archive_id == archive_id, schema.is_live())
        with self.read() as conn:
            found = conn.execute(stmt).scalar()
        return None if found is None else int(found)

    def get_by_id(self, file_id: int) -> FileRecord | None:
        with self.read() as conn:
            rows = conn.execute(select(schema.files).where(schema.files.c.id == file_id)).all()
            records = self._records(conn, rows)
        return records[0] if records else None

    def _records(self, conn: Connection, rows: Sequence[Row[Any]]) -> list[FileRecord]:
        if not rows:
            return []
        ids = [r.id for r in rows]
        tags: dict[int, list[str]] = {}
        words: dict[int, dict[str, Any]] = {}
        for chunk in _chunks(ids, 500):
            for file_id, tag in conn.execute(_TAGS_OF, {"ids": chunk}):
                tags.setdefault(file_id, []).append(tag)
            for file_id, name, kind, shown in conn.execute(_KEYWORDS_OF, {"ids": chunk}):
                words.setdefault(file_id, {})[name] = _keyword_value(kind, shown)
        return [_record(r, tags.get(r.id, ()), words.get(r.id, {})) for r in rows]

    def ledger(self, file_id: int) -> list[LedgerEntry]:
        led = schema.ledger
        with self.read() as conn:
            rows = conn.execute(select(led).where(led.c.file_id == file_id).order_by(led.c.at))
            return [LedgerEntry(LedgerEvent(r.event), r.at) for r in rows]

    def counts(self) -> dict[FileState, int]:
        files = schema.files
        with self.read() as conn:
            rows = conn.execute(select(files.c.state, func.count()).group_by(files.c.state)).all()
        return {FileState(state): count for state, count in rows}


_TAGS_OF = (
    select(schema.tags.c.file_id, schema.tags.c.tag)
    .where(schema.tags.c.file_id.in_(bindparam("ids", expanding=True)))
    .order_by(schema.tags.c.tag)
)
_KEYWORDS_OF = select(
    schema.keywords.c.file_id,
    schema.keywords.c.name,
    schema.keywords.c.kind,
    schema.keywords.c.value_text,
).where(schema.keywords.c.file_id.in_(bindparam("ids", expanding=True)))


def _keyword_value(kind: str, text: str | None) -> Any:
    if kind == "s":
        return text
    if kind == "b":
        return text == "T"
    if kind == "i":
        return int(text or 0)
    if kind == "f":
        return float(text or 0)
    return None if kind == "n" else text


def _record(row: Row[Any], tags: Sequence[str], words: Mapping[str, Any]) -> FileRecord:
    m = row._mapping
    # the columns taken by one itemgetter and set on the frozen record at once, not
    # through its __init__'s 35 object.__setattr__ calls: a page of 100 records was a
    # fifth of the REST listing's time (FileRecord is a plain dataclass: its fields
    # are its __dict__)
    record = object.__new__(FileRecord)
    fields = dict(zip(_RECORD_COLUMNS, _RECORD_VALUES(m), strict=True))
    fields["state"] = FileState(m["state"])
    fields["start"] = m["start_utc"]
    fields["stop"] = m["stop_utc"]
    fields["tags"] = tuple(tags)
    fields["keywords"] = dict(words)
    record.__dict__.update({name: fields[name] for name in _RECORD_FIELDS})
    return record


_RECORD_COLUMNS = [
    c.name
    for c in schema.files.columns
    if c.name not in ("state", "start_utc", "stop_utc", "tracked")  # (tracked: the tracker's)
]
_RECORD_VALUES = operator.itemgetter(*_RECORD_COLUMNS)
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(FileRecord))
if set(_RECORD_FIELDS) != {*_RECORD_COLUMNS, "state", "start", "stop", "tags", "keywords"}:
    raise AssertionError("FileRecord's fields and the files table's columns differ")


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _revision(conn: Connection) -> str | None:
    try:
        if not inspect(conn).has_table("alembic_version"):
            return None
        version: str | None = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return version
    finally:
        if conn.in_transaction():
            conn.rollback()  # a read: end it, so the connection holds no snapshot


def _known_revisions() -> frozenset[str]:
    """The revisions of the migrations this obsflow ships (each file's ``revision = "..."``
    line, read as text so that Alembic is not loaded for it)."""
    found = (_REVISION.search(p.read_text()) for p in (MIGRATIONS / "versions").glob("*.py"))
    return frozenset(m.group(1) for m in found if m)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see below)
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        dbapi_conn.create_function(
            search.SEPARATION, 4, search.separation, deterministic=True
        )  # the exact test of a cone search

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("obsflow_immediate", False)
        # on the driver's connection: SQLAlchemy's way for a statement (events, a result)
        # cost a short transaction as much as its UPDATE
        conn.connection.driver_connection.execute(  # type: ignore[union-attr]
            "BEGIN IMMEDIATE" if immediate else "BEGIN"
        )

"""The status of a site at one moment: the one snapshot that ``obsflow status``,
``GET /api/v1/status``, ``/metrics`` and the demo's live view all show.

:func:`site_status` reads, in ONE transaction (a single snapshot of the catalog:
SQLite's read transaction in WAL mode, PostgreSQL's ``REPEATABLE READ``):

* files by state, and by processing level and state;
* ingest requests by state and the queue's depth (pending or leased,
  :func:`obsflow.catalog.queue.depth_of`);
* runs by state; the tracker's backlog (files it has not read yet, groups waiting
  for a deadline, :func:`obsflow.catalog.tracking.groups_waiting`);
* the cache's figures (:func:`obsflow.catalog.cachestate.cache_figures`: files whose
  bytes are in it, their bytes, virtual files, pinned files, bytes not archived yet);
* for an agent, its outbox (its ingest queue, whose archive is the server): the depth,
  the oldest waiting frame, the last confirmation and the throughput;
* every process that writes to the catalog (daemons, workers, on any machine) with its
  health, as it last recorded it (:mod:`obsflow.catalog.processes`; ``lost`` computed).

The local daemon's status file (``daemon.json``, read by
:func:`obsflow.daemon.read_status`) is passed in by the caller, which knows the site's
directory; its ``role``, when given,
is the site's role, else the settings' role is. :meth:`SiteStatus.to_json` is what
``obsflow status --json`` prints; the API's status is made of it and of
:meth:`SiteStatus.details_json`.

The latency ledger (percentiles, stuck files) is another noun:
:mod:`obsflow.catalog.latency`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, TypeVar

from sqlalchemy import Connection, func, literal_column, select

from obsflow.catalog import Catalog, schema
from obsflow.catalog.cachestate import CacheFigures, cache_figures
from obsflow.catalog.fixity import FixityFigures, FixityStore
from obsflow.catalog.processes import ProcessRecord, processes_of
from obsflow.catalog.queue import count_by_state, depth_of, is_waiting
from obsflow.catalog.tracking import groups_waiting
from obsflow.settings import Role
from obsflow.states import FileState, LedgerEvent, RequestState, RunState

S = TypeVar("S", bound=StrEnum)

OUTBOX_WINDOW: Final = 300.0
"""Seconds over which an agent's outbox throughput is measured."""

files = schema.files
requests = schema.ingest_requests
ledger = schema.ledger


@dataclass(frozen=True)
class Outbox:
    """The state of an agent's outbox (its ingest queue, whose archive is the server)."""

    depth: int
    """Frames not yet archived at the server (the queue's depth)."""
    oldest: datetime | None
    """When the oldest of them was queued."""
    oldest_name: str | None
    last_success: datetime | None
    """When the server last confirmed a frame."""
    bytes_per_second: float
    """Confirmed in the last ``window`` seconds."""
    window: float

    def to_json(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "oldest": _iso(self.oldest),
            "oldest_name": self.oldest_name,
            "last_success": _iso(self.last_success),
            "bytes_per_second": round(self.bytes_per_second, 1),
            "window_seconds": self.window,
        }


@dataclass(frozen=True)
class SiteStatus:
    """The status of a site at ``now``. Every state of each closed enum is a key of its
    mapping (0 for the states nothing is in)."""

    now: datetime
    role: Role
    """The daemon's role if its status says one, else the settings' role."""
    files: Mapping[FileState, int]
    levels: Mapping[int | None, Mapping[FileState, int]]
    """Files by processing level (None: unknown, e.g. a rejected file) and state; only
    the levels some file has are keys, and only the states some file of it is in."""
    queue: Mapping[RequestState, int]
    queue_depth: int
    """Ingest requests pending or leased."""
    runs: Mapping[RunState, int]
    untracked: int
    """Live files the tracker has not read yet."""
    groups_waiting: int
    """Groups of inputs waiting for a deadline (more runs will start)."""
    cache: CacheFigures
    daemon: Mapping[str, Any] | None
    """The daemon's status (with ``alive`` and ``ready``), or None: it never ran here."""
    outbox: Outbox | None
    """An agent's outbox; None at any other site."""
    fixity: FixityFigures
    """The archive's fixity audits: files audited, never audited, bad."""
    processes: tuple[ProcessRecord, ...] = ()
    """Every process that writes to the catalog (daemons, workers), with its health."""

    def at_level(self, level: int | None) -> Mapping[FileState, int]:
        """Files of one processing level by state (the states nothing is in are absent)."""
        return self.levels.get(level, {})

    def to_json(self) -> dict[str, Any]:
        """What ``obsflow status --json`` prints: files and ingest requests by state (every
        state), the queue's depth, the daemon's status, the processes that write to the
        catalog (:meth:`~obsflow.catalog.processes.ProcessRecord.to_json`) and, at an agent
        only, its outbox. The API's status is this, with :meth:`details_json` and the
        latency ledger."""
        data: dict[str, Any] = {
            "files": _by_value(self.files),
            "queue": _by_value(self.queue),
            "queue_depth": self.queue_depth,
            "daemon": None if self.daemon is None else dict(self.daemon),
            "processes": [p.to_json() for p in self.processes],
        }
        if self.outbox is not None:
            data["outbox"] = self.outbox.to_json()
        return data

    def details_json(self) -> dict[str, Any]:
        """The rest of the status, which the API shows beside :meth:`to_json`: the moment,
        the role, runs by state, the tracker's backlog and the cache."""
        return {
            "now": self.now.isoformat(),
            "role": self.role.value,
            "runs": _by_value(self.runs),
            "tracker": {"untracked": self.untracked, "groups_waiting": self.groups_waiting},
            "cache": self.cache.to_json(),
            "fixity": self.fixity.to_json(),
        }


def site_status(
    catalog: Catalog,
    now: datetime,
    *,
    role: Role,
    daemon: Mapping[str, Any] | None = None,
    outbox_window: float = OUTBOX_WINDOW,
) -> SiteStatus:
    """The site's status at ``now``, read from the catalog in one transaction.

    ``role`` is the settings' role; the daemon's status (``daemon``), when it names
    one, overrides it. An agent's status has its outbox, measured over
    ``outbox_window`` seconds.
    """
    named = (daemon or {}).get("role")
    effective = Role(named) if named else role
    with _snapshot(catalog) as conn:
        levels = _files_by_level(conn)
        queue = count_by_state(conn)
        run_state = schema.runs.c.state
        runs = conn.execute(select(run_state, func.count()).group_by(run_state)).all()
        untracked = conn.execute(
            select(func.count()).where(schema.is_untracked(), schema.is_live())
        ).scalar_one()
        waiting = groups_waiting(conn)
        cache = cache_figures(conn)
        depth = depth_of(queue)
        outbox = _outbox(conn, now, depth, outbox_window) if effective is Role.AGENT else None
        fixity = FixityStore(catalog).figures(conn)
        processes = processes_of(conn, now)
    by_state: dict[FileState, int] = {}
    for counts in levels.values():
        for state, n in counts.items():
            by_state[state] = by_state.get(state, 0) + n
    return SiteStatus(
        now=now,
        role=effective,
        files=_every(FileState, by_state),
        levels=levels,
        queue=_every(RequestState, queue),
        queue_depth=depth,
        runs=_every(RunState, {RunState(state): n for state, n in runs}),
        untracked=int(untracked),
        groups_waiting=int(waiting),
        cache=cache,
        daemon=daemon,
        outbox=outbox,
        fixity=fixity,
        processes=processes,
    )


def answers(catalog: Catalog) -> None:
    """Return if the catalog answers a query (``/healthz``); raise if it does not."""
    with catalog.read() as conn:
        conn.execute(select(literal_column("1"))).scalar_one()


@contextmanager
def _snapshot(catalog: Catalog) -> Iterator[Connection]:
    """A read transaction in which every statement sees the same snapshot.

    SQLite's read transaction (``BEGIN``, WAL) already does; PostgreSQL's default
    (``READ COMMITTED``) takes a snapshot per statement, so ``REPEATABLE READ`` here.
    """
    if catalog.is_sqlite:
        with catalog.read() as conn:
            yield conn
        return
    with catalog.engine.connect() as plain:
        conn = plain.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def _files_by_level(conn: Connection) -> dict[int | None, dict[FileState, int]]:
    rows = conn.execute(
        select(files.c.level, files.c.state, func.count()).group_by(files.c.level, files.c.state)
    ).all()
    levels: dict[int | None, dict[FileState, int]] = {}
    for level, state, n in rows:
        levels.setdefault(level, {})[FileState(state)] = n
    return levels


def _outbox(conn: Connection, now: datetime, depth: int, window: float) -> Outbox:
    archived = ledger.c.event == LedgerEvent.ARCHIVED.value
    oldest = conn.execute(
        select(requests.c.created_at, files.c.original_name)
        .join(files, files.c.id == requests.c.file_id)
        .where(is_waiting())
        .order_by(requests.c.created_at)
        .limit(1)
    ).first()
    last = conn.execute(select(func.max(ledger.c.at)).where(archived)).scalar()
    sent = conn.execute(
        select(func.coalesce(func.sum(files.c.size), 0))
        .join(ledger, ledger.c.file_id == files.c.id)
        .where(archived, ledger.c.at >= now - timedelta(seconds=window))
    ).scalar()
    return Outbox(
        depth=depth,
        oldest=oldest.created_at if oldest else None,
        oldest_name=oldest.original_name if oldest else None,
        last_success=last,
        bytes_per_second=float(sent or 0) / window,
        window=window,
    )


def _every(states: type[S], counts: Mapping[S, int]) -> dict[S, int]:
    """Every state of the enum, in its order, with its count (0 for those nothing is in)."""
    return {state: counts.get(state, 0) for state in states}


def _by_value(counts: Mapping[Any, int]) -> dict[str, int]:
    return {state.value: n for state, n in counts.items()}


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None

"""The processes that write to the catalog and their health: daemons and workers.

Every daemon (``obsflow run``, in its role) and every Celery worker with the site's
storage (``obsflow worker --site``) records itself in the ``processes`` table, one row per
process instance, so that any process reading the catalog (a server's ``obsflow status``,
its API, its ``/metrics``, the dashboard) shows the health of every process that writes to
it, on whatever machine. The process writes its own row, never another's:

* at start and at every heartbeat, :meth:`ProcessStore.beat`: ONE statement (an UPSERT,
  on SQLite and PostgreSQL alike), with what it reports (:class:`Health`: its triggers,
  its EPICS link, its executor's workers busy and total, an agent's outbox depth);
* when told to stop, ``stopping`` (it finishes what it holds); when it ends cleanly,
  :meth:`ProcessStore.stop`: ``stopped``.

A process killed (SIGKILL, its machine lost) writes nothing more: its row is shown
``lost`` once its heartbeat is older than :data:`LOST_AFTER_BEATS` of its own heartbeat
intervals, computed when read (:func:`processes_of`), never stored. Rows whose heartbeat
is older than ``daemon.forget_processes_seconds`` (stopped or lost that long) are deleted
when a process starts or stops (:meth:`ProcessStore.prune`).

:func:`processes_of` reads them inside the site's status snapshot
(:func:`obsflow.catalog.status.site_status`); :meth:`ProcessRecord.to_json` is the shape
``obsflow status --json``, ``GET /api/v1/status`` and the dashboard show.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from obsflow import __version__
from obsflow.catalog import Catalog, schema
from obsflow.settings import Role
from obsflow.states import ProcessState

LOST_AFTER_BEATS: Final = 3.0
"""A process whose last heartbeat is older than this many of its heartbeat intervals is
lost (as ``daemon.json``'s ``alive`` says of the daemon)."""

table = schema.processes


class ProcessKind(StrEnum):
    """What a process that writes to the catalog is."""

    DAEMON = "daemon"  # obsflow run, in its role (all, agent, server)
    WORKER = "worker"  # obsflow worker: a Celery worker with the site's storage


@dataclass(frozen=True)
class TriggerHealth:
    """One trigger of a daemon, as it last reported."""

    name: str
    """The trigger's name, e.g. ``watch:/data/incoming``, ``epics:OFCAM:LASTFILE``."""
    kind: str
    """``watch``, ``epics`` or ``scan``."""
    healthy: bool
    last_event: datetime | None
    """When it last offered a path (None: never, since the daemon started)."""
    error: str | None
    """Why it is not healthy (None when it is)."""

    def to_json(self, *, operational: bool = True) -> dict[str, Any]:
        return {
            "name": self.name if operational else None,
            "kind": self.kind,
            "healthy": self.healthy,
            "last_event": _iso(self.last_event),
            "error": self.error if operational else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TriggerHealth:
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            healthy=bool(data["healthy"]),
            last_event=_at(data.get("last_event")),
            error=data.get("error"),
        )


@dataclass(frozen=True)
class EpicsLink:
    """One EPICS trigger's Channel Access link: its PV, and its heartbeat PV's age."""

    trigger: str
    pv: str
    connected: bool
    """Every PV it monitors is connected."""
    heartbeat_pv: str | None = None
    heartbeat_age_seconds: float | None = None
    """Since the heartbeat PV last changed (None: no heartbeat PV, or no value yet)."""

    def to_json(self) -> dict[str, Any]:
        age = self.heartbeat_age_seconds
        return {
            "trigger": self.trigger,
            "pv": self.pv,
            "connected": self.connected,
            "heartbeat_pv": self.heartbeat_pv,
            "heartbeat_age_seconds": None if age is None else round(age, 3),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpicsLink:
        age = data.get("heartbeat_age_seconds")
        return cls(
            trigger=str(data["trigger"]),
            pv=str(data["pv"]),
            connected=bool(data["connected"]),
            heartbeat_pv=data.get("heartbeat_pv"),
            heartbeat_age_seconds=None if age is None else float(age),
        )


@dataclass(frozen=True)
class Workers:
    """An executor's workers: how many execute a run now, of how many."""

    busy: int
    total: int

    def to_json(self) -> dict[str, int]:
        return {"busy": self.busy, "total": self.total}


@dataclass(frozen=True)
class Health:
    """What a process reports at each heartbeat."""

    triggers: tuple[TriggerHealth, ...] = ()
    epics: tuple[EpicsLink, ...] = ()
    """Its EPICS triggers' links (none: it has no EPICS trigger)."""
    workers: Workers | None = None
    """Its executor's workers (None: it executes no runs here, e.g. an agent, or a daemon
    whose runs go to Celery workers, which report themselves)."""
    outbox_depth: int | None = None
    """An agent's frames not yet archived at its server (None: not an agent)."""

    def dumps(self) -> str:
        """As stored in the catalog."""
        return json.dumps(
            {
                "triggers": [t.to_json() for t in self.triggers],
                "epics": [link.to_json() for link in self.epics],
                "workers": None if self.workers is None else self.workers.to_json(),
                "outbox_depth": self.outbox_depth,
            },
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, text: str) -> Health:
        data = json.loads(text)
        workers = data.get("workers")
        return cls(
            triggers=tuple(TriggerHealth.from_json(t) for t in data.get("triggers", [])),
            epics=tuple(EpicsLink.from_json(e) for e in data.get("epics", [])),
            workers=None if workers is None else Workers(workers["busy"], workers["total"]),
            outbox_depth=data.get("outbox_depth"),
        )

    def epics_json(self, *, operational: bool = True) -> dict[str, Any] | None:
        """``{"connected", "heartbeat_age_seconds", "links"}``: every link connected, the
        oldest heartbeat age, and each link (its PVs: ``operational`` only); None without
        an EPICS trigger."""
        if not self.epics:
            return None
        ages = [e.heartbeat_age_seconds for e in self.epics if e.heartbeat_age_seconds is not None]
        return {
            "connected": all(e.connected for e in self.epics),
            "heartbeat_age_seconds": round(max(ages), 3) if ages else None,
            "links": [e.to_json() for e in self.epics] if operational else [],
        }


@dataclass(frozen=True)
class Identity:
    """Who a process is: made once when it starts (:meth:`of_this_process`)."""

    id: str
    kind: ProcessKind
    host: str
    pid: int
    role: Role | None
    """A daemon's role; None for a worker."""
    started: datetime
    version: str = __version__

    @classmethod
    def of_this_process(cls, kind: ProcessKind, started: datetime, role: Role | None) -> Identity:
        """This process, under a new ID (a restarted process is a new row)."""
        return cls(
            id=uuid.uuid4().hex[:16],
            kind=kind,
            host=socket.gethostname(),
            pid=os.getpid(),
            role=role,
            started=started,
        )


@dataclass(frozen=True)
class ProcessRecord:
    """A process as read from the catalog at ``now``."""

    identity: Identity
    heartbeat: datetime
    age_seconds: float
    """Since its last heartbeat."""
    interval_seconds: float
    state: ProcessState
    """As stored, or ``lost`` (computed: its heartbeat is too old)."""
    health: Health = field(default_factory=Health)

    @property
    def id(self) -> str:
        return self.identity.id

    @property
    def kind(self) -> ProcessKind:
        return self.identity.kind

    def to_json(self, *, operational: bool = True) -> dict[str, Any]:
        """The shape the CLI, the API and the dashboard show. ``operational`` False (a
        caller who is not an admin) leaves out where it runs (host, pid) and what names
        paths or addresses (trigger names, errors, EPICS PVs): those are null (or [])."""
        me = self.identity
        return {
            "id": me.id,
            "kind": me.kind.value,
            "host": me.host if operational else None,
            "pid": me.pid if operational else None,
            "role": None if me.role is None else me.role.value,
            "started": me.started.isoformat(),
            "heartbeat": self.heartbeat.isoformat(),
            "age_seconds": round(self.age_seconds, 3),
            "state": self.state.value,
            "version": me.version,
            "triggers": [t.to_json(operational=operational) for t in self.health.triggers],
            "epics": self.health.epics_json(operational=operational),
            "workers": None if self.health.workers is None else self.health.workers.to_json(),
            "outbox_depth": self.health.outbox_depth,
        }


def state_at(stored: ProcessState, age_seconds: float, interval_seconds: float) -> ProcessState:
    """The state to show: ``lost`` for a running or stopping process whose heartbeat is
    older than :data:`LOST_AFTER_BEATS` intervals, else the state it stored."""
    if stored.alive and age_seconds > LOST_AFTER_BEATS * interval_seconds:
        return ProcessState.LOST
    return stored


class ProcessStore:
    """A process's own row in ``processes``."""

    def __init__(self, catalog: Catalog, identity: Identity, interval_seconds: float) -> None:
        self.catalog = catalog
        self.identity = identity
        self.interval = interval_seconds

    def beat(
        self,
        health: Health,
        now: datetime,
        state: ProcessState = ProcessState.RUNNING,
        *,
        conn: Connection | None = None,
    ) -> None:
        """Record this process's heartbeat, health and state (running or stopping): one
        UPSERT (in ``conn``'s transaction if given)."""
        if state is ProcessState.LOST:
            raise ValueError("a process never records itself lost")
        me = self.identity
        values = {
            "id": me.id,
            "kind": me.kind.value,
            "host": me.host[:255],
            "pid": me.pid,
            "role": None if me.role is None else me.role.value,
            "version": me.version[:32],
            "started": me.started,
            "heartbeat": now,
            "interval_seconds": self.interval,
            "state": state.value,
            "health": health.dumps(),
        }
        changing = ("heartbeat", "interval_seconds", "state", "health")
        if conn is None:
            with self.catalog.write() as own:
                own.execute(self._upsert(values, changing))
        else:
            conn.execute(self._upsert(values, changing))

    def _upsert(self, values: dict[str, Any], changing: Sequence[str]) -> Any:
        if self.catalog.is_sqlite:
            lite = sqlite.insert(table).values(**values)
            return lite.on_conflict_do_update(
                index_elements=[table.c.id], set_={c: lite.excluded[c] for c in changing}
            )
        pg = postgresql.insert(table).values(**values)
        return pg.on_conflict_do_update(
            index_elements=[table.c.id], set_={c: pg.excluded[c] for c in changing}
        )

    def stop(self, now: datetime) -> None:
        """This process ends cleanly: ``stopped`` (its health as it last reported it)."""
        with self.catalog.write() as conn:
            conn.execute(
                update(table)
                .where(table.c.id == self.identity.id)
                .values(heartbeat=now, state=ProcessState.STOPPED.value)
            )

    def prune(self, now: datetime, older_than_seconds: float) -> int:
        """Delete the rows of processes (any) that have not beaten for ``older_than_seconds``
        (stopped or lost that long); how many."""
        horizon = now - timedelta(seconds=older_than_seconds)
        with self.catalog.write() as conn:
            gone = conn.execute(delete(table).where(table.c.heartbeat < horizon)).rowcount
        return int(gone or 0)


def processes_of(conn: Connection, now: datetime) -> tuple[ProcessRecord, ...]:
    """Every process recorded, at ``now`` (lost ones computed), daemons first, then by
    host, pid and start: read in ``conn``'s transaction (the status snapshot's)."""
    found: list[ProcessRecord] = []
    for row in conn.execute(select(table)):
        age = max(0.0, (now - row.heartbeat).total_seconds())
        found.append(
            ProcessRecord(
                identity=Identity(
                    id=row.id,
                    kind=ProcessKind(row.kind),
                    host=row.host,
                    pid=int(row.pid),
                    role=None if row.role is None else Role(row.role),
                    started=row.started,
                    version=row.version,
                ),
                heartbeat=row.heartbeat,
                age_seconds=age,
                interval_seconds=float(row.interval_seconds),
                state=state_at(ProcessState(row.state), age, float(row.interval_seconds)),
                health=Health.loads(row.health),
            )
        )
    kinds = list(ProcessKind)
    found.sort(key=lambda p: (kinds.index(p.kind), p.identity.host, p.identity.pid, p.id))
    return tuple(found)


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _at(text: Any) -> datetime | None:
    return None if text is None else datetime.fromisoformat(str(text))

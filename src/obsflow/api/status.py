"""``/api/v1/status`` (what ``obsflow status`` and ``obsflow status --latency`` tell)
and ``/healthz``.

The status is the site's snapshot (:func:`obsflow.catalog.status.site_status`, the one
``obsflow status --json`` prints: files, the ingest queue and its depth, runs, the
tracker's backlog, the cache, an agent's outbox) with the latency percentiles from the
ledger (:func:`obsflow.catalog.latency.latency_report`) and the stuck files by archive
ID. Their original names and error details (which quote paths and header values), and
the daemon's status (which quotes paths and addresses), are shown to admin tokens only.
The processes that write to the catalog (daemons, workers: :mod:`obsflow.catalog.processes`)
are shown to everyone by kind, role, state and heartbeat; where they run (host, pid) and
what names paths or addresses (trigger names and errors, EPICS PVs) to admin tokens only
(null for others).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from obsflow.access import Scope
from obsflow.api.auth import Caller
from obsflow.api.params import Level, Time, utc
from obsflow.api.problems import documented
from obsflow.api.services import Services, json_response, services
from obsflow.catalog import latency
from obsflow.catalog.processes import ProcessKind
from obsflow.catalog.status import answers, site_status
from obsflow.daemon import read_status as read_daemon_status
from obsflow.settings import Role
from obsflow.states import FileState, ProcessState, RequestState, RunState

router = APIRouter(tags=["status"])
Svc = Annotated[Services, Depends(services)]


class PercentilesOut(BaseModel):
    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None


class LatencyOut(BaseModel):
    since: datetime
    total: PercentilesOut = Field(description="acquired → archived.")
    stages: dict[str, PercentilesOut] = Field(description="Each stage, e.g. cached_to_archived.")
    levels: dict[str, PercentilesOut] = Field(
        default_factory=dict,
        description="Science latency per processing level (L0, L1 ...): the latest raw "
        "ancestor acquired → the file archived.",
    )


class StuckOut(BaseModel):
    archive_id: str | None
    state: str = Field(description="cached, failed, or leased (its ingestor died).")
    since: datetime
    seconds: float
    original_name: str | None = Field(default=None, description="Admin tokens only.")
    detail: str | None = Field(default=None, description="Admin tokens only.")


class TrackerOut(BaseModel):
    untracked: int = Field(description="Live files the tracker has not read yet.")
    groups_waiting: int = Field(description="Groups of inputs waiting for a deadline.")


class CacheOut(BaseModel):
    files: int = Field(description="Files whose bytes are in the cache.")
    bytes: int
    virtual: int = Field(description="Files evicted from the cache.")
    pinned: int = Field(description="Files with at least one pin.")
    unarchived_bytes: int = Field(description="Bytes of cached files not archived yet.")


class OutboxOut(BaseModel):
    depth: int = Field(description="Frames not yet archived at the server.")
    oldest: datetime | None = Field(description="When the oldest of them was queued.")
    oldest_name: str | None
    last_success: datetime | None = Field(description="When the server last confirmed one.")
    bytes_per_second: float
    window_seconds: float


class TriggerOut(BaseModel):
    name: str | None = Field(description="e.g. watch:/data/incoming; admin tokens only.")
    kind: str = Field(description="watch, epics or scan.")
    healthy: bool
    last_event: datetime | None = Field(description="When it last offered a path.")
    error: str | None = Field(description="Why it is not healthy; admin tokens only.")


class EpicsLinkOut(BaseModel):
    trigger: str
    pv: str
    connected: bool
    heartbeat_pv: str | None
    heartbeat_age_seconds: float | None


class EpicsOut(BaseModel):
    connected: bool = Field(description="Every EPICS link connected.")
    heartbeat_age_seconds: float | None = Field(description="The oldest heartbeat PV's age.")
    links: list[EpicsLinkOut] = Field(description="Each link; admin tokens only (else []).")


class WorkersOut(BaseModel):
    busy: int
    total: int


class ProcessOut(BaseModel):
    id: str
    kind: ProcessKind
    host: str | None = Field(description="Admin tokens only.")
    pid: int | None = Field(description="Admin tokens only.")
    role: Role | None = Field(description="A daemon's role.")
    started: datetime
    heartbeat: datetime
    age_seconds: float = Field(description="Since its last heartbeat.")
    state: ProcessState = Field(description="lost: its heartbeat is too old.")
    version: str
    triggers: list[TriggerOut]
    epics: EpicsOut | None
    workers: WorkersOut | None = Field(description="Its executor's workers busy and total.")
    outbox_depth: int | None = Field(description="An agent's frames not yet archived.")


class StatusOut(BaseModel):
    now: datetime
    role: Role
    files: dict[FileState, int]
    queue: dict[RequestState, int]
    queue_depth: int = Field(description="Ingest requests pending or leased.")
    runs: dict[RunState, int]
    tracker: TrackerOut
    cache: CacheOut
    outbox: OutboxOut | None = Field(default=None, description="An agent's outbox only.")
    daemon: dict[str, Any] | None = Field(
        default=None, description="The daemon's status (null: it never ran); admin tokens only."
    )
    processes: list[ProcessOut] = Field(
        description="Every process (daemon, worker) that writes to the catalog, and its health."
    )
    latency: LatencyOut
    stuck: list[StuckOut] = Field(description="The oldest stuck files.")
    stuck_total: int
    stuck_after_seconds: float


class Health(BaseModel):
    status: str


@router.get(
    "/api/v1/status",
    response_model=StatusOut,
    summary="Counts, queue depth, cache, latency, stuck files",
    responses=documented(401),
)
def get_status(
    who: Caller,
    svc: Svc,
    since: Annotated[
        Time | None,
        Query(description="Latency of files that reached a stage since (default: 24 h ago)."),
    ] = None,
    stuck_after: Annotated[
        float, Query(ge=0, le=10**7, description="Seconds cached, not archived, that is stuck.")
    ] = latency.DEFAULT_STUCK_AFTER,
    level: Annotated[Level | None, Query(description="Only files of this level.")] = None,
) -> Response:
    now = svc.now()
    settings = svc.site.settings
    site = site_status(
        svc.site.catalog,
        now,
        role=settings.transfer.role,
        daemon=read_daemon_status(settings.site, now),
    )
    snapshot = {**site.to_json(), **site.details_json()}
    report = latency.latency_report(svc.site.catalog, now, utc(since), stuck_after, level=level)
    admin = who.may(Scope.ADMIN)
    if not admin:
        del snapshot["daemon"]
    snapshot["processes"] = [p.to_json(operational=admin) for p in site.processes]
    status = StatusOut.model_validate(
        {
            **snapshot,
            "latency": LatencyOut(
                since=report.since,
                total=PercentilesOut.model_validate(report.total.to_json()),
                stages={
                    k: PercentilesOut.model_validate(p.to_json()) for k, p in report.stages.items()
                },
                levels={
                    latency.level_name(n): PercentilesOut.model_validate(p.to_json())
                    for n, p in report.levels.items()
                },
            ),
            "stuck": [
                StuckOut(
                    archive_id=f.archive_id,
                    state=f.state,
                    since=f.since,
                    seconds=f.seconds,
                    **({"original_name": f.original_name, "detail": f.detail} if admin else {}),
                )
                for f in report.stuck
            ],
            "stuck_total": report.stuck_total,
            "stuck_after_seconds": report.stuck_after,
        }
    )
    return json_response(status)


@router.get(
    "/healthz",
    response_model=Health,
    summary="Alive, and the catalog answers",
    responses=documented(),
)
def healthz(svc: Svc) -> Response:
    answers(svc.site.catalog)
    return json_response(Health(status="ok"))

"""``/api/v1/status`` (what ``obsflow status --latency`` tells) and ``/healthz``.

The status counts files by state, the ingest queue and runs by state, takes latency
percentiles from the ledger (:func:`obsflow.latency.latency_report`) and lists the
stuck files by archive ID; their original names and error details (which quote
paths and header values) are shown to admin tokens only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy import text

from obsflow.access import Scope
from obsflow.api.auth import Caller
from obsflow.api.params import Level, Time, utc
from obsflow.api.problems import documented
from obsflow.api.services import Services, json_response, services
from obsflow.catalog import latency
from obsflow.states import FileState, RequestState, RunState

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


class StuckOut(BaseModel):
    archive_id: str | None
    state: str = Field(description="cached, failed, or leased (its ingestor died).")
    since: datetime
    seconds: float
    original_name: str | None = Field(default=None, description="Admin tokens only.")
    detail: str | None = Field(default=None, description="Admin tokens only.")


class StatusOut(BaseModel):
    now: datetime
    files: dict[FileState, int]
    queue: dict[RequestState, int]
    queue_depth: int = Field(description="Ingest requests pending or leased.")
    runs: dict[RunState, int]
    latency: LatencyOut
    stuck: list[StuckOut] = Field(description="The oldest stuck files.")
    stuck_total: int
    stuck_after_seconds: float


class Health(BaseModel):
    status: str


@router.get(
    "/api/v1/status",
    response_model=StatusOut,
    summary="Counts, queue depth, latency, stuck files",
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
    report = latency.latency_report(svc.site.catalog, now, utc(since), stuck_after, level=level)
    counts = svc.site.catalog.counts()
    depth = svc.site.queue.depth()
    runs = svc.runs.counts()
    admin = who.may(Scope.ADMIN)
    status = StatusOut(
        now=now,
        files={state: counts.get(state, 0) for state in FileState},
        queue={state: depth.get(state, 0) for state in RequestState},
        queue_depth=depth.get(RequestState.PENDING, 0) + depth.get(RequestState.LEASED, 0),
        runs={state: runs.get(state, 0) for state in RunState},
        latency=LatencyOut(
            since=report.since,
            total=PercentilesOut.model_validate(report.total.to_json()),
            stages={
                k: PercentilesOut.model_validate(p.to_json()) for k, p in report.stages.items()
            },
        ),
        stuck=[
            StuckOut(
                archive_id=f.archive_id,
                state=f.state,
                since=f.since,
                seconds=f.seconds,
                **({"original_name": f.original_name, "detail": f.detail} if admin else {}),
            )
            for f in report.stuck
        ],
        stuck_total=report.stuck_total,
        stuck_after_seconds=report.stuck_after,
    )
    return json_response(status)


@router.get(
    "/healthz",
    response_model=Health,
    summary="Alive, and the catalog answers",
    responses=documented(),
)
def healthz(svc: Svc) -> Response:
    with svc.site.catalog.read() as conn:
        conn.execute(text("SELECT 1"))
    return json_response(Health(status="ok"))

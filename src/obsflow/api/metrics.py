"""``/metrics``: the site in Prometheus' text format, one registry per app.

Gauges are read from the catalog when Prometheus scrapes (nothing is counted twice,
nothing drifts): files by state, ingest requests by state and the queue's depth,
runs by state (their outcomes), stuck files, and the cache.

The latency histogram ``obsflow_latency_seconds{stage}`` (``acquired_to_archived``,
and each stage between consecutive ledger events) is fed from the ledger: each scrape
observes the files archived since the scrape before, once each. The first scrape
takes the files archived in the 24 hours before it. A file whose ``archived`` stamp
commits late (a transaction open over a scrape) is still seen: each scrape looks
back :data:`OVERLAP` behind the newest stamp seen and skips the files it observed.

Requests the API answered are counted by route template and status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from obsflow.api.problems import documented
from obsflow.api.services import Services, services
from obsflow.archive.retrieval import Retriever
from obsflow.catalog import latency, schema
from obsflow.catalog.queue import IngestQueue
from obsflow.catalog.runs import RunStore
from obsflow.site import Site
from obsflow.states import FileState, LedgerEvent, RequestState, RunState

OVERLAP: Final = timedelta(minutes=2)
LATENCY_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    4 * 3600.0, 24 * 3600.0, float("inf"),
)  # fmt: skip
REQUEST_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, float("inf"))
_WAY: Final = (
    LedgerEvent.ACQUIRED,
    LedgerEvent.RECEIVED,
    LedgerEvent.VALIDATED,
    LedgerEvent.CACHED,
    LedgerEvent.ARCHIVED,
)

router = APIRouter(tags=["status"])


class Metrics:
    """The app's Prometheus registry and what feeds it."""

    def __init__(self, site: Site, runs: RunStore, retriever: Retriever) -> None:
        self.site = site
        self.registry = CollectorRegistry()
        self.registry.register(_CatalogCollector(site, runs, retriever))
        self.latency = Histogram(
            "obsflow_latency_seconds",
            "Seconds files took, acquired to archived and per stage (observed when archived).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "obsflow_api_requests",
            "Requests the API answered, by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "obsflow_api_request_seconds",
            "Seconds the API took to answer, by route.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._newest: datetime | None = None
        self._observed: dict[int, datetime] = {}  # file ID → archived stamp, near _newest

    def render(self) -> bytes:
        """The text exposition, after observing the files archived since last time."""
        with self._lock:
            self._observe_archived()
        return generate_latest(self.registry)

    def _observe_archived(self) -> None:
        now = self.site.clock()
        since = now - latency.DEFAULT_WINDOW if self._newest is None else self._newest - OVERLAP
        led = schema.ledger
        archived = select(led.c.file_id).where(
            led.c.event == LedgerEvent.ARCHIVED.value, led.c.at >= since
        )
        pivot = (
            select(
                led.c.file_id,
                *(func.max(case((led.c.event == e.value, led.c.at))).label(e.value) for e in _WAY),
            )
            .where(led.c.file_id.in_(archived), led.c.event.in_([e.value for e in _WAY]))
            .group_by(led.c.file_id)
        )
        with self.site.catalog.read() as conn:
            rows = conn.execute(pivot).all()
        for row in rows:
            stamps = row._mapping
            at = stamps[LedgerEvent.ARCHIVED.value]
            if row.file_id in self._observed or at is None:
                continue
            self._observed[row.file_id] = at
            for start, end in (latency.TOTAL, *latency.STAGES):
                began, ended = stamps[start.value], stamps[end.value]
                if began is not None and ended is not None:
                    seconds = max((ended - began).total_seconds(), 0.0)
                    self.latency.labels(latency.stage_name(start, end)).observe(seconds)
            if self._newest is None or at > self._newest:
                self._newest = at
        if self._newest is None:
            self._newest = now
        horizon = self._newest - OVERLAP
        self._observed = {i: at for i, at in self._observed.items() if at >= horizon}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)


class _CatalogCollector(Collector):
    """Gauges computed from the catalog at each scrape."""

    def __init__(self, site: Site, runs: RunStore, retriever: Retriever) -> None:
        self.site = site
        self.runs = runs
        self.retriever = retriever

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        catalog = self.site.catalog
        families = self._families()
        files, requests, depth, runs, stuck, cache_files, cache_bytes, virtual = families
        for state, n in _all(FileState, catalog.counts()):
            files.add_metric([state], n)
        queue = IngestQueue(catalog).depth()
        for state, n in _all(RequestState, queue):
            requests.add_metric([state], n)
        depth.add_metric([], queue.get(RequestState.PENDING, 0) + queue.get(RequestState.LEASED, 0))
        for state, n in _all(RunState, self.runs.counts()):
            runs.add_metric([state], n)
        stuck_list = latency.stuck_files(catalog, self.site.clock(), limit=1)
        stuck.add_metric([], stuck_list.total)
        cache = self.retriever.status()
        cache_files.add_metric([], cache.files)
        cache_bytes.add_metric([], cache.bytes)
        virtual.add_metric([], cache.virtual)
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("obsflow_files", "Files in the catalog by state.", labels=["state"]),
            GaugeMetricFamily(
                "obsflow_ingest_requests", "Ingest requests by state.", labels=["state"]
            ),
            GaugeMetricFamily("obsflow_ingest_queue_depth", "Ingest requests pending or leased."),
            GaugeMetricFamily("obsflow_runs", "Pipeline runs by state.", labels=["state"]),
            GaugeMetricFamily(
                "obsflow_stuck_files",
                "Files cached too long, failed, or with an expired ingest lease.",
            ),
            GaugeMetricFamily("obsflow_cache_files", "Files whose bytes are in the cache."),
            GaugeMetricFamily("obsflow_cache_bytes", "Bytes in the cache."),
            GaugeMetricFamily("obsflow_virtual_files", "Files evicted from the cache."),
        ]


def _all(states: Iterable[StrEnum], counts: Mapping[Any, int]) -> Iterator[tuple[str, int]]:
    """Every state with its count (0 for the states nothing is in)."""
    for state in states:
        yield state.value, counts.get(state, 0)


class RequestMetrics:
    """ASGI middleware counting each answered request by its route's template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request(scope["method"], route, status, time.perf_counter() - started)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={
        200: {
            "description": "The text exposition format.",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        },
        **documented(),
    },
)
def get_metrics(svc: Annotated[Services, Depends(services)]) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

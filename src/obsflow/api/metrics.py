"""``/metrics``: the site in Prometheus' text format, one registry per app.

Gauges are read from the catalog when Prometheus scrapes (nothing is counted twice,
nothing drifts): files by state, ingest requests by state and the queue's depth,
runs by state (their outcomes) and the cache, from the site's status snapshot
(:func:`obsflow.catalog.status.site_status`, what ``obsflow status`` shows), and the
stuck files from the latency ledger. From the same snapshot, the processes that write to
the catalog (:mod:`obsflow.catalog.processes`): how many of each kind are in each state,
the age of the stalest heartbeat of each kind (processes not cleanly stopped), their
workers busy and total, and whether each trigger of the live daemons is healthy (labels
from closed sets: the process kinds and states, and the triggers the registry declares).

The latency histogram ``obsflow_latency_seconds{stage}`` (``acquired_to_archived``,
and each stage between consecutive ledger events) is fed from the ledger
(:func:`obsflow.catalog.latency.archived_stamps`): each scrape
observes the files archived since the scrape before, once each. The first scrape
takes the files archived in the 24 hours before it. A file whose ``archived`` stamp
commits late (a transaction open over a scrape) is still seen: each scrape looks
back :data:`OVERLAP` behind the newest stamp seen and skips the files it observed.

Requests the API answered are counted by method, route template and status, each
from a closed set (an unknown method or a path no route matches is ``other``), so that
no client can grow the registry or the page.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import PurePath
from typing import Annotated, Final

from fastapi import APIRouter, Depends, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from obsflow.api.problems import documented
from obsflow.api.services import Services, services
from obsflow.catalog import latency
from obsflow.catalog.processes import ProcessKind, ProcessRecord
from obsflow.catalog.status import site_status
from obsflow.site import Site
from obsflow.states import ProcessState

OVERLAP: Final = timedelta(minutes=2)
LATENCY_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    4 * 3600.0, 24 * 3600.0, float("inf"),
)  # fmt: skip
REQUEST_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, float("inf"))

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER: Final = "other"
"""The label of a method not in :data:`METHODS`, and of a path that matches no route."""

router = APIRouter(tags=["status"])


class Metrics:
    """The app's Prometheus registry and what feeds it."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.registry = CollectorRegistry()
        self.registry.register(_CatalogCollector(site))
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
        for stamps in latency.archived_stamps(self.site.catalog, since):
            at = stamps.archived
            if stamps.file_id in self._observed or at is None:
                continue
            self._observed[stamps.file_id] = at
            for stage, seconds in stamps.stages():
                self.latency.labels(stage).observe(seconds)
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

    def __init__(self, site: Site) -> None:
        self.site = site

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        site = self.site
        now = site.clock()
        status = site_status(site.catalog, now, role=site.settings.transfer.role)
        families = self._families()
        files, requests, depth, runs, stuck, cache_files, cache_bytes, virtual = families[:8]
        unaudited, bad = families[8:10]
        for counts, family in ((status.files, files), (status.queue, requests)):
            for state, n in counts.items():
                family.add_metric([state.value], n)
        depth.add_metric([], status.queue_depth)
        for run_state, n in status.runs.items():
            runs.add_metric([run_state.value], n)
        stuck.add_metric([], latency.stuck_files(site.catalog, now, limit=1).total)
        cache_files.add_metric([], status.cache.files)
        cache_bytes.add_metric([], status.cache.bytes)
        virtual.add_metric([], status.cache.virtual)
        unaudited.add_metric([], status.fixity.never)
        bad.add_metric([], status.fixity.bad)
        _processes(status.processes, *families[10:])
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
            GaugeMetricFamily(
                "obsflow_fixity_never_audited", "Archived files no fixity audit has read yet."
            ),
            GaugeMetricFamily(
                "obsflow_fixity_bad_files",
                "Archived files whose latest fixity audit found them changed, missing or "
                "unreadable (alert on > 0).",
            ),
            GaugeMetricFamily(
                "obsflow_processes",
                "Processes writing to the catalog (daemons, workers) by kind and state.",
                labels=["kind", "state"],
            ),
            GaugeMetricFamily(
                "obsflow_process_heartbeat_age_seconds",
                "Seconds since the stalest heartbeat of the processes of a kind that are not "
                "cleanly stopped (running, stopping or lost).",
                labels=["kind"],
            ),
            GaugeMetricFamily(
                "obsflow_workers_busy",
                "Runs the live processes of a kind execute now.",
                labels=["kind"],
            ),
            GaugeMetricFamily(
                "obsflow_workers_total",
                "Runs the live processes of a kind can execute at once.",
                labels=["kind"],
            ),
            GaugeMetricFamily(
                "obsflow_trigger_healthy",
                "1 if the trigger is healthy in every live daemon that runs it, else 0.",
                labels=["trigger"],
            ),
        ]


def _processes(
    processes: Sequence[ProcessRecord],
    counts: GaugeMetricFamily,
    ages: GaugeMetricFamily,
    busy: GaugeMetricFamily,
    total: GaugeMetricFamily,
    triggers: GaugeMetricFamily,
) -> None:
    """The processes' gauges: every (kind, state), and per kind and trigger those seen."""
    for kind in ProcessKind:
        of_kind = [p for p in processes if p.kind is kind]
        for state in ProcessState:
            counts.add_metric([kind.value, state.value], sum(p.state is state for p in of_kind))
        unstopped = [p.age_seconds for p in of_kind if p.state is not ProcessState.STOPPED]
        if unstopped:
            ages.add_metric([kind.value], max(unstopped))
        live = [p.health.workers for p in of_kind if p.state.alive and p.health.workers]
        if live:
            busy.add_metric([kind.value], sum(w.busy for w in live))
            total.add_metric([kind.value], sum(w.total for w in live))
    healthy: dict[str, bool] = {}
    for p in processes:
        if p.kind is ProcessKind.DAEMON and p.state.alive:
            for t in p.health.triggers:
                healthy[t.name] = healthy.get(t.name, True) and t.healthy
    for name, ok in sorted(healthy.items()):
        triggers.add_metric([_public(name)], 1.0 if ok else 0.0)


def _public(trigger: str) -> str:
    """A trigger's name without a path (``/metrics`` needs no token, and no answer to
    an anonymous caller names a site path): ``watch:/srv/site/incoming`` → ``watch:incoming``."""
    kind, sep, what = trigger.partition(":")
    return f"{kind}:{PurePath(what).name}" if sep and what.startswith("/") else trigger


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
            # labels from closed sets only: a stream of made-up methods or paths must not
            # grow the registry (the route is a template of the app's, or "other")
            route = getattr(scope.get("route"), "path", None) or OTHER
            method = scope["method"] if scope["method"] in METHODS else OTHER
            self.metrics.request(method, route, status, time.perf_counter() - started)


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

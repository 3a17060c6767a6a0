"""The daemon (``obsflow run``): triggers → intake (receipt) → cache + catalog → ingestors,
and tracker → executor → controller → receipt for the pipelines.

All in one process: the triggers offer paths, the intake receives them (workers
plus one committer), ingest workers drain the durable queue, the tracker queues the
pipeline runs that new files make ready and the executor runs them. At start-up it sweeps
files an interrupted run left in the cache, then a reconcile scan offers whatever
arrived while nobody watched. On SIGINT/SIGTERM it stops the triggers, finishes
the files in flight, lets each ingestor finish its batch, and exits; a SIGKILL
loses nothing either (leases expire; the scan and the sweep recover the rest).

Once every part is up it writes ``SITE/.obsflow/daemon.json`` with ``ready: true``
(pid, times, the health of each trigger and of the tracker), then again every
``status_seconds``, for ``obsflow status``. Beside it, at start and at each of those
heartbeats, it records itself in the catalog (:mod:`obsflow.catalog.processes`: one
UPSERT: its triggers, EPICS links, workers busy and total, an agent's outbox depth), so
that whoever reads the catalog, on any machine, sees it; ``stopping`` once told to stop,
``stopped`` when it ends cleanly, and ``lost`` to readers if it dies.

In ``daemon.json``, the ``tracker`` object (``null`` for an agent, which runs no
pipelines) holds ``ok``, ``last_error``, ``failures`` (passes failed in a row) and
``since`` (see :class:`~obsflow.processing.tracker.loop.TrackerHealth`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from obsflow.archive.ingest import Ingestor
from obsflow.catalog.processes import (
    Health,
    Identity,
    ProcessKind,
    ProcessStore,
    TriggerHealth,
    Workers,
)
from obsflow.catalog.seen import SeenLedger
from obsflow.errors import SiteError
from obsflow.processing.executor import Executor, make_executor
from obsflow.processing.tracker.loop import TrackerLoop
from obsflow.receipt.intake import Intake, Wake
from obsflow.receipt.receiver import Outcome, Received
from obsflow.registry.specs import EpicsTriggerSpec, WatchTriggerSpec
from obsflow.settings import Role
from obsflow.site import Site
from obsflow.states import ProcessState
from obsflow.transfer.agent import Client, Transferer
from obsflow.trigger import Offer, Trigger
from obsflow.trigger.epics import EpicsTrigger  # (caproto is imported when one starts)
from obsflow.trigger.scan import ReconcileScan
from obsflow.trigger.watch import WatchTrigger

if TYPE_CHECKING:
    from obsflow.api import ApiServer

log = logging.getLogger(__name__)
STATUS_FILE = Path(".obsflow") / "daemon.json"


def build_triggers(site: Site) -> list[Trigger]:
    """The triggers the registry declares, plus one reconcile scan over their directories."""
    triggers: list[Trigger] = []
    directories: dict[Path, bool] = {}
    for instrument in site.registry.instruments.values():
        for spec in instrument.triggers:
            directory = site.settings.site / spec.directory
            if isinstance(spec, WatchTriggerSpec):
                triggers.append(
                    WatchTrigger(
                        directory,
                        recursive=spec.recursive,
                        polling=spec.polling,
                        poll_seconds=spec.poll_seconds,
                    )
                )
                directories[directory] = directories.get(directory, False) or spec.recursive
            elif isinstance(spec, EpicsTriggerSpec):
                triggers.append(EpicsTrigger(spec, directory))
                directories.setdefault(directory, False)
    triggers.append(
        ReconcileScan(
            sorted(directories.items()),
            SeenLedger(site.catalog),
            interval_seconds=site.settings.daemon.reconcile_seconds,
        )
    )
    return triggers


@dataclass(frozen=True)
class Upstream:
    """Where an agent sends its frames: the archive server and a write token of its."""

    server: str
    token: str | None


class Daemon:
    """One site's daemon in its ``role`` (the settings' ``transfer.role`` if None):

    * ``all``: triggers → receipt → cache → ingest → tracker → runs (one machine);
    * ``agent``: triggers → receipt → cache → the outbox, sent to ``upstream``;
    * ``server``: uploads (the API) → cache → ingest → tracker → runs, and any triggers
      of its own.

    ``listen``: where the REST API is served (``HOST:PORT``); else the settings'
    ``api.listen``; neither: no API (a server must have one).
    """

    def __init__(
        self,
        site: Site,
        triggers: Sequence[Trigger] | None = None,
        *,
        listen: str | None = None,
        role: Role | None = None,
        upstream: Upstream | None = None,
    ) -> None:
        self.site = site
        self.role = role or site.settings.transfer.role
        self.listen = listen or site.settings.api.listen
        transfer = site.settings.transfer
        if upstream is None and transfer.server is not None:
            upstream = Upstream(transfer.server, transfer.token)
        self.upstream = upstream
        if self.role is Role.AGENT and upstream is None:
            raise SiteError(
                "an agent needs its archive server: --server URL (or OBSFLOW_SERVER_URL, "
                "or transfer.server in obsflow.yaml)"
            )
        if upstream is not None and not upstream.server.startswith(("http://", "https://")):
            raise SiteError(f"the archive server {upstream.server!r}: expected an http(s) URL")
        if self.role is Role.SERVER and self.listen is None:
            raise SiteError(
                "a server needs an address to listen on: --listen HOST:PORT (or api.listen)"
            )
        self.api_url: str | None = None
        committed = threading.Event()  # new files are queued: wakes the ingestors
        new_files = threading.Event()  # ... and the tracker
        self._events = (committed, new_files)
        self.triggers = list(triggers) if triggers is not None else build_triggers(site)
        self.started = site.clock()
        self.counts: dict[Outcome, int] = {}
        self.executor: Executor | None = None
        self.tracking: TrackerLoop | None = None
        """The tracker's loop (not for an agent), whose health the status file shows."""
        self.ready = False
        """Every part is up and every trigger started (and not yet stopping)."""
        self.process = ProcessStore(
            site.catalog,
            Identity.of_this_process(ProcessKind.DAEMON, self.started, self.role),
            site.settings.daemon.status_seconds,
        )
        """This daemon's row in the catalog's ``processes``."""
        self._started: list[Trigger] = []
        self._offered: dict[str, datetime] = {}  # trigger name → when it last offered a path
        self._lock = threading.Lock()

    def run(self, stop: threading.Event, on_ready: Callable[[], object] = lambda: None) -> None:
        """Run until ``stop`` is set; then shut down cleanly. ``on_ready`` is called once
        every part is up (ingestors, tracker, API, every trigger started): from then on
        ``obsflow status --json`` shows ``daemon.ready: true``."""
        api = self._api()  # first: an address in use stops the daemon before it starts
        try:
            self._run(stop, on_ready)
        finally:
            if api is not None:
                api.stop()

    def _run(self, stop: threading.Event, on_ready: Callable[[], object]) -> None:
        site = self.site
        self._forget_old_processes()
        self.record(ProcessState.RUNNING)
        swept = sweep_cache(site)
        if swept:
            log.warning("removed %d file(s) an interrupted run left in the cache", len(swept))
        committed, new_files = self._events
        wake = Wake(committed, new_files)
        intake = Intake(
            site.receiver,
            workers=site.settings.workers.receipt,
            seen=SeenLedger(site.catalog),
            on_result=self._count,
            committed=wake,
            linger=0.002,  # frames arrive one by one: latency matters more than batching
        )
        tracker_stop = threading.Event()
        executor: Executor | None = None
        tracker: threading.Thread | None = None
        if self.role is not Role.AGENT:  # an agent's pipelines run at the server
            if any(s.image for p in site.registry.profiles.values() for s in p.steps):
                from obsflow.processing.container import remove_orphans  # docker-py: at use

                remove_orphans(site.settings.containers)  # a killed daemon's containers
            executor = make_executor(site, on_done=wake)  # a run's outputs are new files too
            self.executor = executor
            tracking = TrackerLoop(site, executor)
            self.tracking = tracking
            tracker = threading.Thread(
                target=tracking.run, args=(tracker_stop, new_files), name="tracker", daemon=True
            )
        ingest_stop = threading.Event()
        client = self._client()
        ingestors = [
            threading.Thread(
                target=self._ingestor(client).run,
                args=(ingest_stop,),
                kwargs={"wake": committed},
                name=f"ingest-{n}" if client is None else f"transfer-{n}",
                daemon=True,
            )
            for n in range(
                site.settings.workers.ingest if client is None else site.settings.transfer.workers
            )
        ]
        trimmer = threading.Thread(
            target=self._trim, args=(tracker_stop,), name="cache-trim", daemon=True
        )
        auditor: threading.Thread | None = None
        if self.role is not Role.AGENT and site.settings.fixity.rate_mb_s > 0:
            # fixity audits at a low rate, stopped with the tracker (between two reads)
            auditor = threading.Thread(
                target=site.auditor().run,
                args=(site.settings.fixity, tracker_stop),
                name="fixity",
                daemon=True,
            )
        for thread in ingestors:
            thread.start()
        if tracker is not None:
            tracker.start()
        trimmer.start()
        if auditor is not None:
            auditor.start()
        started = self._started
        try:
            for trigger in self.triggers:
                trigger.start(self._offering(trigger.name, intake.offer))
                started.append(trigger)
                log.info("trigger %s started", trigger.name)
            self.ready = True
            self.write_status(intake, running=True)
            self.record(ProcessState.RUNNING)
            log.info("ready: %d trigger(s) started", len(started))
            on_ready()
            while not stop.wait(site.settings.daemon.status_seconds):
                self.write_status(intake, running=True)
                self.record(ProcessState.RUNNING)
        finally:
            self.ready = False
            self.record(ProcessState.STOPPING)
            log.info("stopping: triggers, files in flight, the tracker, runs, then ingestors")
            for trigger in reversed(started):
                trigger.stop()
            intake.close()
            tracker_stop.set()
            if tracker is not None:
                tracker.join()
            trimmer.join()
            if auditor is not None:
                auditor.join()
            if executor is not None:
                executor.close(stop=True)  # runs in flight go back to the queue for next time
            ingest_stop.set()
            for thread in ingestors:
                thread.join()
            if client is not None:
                client.close()
            self.write_status(intake, running=False)
            self._record_stopped()

    def _client(self) -> Client | None:
        """The agent's connection to its server (None in the other roles)."""
        if self.role is not Role.AGENT or self.upstream is None:
            return None
        timeout = self.site.settings.transfer.timeout_seconds
        return Client(self.upstream.server, self.upstream.token, timeout=timeout)

    def _ingestor(self, client: Client | None) -> Ingestor:
        """An ingestor into the archive; an agent's sends its outbox to the server."""
        site = self.site
        if client is None:
            return site.ingestor()
        return Transferer(
            site.catalog,
            site.storage,
            site.cache,
            site.settings.ingest,
            site.settings.transfer,
            client,
            site.settings.quarantine,
            clock=site.clock,
        )

    def _api(self) -> ApiServer | None:
        """The REST API, serving from a thread of its own, if the daemon has an address."""
        if self.listen is None:
            return None
        from obsflow.api import ApiServer, create_app, parse_listen  # FastAPI only if served

        app = create_app(self.site, wake=Wake(*self._events))  # uploads wake the ingestors
        server = ApiServer(self.site, *parse_listen(self.listen), app=app)
        server.start()
        self.api_url = server.url
        log.info("the REST API on %s/api/v1", server.url)
        return server

    def _trim(self, stop: threading.Event) -> None:
        """Keep the cache within its budget (if it has one): evict the least recently
        used archived files, which become virtual. An agent with ``transfer.keep_seconds``
        also lets go of the frames the server archived that long ago."""
        policy = self.site.settings.cache_policy
        keep = self.site.settings.transfer.keep_seconds
        if self.role is not Role.AGENT:
            keep = None
        if policy.budget_bytes is None and keep is None:
            return
        retriever = self.site.retriever()
        while not stop.wait(policy.trim_seconds):
            try:
                if keep is not None:
                    gone = retriever.expire(self.site.clock() - timedelta(seconds=keep))
                    if gone:
                        log.info("%d frame(s) the server archived were let go", gone)
                if policy.budget_bytes is not None and retriever.over_budget():
                    report = retriever.trim()
                    log.info(
                        "cache over budget: %d file(s) evicted, %d bytes freed",
                        report.evicted,
                        report.freed_bytes,
                    )
            except Exception:  # the catalog briefly unreachable: try at the next turn
                log.exception("cache trim failed")

    def _count(self, result: Received) -> None:
        with self._lock:
            self.counts[result.outcome] = self.counts.get(result.outcome, 0) + 1
        if result.outcome in (Outcome.ERROR, Outcome.VANISHED):
            log.warning("%s %s: %s", result.outcome.value, result.path, result.reason)

    def _offering(self, name: str, offer: Offer) -> Offer:
        """``offer``, noting when the trigger ``name`` last offered a path (its last event)."""

        def noted(path: Path) -> None:
            now = self.site.clock()
            with self._lock:
                self._offered[name] = now
            offer(path)

        return noted

    def health(self) -> Health:
        """What this daemon records in the catalog at each heartbeat: its started triggers,
        its EPICS links, its executor's workers, an agent's outbox depth."""
        with self._lock:
            offered = dict(self._offered)
        triggers = []
        for trigger in list(self._started):
            health = trigger.health()
            triggers.append(
                TriggerHealth(
                    name=trigger.name,
                    kind=trigger.kind,
                    healthy=health.ok,
                    last_event=offered.get(trigger.name),
                    error=None if health.ok else health.detail or "unhealthy",
                )
            )
        epics = tuple(t.link() for t in self._started if isinstance(t, EpicsTrigger))
        executor = self.executor
        workers = None
        if executor is not None and executor.capacity is not None:
            workers = Workers(busy=executor.in_flight, total=executor.capacity)
        depth = self.site.queue.depth() if self.role is Role.AGENT else None
        return Health(triggers=tuple(triggers), epics=epics, workers=workers, outbox_depth=depth)

    def record(self, state: ProcessState) -> None:
        """Record this daemon's heartbeat and health in the catalog (one UPSERT). A
        catalog out of reach is said in the log, and tried again at the next heartbeat."""
        try:
            self.process.beat(self.health(), self.site.clock(), state)
        except Exception as exc:
            log.warning("could not record the daemon's heartbeat in the catalog: %s", exc)

    def _record_stopped(self) -> None:
        try:
            self.process.stop(self.site.clock())
        except Exception as exc:
            log.warning("could not record the daemon's stop in the catalog: %s", exc)
        self._forget_old_processes()

    def _forget_old_processes(self) -> None:
        """Delete the rows of processes stopped or lost over ``forget_processes_seconds``."""
        try:
            forgotten = self.process.prune(
                self.site.clock(), self.site.settings.daemon.forget_processes_seconds
            )
        except Exception as exc:
            log.warning("could not forget old processes in the catalog: %s", exc)
            return
        if forgotten:
            log.info("forgot %d process(es) stopped or lost long ago", forgotten)

    def write_status(self, intake: Intake, *, running: bool) -> None:
        now = self.site.clock()
        with self._lock:
            counts = {outcome.value: n for outcome, n in self.counts.items()}
        status: dict[str, Any] = {
            "pid": os.getpid(),
            "running": running,
            "ready": running and self.ready,
            "started": self.started.isoformat(),
            "updated": now.isoformat(),
            "status_seconds": self.site.settings.daemon.status_seconds,
            "in_flight": intake.in_flight,
            "runs_in_flight": self.executor.in_flight if self.executor is not None else 0,
            "api": self.api_url,
            "role": self.role.value,
            "server": self.upstream.server if self.upstream else None,
            "received": counts,
            "triggers": [
                {"name": t.name, "ok": h.ok, "detail": h.detail}
                for t in self.triggers
                for h in [t.health()]
            ],
            "tracker": self.tracking.health.as_json() if self.tracking is not None else None,
        }
        path = self.site.settings.site / STATUS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(status, indent=1) + "\n")
        os.replace(temp, path)


def read_status(site_dir: Path, now: datetime) -> dict[str, Any] | None:
    """The daemon's last status, with ``alive`` (updated recently and still running) and
    ``ready`` (alive, with every trigger started)."""
    try:
        status: dict[str, Any] = json.loads((site_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    age = (now - datetime.fromisoformat(status["updated"])).total_seconds()
    status["alive"] = bool(status.get("running")) and age < 3 * float(status["status_seconds"])
    status["ready"] = status["alive"] and bool(status.get("ready"))
    return status


def sweep_cache(site: Site, nights: int = 3) -> list[str]:
    """Remove cache files no catalog row claims, in each instrument's newest ``nights``
    night directories (where an interrupted recording can have left one)."""
    root = site.cache.root
    candidates: list[str] = []
    if root.is_dir():
        for instrument in sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] != "."):
            for night in sorted(p for p in instrument.iterdir() if p.is_dir())[-nights:]:
                candidates += [
                    f"{instrument.name}/{night.name}/{f.name}"
                    for f in night.iterdir()
                    if f.is_file() and not f.name.startswith(".")
                ]
    return site.catalog.sweep(candidates, lambda key: site.cache.path(key).unlink(missing_ok=True))

"""The real-time demo (``obsflow demo``, ``make demo``): a short simulated night, live.

Two programs run, as they would on two terminals at an observatory:

* ``obsflow simulate --epics``: the instrument. It serves the EPICS PVs ``OFCAM:LASTFILE``
  and ``OFCAM:HEARTBEAT`` from a caproto IOC, writes each frame in pieces into the site's
  ``incoming/`` and then announces its path on ``LASTFILE``, twice (a keyword system may
  well broadcast a value more than once);
* ``obsflow run``: the daemon, whose registry (here) has the EPICS trigger instead of the
  directory watch, so every frame reaches it through Channel Access; the reconcile scan
  stands behind it; it serves the API and the operator's dashboard on 127.0.0.1
  (:data:`DASHBOARD_PORT` when free), whose URL and an admin token are printed first;
* with a broker (``obsflow demo --broker redis://...``), two ``obsflow worker`` processes
  too: the daemon hands its runs to Celery, and the workers execute them with the site's
  storage, as on a cluster with shared disks.

Both talk over Channel Access on 127.0.0.1 only, on a free port chosen here (the EPICS
environment of the two child processes; nothing goes out on the network). The daemon also
runs the registry's pipelines as their inputs arrive (L0 → L3). Meanwhile this process
reads the site's status (:func:`obsflow.catalog.status.site_status`, what ``obsflow
status`` shows) and shows, four times a second, the frames acquired, received, archived
and in flight, the latency percentiles acquired → archived so far, the products made per
level and the runs per state. When the night is over, every frame archived and nothing
left to run (or ``settle_seconds`` have passed), the daemon is stopped with SIGTERM and
:func:`run_demo` returns what happened as a :class:`DemoResult`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Final

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from obsflow.access import Scope, TokenStore
from obsflow.catalog import Catalog
from obsflow.catalog.latency import Percentiles, latencies
from obsflow.catalog.processes import ProcessKind
from obsflow.catalog.status import site_status
from obsflow.errors import SiteError
from obsflow.processing.tracker import Tracker
from obsflow.receipt.receiver import utcnow
from obsflow.registry import load_registry
from obsflow.settings import SETTINGS_FILE, Settings, load_settings
from obsflow.site import init_site
from obsflow.states import FileState, RunState

PV_PREFIX: Final = "OFCAM:"
WATCH_TRIGGER: Final = re.compile(r"^    - kind: watch\b.*\n(?:      .*\n)*", re.MULTILINE)
"""The example registry's directory-watch trigger (its lines), which the demo site swaps out."""
AFTER: Final = re.compile(r"after_minutes: [0-9.]+")
ANNOUNCEMENTS: Final = 2
"""How many times the simulator announces each frame."""


@dataclass(frozen=True)
class DemoPlan:
    root: Path
    frames: int = 50
    cadence: float = 0.2
    size: int = 256
    settle_seconds: float = 300.0
    """After the last frame, how long to wait for the night to be archived and reduced."""
    quiet_seconds: float | None = None
    """If given, the pipelines' ``last_input`` deadlines wait this long instead of what the
    example registry says (a night's biases, flats, catalogs are taken once quiet)."""
    broker: str | None = None
    """If given, runs go through Celery on this broker to :attr:`workers` workers
    (``obsflow worker``, sharing the site's storage) instead of the daemon's own pool."""
    workers: int = 2
    port: int | None = None
    """Where the daemon serves the API and the dashboard on 127.0.0.1; None:
    :data:`DASHBOARD_PORT` if it is free, else any free port."""


@dataclass(frozen=True)
class Snapshot:
    """What the live view shows at one moment."""

    acquired: int
    received: int
    archived: int
    """Raw frames (level 0) archived."""
    quarantined: int
    latency: Percentiles
    triggers: tuple[tuple[str, bool, str], ...]
    """(name, ok, detail) of each of the daemon's triggers, as it last recorded them in
    the catalog (the status snapshot's processes)."""
    products: Mapping[int, int]
    """Level (1-3) → products archived."""
    runs: Mapping[RunState, int]
    waiting: tuple[str, ...]
    """Each group that waits for its deadline (more runs will start), in words:
    ``ofcam_masterflat filter=R waits for its deadline, 12 s``."""
    unarchived: int
    """Files of any level cached and not archived yet."""
    untracked: int
    """Files the tracker has not looked at yet."""

    @property
    def in_flight(self) -> int:
        return max(0, self.acquired - self.archived - self.quarantined)

    @property
    def quiet(self) -> bool:
        """Everything acquired is archived and no run is queued, running or waiting."""
        busy = self.runs.get(RunState.QUEUED, 0) + self.runs.get(RunState.RUNNING, 0)
        idle = self.unarchived == 0 and self.untracked == 0
        return self.in_flight == 0 and busy == 0 and not self.waiting and idle


@dataclass(frozen=True)
class DemoResult:
    settings: Settings
    last: Snapshot
    simulator_exit: int
    daemon_exit: int
    seconds: float
    worker_exits: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        """Every frame acquired was archived, once, and both programs exited cleanly."""
        last = self.last
        return (
            self.simulator_exit == 0
            and self.daemon_exit == 0
            and all(code == 0 for code in self.worker_exits)
            and last.acquired > 0
            and last.archived == last.acquired
            and last.runs.get(RunState.FAILED, 0) == 0
            and last.quiet
        )


DASHBOARD_PORT: Final = 8765
"""The demo's dashboard port, when it is free: the same URL from one demo to the next."""


def dashboard_port(preferred: int = DASHBOARD_PORT) -> int:
    """``preferred`` if nothing listens there on 127.0.0.1, else any free port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        try:
            tcp.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (Channel Access uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise SiteError("no port free for both TCP and UDP on 127.0.0.1 for the demo's IOC")


def loopback_epics_env(port: int) -> dict[str, str]:
    """The environment for Channel Access clients and servers on 127.0.0.1:``port`` only."""
    return {
        **os.environ,
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    }


def make_demo_site(
    root: Path, quiet_seconds: float | None = None, broker: str | None = None
) -> Settings:
    """A new site at ``root`` whose OFCAM frames arrive by EPICS instead of the watch
    (and whose ``last_input`` deadlines wait ``quiet_seconds``, if given; whose runs go
    to Celery workers through ``broker``, if given, on a queue of this site's own)."""
    site = init_site(root)
    if broker is not None:
        config = site / SETTINGS_FILE
        queue = f"obsflow-demo-{os.getpid()}"  # a broker may serve other sites: not theirs
        text = config.read_text()
        for line, value in (
            ("executor: local", "executor: celery"),
            ("broker: null", f"broker: {json.dumps(broker)}"),
            ("queue: obsflow", f"queue: {queue}"),
        ):
            if f"  {line} " not in text:
                raise SiteError(f"{config}: no '{line}' line for the demo to change")
            text = text.replace(f"  {line} ", f"  {value} ", 1)
        config.write_text(text)
    settings = load_settings(site)
    path = settings.registry / "ofcam.yaml"
    text = path.read_text()
    watch = WATCH_TRIGGER.search(text)
    if watch is None:
        raise SiteError(f"{path}: no '- kind: watch' trigger for the demo to replace")
    epics = (
        f"    - kind: epics                 # the demo: frames announced on {PV_PREFIX}LASTFILE\n"
        f"      pv: '{PV_PREFIX}LASTFILE'\n"
        f"      heartbeat_pv: '{PV_PREFIX}HEARTBEAT'\n"
        f"      heartbeat_stale_seconds: 5\n"
        f"      directory: incoming\n"
    )
    path.write_text(text[: watch.start()] + epics + text[watch.end() :])
    if quiet_seconds is not None:
        pipelines = settings.registry / "ofcam_pipelines.yaml"
        minutes = f"after_minutes: {quiet_seconds / 60:.4f}"
        pipelines.write_text(AFTER.sub(minutes, pipelines.read_text()))
    load_registry(settings.registry)  # a ConfigError now, not from the daemon later
    return settings


def snapshot(
    settings: Settings, catalog: Catalog, since: datetime, tracker: Tracker | None = None
) -> Snapshot:
    """The night so far: frames on disk, the site's status, latencies, trigger health,
    and (with ``tracker``) which groups wait for their deadline."""
    acquired = sum(1 for p in settings.incoming.glob("ofc_*.fits"))
    now = utcnow()
    # one snapshot of the catalog: never quiet between two steps of the tracker
    status = site_status(catalog, now, role=settings.transfer.role)
    total, _ = latencies(catalog, since, level=0)  # the frames, not the products
    daemons = [p for p in status.processes if p.kind is ProcessKind.DAEMON]
    newest = max(daemons, key=lambda p: p.identity.started, default=None)
    triggers = tuple(
        (t.name, t.healthy, t.error or "") for t in (newest.health.triggers if newest else ())
    )
    raw = status.at_level(0)
    products = {
        level: n
        for level, counts in status.levels.items()
        if level and (n := counts.get(FileState.ARCHIVED, 0))
    }
    return Snapshot(
        acquired=acquired,
        received=sum(raw.values()) - raw.get(FileState.REJECTED, 0),
        archived=raw.get(FileState.ARCHIVED, 0),
        quarantined=status.files[FileState.REJECTED],
        latency=total,
        triggers=triggers,
        products=products,
        runs={state: n for state, n in status.runs.items() if n},
        waiting=_waiting(tracker, now, status.groups_waiting),
        unarchived=status.files[FileState.CACHED],
        untracked=status.untracked,
    )


def _waiting(tracker: Tracker | None, now: datetime, count: int) -> tuple[str, ...]:
    """Each group that waits for its deadline, in words (``count`` of them, as the
    status counted: never fewer words than that)."""
    if not count:
        return ()
    said = []
    for w in tracker.waiting() if tracker else ():
        group = " ".join(f"{k}={v}" for k, v in w.group.values if k != "night")
        left = max(0.0, (w.until - now).total_seconds())
        lacks = f" (lacks {'; '.join(w.lacks)})" if w.lacks else ""
        said.append(
            f"{w.group.pipeline}{' ' + group if group else ''} waits for its deadline, "
            f"{left:.0f} s{lacks}"
        )
    return tuple(said) or (f"{count} group(s) wait for their deadline",)


def render(plan: DemoPlan, now: Snapshot, elapsed: float, *, night_over: bool = False) -> Group:
    """The live view."""
    table = Table(title=f"OFCAM night, {elapsed:4.1f} s", title_justify="left")
    for column in ("acquired", "received", "archived", "in flight", "quarantined", "p50", "p99"):
        table.add_column(column, justify="right")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    table.add_row(
        f"{now.acquired}/{plan.frames}",
        str(now.received),
        str(now.archived),
        str(now.in_flight),
        str(now.quarantined),
        ms(now.latency.p50_ms),
        ms(now.latency.p99_ms),
    )
    runs = Table(title="processing", title_justify="left")
    for column in ("L1", "L2", "L3", "runs queued", "running", "succeeded", "failed"):
        runs.add_column(column, justify="right")
    runs.add_row(
        *(str(now.products.get(level, 0)) for level in (1, 2, 3)),
        *(str(now.runs.get(state, 0)) for state in RunState),
    )
    health = Text("triggers: ")
    for name, ok, detail in now.triggers or (("(daemon starting)", True, ""),):
        health.append(f"{name} ", style="bold")
        if night_over and name.startswith("epics:"):
            health.append("(the instrument has finished its night)  ")
        elif not ok and name.startswith("epics:") and now.acquired == 0:
            # the IOC comes up with the simulator: no link yet is no alarm yet
            health.append("(waiting for the instrument to start)  ")
        else:
            health.append("ok  " if ok else f"ALARM {detail}  ", style="green" if ok else "red")
    lines: list[Text] = [health]
    lines += [Text(f"waiting: {said}") for said in now.waiting]
    return Group(table, runs, *lines)


def run_demo(
    plan: DemoPlan,
    console: Console,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> DemoResult:
    """Make the site, run the simulator and the daemon, show the night live, stop cleanly."""
    settings = make_demo_site(plan.root, plan.quiet_seconds, plan.broker)
    logs = settings.site / ".obsflow"
    logs.mkdir(parents=True, exist_ok=True)
    env = loopback_epics_env(free_port())
    command = [sys.executable, "-m", "obsflow"]
    catalog = Catalog.open(settings.catalog_url)  # made here, before either program starts
    tracker = Tracker(load_registry(settings.registry), catalog, utcnow)
    port = plan.port or dashboard_port()
    secret, _ = TokenStore(catalog).create("operator", Scope.ADMIN, [], utcnow())
    console.print(
        f"the dashboard: [bold]http://127.0.0.1:{port}/[/] (open it now; sign in with the "
        f"token {secret} to retry and reprocess runs)",
        highlight=False,
        soft_wrap=True,
    )
    since = utcnow()
    began = clock()
    with (
        open(logs / "demo-simulator.log", "w") as simulator_log,
        open(logs / "demo-daemon.log", "w") as daemon_log,
        ExitStack() as worker_logs,
    ):
        night = ["--frames", str(plan.frames), "--cadence", str(plan.cadence)]
        night += ["--size", str(plan.size), "--duplicates", str(ANNOUNCEMENTS)]
        night += ["--wait-listener", "30"]  # the first frame waits for the daemon to listen
        site = ["--site", str(settings.site)]
        simulator = _start([*command, "simulate", "--epics", *site, *night], env, simulator_log)
        listen = ["--listen", f"127.0.0.1:{port}"]  # the API and the dashboard
        daemon = _start([*command, "run", *site, *listen], env, daemon_log)
        workers: list[subprocess.Popen[bytes]] = []
        if plan.broker is not None:
            queue = ["--queues", settings.processing.queue, "--concurrency", "1"]
            for n in range(plan.workers):
                out = worker_logs.enter_context(open(logs / f"demo-worker-{n + 1}.log", "w"))
                workers.append(_start([*command, "worker", *site, *queue], env, out))
        try:
            now = snapshot(settings, catalog, since, tracker)
            with Live(render(plan, now, 0.0), console=console, refresh_per_second=4) as live:
                finished_at: float | None = None
                while True:
                    time.sleep(0.25)
                    now = snapshot(settings, catalog, since, tracker)
                    over = simulator.poll() is not None
                    live.update(render(plan, now, clock() - began, night_over=over))
                    if daemon.poll() is not None:
                        break  # it died: the summary says so
                    if simulator.poll() is None:
                        continue
                    finished_at = finished_at or clock()
                    if now.quiet or clock() - finished_at > plan.settle_seconds:
                        break
            console.line()
        finally:
            simulator_exit = _stop(simulator)
            daemon_exit = _stop(daemon)
            worker_exits = tuple(_stop(worker) for worker in workers)
    try:
        last = snapshot(settings, catalog, since, tracker)
    finally:
        catalog.close()
    return DemoResult(settings, last, simulator_exit, daemon_exit, clock() - began, worker_exits)


def _start(argv: list[str], env: dict[str, str], log: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM (a clean stop: in-flight work finishes), then SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()

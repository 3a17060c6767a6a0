"""The real-time demo (``obsflow demo``, ``make demo``): a short simulated night, live.

Two programs run, as they would on two terminals at an observatory:

* ``obsflow simulate --epics``: the instrument. It serves the EPICS PVs ``OFCAM:LASTFILE``
  and ``OFCAM:HEARTBEAT`` from a caproto IOC, writes each frame in pieces into the site's
  ``incoming/`` and then announces its path on ``LASTFILE``, twice (a keyword system may
  well broadcast a value more than once);
* ``obsflow run``: the daemon, whose registry (here) has the EPICS trigger instead of the
  directory watch, so every frame reaches it through Channel Access; the reconcile scan
  stands behind it.

Both talk over Channel Access on 127.0.0.1 only, on a free port chosen here (the EPICS
environment of the two child processes; nothing goes out on the network). Meanwhile this
process reads the catalog and shows, four times a second, the frames acquired, received,
archived and in flight and the latency percentiles acquired → archived so far. When the
night is over and every frame is archived (or ``settle_seconds`` have passed), the daemon is
stopped with SIGTERM and :func:`run_demo` returns what happened as a :class:`DemoResult`.
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from obsflow.catalog import Catalog
from obsflow.daemon import STATUS_FILE
from obsflow.errors import SiteError
from obsflow.latency import Percentiles, latencies
from obsflow.receipt import utcnow
from obsflow.registry import load_registry
from obsflow.settings import Settings, load_settings
from obsflow.site import init_site
from obsflow.states import FileState

PV_PREFIX: Final = "OFCAM:"
WATCH_TRIGGER: Final = re.compile(r"^    - kind: watch\b.*\n(?:      .*\n)*", re.MULTILINE)
"""The example registry's directory-watch trigger (its lines), which the demo site swaps out."""
ANNOUNCEMENTS: Final = 2
"""How many times the simulator announces each frame."""


@dataclass(frozen=True)
class DemoPlan:
    root: Path
    frames: int = 40
    cadence: float = 0.25
    size: int = 512
    settle_seconds: float = 30.0
    """After the last frame, how long to wait for every frame to be archived."""


@dataclass(frozen=True)
class Snapshot:
    """What the live view shows at one moment."""

    acquired: int
    received: int
    archived: int
    quarantined: int
    latency: Percentiles
    triggers: tuple[tuple[str, bool, str], ...]
    """(name, ok, detail) of each of the daemon's triggers, as its status file says."""

    @property
    def in_flight(self) -> int:
        return max(0, self.acquired - self.archived - self.quarantined)


@dataclass(frozen=True)
class DemoResult:
    settings: Settings
    last: Snapshot
    simulator_exit: int
    daemon_exit: int
    seconds: float

    @property
    def ok(self) -> bool:
        """Every frame acquired was archived, once, and both programs exited cleanly."""
        last = self.last
        return (
            self.simulator_exit == 0
            and self.daemon_exit == 0
            and last.acquired > 0
            and last.archived == last.acquired
        )


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


def make_demo_site(root: Path) -> Settings:
    """A new site at ``root`` whose OFCAM frames arrive by EPICS instead of the watch."""
    settings = load_settings(init_site(root))
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
    load_registry(settings.registry)  # a ConfigError now, not from the daemon later
    return settings


def snapshot(settings: Settings, catalog: Catalog, since: datetime) -> Snapshot:
    """The night so far: frames on disk, catalog counts, latencies, trigger health."""
    acquired = sum(1 for p in settings.incoming.glob("ofc_*.fits"))
    counts = catalog.counts()
    total, _ = latencies(catalog, since)
    try:
        status: dict[str, Any] = json.loads((settings.site / STATUS_FILE).read_text())
    except (OSError, ValueError):
        status = {}
    triggers = tuple(
        (str(t["name"]), bool(t["ok"]), str(t.get("detail") or ""))
        for t in status.get("triggers", [])
    )
    known = sum(counts.values()) - counts.get(FileState.REJECTED, 0)
    return Snapshot(
        acquired=acquired,
        received=known,
        archived=counts.get(FileState.ARCHIVED, 0),
        quarantined=counts.get(FileState.REJECTED, 0),
        latency=total,
        triggers=triggers,
    )


def render(plan: DemoPlan, now: Snapshot, elapsed: float) -> Group:
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
    health = Text("triggers: ")
    for name, ok, detail in now.triggers or (("(daemon starting)", True, ""),):
        health.append(f"{name} ", style="bold")
        health.append("ok  " if ok else f"ALARM {detail}  ", style="green" if ok else "red")
    return Group(table, health)


def run_demo(
    plan: DemoPlan,
    console: Console,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> DemoResult:
    """Make the site, run the simulator and the daemon, show the night live, stop cleanly."""
    settings = make_demo_site(plan.root)
    logs = settings.site / ".obsflow"
    logs.mkdir(parents=True, exist_ok=True)
    env = loopback_epics_env(free_port())
    command = [sys.executable, "-m", "obsflow"]
    catalog = Catalog.open(settings.catalog_url)  # made here, before either program starts
    since = utcnow()
    began = clock()
    with (
        open(logs / "demo-simulator.log", "w") as simulator_log,
        open(logs / "demo-daemon.log", "w") as daemon_log,
    ):
        night = ["--frames", str(plan.frames), "--cadence", str(plan.cadence)]
        night += ["--size", str(plan.size), "--duplicates", str(ANNOUNCEMENTS)]
        night += ["--wait-listener", "30"]  # the first frame waits for the daemon to listen
        site = ["--site", str(settings.site)]
        simulator = _start([*command, "simulate", "--epics", *site, *night], env, simulator_log)
        daemon = _start([*command, "run", *site], env, daemon_log)
        try:
            now = snapshot(settings, catalog, since)
            with Live(render(plan, now, 0.0), console=console, refresh_per_second=4) as live:
                finished_at: float | None = None
                while True:
                    time.sleep(0.25)
                    now = snapshot(settings, catalog, since)
                    live.update(render(plan, now, clock() - began))
                    if daemon.poll() is not None:
                        break  # it died: the summary says so
                    if simulator.poll() is None:
                        continue
                    finished_at = finished_at or clock()
                    done = now.archived + now.quarantined >= now.acquired
                    if done or clock() - finished_at > plan.settle_seconds:
                        break
            console.line()
        finally:
            simulator_exit = _stop(simulator)
            daemon_exit = _stop(daemon)
    try:
        last = snapshot(settings, catalog, since)
    finally:
        catalog.close()
    return DemoResult(settings, last, simulator_exit, daemon_exit, seconds=clock() - began)


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

"""The processes that write to the catalog (:mod:`obsflow.catalog.processes`): real daemons
and a real Celery worker record themselves, their triggers and their workers; a clean stop
is ``stopped``, a SIGKILL becomes ``lost`` once the heartbeat ages; the status snapshot,
``obsflow status``, ``GET /api/v1/status`` and ``/metrics`` show them. SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from obsflow import __version__
from obsflow.access import Scope, TokenStore
from obsflow.catalog import SCHEMA_REVISION, Catalog
from obsflow.catalog.processes import (
    LOST_AFTER_BEATS,
    EpicsLink,
    Health,
    Identity,
    ProcessKind,
    ProcessRecord,
    ProcessStore,
    TriggerHealth,
    Workers,
    state_at,
)
from obsflow.catalog.status import site_status
from obsflow.settings import Role, Settings
from obsflow.site import Site, open_site
from obsflow.states import ProcessState
from tests.conftest import SiteFactory
from tests.test_celery import Broker, broker, sections, workers
from tests.test_celery import Workers as CeleryWorkers
from tests.test_daemon import DAEMON_SETTINGS, daemon, running, wait_for
from tests.test_site_open import downgrade_to, revision
from tests.test_status import parse_metrics

__all__ = ["broker", "workers"]  # fixtures this module uses

PROCESS_KEYS = {
    "id", "kind", "host", "pid", "role", "started", "heartbeat", "age_seconds", "state",
    "version", "triggers", "epics", "workers", "outbox_depth",
}  # fmt: skip
"""The keys of a process in the status JSON: the dashboard reads exactly these."""
TRIGGER_KEYS = {"name", "kind", "healthy", "last_event", "error"}


@pytest.mark.parametrize(
    ("stored", "age", "shown"),
    [
        (ProcessState.RUNNING, 0.5, ProcessState.RUNNING),
        (ProcessState.RUNNING, LOST_AFTER_BEATS * 2.0, ProcessState.RUNNING),
        (ProcessState.RUNNING, LOST_AFTER_BEATS * 2.0 + 0.1, ProcessState.LOST),
        (ProcessState.STOPPING, 60.0, ProcessState.LOST),
        (ProcessState.STOPPED, 10_000.0, ProcessState.STOPPED),
    ],
)
def test_a_process_is_lost_when_its_heartbeat_is_a_few_intervals_old(
    stored: ProcessState, age: float, shown: ProcessState
) -> None:
    assert state_at(stored, age, interval_seconds=2.0) is shown


def test_a_heartbeat_is_one_upsert_and_the_snapshot_shows_it(site: Site) -> None:
    t0 = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)
    me = Identity.of_this_process(ProcessKind.DAEMON, t0, Role.AGENT)
    store = ProcessStore(site.catalog, me, interval_seconds=2.0)
    health = Health(
        triggers=(
            TriggerHealth("epics:OFCAM:LASTFILE", "epics", False, t0, "not connected for 4 s"),
            TriggerHealth("reconcile-scan", "scan", True, None, None),
        ),
        epics=(EpicsLink("epics:OFCAM:LASTFILE", "OFCAM:LASTFILE", False, "OFCAM:HB", 4.0),),
        workers=None,
        outbox_depth=7,
    )
    for n in range(3):
        store.beat(health, t0 + timedelta(seconds=2 * n))
    now = t0 + timedelta(seconds=5)
    status = site_status(site.catalog, now, role=Role.AGENT)
    (record,) = status.processes
    assert record.identity == me and record.health == health
    assert record.heartbeat == t0 + timedelta(seconds=4) and record.age_seconds == 1.0
    assert record.state is ProcessState.RUNNING
    shown = json.loads(json.dumps(status.to_json()))["processes"]
    assert [set(p) for p in shown] == [PROCESS_KEYS]
    (data,) = shown
    assert data["kind"] == "daemon" and data["role"] == "agent" and data["state"] == "running"
    assert (data["host"], data["pid"]) == (socket.gethostname(), os.getpid())
    assert data["version"] == __version__ and data["outbox_depth"] == 7
    assert data["workers"] is None and data["age_seconds"] == 1.0
    assert [set(t) for t in data["triggers"]] == [TRIGGER_KEYS, TRIGGER_KEYS]
    assert data["triggers"][0]["error"] == "not connected for 4 s"
    assert data["triggers"][0]["last_event"] == t0.isoformat()
    assert data["epics"] == {
        "connected": False,
        "heartbeat_age_seconds": 4.0,
        "links": [
            {
                "trigger": "epics:OFCAM:LASTFILE",
                "pv": "OFCAM:LASTFILE",
                "connected": False,
                "heartbeat_pv": "OFCAM:HB",
                "heartbeat_age_seconds": 4.0,
            }
        ],
    }
    later = t0 + timedelta(seconds=4 + LOST_AFTER_BEATS * 2.0 + 1)
    (lost,) = site_status(site.catalog, later, role=Role.AGENT).processes
    assert lost.state is ProcessState.LOST
    store.beat(health, later, ProcessState.STOPPING)
    store.stop(later + timedelta(seconds=1))
    (stopped,) = site_status(site.catalog, later + timedelta(days=3), role=Role.AGENT).processes
    assert stopped.state is ProcessState.STOPPED and stopped.health == health
    other = ProcessStore(
        site.catalog, Identity.of_this_process(ProcessKind.WORKER, later, None), 1.0
    )
    other.beat(Health(workers=Workers(1, 4)), later + timedelta(days=1, seconds=2))
    assert other.prune(later + timedelta(days=1, seconds=3), older_than_seconds=86400.0) == 1
    at = later + timedelta(days=1, seconds=3)
    (kept,) = site_status(site.catalog, at, role=Role.ALL).processes
    assert kept.kind is ProcessKind.WORKER and kept.health.workers == Workers(1, 4)


def processes(settings: Settings) -> list[ProcessRecord]:
    """The processes the site's status shows now (as another machine reading it would)."""
    catalog = Catalog.open(settings.catalog_url, migrate=False)
    try:
        return list(site_status(catalog, datetime.now(UTC), role=Role.ALL).processes)
    finally:
        catalog.close()


def of_pid(settings: Settings, pid: int) -> ProcessRecord | None:
    found = [p for p in processes(settings) if p.identity.pid == pid]
    assert len(found) <= 1, found
    return found[0] if found else None


def status_json(settings: Settings, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "status", *args, "--site", str(settings.site)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout) if "--json" in args else done.stdout


@pytest.fixture
def settings(make_site: SiteFactory) -> Settings:
    return make_site(**DAEMON_SETTINGS)


def recorded_ready(settings: Settings, proc: subprocess.Popen[str]) -> ProcessRecord:
    """Wait for the daemon ``proc`` to record itself with its triggers started."""
    wait_for(lambda: running(settings, proc), 60, "the daemon to be ready")
    wait_for(
        lambda: (p := of_pid(settings, proc.pid)) is not None and len(p.health.triggers) == 2,
        10,
        "the daemon's heartbeat with its triggers",
    )
    record = of_pid(settings, proc.pid)
    assert record is not None
    return record


@pytest.mark.slow
def test_a_running_daemon_shows_its_triggers_and_a_clean_stop_is_stopped(
    settings: Settings, frames: list[Path]
) -> None:
    with daemon(settings) as proc:
        record = recorded_ready(settings, proc)
        assert record.kind is ProcessKind.DAEMON and record.identity.role is Role.ALL
        assert record.state is ProcessState.RUNNING
        assert record.identity.host == socket.gethostname()
        assert record.interval_seconds == DAEMON_SETTINGS["daemon"]["status_seconds"]
        triggers = {t.kind: t for t in record.health.triggers}
        assert set(triggers) == {"watch", "scan"}
        assert all(t.healthy and t.error is None for t in triggers.values())
        assert triggers["watch"].name == f"watch:{settings.incoming}"
        assert record.health.workers == Workers(0, settings.workers.runs)
        assert record.health.outbox_depth is None and record.health.epics == ()
        shutil.copyfile(frames[0], settings.incoming / frames[0].name)

        def watched() -> bool:
            now = of_pid(settings, proc.pid)
            return now is not None and any(
                t.kind == "watch" and t.last_event is not None for t in now.health.triggers
            )

        wait_for(watched, 10, "the watch's last event")
        shown = status_json(settings, "--json")["processes"]
        assert [p["pid"] for p in shown] == [proc.pid] and shown[0]["state"] == "running"
        table = status_json(settings)
        assert "processes writing to this catalog" in table and "2/2" in table
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    stopped = of_pid(settings, proc.pid)
    assert stopped is not None and stopped.state is ProcessState.STOPPED
    assert status_json(settings, "--json")["processes"][0]["state"] == "stopped"


@pytest.mark.slow
def test_a_killed_daemon_becomes_lost_once_its_heartbeat_ages(settings: Settings) -> None:
    with daemon(settings) as proc:
        recorded_ready(settings, proc)
        proc.kill()
        proc.wait(timeout=30)
        interval = DAEMON_SETTINGS["daemon"]["status_seconds"]
        wait_for(
            lambda: (p := of_pid(settings, proc.pid)) is not None and p.state is ProcessState.LOST,
            LOST_AFTER_BEATS * interval + 5,
            "the killed daemon to be lost",
        )
    record = of_pid(settings, proc.pid)
    assert record is not None and record.age_seconds > LOST_AFTER_BEATS * interval
    assert "lost" in status_json(settings)


@pytest.mark.slow
def test_an_agent_records_its_outbox_depth(settings: Settings, frames: list[Path]) -> None:
    # its server is out of reach (the discard port): the frames wait in its outbox
    with daemon(settings, "--role", "agent", "--server", "http://127.0.0.1:9") as proc:
        recorded_ready(settings, proc)
        for frame in frames[:2]:
            shutil.copyfile(frame, settings.incoming / frame.name)

        def waiting() -> bool:
            now = of_pid(settings, proc.pid)
            return now is not None and now.health.outbox_depth == 2

        wait_for(waiting, 20, "two frames in the agent's outbox")
        record = of_pid(settings, proc.pid)
        assert record is not None and record.identity.role is Role.AGENT
        assert record.health.workers is None  # its pipelines run at the server


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_server_shows_a_worker_that_writes_to_its_catalog(
    make_site: SiteFactory, broker: Broker, workers: CeleryWorkers
) -> None:
    """A server daemon, and an ``obsflow worker`` with the site's storage on another
    "machine": the server's API shows both, hosts and pids to an admin only; the worker's
    warm shutdown is ``stopped``; /metrics counts them."""
    settings = make_site(
        **{**sections(broker), "daemon": {"status_seconds": 0.3}, "transfer": {"role": "server"}}
    )
    worker = workers.start(settings, "w1")
    workers.wait_ready()
    site = open_site(settings)
    try:
        admin = TokenStore(site.catalog).create("root", Scope.ADMIN, [], site.clock())[0]
        reader = TokenStore(site.catalog).create("ann", Scope.READ, [], site.clock())[0]
        wait_for(lambda: of_pid(settings, worker.proc.pid) is not None, 20, "the worker's row")
        with daemon(settings, "--listen", "127.0.0.1:0") as proc:
            recorded_ready(settings, proc)
            url = json.loads((settings.site / ".obsflow" / "daemon.json").read_text())["api"]
            with httpx.Client(base_url=url, timeout=30) as client:

                def shown(token: str) -> list[dict[str, Any]]:
                    answer = client.get(
                        "/api/v1/status", headers={"Authorization": f"Bearer {token}"}
                    )
                    assert answer.status_code == 200, answer.text
                    found: list[dict[str, Any]] = answer.json()["processes"]
                    return found

                as_admin = {p["kind"]: p for p in shown(admin)}
                assert set(as_admin) == {"daemon", "worker"}
                assert as_admin["daemon"]["role"] == "server"
                assert as_admin["daemon"]["pid"] == proc.pid
                assert as_admin["worker"]["pid"] == worker.proc.pid
                assert as_admin["worker"]["workers"] == {"busy": 0, "total": 1}
                assert as_admin["worker"]["state"] == "running"
                assert as_admin["daemon"]["workers"] is None  # its runs go to Celery
                assert all(set(p) == PROCESS_KEYS for p in as_admin.values())
                as_reader = {p["kind"]: p for p in shown(reader)}
                assert all(p["host"] is None and p["pid"] is None for p in as_reader.values())
                assert all(t["name"] is None for t in as_reader["daemon"]["triggers"])
                assert as_reader["worker"]["state"] == "running"
                page = client.get("/metrics").text
                assert str(site.settings.site) not in page  # no path to anonymous callers
                metrics = parse_metrics(page)
                assert metrics['obsflow_processes{kind="worker",state="running"}'] == 1
                assert metrics['obsflow_processes{kind="daemon",state="running"}'] == 1
                assert metrics['obsflow_processes{kind="daemon",state="lost"}'] == 0
                assert metrics['obsflow_workers_total{kind="worker"}'] == 1
                assert metrics['obsflow_process_heartbeat_age_seconds{kind="worker"}'] < 5
                assert metrics['obsflow_trigger_healthy{trigger="reconcile-scan"}'] == 1
                worker.proc.send_signal(signal.SIGTERM)  # a warm shutdown
                assert worker.proc.wait(timeout=60) == 0
                (gone,) = [p for p in shown(admin) if p["kind"] == "worker"]
                assert gone["state"] == "stopped"
    finally:
        site.close()


@pytest.mark.slow
def test_a_catalog_at_0014_is_migrated_and_the_daemon_then_records_itself(
    settings: Settings,
) -> None:
    downgrade_to(settings, "0014")
    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "migrate", "--site", str(settings.site)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert revision(settings) == SCHEMA_REVISION  # 0015 and every later one
    assert processes(settings) == []
    with daemon(settings) as proc:
        assert recorded_ready(settings, proc).state is ProcessState.RUNNING

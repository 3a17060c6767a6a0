"""obsflow run: the daemon as a real subprocess, real inotify, frames written in chunks."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from obsflow.catalog import FileQuery
from obsflow.settings import Settings
from obsflow.sim.demo import free_port
from obsflow.sim.ioc import IocClient
from obsflow.site import open_site
from obsflow.states import FileState, RequestState
from tests.conftest import SiteFactory
from tests.test_epics import IocProcess, client_env, make_ioc

__all__ = ["make_ioc"]  # a fixture this module uses

DAEMON_SETTINGS: dict[str, dict[str, Any]] = {
    "receipt": {"settle_seconds": 0.5},
    "ingest": {"lease_seconds": 2.0, "backoff_seconds": 0.2},
    "daemon": {"reconcile_seconds": 1.0, "status_seconds": 0.3},
}


@contextmanager
def daemon(settings: Settings, *args: str) -> Iterator[subprocess.Popen[str]]:
    log = (settings.site / "daemon.log").open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "obsflow", "-v", "run", "--site", str(settings.site), *args],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


def running(settings: Settings, proc: subprocess.Popen[str]) -> bool:
    """The daemon ``proc`` reports itself running (its handlers and triggers are up)."""
    try:
        status = json.loads((settings.site / ".obsflow" / "daemon.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(status["running"]) and status["pid"] == proc.pid


def write_slowly(frame: Path, target: Path, pieces: int = 8, pause: float = 0.005) -> None:
    """Write as a detector does: the final name at once, the bytes over some milliseconds."""
    data = frame.read_bytes()
    step = -(-len(data) // pieces)
    with target.open("wb") as out:
        for start in range(0, len(data), step):
            out.write(data[start : start + step])
            out.flush()
            time.sleep(pause)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def archived(settings: Settings) -> list[Any]:
    site = open_site(settings)
    try:
        return site.catalog.find(FileQuery(state=FileState.ARCHIVED))
    finally:
        site.close()


def check_archive_exactly_once(settings: Settings, names: list[str]) -> None:
    """Every frame archived once, checksum verified, nothing partial, nothing orphaned."""
    site = open_site(settings)
    try:
        records = site.catalog.find(FileQuery())
        assert sorted(r.original_name for r in records) == sorted(names)
        for record in records:
            assert record.state is FileState.ARCHIVED, record
            assert record.archive_path is not None
            stored = settings.archive / record.archive_path
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == record.sha256
        in_archive = [p for p in settings.archive.rglob("*") if p.is_file()]
        assert len(in_archive) == len(names), "a partial or extra file in the archive"
        cached = {str(p.relative_to(settings.cache)) for p in settings.cache.rglob("*")
                  if p.is_file() and ".tmp" not in p.parts}  # fmt: skip
        assert cached == {r.cache_path for r in records}, "a file orphaned in the cache"
        requests = site.queue.requests_for([r.id for r in records])
        assert {q.state for q in requests} == {RequestState.DONE}
    finally:
        site.close()


@pytest.fixture
def settings(make_site: SiteFactory) -> Settings:
    return make_site(**DAEMON_SETTINGS)


@pytest.mark.slow
def test_frames_written_slowly_are_archived_by_the_watch(
    settings: Settings, frames: list[Path]
) -> None:
    with daemon(settings) as proc:
        wait_for(lambda: running(settings, proc), 30, "start-up")
        for frame in frames:
            write_slowly(frame, settings.incoming / frame.name)
        wait_for(lambda: len(archived(settings)) == len(frames), 60, "every frame archived")
        assert proc.poll() is None
        shown = subprocess.run(
            [sys.executable, "-m", "obsflow", "status", "--json", "--site", str(settings.site)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        live = json.loads(shown.stdout)["daemon"]
        assert live["alive"] is True and live["pid"] == proc.pid
        assert all(t["ok"] for t in live["triggers"]), live["triggers"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    check_archive_exactly_once(settings, [f.name for f in frames])
    assert "stopped cleanly" in (settings.site / "daemon.log").read_text()
    status = json.loads((settings.site / ".obsflow" / "daemon.json").read_text())
    assert status["running"] is False
    shown = subprocess.run(
        [sys.executable, "-m", "obsflow", "status", "--site", str(settings.site)],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert "not running" in shown.stdout


@pytest.mark.slow
def test_frames_written_while_down_are_found_at_start_and_a_bad_one_is_quarantined(
    settings: Settings, frames: list[Path]
) -> None:
    for frame in frames[:6]:
        write_slowly(frame, settings.incoming / frame.name)
    (settings.incoming / "ofc_20261122_0999.fits").write_bytes(b"not FITS at all" * 500)
    with daemon(settings) as proc:
        wait_for(lambda: running(settings, proc), 30, "start-up")
        wait_for(lambda: len(archived(settings)) == 6, 60, "the start-up scan's frames")
        for frame in frames[6:]:  # the daemon keeps going after the bad file
            write_slowly(frame, settings.incoming / frame.name)
        wait_for(lambda: len(archived(settings)) == len(frames), 60, "the later frames")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    quarantined = list(settings.quarantine.rglob("ofc_20261122_0999.fits"))
    assert len(quarantined) == 1
    assert quarantined[0].with_name(quarantined[0].name + ".reason.json").is_file()


@pytest.mark.slow
def test_polling_watch_for_network_file_systems(make_site: SiteFactory, frames: list[Path]) -> None:
    settings = make_site(**DAEMON_SETTINGS)
    registry = settings.registry / "ofcam.yaml"
    text = registry.read_text()
    assert "    - kind: watch " in text
    polling = "    - polling: true\n      poll_seconds: 0.2\n      kind: watch "
    registry.write_text(text.replace("    - kind: watch ", polling))
    with daemon(settings) as proc:
        wait_for(lambda: running(settings, proc), 30, "start-up")
        for frame in frames[:4]:
            write_slowly(frame, settings.incoming / frame.name)
        wait_for(lambda: len(archived(settings)) == 4, 60, "frames seen by polling")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_ingest_command_works_while_the_daemon_runs(
    settings: Settings, frames: list[Path], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for frame in frames[6:]:
        (elsewhere / frame.name).write_bytes(frame.read_bytes())
    with daemon(settings) as proc:
        wait_for(lambda: running(settings, proc), 30, "start-up")
        for frame in frames[:6]:
            write_slowly(frame, settings.incoming / frame.name)
        command = ["ingest", "--site", str(settings.site), str(elsewhere)]
        done = subprocess.run(
            [sys.executable, "-m", "obsflow", *command],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        wait_for(lambda: len(archived(settings)) == len(frames), 60, "both sources archived")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    check_archive_exactly_once(settings, [f.name for f in frames])


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_and_doubles_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    from obsflow.sim.simulate import simulate_night

    night = simulate_night(tmp_path / "night", 200, seed=11, shape=(32, 32))
    rng = random.Random(5)
    pending = [f.path for f in night]
    while pending:
        with daemon(settings) as proc:
            deadline = time.monotonic() + rng.uniform(0.2, 1.0)
            while pending and time.monotonic() < deadline:
                frame = pending.pop(0)
                write_slowly(frame, settings.incoming / frame.name, pieces=4, pause=0.002)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    # a last, undisturbed run: the start-up sweep and scan, then expired leases retried
    with daemon(settings) as proc:
        wait_for(lambda: running(settings, proc), 30, "start-up")
        wait_for(lambda: len(archived(settings)) == len(night), 120, "every frame archived")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    check_archive_exactly_once(settings, [f.path.name for f in night])


@pytest.mark.slow
def test_epics_broadcasts_three_times_and_an_ioc_restart_lose_and_double_nothing(
    make_site: SiteFactory,
    frames: list[Path],
    make_ioc: Callable[..., IocProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frames written where no watch looks: only the EPICS trigger can announce them."""
    ioc = make_ioc()
    client_env(monkeypatch, ioc.port)  # this process and the daemon it starts
    settings = make_site(**{**DAEMON_SETTINGS, "daemon": {"reconcile_seconds": 3600,
                                                           "status_seconds": 0.3}})  # fmt: skip
    registry = settings.registry / "ofcam.yaml"
    epics = (f"    - kind: epics\n      pv: '{ioc.lastfile}'\n      directory: detector\n"
             f"      heartbeat_pv: '{ioc.heartbeat}'\n    - kind: watch ")  # fmt: skip
    registry.write_text(registry.read_text().replace("    - kind: watch ", epics))
    detector = settings.site / "detector"
    detector.mkdir()

    def epics_ok() -> bool:
        status = json.loads((settings.site / ".obsflow" / "daemon.json").read_text())
        return all(t["ok"] for t in status["triggers"] if t["name"].startswith("epics:"))

    def announce(batch: list[Path]) -> None:
        publisher = IocClient(ioc.prefix)
        try:
            for frame in batch:
                write_slowly(frame, detector / frame.name)
                for _ in range(3):  # every update broadcast three times
                    publisher.publish(str(detector / frame.name))
        finally:
            publisher.close()

    with daemon(settings) as proc:
        wait_for(lambda: running(settings, proc), 30, "start-up")
        wait_for(epics_ok, 30, "the EPICS trigger connected")
        announce(frames[:6])
        wait_for(lambda: len(archived(settings)) == 6, 60, "the first frames archived")
        ioc.kill()  # mid-night: the IOC dies and comes back
        wait_for(lambda: not epics_ok(), 30, "the daemon noticing the IOC is gone")
        ioc.start()
        wait_for(epics_ok, 60, "the EPICS trigger reconnected")
        announce(frames[6:])
        wait_for(lambda: len(archived(settings)) == len(frames), 60, "every frame archived")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    check_archive_exactly_once(settings, [f.name for f in frames])


@pytest.mark.slow
def test_the_daemon_keeps_the_cache_within_its_budget_and_evicted_files_come_back(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    budget = {"budget_bytes": 1, "low_water_bytes": 0, "trim_seconds": 0.2}
    settings = make_site(**{**DAEMON_SETTINGS, "cache_policy": budget})
    with daemon(settings) as proc:
        wait_for(lambda: running(settings, proc), 30, "start-up")
        for frame in frames:
            write_slowly(frame, settings.incoming / frame.name)

        def all_virtual() -> bool:
            records = archived(settings)
            return len(records) == len(frames) and all(r.virtual for r in records)

        wait_for(all_virtual, 60, "every archived frame evicted from the cache")
        assert not [p for p in settings.cache.rglob("*.fits") if ".tmp" not in p.parts]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    site = open_site(settings)
    try:
        record = archived(settings)[0]
        path = site.retriever().fetch(record.archive_id or "")  # back from the archive
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256
        assert not site.catalog.records([record.id])[0].virtual
    finally:
        site.close()


@pytest.mark.slow
def test_run_listen_serves_the_api_while_the_daemon_archives(
    settings: Settings, frames: list[Path]
) -> None:
    port = free_port()
    with daemon(settings, "--listen", f"127.0.0.1:{port}") as proc:
        wait_for(lambda: running(settings, proc), 30, "start-up")
        status = json.loads((settings.site / ".obsflow" / "daemon.json").read_text())
        assert status["api"] == f"http://127.0.0.1:{port}"
        for frame in frames[:3]:
            write_slowly(frame, settings.incoming / frame.name)
        wait_for(lambda: len(archived(settings)) == 3, 60, "three frames archived")
        with httpx.Client(base_url=status["api"], timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            page = client.get("/api/v1/files", params={"product": "ofcam_raw"}).json()
            assert sorted(f["archive_id"] for f in page["items"]) == sorted(
                f.archive_id for f in archived(settings)
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with pytest.raises(httpx.ConnectError):  # the API stopped with the daemon
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_run_listen_on_an_address_in_use_says_so_and_starts_nothing(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "obsflow", "run", "--site", str(settings.site),
             "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert not (settings.site / ".obsflow" / "daemon.json").exists()

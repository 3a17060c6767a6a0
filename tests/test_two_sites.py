"""Two sites as real processes on 127.0.0.1: an observatory agent (its own SQLite
catalog) sends frames to an archive server (this test's catalog, SQLite or PostgreSQL)
through a fault-injecting proxy. Whatever the link, the server, or the agent does, every
frame is archived exactly once with a verified checksum, nothing is left half-written,
and no frame leaves the agent before the server confirmed it."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from obsflow.access import Scope, TokenStore
from obsflow.archive.storage import LocalStorage
from obsflow.catalog import Catalog, FileQuery
from obsflow.settings import Settings
from obsflow.sim.demo import free_port
from obsflow.states import FileState
from tests.conftest import SiteFactory
from tests.faultproxy import FaultProxy, Faults
from tests.test_daemon import daemon, wait_for, write_slowly

pytestmark = pytest.mark.slow

AGENT = {
    "catalog": {"url": "sqlite:///agent.db"},  # the agent's own catalog, whatever the test's
    "receipt": {"settle_seconds": 0.5},
    "ingest": {"lease_seconds": 3.0, "backoff_seconds": 0.1, "backoff_max_seconds": 0.5},
    "daemon": {"reconcile_seconds": 1.0, "status_seconds": 0.3},
    "transfer": {"timeout_seconds": 3.0, "confirm_seconds": 2.0, "keep_seconds": 0},
    "cache_policy": {"trim_seconds": 0.2},
}
SERVER = {
    "ingest": {"lease_seconds": 3.0, "backoff_seconds": 0.1},
    "daemon": {"status_seconds": 0.3},
}


@dataclass
class Sites:
    agent: Settings
    server: Settings
    token: str
    port: int  # where the server listens

    def server_catalog(self) -> Catalog:
        return Catalog.open(self.server.catalog_url, migrate=False)

    def agent_catalog(self) -> Catalog:
        return Catalog.open(self.agent.catalog_url, migrate=False)


@pytest.fixture
def sites(make_site: SiteFactory) -> Sites:
    server = make_site("server", **SERVER)
    agent = make_site("agent", **AGENT)
    catalog = Catalog.open(server.catalog_url)
    token, _ = TokenStore(catalog).create("agent", Scope.WRITE, [], time_now())
    catalog.close()
    Catalog.open(agent.catalog_url).close()
    return Sites(agent, server, token, free_port())


def time_now() -> Any:
    from obsflow.receipt.receiver import utcnow

    return utcnow()


@contextmanager
def run(settings: Settings, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``obsflow run`` on ``settings`` with ``args`` (its output in the site's log),
    started; stopped with SIGTERM at the end if it still runs."""
    with daemon(settings, *args) as proc:
        wait_for(lambda: running(settings, proc), 30, f"{settings.site.name} to start")
        yield proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def running(settings: Settings, proc: subprocess.Popen[str]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(
            f"{settings.site.name} exited {proc.returncode}:\n"
            + (settings.site / "daemon.log").read_text()[-3000:]
        )
    try:
        status = json.loads((settings.site / ".obsflow" / "daemon.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(status["running"]) and status["pid"] == proc.pid


def server_run(sites: Sites) -> Any:
    return run(sites.server, "--role", "server", "--listen", f"127.0.0.1:{sites.port}")


def agent_run(sites: Sites, url: str) -> Any:
    return run(sites.agent, "--role", "agent", "--server", url, "--token", sites.token)


class Watch:
    """Checks, whenever asked, that every frame the agent let go of is archived at the
    server (nothing leaves the agent before the server confirmed it)."""

    def __init__(self, sites: Sites) -> None:
        self.agent = sites.agent_catalog()
        self.server = sites.server_catalog()
        self.let_go: set[str] = set()

    def check(self) -> None:
        gone = {r.archive_id or "" for r in self.agent.find(FileQuery()) if r.virtual}
        for archive_id in sorted(gone - self.let_go):
            record = self.server.get(archive_id)
            assert record is not None and record.state is FileState.ARCHIVED, (
                f"the agent let go of {archive_id} before the server archived it: {record}"
            )
        self.let_go |= gone

    def released(self) -> int:
        self.check()
        return len(self.let_go)

    def all_archived(self, count: int) -> bool:
        self.check()
        archived = self.server.find(FileQuery(state=FileState.ARCHIVED))
        confirmed = self.agent.find(FileQuery(state=FileState.ARCHIVED))
        return len(archived) == count and len(confirmed) == count

    def close(self) -> None:
        self.agent.close()
        self.server.close()


def check_exactly_once(sites: Sites, frames: list[Path]) -> None:
    """Each frame once at the server, archived, its stored copy's checksum its own."""
    catalog = sites.server_catalog()
    try:
        records = catalog.find(FileQuery())
    finally:
        catalog.close()
    by_name = {r.original_name: r for r in records}
    assert len(records) == len(frames) == len(by_name), sorted(by_name)
    storage = LocalStorage(sites.server.archive)
    for frame in frames:
        record = by_name[frame.name]
        assert record.state is FileState.ARCHIVED
        expected = hashlib.sha256(frame.read_bytes()).hexdigest()
        assert record.sha256 == expected
        assert record.archive_path is not None
        assert storage.sha256(record.archive_path) == expected
    uploads = sites.server.cache / ".uploads"
    left = sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []
    assert left == [], f"half-written uploads left at the server: {left}"


def test_frames_cross_a_link_that_resets_stalls_and_cuts_exactly_once(
    sites: Sites, frames: list[Path]
) -> None:
    faults = Faults(
        reset=0.3, reset_within_bytes=16_000, cut=0.3, cut_within_bytes=40_000,
        stall=0.3, stall_seconds=1.0, stall_within_bytes=30_000, refuse=0.2,
    )  # fmt: skip
    with server_run(sites), FaultProxy(("127.0.0.1", sites.port), seed=1) as proxy:
        proxy.faults = faults
        watch = Watch(sites)
        try:
            with agent_run(sites, proxy.url):
                for frame in frames:
                    write_slowly(frame, sites.agent.incoming / frame.name)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not watch.all_archived(len(frames)):
                    time.sleep(0.2)  # the faulty link alone
                proxy.faults = Faults()  # then it heals: the rest must follow
                wait_for(lambda: watch.all_archived(len(frames)), 60, "every frame archived")
                wait_for(lambda: watch.released() == len(frames), 30, "the agent to let go")
        finally:
            watch.close()
        stats = proxy.stats
    assert stats.resets + stats.cuts > 0 and stats.stalls + stats.refused > 0, stats
    check_exactly_once(sites, frames)


def test_the_server_restarted_mid_night_loses_and_doubles_nothing(
    sites: Sites, frames: list[Path]
) -> None:
    url = f"http://127.0.0.1:{sites.port}"
    watch = Watch(sites)
    try:
        with agent_run(sites, url):
            with server_run(sites):
                for frame in frames[:6]:
                    write_slowly(frame, sites.agent.incoming / frame.name)
                    time.sleep(0.1)
            for frame in frames[6:9]:  # while the server is down: the outbox holds them
                write_slowly(frame, sites.agent.incoming / frame.name)
            time.sleep(1.0)
            watch.check()
            with server_run(sites):
                for frame in frames[9:]:
                    write_slowly(frame, sites.agent.incoming / frame.name)
                wait_for(lambda: watch.all_archived(len(frames)), 60, "every frame archived")
    finally:
        watch.close()
    check_exactly_once(sites, frames)


def test_the_agent_sigkilled_mid_upload_resumes_and_doubles_nothing(
    sites: Sites, frames: list[Path]
) -> None:
    with server_run(sites), FaultProxy(("127.0.0.1", sites.port), seed=5) as proxy:
        # every upload stalls a while after its first bytes: the kill comes mid-upload
        proxy.faults = Faults(stall=1.0, stall_seconds=5.0, stall_within_bytes=2_000)
        with agent_run(sites, proxy.url) as agent:
            for frame in frames:
                write_slowly(frame, sites.agent.incoming / frame.name)
            wait_for(lambda: proxy.stats.stalls >= 2, 30, "uploads under way")
            time.sleep(0.3)
            agent.send_signal(signal.SIGKILL)
            agent.wait(timeout=30)
        proxy.faults = Faults()
        watch = Watch(sites)
        try:
            with agent_run(sites, proxy.url):
                wait_for(lambda: watch.all_archived(len(frames)), 60, "every frame archived")
        finally:
            watch.close()
    check_exactly_once(sites, frames)


def test_agent_status_shows_the_outbox(sites: Sites, frames: list[Path]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # no server there: everything waits
    with agent_run(sites, dead):
        for frame in frames[:3]:
            write_slowly(frame, sites.agent.incoming / frame.name)
        catalog = sites.agent_catalog()
        try:
            wait_for(lambda: len(catalog.find(FileQuery())) == 3, 30, "three frames received")
        finally:
            catalog.close()
        shown = subprocess.run(
            [sys.executable, "-m", "obsflow", "status", "--json", "--site", str(sites.agent.site)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    outbox = json.loads(shown.stdout)["outbox"]
    assert outbox["depth"] == 3
    assert outbox["oldest_name"] == frames[0].name
    assert outbox["last_success"] is None

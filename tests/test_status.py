"""One status of a site (:mod:`obsflow.catalog.status`): ``obsflow status --json``,
``GET /api/v1/status`` and ``/metrics`` tell the same counts and the same queue depth,
on SQLite and PostgreSQL; the depth is one rule (pending or leased)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from obsflow.access import Scope, TokenStore
from obsflow.api import ApiServer
from obsflow.catalog.queue import WAITING, depth_of
from obsflow.catalog.status import site_status
from obsflow.settings import Role
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import FileState, RequestState, RunState
from tests.conftest import SiteFactory


@pytest.mark.parametrize(
    ("counts", "depth"),
    [
        ({}, 0),
        ({RequestState.DONE: 5, RequestState.FAILED: 2}, 0),
        ({RequestState.PENDING: 3}, 3),
        ({RequestState.PENDING: 3, RequestState.LEASED: 2, RequestState.DONE: 9}, 5),
    ],
)
def test_the_depth_is_the_requests_pending_or_leased(
    counts: dict[RequestState, int], depth: int
) -> None:
    assert depth_of(counts) == depth
    assert set(WAITING) == {RequestState.PENDING, RequestState.LEASED}


@dataclass
class Mixed:
    """A site with archived, queued (one of them leased) and rejected files."""

    site: Site
    archived: int
    queued: int
    rejected: int


@pytest.fixture
def mixed(make_site: SiteFactory, frames: list[Path]) -> Iterator[Mixed]:
    site = open_site(make_site())
    try:
        ingest_paths(site, frames[:6])
        bad = frames[0].parent / "ofc_20261122_0999.fits"
        bad.write_bytes(b"this is not a FITS file at all\n" * 100)
        ingest_paths(site, [*frames[6:10], bad], wait=False)
        leased = site.queue.lease("test", site.clock(), lease_seconds=3600, limit=1)
        assert len(leased) == 1
        yield Mixed(site, archived=6, queued=4, rejected=1)
    finally:
        site.close()


def test_the_snapshot_counts_every_state_and_the_depth(mixed: Mixed) -> None:
    site = mixed.site
    now = site.clock()
    status = site_status(site.catalog, now, role=Role.SERVER)
    assert status.now == now and status.role is Role.SERVER
    assert list(status.files) == list(FileState)
    assert status.files[FileState.ARCHIVED] == mixed.archived
    assert status.files[FileState.CACHED] == mixed.queued
    assert status.files[FileState.REJECTED] == mixed.rejected
    assert status.queue == {
        RequestState.PENDING: mixed.queued - 1,
        RequestState.LEASED: 1,
        RequestState.DONE: mixed.archived,
        RequestState.FAILED: 0,
    }
    assert status.queue_depth == mixed.queued == site.queue.depth()
    assert site.queue.counts() == {s: n for s, n in status.queue.items() if n}
    assert status.runs == {state: 0 for state in RunState}
    assert status.at_level(0)[FileState.ARCHIVED] == mixed.archived
    assert sum(status.files.values()) == sum(sum(c.values()) for c in status.levels.values())
    retriever = site.retriever().status()
    assert status.cache.files == retriever.files == mixed.archived + mixed.queued
    assert status.cache.bytes == retriever.bytes
    assert status.cache.unarchived_bytes == retriever.unarchived_bytes
    assert (status.cache.virtual, status.cache.pinned) == (retriever.virtual, retriever.pinned)
    assert status.untracked == mixed.archived + mixed.queued  # no pipelines: none tracked
    assert status.daemon is None and status.outbox is None
    assert "outbox" not in status.to_json()
    assert status.details_json()["runs"] == {state.value: 0 for state in RunState}


def test_an_agent_shows_its_outbox_and_the_daemon_names_the_role(mixed: Mixed) -> None:
    site = mixed.site
    now = site.clock()
    agent = site_status(site.catalog, now, role=Role.AGENT)
    assert agent.outbox is not None
    assert agent.outbox.depth == agent.queue_depth == mixed.queued
    assert agent.outbox.oldest is not None and agent.outbox.oldest_name is not None
    assert agent.outbox.last_success is not None  # the six archived here
    assert agent.to_json()["outbox"]["depth"] == mixed.queued
    daemon = {"role": "agent", "alive": False, "triggers": []}
    named = site_status(site.catalog, now, role=Role.ALL, daemon=daemon)
    assert named.role is Role.AGENT and named.outbox == agent.outbox
    assert named.to_json()["daemon"] == daemon


def test_cli_api_and_metrics_tell_the_same_status(mixed: Mixed) -> None:
    site = mixed.site
    shown = subprocess.run(
        [sys.executable, "-m", "obsflow", "status", "--json", "--site", str(site.settings.site)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    cli = json.loads(shown.stdout)
    store = TokenStore(site.catalog)
    admin = store.create("root", Scope.ADMIN, [], site.clock())[0]
    server = ApiServer(site).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            api = client.get("/api/v1/status").json()
            as_admin = client.get(
                "/api/v1/status", headers={"Authorization": f"Bearer {admin}"}
            ).json()
            metrics = parse_metrics(client.get("/metrics").text)
    finally:
        server.stop()
    ours = site_status(site.catalog, site.clock(), role=site.settings.transfer.role)
    assert set(cli) == {"files", "queue", "queue_depth", "daemon", "processes"}
    for key in ("files", "queue", "queue_depth"):
        assert cli[key] == api[key] == ours.to_json()[key], key
    for key in ("runs", "tracker", "cache", "role"):
        assert api[key] == ours.details_json()[key], key
    assert cli["queue_depth"] == mixed.queued
    assert cli["daemon"] is None and "daemon" not in api and as_admin["daemon"] is None
    assert "outbox" not in cli and "outbox" not in api
    for state, n in cli["files"].items():
        assert metrics[f'obsflow_files{{state="{state}"}}'] == n
    for state, n in cli["queue"].items():
        assert metrics[f'obsflow_ingest_requests{{state="{state}"}}'] == n
    for state, n in api["runs"].items():
        assert metrics[f'obsflow_runs{{state="{state}"}}'] == n
    assert metrics["obsflow_ingest_queue_depth"] == cli["queue_depth"]
    assert metrics["obsflow_cache_files"] == api["cache"]["files"] == mixed.archived + mixed.queued
    assert metrics["obsflow_cache_bytes"] == api["cache"]["bytes"]
    assert metrics["obsflow_virtual_files"] == api["cache"]["virtual"]


def test_the_json_keeps_what_it_said(mixed: Mixed) -> None:
    """The fields ``obsflow status --json`` had before the snapshot keep their meaning."""
    status = site_status(mixed.site.catalog, mixed.site.clock(), role=Role.ALL)
    data: dict[str, Any] = json.loads(json.dumps(status.to_json()))
    assert {"files", "queue", "queue_depth", "daemon"} <= set(data)
    assert data["files"] == {state.value: status.files[state] for state in FileState}
    assert data["queue"] == {state.value: status.queue[state] for state in RequestState}
    assert data["queue_depth"] == data["queue"]["pending"] + data["queue"]["leased"]
    assert data["daemon"] is None


def parse_metrics(text: str) -> dict[str, float]:
    return {
        name: float(value)
        for line in text.splitlines()
        if line and not line.startswith("#")
        for name, value in [line.rsplit(" ", 1)]
    }

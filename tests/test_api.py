"""The REST API (:mod:`obsflow.api`) as a client meets it: a real uvicorn server on
127.0.0.1 serving a real site (SQLite and PostgreSQL), a real httpx client.

The site holds the small night's 12 frames, given programs and release dates in the
catalog: 4 of program A still proprietary, 4 of program A released yesterday, 4 of
program B proprietary. Tokens: a reader of A ("own"), a reader of B ("other"), an
admin, a writer of A and a writer of B. The page limit is 5, so listings page.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import Case, GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.result import Ok
from sqlalchemy import insert, update

from obsflow.access import Scope, TokenStore
from obsflow.api import OPENAPI_URL, ApiServer, ListenError, parse_listen
from obsflow.archive.retrieval import Retriever
from obsflow.catalog import schema
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.catalog.runs import NewRun, RunStore
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import RunState, StepState
from tests.conftest import SiteFactory

PROBLEM = "application/problem+json"
WITHHELD = ("object", "original_name", "sha256", "keywords", "observer")
ADMIN_ONLY = ("cache_path", "archive_path", "source_path")
EXAMPLES = 40
"""Schemathesis cases per operation and mode (valid, invalid)."""
SERVE = [
    sys.executable,
    "-c",
    "import obsflow.cli.serve; from obsflow.cli import main; main()",
    "serve",
]
"""``obsflow serve``, whether or not :mod:`obsflow.cli` registers it yet."""


@dataclass
class World:
    site: Site
    url: str
    before: list[FileRecord]
    """Program A, proprietary for a year yet."""
    after: list[FileRecord]
    """Program A, released yesterday."""
    other: list[FileRecord]
    """Program B, proprietary for a year yet."""
    tokens: dict[str, str]
    """Role → secret: own (reads A), other (reads B), admin, writer (A), writer_b (B)."""

    def client(self, role: str = "anonymous") -> httpx.Client:
        token = self.tokens.get(role)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def record(self, archive_id: str) -> FileRecord:
        found = self.site.catalog.get(archive_id)
        assert found is not None
        return found


@pytest.fixture
def world(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    site = open_site(make_site(api={"page_limit": 5}))
    ingest_paths(site, frames)
    records = sorted(site.catalog.find(FileQuery()), key=lambda r: r.id)
    assert len(records) == 12
    now = site.clock()
    groups = {
        ("A", now + timedelta(days=365)): records[0:4],
        ("A", now - timedelta(days=1)): records[4:8],
        ("B", now + timedelta(days=365)): records[8:12],
    }
    with site.catalog.write() as conn:  # setup: who owns what, until when
        for (program, until), chosen in groups.items():
            conn.execute(
                update(schema.files)
                .where(schema.files.c.id.in_([r.id for r in chosen]))
                .values(program=program, proprietary_until=until)
            )
    store = TokenStore(site.catalog)
    tokens = {
        role: store.create(user, scope, programs, now)[0]
        for role, user, scope, programs in (
            ("own", "alice", Scope.READ, ["A"]),
            ("other", "bob", Scope.READ, ["B"]),
            ("admin", "root", Scope.ADMIN, []),
            ("writer", "wanda", Scope.WRITE, ["A"]),
            ("writer_b", "walt", Scope.WRITE, ["B"]),
        )
    }
    ids = [r.id for r in records]
    fresh = site.catalog.records(ids)
    server = ApiServer(site).start()
    try:
        yield World(site, server.url, fresh[0:4], fresh[4:8], fresh[8:12], tokens)
    finally:
        server.stop()
        site.close()


def is_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert {"type", "title", "status", "detail", "instance"} <= set(body)
    return body


# ------------------------------------------------------------------ access


ROLES = ("anonymous", "other", "own", "admin")


def test_the_access_matrix(world: World) -> None:
    """Listing, metadata and data, for each caller, before and after the release."""
    seen: dict[tuple[str, str], tuple[bool, bool, int]] = {}
    for role in ROLES:
        with world.client(role) as client:
            for moment, record in (("before", world.before[0]), ("after", world.after[0])):
                aid = record.archive_id
                listed = client.get("/api/v1/files", params={"archive_id": aid})
                assert listed.status_code == 200, listed.text
                (item,) = listed.json()["items"]
                shown = client.get(f"/api/v1/files/{aid}")
                assert shown.status_code == 200, shown.text
                meta = shown.json()
                data = client.get(f"/api/v1/files/{aid}/data")
                for view in (item, meta):
                    withheld = view.get("proprietary", False)
                    assert all((k in view) is not withheld for k in WITHHELD), (role, view)
                    assert all((k in view) is (role == "admin") for k in ADMIN_ONLY)
                    assert view["archive_id"] == aid
                    assert view["proprietary_until"]  # the release date is public
                if data.status_code == 200:
                    assert hashlib.sha256(data.content).hexdigest() == record.sha256
                    assert data.headers["content-type"] == "application/fits"
                    assert data.headers["etag"] == f'"{record.sha256}"'
                else:
                    body = is_problem(data, data.status_code)
                    assert body["type"].endswith((":proprietary", ":unauthenticated"))
                    assert "until" in body["detail"]
                seen[role, moment] = (
                    item.get("proprietary", False),
                    meta.get("proprietary", False),
                    data.status_code,
                )
    # (listing withheld, metadata withheld, data status); anonymous is told a token may
    # help (401), a token of another program that it will not (403)
    assert seen == {
        ("anonymous", "before"): (True, True, 401),
        ("anonymous", "after"): (False, False, 200),
        ("other", "before"): (True, True, 403),
        ("other", "after"): (False, False, 200),
        ("own", "before"): (False, False, 200),
        ("own", "after"): (False, False, 200),
        ("admin", "before"): (False, False, 200),
        ("admin", "after"): (False, False, 200),
    }


def test_a_listing_shows_every_file_and_withholds_per_file(world: World) -> None:
    with world.client("own") as client:
        items = walk(client, "/api/v1/files")
    assert [i["id"] for i in items] == [r.id for r in world.before + world.after + world.other]
    withheld = {i["archive_id"] for i in items if i.get("proprietary")}
    assert withheld == {r.archive_id for r in world.other}


def test_filters_on_withheld_fields_never_match_an_unreadable_file(world: World) -> None:
    secret = world.before[0]
    guesses = {"original_name": secret.original_name, "object": secret.object}
    frame = secret.keywords.get("FRAMENUM")
    for name, value in guesses.items():
        for role, found in (("anonymous", 0), ("other", 0), ("own", 1), ("admin", 1)):
            with world.client(role) as client:
                got = client.get(
                    "/api/v1/files", params={name: value, "archive_id": secret.archive_id}
                )
            assert len(got.json()["items"]) == found, (name, role)
    assert frame is not None
    for role, found in (("anonymous", 0), ("own", 1)):
        with world.client(role) as client:
            got = client.get(
                "/api/v1/files",
                params={"keyword": f"FRAMENUM={frame}", "archive_id": secret.archive_id},
            )
        assert len(got.json()["items"]) == found, role


def walk(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a listing, page by page."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= 5
        items += body["items"]
        cursor = body["next"]
        if cursor is None:
            return items


def test_filters_and_pages(world: World) -> None:
    every = world.before + world.after + world.other
    with world.client("admin") as client:
        assert len(walk(client, "/api/v1/files", limit=2)) == 12
        assert len(walk(client, "/api/v1/files", product="ofcam_raw")) == 12
        assert walk(client, "/api/v1/files", product="nope") == []
        assert len(walk(client, "/api/v1/files", tag="raw")) == 12
        night = every[0].night
        assert night is not None
        assert len(walk(client, "/api/v1/files", night=night.isoformat())) == 12
        assert walk(client, "/api/v1/files", night="2001-01-01") == []
        one = every[5]
        assert one.start is not None and one.stop is not None
        overlapping = [
            i["archive_id"]
            for i in walk(
                client,
                "/api/v1/files",
                since=one.start.isoformat(),
                until=one.start.isoformat(),
            )
        ]
        assert one.archive_id in overlapping
        expected = [
            r.archive_id for r in every if r.start and r.stop and r.start <= one.start <= r.stop
        ]
        assert overlapping == expected
        name = one.original_name
        assert [i["archive_id"] for i in walk(client, "/api/v1/files", original_name=name)] == [
            one.archive_id
        ]
        sky = next(r for r in every if "AIRMASS" in r.keywords)
        airmass, frame = sky.keywords["AIRMASS"], sky.keywords["FRAMENUM"]
        for words, found in (
            ([f"AIRMASS={airmass}"], [sky.archive_id]),
            ([f"AIRMASS={airmass:.6e}"], [sky.archive_id]),  # numbers compare as numbers
            ([f"AIRMASS={airmass}", f"FRAMENUM={frame + 1}"], []),
            ([f"FRAMENUM={frame}", "GAIN=1.5"], [sky.archive_id]),
            (["FRAMENUM=x"], []),
        ):
            got = walk(client, "/api/v1/files", keyword=words)
            assert [i["archive_id"] for i in got] == found, words
        # limits and cursors are checked
        is_problem(client.get("/api/v1/files", params={"limit": 6}), 422)
        is_problem(client.get("/api/v1/files", params={"limit": 0}), 422)
        is_problem(client.get("/api/v1/files", params={"cursor": "x1"}), 422)
        is_problem(client.get("/api/v1/files", params={"cursor": "99999999999"}), 422)
        assert client.get("/api/v1/files", params={"cursor": "9999999999"}).json() == {
            "items": [],
            "next": None,
        }
        later = {"since": "2027-01-02T00:00:00Z", "until": "2027-01-02T01:00:00+02:00"}
        assert client.get("/api/v1/files", params=later).json() == {"items": [], "next": None}
        for loose in ("2027-01-01", "1700000000", "2027-01-01T00:00:00"):  # RFC 3339 only
            is_problem(client.get("/api/v1/files", params={"since": loose}), 422)
        is_problem(client.get("/api/v1/files", params={"night": "1700000000"}), 422)
        bad = client.get("/api/v1/files", params={"original_name": "a\x00b"})
        assert is_problem(bad, 422)["errors"][0]["loc"] == ["query", "original_name"]


# ------------------------------------------------------------------ paths


TRAVERSALS = [
    "/api/v1/files/../../../etc/passwd/data",
    "/api/v1/files/..%2f..%2f..%2fetc%2fpasswd/data",
    "/api/v1/files/%2e%2e/data",
    "/api/v1/files/%2e%2e%2f%2e%2e%2fcatalog.db/data",
    "/api/v1/files/..%5c..%5ccatalog.db/data",
    "/api/v1/files/%2fetc%2fpasswd/data",
    "/api/v1/files/.hidden/data",
    "/api/v1/files/catalog.db/data",
    "/api/v1/files/obsflow.yaml",
    "/api/v1/files/cache/data",
    "/api/v1/files/OF.20261122.18000.00.fits%00/data",
    "/api/v1/files/OF.20261122.18000.00.fits%2f..%2f..%2fcatalog.db/data",
    "/api/v1/files/" + "A" * 97 + "/data",
    "/api/v1/files/~root/data",
    "/api/v1/files/%252e%252e%252fcatalog.db/data",
    "/api/v1/files/x/tags/..%2f..%2fetc",
    "/api/v1/runs/..%2f1",
    "/api/v1/runs/99999999999999999999",
]


@pytest.mark.parametrize("role", ["anonymous", "admin"])
def test_traversal_shaped_ids_reach_no_path(world: World, role: str) -> None:
    """Raw request targets, sent as written (no client normalises them)."""
    host, port = world.url.removeprefix("http://").split(":")
    token = world.tokens.get(role)
    for target in TRAVERSALS:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request(
                "GET", target, headers={"Authorization": f"Bearer {token}"} if token else {}
            )
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status in (404, 422), (target, response.status, body[:200])
        assert response.getheader("content-type") == PROBLEM, target
        assert b"SQLite format" not in body and b"root:" not in body and b"catalog:" not in body


# ------------------------------------------------------------------ bytes


def test_range_requests(world: World) -> None:
    record = world.after[1]
    path = f"/api/v1/files/{record.archive_id}/data"
    with world.client() as client:
        whole = client.get(path)
        assert whole.status_code == 200
        assert whole.headers["accept-ranges"] == "bytes"
        body = whole.content
        size = len(body)
        assert size == record.size
        for asked, start, end in (
            ("bytes=0-9", 0, 9),
            ("bytes=10-", 10, size - 1),
            ("bytes=-10", size - 10, size - 1),
            ("bytes=5-5", 5, 5),
            ("bytes=100-99999999", 100, size - 1),
            ("bytes=-99999999", 0, size - 1),
        ):
            got = client.get(path, headers={"Range": asked})
            assert got.status_code == 206, asked
            assert got.headers["content-range"] == f"bytes {start}-{end}/{size}", asked
            assert got.content == body[start : end + 1], asked
            assert got.headers["content-length"] == str(end - start + 1)
        for unsatisfiable in (f"bytes={size}-", f"bytes={size + 100}-{size + 200}", "bytes=-0"):
            got = client.get(path, headers={"Range": unsatisfiable})
            is_problem(got, 416)
            assert got.headers["content-range"] == f"bytes */{size}"
        # ignored (RFC 9110 allows it): other units, bad syntax, several ranges
        for ignored in ("items=0-1", "bytes=5-2", "bytes=a-b", "bytes=0-1,5-6", "bytes"):
            got = client.get(path, headers={"Range": ignored})
            assert got.status_code == 200, ignored
            assert got.content == body
        etag = whole.headers["etag"]
        stale = client.get(path, headers={"Range": "bytes=0-9", "If-Range": '"another"'})
        assert stale.status_code == 200 and stale.content == body
        fresh = client.get(path, headers={"Range": "bytes=0-9", "If-Range": etag})
        assert fresh.status_code == 206 and fresh.content == body[:10]
        cached = client.get(path, headers={"If-None-Match": etag})
        assert cached.status_code == 304 and cached.content == b""


def test_a_virtual_file_is_restored_transparently(world: World) -> None:
    retriever = Retriever(
        world.site.catalog,
        world.site.cache,
        world.site.storage,
        world.site.settings.cache_policy,
        world.site.clock,
    )
    assert retriever.trim(to_bytes=0).evicted == 12
    record = world.record(world.after[2].archive_id or "")
    assert record.virtual and record.cache_path is not None
    assert not world.site.cache.path(record.cache_path).exists()
    with world.client() as client:
        part = client.get(
            f"/api/v1/files/{record.archive_id}/data", headers={"Range": "bytes=-100"}
        )
        assert part.status_code == 206
        whole = client.get(f"/api/v1/files/{record.archive_id}/data")
        assert hashlib.sha256(whole.content).hexdigest() == record.sha256
        assert whole.content[-100:] == part.content
        assert client.get(f"/api/v1/files/{record.archive_id}").json()["virtual"] is False
    assert not world.record(record.archive_id or "").virtual


# ------------------------------------------------------------------ runs and provenance


def make_run(world: World, inputs: list[FileRecord], output: FileRecord, *, failed: bool) -> int:
    """A finished run of a pipeline over ``inputs`` that made ``output``, with one step
    and a log in the site's logs: setup written into the catalog as the controller
    would leave it."""
    store = RunStore(world.site.catalog)
    now = world.site.clock()
    night = inputs[0].night
    run_id = store.create(
        NewRun(
            pipeline="ofcam_masterbias",
            group_key=GroupKey.of("ofcam_masterbias", {"night": str(night)}),
            night=night,
            inputs={"bias": tuple(r.id for r in inputs)},
            reason="test",
        ),
        now,
    )
    assert run_id is not None
    log = world.site.settings.logs / "runs" / f"{run_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"run {run_id} started\nstep combine: exit 3\n")
    state = RunState.FAILED if failed else RunState.SUCCEEDED
    with world.site.catalog.write() as conn:
        conn.execute(
            update(schema.runs)
            .where(schema.runs.c.id == run_id)
            .values(
                state=state.value,
                attempts=1,
                started_at=now,
                finished_at=now,
                error="boom" if failed else None,
                profile="steps: []\n",
                work_dir=str(world.site.settings.work / str(run_id)),
                log_path=str(log),
            )
        )
        conn.execute(
            insert(schema.run_steps).values(
                run_id=run_id,
                step="combine",
                position=0,
                state=StepState.FAILED.value if failed else StepState.SUCCEEDED.value,
                attempts=1,
                argv=json.dumps(["combine", "--bias"]),
                started_at=now,
                finished_at=now,
                exit_status=3 if failed else 0,
            )
        )
        conn.execute(
            update(schema.files).where(schema.files.c.id == output.id).values(made_by_run=run_id)
        )
    return run_id


def test_provenance_runs_logs_and_retry(world: World) -> None:
    public_run = make_run(world, world.after[:2], world.after[3], failed=True)
    secret_run = make_run(world, world.before[:2], world.before[3], failed=True)
    # a run's inputs are listed in observation order (then name), whatever order they came in
    observed = sorted(world.after[:2], key=lambda r: (r.start is None, r.start, r.original_name))
    inputs = [r.archive_id for r in observed]
    with world.client() as anonymous:
        made = anonymous.get(f"/api/v1/files/{world.after[3].archive_id}").json()["made_by"]
        assert made == {
            "run_id": public_run,
            "pipeline": "ofcam_masterbias",
            "version": 1,
            "state": "failed",
            "inputs": {"bias": inputs},
        }
        events = [e["event"] for e in anonymous.get(f"/api/v1/files/{inputs[0]}").json()["ledger"]]
        assert events[0] == "acquired" and "archived" in events
        runs = walk(anonymous, "/api/v1/runs")
        assert [r["run_id"] for r in runs] == [public_run, secret_run]
        assert runs[0]["outputs"] == [world.after[3].archive_id]
        assert runs[1]["proprietary"] is True and "group" not in runs[1]
        assert walk(anonymous, "/api/v1/runs", state="succeeded") == []
        shown = anonymous.get(f"/api/v1/runs/{public_run}").json()
        assert shown["log"] == f"run {public_run} started\nstep combine: exit 3\n"
        assert shown["error"] == "boom" and "log_path" not in shown
        hidden = anonymous.get(f"/api/v1/runs/{secret_run}").json()
        assert hidden["proprietary"] is True
        assert not {"log", "group", "error", "profile", "steps"} & set(hidden)
        is_problem(anonymous.get("/api/v1/runs/424242"), 404)
        is_problem(anonymous.get("/api/v1/runs/0"), 422)
        is_problem(anonymous.post(f"/api/v1/runs/{public_run}/retry"), 401)
    with world.client("own") as own:
        assert own.get(f"/api/v1/runs/{secret_run}").json()["log"].startswith("run ")
        is_problem(own.post(f"/api/v1/runs/{public_run}/retry"), 403)  # read scope
    with world.client("admin") as admin:
        assert admin.get(f"/api/v1/runs/{public_run}").json()["log_path"].endswith(".log")
    with world.client("writer_b") as writer_b:
        is_problem(writer_b.post(f"/api/v1/runs/{secret_run}/retry"), 403)  # A's files
    with world.client("writer") as writer:
        retried = writer.post(f"/api/v1/runs/{public_run}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json()["state"] == "queued"
        is_problem(writer.post(f"/api/v1/runs/{public_run}/retry"), 409)
        is_problem(writer.post("/api/v1/runs/424242/retry"), 404)
    run = RunStore(world.site.catalog).get(public_run)
    assert run is not None and run.state is RunState.QUEUED


# ------------------------------------------------------------------ tags, errors


def test_tags_need_write_scope_and_a_readable_file(world: World) -> None:
    mine, theirs = world.before[0].archive_id, world.other[0].archive_id
    with world.client() as anonymous:
        is_problem(anonymous.put(f"/api/v1/files/{mine}/tags/best"), 401)
        assert anonymous.get(f"/api/v1/files/{theirs}/tags").json()["tags"] == ["raw"]
    with world.client("own") as reader:
        assert is_problem(reader.put(f"/api/v1/files/{mine}/tags/best"), 403)["detail"]
    with world.client("writer") as writer:
        added = writer.put(f"/api/v1/files/{mine}/tags/best")
        assert added.status_code == 200 and added.json()["tags"] == ["best", "raw"]
        assert writer.put(f"/api/v1/files/{mine}/tags/best").json()["tags"] == ["best", "raw"]
        is_problem(writer.put(f"/api/v1/files/{theirs}/tags/best"), 403)  # B's, proprietary
        is_problem(writer.put(f"/api/v1/files/{mine}/tags/no%20spaces"), 422)
        is_problem(writer.put("/api/v1/files/OF.nothing.fits/tags/best"), 404)
        assert writer.get("/api/v1/tags").json() == [
            {"tag": "best", "files": 1},
            {"tag": "raw", "files": 12},
        ]
        tagged = walk(writer, "/api/v1/files", tag="best")
        assert [i["archive_id"] for i in tagged] == [mine]
        assert writer.delete(f"/api/v1/files/{mine}/tags/best").json()["tags"] == ["raw"]
        is_problem(writer.delete(f"/api/v1/files/{mine}/tags/best"), 404)


def test_errors_are_problem_details(world: World) -> None:
    with world.client() as client:
        assert is_problem(client.get("/nowhere"), 404)["instance"] == "/nowhere"
        is_problem(client.delete("/api/v1/files"), 405)
        is_problem(client.get("/api/v1/files/OF.nothing.fits"), 404)
        is_problem(client.get("/api/v1/files/OF.nothing.fits/data"), 404)
        bad = client.get("/api/v1/files", headers={"Authorization": "Bearer obf_" + "x" * 43})
        assert "invalid_token" in is_problem(bad, 401)["type"] + bad.headers["www-authenticate"]
        is_problem(client.get("/api/v1/files", headers={"Authorization": "Basic dTpw"}), 401)
        is_problem(client.get("/api/v1/status", params={"stuck_after": -1}), 422)
    revoked = TokenStore(world.site.catalog)
    secret, who = revoked.create("eve", Scope.READ, [], world.site.clock())
    assert who.token_id is not None
    revoked.revoke(who.token_id, world.site.clock())
    with httpx.Client(base_url=world.url, headers={"Authorization": f"Bearer {secret}"}) as eve:
        is_problem(eve.get("/api/v1/files"), 401)


# ------------------------------------------------------------------ status, metrics


def test_status_health_and_metrics(world: World) -> None:
    with world.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        status = client.get("/api/v1/status").json()
        assert status["files"]["archived"] == 12 and status["queue_depth"] == 0
        assert status["latency"]["total"]["count"] == 12
        assert status["latency"]["levels"]["L0"]["count"] == 12  # the world's raw frames
        assert status["runs"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0}
        assert status["stuck_total"] == 0
        text = client.get("/metrics")
        assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
        metrics = parse_metrics(text.text)
        assert metrics['obsflow_files{state="archived"}'] == 12
        assert metrics["obsflow_ingest_queue_depth"] == 0
        assert metrics['obsflow_runs{state="failed"}'] == 0
        assert metrics['obsflow_latency_seconds_count{stage="acquired_to_archived"}'] == 12
        assert metrics['obsflow_latency_seconds_count{stage="cached_to_archived"}'] == 12
        again = parse_metrics(client.get("/metrics").text)  # observed once per file
        assert again['obsflow_latency_seconds_count{stage="acquired_to_archived"}'] == 12
        key = 'obsflow_api_requests_total{method="GET",route="/api/v1/status",status="200"}'
        assert again[key] == 1


def parse_metrics(text: str) -> dict[str, float]:
    return {
        name: float(value)
        for line in text.splitlines()
        if line and not line.startswith("#")
        for name, value in [line.rsplit(" ", 1)]
    }


# ------------------------------------------------------------------ the OpenAPI document


@pytest.fixture
def hypothesis_home(tmp_path: Path) -> Iterator[None]:
    """Hypothesis keeps its caches here, not in the work tree's ``.hypothesis``."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    set_hypothesis_home_dir(None)


@pytest.mark.usefixtures("hypothesis_home")
def test_the_openapi_document_holds_and_nothing_errs(world: World) -> None:
    """Schemathesis: for every operation, cases from the document, valid and not, sent
    as admin; every answer must conform to the document, and none be a server error."""
    api = schemathesis.openapi.from_url(world.url + OPENAPI_URL)
    token = {"Authorization": f"Bearer {world.tokens['admin']}"}
    checked: list[str] = []
    for result in api.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        takes = [*operation.path_parameters, *operation.query]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 2 if takes else 1]:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Case[Any]) -> None:
                for framing in ("content-length", "transfer-encoding", "host"):
                    # the HTTP client's to set, not the API's: garbage there is an invalid
                    # HTTP message, refused by the server's HTTP layer before the API
                    for name in [h for h in case.headers or {} if h.lower() == framing]:
                        del case.headers[name]
                response = case.call(base_url=world.url, headers=token)
                assert response.status_code < 500, case.as_curl_command()
                # an upload and a reduction are valid by their content too (a name the
                # registry knows, bytes whose sha256 is the one given, a pipeline and frames
                # that exist), which no schema can say
                excluded = [positive_data_acceptance] if by_content(case.path) else []
                case.validate_response(response, headers=token, excluded_checks=excluded)

            check()
        checked.append(operation.label)
    assert len(checked) == 30, checked


def test_the_document_is_served(world: World) -> None:
    with world.client() as client:
        doc = client.get(OPENAPI_URL).json()
    paths = set(doc["paths"])
    wanted = ["/api/v1/files", "/api/v1/files/{archive_id}/data", "/api/v1/runs/{run_id}/retry"]
    assert {*wanted, "/api/v1/status", "/healthz", "/metrics"} <= paths
    assert doc["components"]["schemas"]["Problem"]["required"] == ["title", "status"]
    text = json.dumps(doc)
    assert not any(f'"{word}":' in text for word in ("ge", "le", "gt", "lt"))  # not JSON Schema


# ------------------------------------------------------------------ obsflow serve


def test_obsflow_serve_runs_and_stops_on_sigterm(make_site: SiteFactory) -> None:
    root = make_site().site
    with subprocess.Popen(
        [*SERVE, "--site", str(root), "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stderr is not None
            line = server.stderr.readline()
            url = line.split("the API on ")[1].split("/api/v1")[0]
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server never answered"
                    time.sleep(0.05)
            assert httpx.get(url + "/api/v1/files").json() == {"items": [], "next": None}
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0
            assert "stopped cleanly" in server.stderr.read()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()


def test_a_port_in_use_is_refused_at_once(world: World) -> None:
    port = int(world.url.rsplit(":", 1)[1])
    with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
        ApiServer(world.site, "127.0.0.1", port)
    with pytest.raises(ListenError, match="expected HOST:PORT"):
        parse_listen("8000")
    assert parse_listen("[::1]:8000") == ("::1", 8000)


def test_obsflow_serve_says_why_it_cannot_listen(make_site: SiteFactory) -> None:
    root = make_site().site
    for listen, message in (("nonsense", "expected HOST:PORT"), ("127.0.0.1:99999", "HOST:PORT")):
        done = subprocess.run(
            [*SERVE, "--site", str(root), "--listen", listen],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert message in done.stderr


def test_an_unknown_query_parameter_is_refused_not_ignored(world: World) -> None:
    """A misspelt filter would otherwise answer with every file, as if it matched."""
    with world.client("admin") as client:
        body = is_problem(client.get("/api/v1/files", params={"prodcut": "ofcam_raw"}), 422)
        assert "'prodcut'" in body["detail"] and "did you mean 'product'" in body["detail"]
        assert body["type"].endswith("unknown-parameter")
        is_problem(client.get("/api/v1/runs", params={"pipline": "x"}), 422)
        is_problem(client.get("/api/v1/status", params={"verbose": "1"}), 422)
        assert client.get("/api/v1/files", params={"product": "ofcam_raw"}).status_code == 200
        assert client.get("/api/v1/status").status_code == 200


def test_search_by_filter_type_exposure_and_cone(world: World) -> None:
    every = world.before + world.after + world.other
    with world.client("admin") as admin:
        flats = walk(admin, "/api/v1/files", frame_type="FLAT")
        assert flats and {f["archive_id"] for f in flats} == {
            r.archive_id for r in every if r.frame_type == "FLAT"
        }
        band = flats[0]["filter"]
        assert {f["archive_id"] for f in walk(admin, "/api/v1/files", filter=band)} == {
            r.archive_id for r in every if r.filter == band
        }
        low = sorted({r.exptime for r in every if r.exptime is not None})[1]
        longer = walk(admin, "/api/v1/files", exptime_min=low)
        assert {f["archive_id"] for f in longer} == {
            r.archive_id for r in every if r.exptime is not None and r.exptime >= low
        }
        centre = next(r for r in every if r.ra is not None)
        cone = {"cone": f"{centre.ra:.9f},{centre.dec:.9f},0.0003"}
        assert centre.archive_id in {f["archive_id"] for f in walk(admin, "/api/v1/files", **cone)}
        far = {"cone": f"{((centre.ra or 0) + 180) % 360:.6f},{-(centre.dec or 0):.6f},10"}
        assert walk(admin, "/api/v1/files", **far) == []
        for bad in ("10,5", "10,95,1", "400,5,1", "10,5,-1", "a,b,c"):
            body = is_problem(admin.get("/api/v1/files", params={"cone": bad}), 422)
            assert "cone" in body["detail"], bad
    with (
        world.client() as anonymous
    ):  # a position is withheld: a cone matches only what one may read
        wide = {"cone": f"{centre.ra:.9f},{centre.dec:.9f},5"}
        seen = {f["archive_id"] for f in walk(anonymous, "/api/v1/files", **wide)}
        assert seen and seen <= {r.archive_id for r in world.after}


def test_the_interactive_docs_need_no_outside_host(world: World) -> None:
    """Observatory networks are often offline: the docs page and every asset it loads
    come from obsflow itself."""
    with world.client() as client:
        page = client.get("/api/v1/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        html = page.text
        assert "SwaggerUIBundle" in html and "/api/v1/openapi.json" in html
        hosts = re.findall(r"\b(?:https?:)?//([A-Za-z0-9.-]+)", html)
        assert hosts == [], hosts  # no URL names a host: every one is this server's path
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert len(assets) >= 3, assets  # the bundle, its CSS, the icon
        for asset in assets:
            assert asset.startswith("/api/v1/"), asset
            fetched = client.get(asset)
            assert fetched.status_code == 200 and len(fetched.content) > 100, asset
        script = next(a for a in assets if a.endswith(".js"))
        assert "SwaggerUIBundle" in client.get(script).text


def by_content(path: str) -> bool:
    """Operations whose requests are valid by what the site holds, which no schema says
    (an upload's name and sha256; a reduction's pipeline, frames and parameters)."""
    return "/transfers/" in path or path.rstrip("/").endswith("/reductions")

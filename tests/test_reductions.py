"""On-demand reductions through the real API server and a real local executor: the plan
reuses what the archive holds and runs only what is missing, parameters are checked
against the registry, the proprietary rule holds, identical requests share their runs,
results are the user's (not archive products), quotas, abort and expiry.

The registry is the example instrument with toy pipelines whose steps are real
subprocesses (``tests/tools/stack.py``); the master bias and flat wait for a deadline
hours away, so that a reduction finds them missing ("cold") until it makes them.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from obsflow.access import Scope, TokenStore
from obsflow.api import ApiServer
from obsflow.catalog import schema
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.catalog.runs import RunStore
from obsflow.processing.executor import LocalExecutor
from obsflow.processing.reductions import Reductions
from obsflow.processing.tracker import Tracker
from obsflow.processing.tracker.loop import TrackerLoop, process_until_idle
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import ReductionPhase, RunState
from tests.conftest import SiteFactory

STACK = Path(__file__).parent / "tools" / "stack.py"

PIPELINES = f"""
pipelines:
  - id: toy_bias
    profile: stack_bias
    inputs:
      - {{product: ofcam_raw, name: biases, where: "frame_type == 'BIAS'", min: 1}}
    group: {{by: [night]}}
    kickoff: {{rule: deadline, deadline: last_input, after_minutes: 600}}
    outputs:
      - {{product: ofcam_masterbias, name: "ofc_{{nightid}}_mbias.fits"}}
  - id: toy_flat
    profile: stack_flat
    inputs:
      - {{product: ofcam_raw, name: flats, where: "frame_type == 'FLAT'", min: 1}}
      - {{product: ofcam_masterbias, name: bias, max: 1}}
    group: {{by: [night, filter]}}
    kickoff: {{rule: deadline, deadline: last_input, after_minutes: 600}}
    outputs:
      - {{product: ofcam_masterflat, name: "ofc_{{nightid}}_mflat_{{filter}}.fits"}}
  - id: toy_calibrate
    profile: calibrate
    inputs:
      - {{product: ofcam_raw, name: frame, where: "frame_type == 'OBJECT'", max: 1}}
      - {{product: ofcam_masterflat, name: flat, where: "filter == group.filter", max: 1}}
    group: {{by: [file]}}
    outputs:
      - {{product: ofcam_calibrated, name: "ofc_{{date}}_{{frame}}_cal.fits"}}
  - id: toy_sources
    profile: sources
    inputs:
      - {{product: ofcam_calibrated, name: frame, max: 1}}
    group: {{by: [file]}}
    parameters:
      label: {{default: SOURCES, choices: [SOURCES, CATALOG]}}
      pause: {{default: 0.0, min: 0, max: 60}}
    outputs:
      - {{product: ofcam_sources, name: "ofc_{{date}}_{{frame}}_src.fits"}}
  - id: toy_private
    profile: private
    on_demand: false
    inputs:
      - {{product: ofcam_calibrated, name: frame, max: 1}}
    group: {{by: [file]}}
profiles:
  - id: stack_bias
    steps:
      - name: stack
        command: ["{{python}}", "{STACK}", --imagetyp, MASTERBIAS,
                  --out, "{{outputs.ofcam_masterbias}}", "{{inputs.biases}}"]
  - id: stack_flat
    steps:
      - name: stack
        command: ["{{python}}", "{STACK}", --imagetyp, MASTERFLAT,
                  --out, "{{outputs.ofcam_masterflat}}", "{{inputs.flats}}"]
  - id: calibrate
    steps:
      - name: calibrate
        command: ["{{python}}", "{STACK}", --imagetyp, OBJECT,
                  --out, "{{outputs.ofcam_calibrated}}", "{{inputs.frame}}", "{{inputs.flat}}"]
  - id: private
    steps:
      - name: nothing
        command: [sh, -c, "true"]
  - id: sources
    steps:
      - name: wait
        command: [sh, -c, 'echo $$ > "{{site}}/step-{{label}}-{{pause}}.pid"; sleep {{pause}}']
      - name: detect
        needs: [wait]
        command: ["{{python}}", "{STACK}", --imagetyp, "{{label}}",
                  --out, "{{outputs.ofcam_sources}}", "{{inputs.frame}}"]
"""


@dataclass
class World:
    site: Site
    url: str
    tokens: dict[str, str]
    science: list[FileRecord]
    """OBJECT frames of program A (proprietary for a year yet)."""
    foreign: list[FileRecord]
    """OBJECT frames of program B."""

    def client(self, role: str = "anonymous") -> httpx.Client:
        token = self.tokens.get(role)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def process(self, site: Site | None = None) -> None:
        """Track, execute and archive until no reduction is unfinished and no run is
        queued or running (the groups' deadlines, hours away, are not waited for)."""
        site = site or self.site
        store = Reductions(site).store
        executor = LocalExecutor(site)
        try:
            assert process_until_idle(
                site, executor, timeout=90, until=lambda: not store.unfinished()
            ), "reductions still unfinished after 90 s"
        finally:
            executor.close()


def make_world(make_site: SiteFactory, frames: list[Path], **settings: Any) -> Iterator[World]:
    processing = {"lease_seconds": 3, **settings.pop("processing", {})}
    config = make_site(processing=processing, **settings)
    (config.registry / "ofcam_pipelines.yaml").write_text(PIPELINES)
    site = open_site(config)
    ingest_paths(site, frames)
    Tracker(site.registry, site.catalog, site.clock).drain()  # groups open, waiting
    records = sorted(site.catalog.find(FileQuery(product="ofcam_raw")), key=lambda r: r.id)
    objects = [r for r in records if r.frame_type == "OBJECT"]
    assert len(objects) >= 3, [r.frame_type for r in records]
    now = site.clock()
    with site.catalog.write() as conn:  # setup: every frame program A's, one of B's
        conn.execute(
            update(schema.files).values(program="A", proprietary_until=now + timedelta(days=365))
        )
        conn.execute(
            update(schema.files).where(schema.files.c.id == objects[-1].id).values(program="B")
        )
    store = TokenStore(site.catalog)
    tokens = {
        role: store.create(user, scope, programs, now)[0]
        for role, user, scope, programs in (
            ("alice", "alice", Scope.READ, ["A"]),
            ("amy", "amy", Scope.READ, ["A"]),
            ("bob", "bob", Scope.READ, ["B"]),
            ("admin", "root", Scope.ADMIN, []),
        )
    }
    fresh = site.catalog.records([r.id for r in objects])
    server = ApiServer(site).start()
    try:
        yield World(site, server.url, tokens, fresh[:-1], fresh[-1:])
    finally:
        server.stop()
        site.close()


@pytest.fixture
def world(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    yield from make_world(make_site, frames)


def ask(client: httpx.Client, inputs: Any, **parameters: Any) -> httpx.Response:
    body = {"pipeline": "toy_sources", "inputs": inputs, "parameters": parameters}
    return client.post("/api/v1/reductions", json=body)


def wait_for(client: httpx.Client, location: str, world: World) -> dict[str, Any]:
    world.process()
    body: dict[str, Any] = client.get(location).json()
    return body


def same(these: list[dict[str, Any]], those: list[dict[str, Any]]) -> bool:
    """The same results (each reduction has its own URLs for them)."""

    def files(results: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
        return {(r["name"], r["sha256"], r["size"]) for r in results}

    return files(these) == files(those)


def problem(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    detail: str = response.json()["detail"]
    return detail


# ------------------------------------------------------------------ asking


def test_a_request_is_checked_against_the_registry_and_the_proprietary_rule(
    world: World,
) -> None:
    frame = world.science[0].archive_id
    with world.client("alice") as alice, world.client() as anonymous:
        problem(ask(anonymous, [frame]), 401)
        detail = problem(ask(alice, [frame], threshold=3), 422)
        assert "threshold" in detail and "label" in detail and "pause" in detail
        assert "maximum 60" in problem(ask(alice, [frame], pause=1000), 422)
        assert "not a number" in problem(ask(alice, [frame], pause="soon"), 422)
        assert "'SOURCES', 'CATALOG'" in problem(ask(alice, [frame], label="X"), 422)
        body = {"pipeline": "toy_nope", "inputs": [frame]}
        assert "toy_sources" in problem(alice.post("/api/v1/reductions", json=body), 422)
        body = {"pipeline": "toy_private", "inputs": [frame]}
        assert "on_demand" in problem(alice.post("/api/v1/reductions", json=body), 403)
        assert "OF.nope" in problem(ask(alice, ["OF.nope"]), 404)
        foreign = world.foreign[0].archive_id
        assert str(foreign) in problem(ask(alice, [foreign]), 403)
        bias = world.site.catalog.find(FileQuery(product="ofcam_raw", object=None))
        bias_id = next(r.archive_id for r in bias if r.frame_type == "BIAS")
        assert "is not an input" in problem(ask(alice, [bias_id]), 422)
    assert not RunStore(world.site.catalog).find(), "a refused request queued a run"


def test_a_dry_run_plans_the_missing_calibrations_and_creates_nothing(world: World) -> None:
    frame = world.science[0].archive_id
    with world.client("alice") as alice:
        response = alice.post(
            "/api/v1/reductions?dry_run=true", json={"pipeline": "toy_sources", "inputs": [frame]}
        )
    assert response.status_code == 200, response.text
    plan = response.json()["plan"]
    by = {(a["pipeline"], a["action"]) for a in plan}
    # cold: no master bias or flat yet (their deadline is hours away): the plan makes
    # them now, as the archive's own runs; calibrate and sources wait for them
    assert ("toy_bias", "run") in by and ("toy_flat", "run") in by
    assert ("toy_calibrate", "run") in by and ("toy_sources", "run") in by
    assert [a for a in plan if a["final"]] == [a for a in plan if a["pipeline"] == "toy_sources"]
    assert not RunStore(world.site.catalog).find()


# ------------------------------------------------------------------ running


def test_a_cold_reduction_makes_the_archive_products_it_lacks_and_user_results(
    world: World,
) -> None:
    frame = world.science[0]
    with world.client("alice") as alice:
        response = ask(alice, [frame.archive_id], label="CATALOG")
        assert response.status_code == 202, response.text
        location = response.headers["location"]
        assert response.json()["phase"] in ("QUEUED", "EXECUTING")
        done = wait_for(alice, location, world)
        assert done["phase"] == "COMPLETED", done
        [result] = done["results"]
        assert result["product"] == "ofcam_sources" and result["size"] > 0
        data = alice.get(result["url"])
        assert data.status_code == 200 and len(data.content) == result["size"]
        assert data.content[:6] == b"SIMPLE"
        part = alice.get(result["url"], headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == data.content[:10]
        assert part.headers["content-range"] == f"bytes 0-9/{result['size']}"
        past = alice.get(result["url"], headers={"Range": f"bytes={result['size']}-"})
        assert past.status_code == 416 and past.headers["content-range"].endswith(
            f"/{result['size']}"
        )
        stale = alice.get(result["url"], headers={"Range": "bytes=0-9", "If-Range": '"x"'})
        assert stale.status_code == 200 and stale.content == data.content  # changed: all
        # another user of the same program may not see alice's reduction (404, not 403)
        with world.client("amy") as amy:
            assert amy.get(location).status_code == 404
            assert amy.get(result["url"]).status_code == 404
    # the calibrations and the calibrated frame are the archive's products now (made
    # as the archive's own runs, which go on to the archive's own sources); the user's
    # catalogue is not a file of the archive: it supersedes nothing, starts nothing
    catalog = world.site.catalog
    for product in ("ofcam_masterbias", "ofcam_masterflat", "ofcam_calibrated"):
        assert catalog.find(FileQuery(product=product)), product
    [final] = [a["run_id"] for a in done["plan"] if a["final"]]
    archived = catalog.find(FileQuery())
    assert all(r.made_by_run != final for r in archived)
    assert result["sha256"] not in {r.sha256 for r in archived}
    assert all(r.superseded_by is None for r in archived if r.level == 2)
    runs = RunStore(catalog).find()
    assert all(r.state is RunState.SUCCEEDED for r in runs), [r.error for r in runs]
    # (the calibrated frame: made for the reduction, or by the archive's own cascade
    # first, once the master flat was there, and reused)
    mine = {a["pipeline"]: a["action"] for a in done["plan"]}
    assert mine.pop("toy_calibrate") in ("run", "reuse")
    assert mine == {"toy_bias": "run", "toy_flat": "run", "toy_sources": "run"}


def test_reuse_identical_requests_and_a_changed_parameter(world: World) -> None:
    frame = world.science[0].archive_id
    with world.client("alice") as alice, world.client("amy") as amy:
        first = ask(alice, [frame])
        assert first.status_code == 202
        done = wait_for(alice, first.headers["location"], world)
        assert done["phase"] == "COMPLETED", done
        before = len(RunStore(world.site.catalog).find())
        # identical (another user of the program): answered at once, the same results
        again = ask(amy, [frame])
        assert again.status_code == 200, again.text
        assert again.json()["phase"] == "COMPLETED"
        assert same(again.json()["results"], done["results"])
        assert len(RunStore(world.site.catalog).find()) == before
        # a downstream parameter changed: every upstream product is reused
        other = ask(alice, [frame], label="CATALOG")
        plan = other.json()["plan"]
        assert {a["pipeline"]: a["action"] for a in plan} == {
            "toy_calibrate": "reuse",
            "toy_sources": "run",
        }
        reused = next(a for a in plan if a["pipeline"] == "toy_calibrate")
        assert reused["products"] and world.site.catalog.get(reused["products"][0])
        done = wait_for(alice, other.headers["location"], world)
        assert done["phase"] == "COMPLETED"
        assert done["results"][0]["sha256"] != again.json()["results"][0]["sha256"]


def test_identical_requests_in_flight_share_one_run(world: World) -> None:
    frames = [r.archive_id for r in world.science[:2]]
    with world.client("alice") as alice, world.client("amy") as amy:
        first = ask(alice, frames, label="CATALOG")
        second = ask(amy, list(reversed(frames)), label="CATALOG")
        assert first.status_code == second.status_code == 202
        assert first.json()["plan"] == second.json()["plan"]
        world.process()
        one, two = (c.get(r.headers["location"]).json() for c, r in ((alice, first), (amy, second)))
        tar = alice.get(f"{first.headers['location']}/results.tar")
        assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
        with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive}  # type: ignore[union-attr]
        assert {n: hashlib.sha256(b).hexdigest() for n, b in members.items()} == {
            r["name"]: r["sha256"] for r in one["results"]
        }
    assert one["phase"] == two["phase"] == "COMPLETED"
    assert same(one["results"], two["results"]) and len(one["results"]) == 2
    finals = [r for r in RunStore(world.site.catalog).find() if r.request.startswith("reduction-")]
    assert len(finals) == 2  # one per frame, not per request


def test_a_failed_step_is_an_error_with_its_output(world: World) -> None:
    frame = world.science[0].archive_id
    (world.site.settings.registry / "ofcam_pipelines.yaml").write_text(
        PIPELINES.replace('--imagetyp, "{label}"', '--fail, "3", --imagetyp, "{label}"')
    )
    site = open_site(world.site.settings)  # the registry read again
    try:
        with world.client("alice") as alice:
            response = ask(alice, [frame])
            assert response.status_code == 202
        world.process(site)
        with world.client("alice") as alice:
            body = alice.get(response.headers["location"]).json()
    finally:
        site.close()
    assert body["phase"] == "ERROR", body
    assert "refusing on purpose" in body["error"] and "detect" in body["error"]
    assert body["results"] == []


@pytest.fixture
def long_lease_world(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    """The default lease (a minute): an abort must not wait for a third of it."""
    yield from make_world(make_site, frames, processing={"lease_seconds": 60})


def test_abort_kills_the_running_step(long_lease_world: World) -> None:
    world = long_lease_world
    frame = world.science[0].archive_id
    executor = LocalExecutor(world.site)
    try:
        with world.client("alice") as alice:
            response = ask(alice, [frame], pause=50)
            location = response.headers["location"]
            pid_file = world.site.settings.site / "step-SOURCES-50.0.pid"
            loop = TrackerLoop(world.site, executor)
            deadline = time.monotonic() + 60
            while not pid_file.exists() or not pid_file.read_text().strip():
                assert time.monotonic() < deadline, "the step never started"
                loop.once()
                time.sleep(0.1)
            pid = int(pid_file.read_text())
            assert alice.get(location).json()["phase"] == "EXECUTING"
            aborted = alice.post(f"{location}/abort")
            assert aborted.status_code == 200 and aborted.json()["phase"] == "ABORTED"
            deadline = time.monotonic() + 4  # lifecycle.STOP_WITHIN (2 s) and the kill
            while _alive(pid):
                assert time.monotonic() < deadline, "the aborted step lives on"
                time.sleep(0.1)
            assert alice.get(location).json()["phase"] == "ABORTED"
    finally:
        executor.close()
    runs = [r for r in RunStore(world.site.catalog).find() if r.request.startswith("reduction-")]
    assert [r.state for r in runs] == [RunState.FAILED]
    assert "aborted by alice" in (runs[0].error or "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie not reaped yet is dead too
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ quotas, expiry


KEEP = timedelta(days=1)
"""The strict world's ``reductions.keep_days``: results expire when a clock a day ahead
advances the reductions, not after a sleep that a loaded machine could outlast."""


@pytest.fixture
def strict_world(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    yield from make_world(
        make_site, frames, reductions={"max_active": 1, "max_inputs": 2, "keep_days": KEEP.days}
    )


def test_quotas_answer_429_with_retry_after(strict_world: World) -> None:
    world = strict_world
    frames = [r.archive_id for r in world.science]
    with world.client("alice") as alice, world.client("amy") as amy:
        too_many = ask(alice, frames[:3])
        assert problem(too_many, 429) and too_many.headers["retry-after"]
        assert ask(alice, frames[:1]).status_code == 202
        busy = ask(alice, frames[1:2])
        assert "max_active" in problem(busy, 429) and busy.headers["retry-after"]
        # another user is not held back by alice's request
        assert ask(amy, frames[1:2]).status_code == 202


def test_results_expire_and_a_later_request_makes_them_again(strict_world: World) -> None:
    world = strict_world
    frame = world.science[0].archive_id
    with world.client("alice") as alice:
        first = ask(alice, [frame])
        done = wait_for(alice, first.headers["location"], world)
        assert done["phase"] == "COMPLETED"
        url = done["results"][0]["url"]
        later = replace(world.site, clock=lambda: world.site.clock() + KEEP + timedelta(seconds=1))
        Reductions(later).advance()
        expired = alice.get(first.headers["location"]).json()
        assert expired["expired"] is True and expired["results"] == []
        assert alice.get(url).status_code == 404
        assert not any((world.site.settings.site / "reductions").iterdir())
        again = ask(alice, [frame])
        assert again.status_code == 202  # not answered from the expired one
        remade = wait_for(alice, again.headers["location"], world)
    assert remade["phase"] == "COMPLETED"
    assert remade["results"][0]["sha256"] == done["results"][0]["sha256"]


def test_listing_shows_only_the_callers_own_reductions(world: World) -> None:
    frame = world.science[0].archive_id
    with world.client("alice") as alice, world.client("amy") as amy:
        ask(alice, [frame])
        ask(amy, [frame], label="CATALOG")
        mine = alice.get("/api/v1/reductions", params={"mine": "true"}).json()["items"]
        assert [r["owner"] for r in mine] == ["alice"]
        assert [r["owner"] for r in alice.get("/api/v1/reductions").json()["items"]] == ["alice"]
    with world.client("admin") as admin:
        everyone = admin.get("/api/v1/reductions").json()["items"]
    assert sorted(r["owner"] for r in everyone) == ["alice", "amy"]


# ------------------------------------------------------------------ the CLI


def test_the_cli_plans_reduces_waits_and_downloads_on_a_site(world: World, tmp_path: Path) -> None:
    from tests.test_cli import as_json, obsflow

    site = world.site.settings.site
    frame = str(world.science[0].archive_id)
    ask = ("reduce", "--site", site, "--pipeline", "toy_sources", "--input", frame)
    plan = as_json(obsflow(*ask, "--param", "label=CATALOG", "--dry-run", "--json"))
    assert {a["pipeline"] for a in plan["plan"]} >= {"toy_bias", "toy_flat", "toy_sources"}
    assert plan["parameters"]["label"] == "CATALOG"
    assert not RunStore(world.site.catalog).find()
    wrong = obsflow(*ask, "--param", "pause=soon")
    assert wrong.returncode == 2 and "pause" in wrong.stderr and "not a number" in wrong.stderr
    target = tmp_path / "results"
    done = as_json(obsflow(*ask, "--param", "label=CATALOG", "--download", target, "--json"))
    assert done["phase"] == "COMPLETED", done
    [result] = done["results"]
    saved = target / result["name"]
    assert saved.stat().st_size == result["size"]
    listed = as_json(obsflow("reductions", "--site", site, "--json"))
    assert [r["reduction_id"] for r in listed] == [done["reduction_id"]]


@pytest.fixture
def one_worker(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    yield from make_world(make_site, frames, workers={"runs": 1}, reductions={"fair_share": 1})


def test_users_take_turns_and_high_priority_is_for_admins(one_worker: World) -> None:
    world = one_worker
    frames = [str(r.archive_id) for r in world.science[:3]]
    with world.client("alice") as alice, world.client("amy") as amy:
        body = {"pipeline": "toy_sources", "inputs": frames, "priority": "high"}
        assert "admin" in problem(alice.post("/api/v1/reductions", json=body), 403)
        with world.client("admin") as admin:  # the calibrations made, once
            warm = ask(admin, frames)
            assert wait_for(admin, warm.headers["location"], world)["phase"] == "COMPLETED"
        many = ask(alice, frames, pause=0.5)
        one = ask(amy, frames[:1], label="CATALOG", pause=0.5)
        assert many.status_code == one.status_code == 202
        world.process()
        assert alice.get(many.headers["location"]).json()["phase"] == "COMPLETED"
        assert amy.get(one.headers["location"]).json()["phase"] == "COMPLETED"
    finals = [r for r in RunStore(world.site.catalog).find() if r.request.startswith("reduction-")]
    alices = sorted(r.started for r in finals if r.overrides == {"pause": 0.5} and r.started)
    [amys] = [r.started for r in finals if r.overrides.get("label") == "CATALOG" and r.started]
    assert len(alices) == 3
    # first come, first served would have run alice's three first: amy's one frame
    # goes in alice's turns, before alice's last
    assert amys < alices[-1], (amys, alices)


def test_a_reduction_being_planned_is_not_followed_nor_completed(world: World) -> None:
    """The API's thread records a reduction, then plans it; the tracker loop's thread
    must not take a reduction without a plan for one with nothing left to do."""
    from obsflow.catalog.reductions import NewReduction

    reductions = Reductions(world.site)
    new = NewReduction("alice", "toy_sources", "k" * 64, {}, ["OF.x"], "normal", 0)
    reduction_id = reductions.store.create(new, world.site.clock())
    reductions.advance()
    assert reductions.refresh(reduction_id).phase is ReductionPhase.PENDING
    assert reductions.store.active("alice") == 1  # (it counts against the quota)

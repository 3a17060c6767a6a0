"""A worker with no shared storage: runs executed through a real archive server (uvicorn
on 127.0.0.1) by :class:`ServerHost`, with only the server's URL and a worker token.

The night's test runs the worker in a subprocess as another user (``nobody``) with the
site's directory closed to it (mode 700): whatever it does, it cannot read a path of
the site, so the night reaching L3 shows it never needed one. The other tests call
:class:`ServerHost` in this process, against the same kind of server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from astropy.io import fits

from obsflow.access import Scope, TokenStore
from obsflow.api import ApiServer, create_app
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.catalog.runs import RunStore
from obsflow.errors import StorageError
from obsflow.processing.executor import Executor
from obsflow.processing.lifecycle import execute_run
from obsflow.processing.plan import RunPlan
from obsflow.processing.serverhost import ServerError, ServerHost
from obsflow.processing.tracker import Tracker
from obsflow.processing.tracker.loop import process_until_idle
from obsflow.settings import Processing
from obsflow.sim.demo import AFTER
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import FileState, RunState
from tests.conftest import SiteFactory
from tests.test_processing import toy_pipelines

NOBODY = 65534
SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class Server:
    """An archive server on 127.0.0.1 with a token of each kind."""

    site: Site
    url: str
    tokens: dict[str, str]  # worker, read, write, admin

    def http(self, role: str | None = "worker") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=30)

    def host(self, root: Path, cache_bytes: int = 1 << 30) -> ServerHost:
        return ServerHost(self.url, self.tokens["worker"], root=root, cache_bytes=cache_bytes)


def _serve(site: Site) -> Iterator[Server]:
    now = site.clock()
    store = TokenStore(site.catalog)
    tokens = {
        role: store.create(role, scope, [], now)[0]
        for role, scope in (
            ("worker", Scope.WORKER),
            ("read", Scope.READ),
            ("write", Scope.WRITE),
            ("admin", Scope.ADMIN),
        )
    }
    server = ApiServer(site, app=create_app(site)).start()
    try:
        yield Server(site, server.url, tokens)
    finally:
        server.stop()
        site.close()


@pytest.fixture
def toy(make_site: SiteFactory, frames: list[Path]) -> Iterator[Server]:
    """The small night ingested at a server whose pipelines are the toy ones (L0 → L1,
    each run queued as soon as its inputs are there)."""
    settings = make_site("server", processing={"lease_seconds": 30})
    (settings.registry / "ofcam_pipelines.yaml").write_text(toy_pipelines())
    site = open_site(settings)
    assert len(ingest_paths(site, frames).ingest.archived) == len(frames)
    yield from _serve(site)


def _queued(server: Server, pipeline: str) -> list[int]:
    site = server.site
    Tracker(site.registry, site.catalog, site.clock).drain()
    runs = RunStore(site.catalog)
    return [r.id for r in runs.find(state=RunState.QUEUED) if r.pipeline == pipeline]


def _data_requests(host: ServerHost) -> list[str]:
    """The input downloads ``host`` makes from now on."""
    seen: list[str] = []

    def note(request: httpx.Request) -> None:
        if request.url.path.endswith("/data"):
            seen.append(request.url.path)

    host.http.event_hooks["request"] = [note]
    return seen


# ------------------------------------------------------------------ the night, as nobody


WORKER = """
import json, os, sys
from pathlib import Path
from obsflow.processing.lifecycle import execute_run
from obsflow.processing.serverhost import ServerHost
from obsflow.settings import Processing

server, token, root, site = sys.argv[1:5]
try:
    os.listdir(site)
    print(json.dumps({"site": "readable"}), flush=True)
except PermissionError:
    print(json.dumps({"site": "unreadable"}), flush=True)
host = ServerHost(server, token, root=Path(root), cache_bytes=1 << 30)
fetched = []
host.http.event_hooks["request"] = [
    lambda r: fetched.append(r.url.path) if r.url.path.endswith("/data") else None
]
for line in sys.stdin:
    run_id = int(line)
    before = len(fetched)
    try:
        state = execute_run(host, run_id, "nobody-worker", processing=Processing())
        out = {"run": run_id, "state": state.value if state else None}
    except Exception as exc:
        out = {"run": run_id, "state": None, "error": repr(exc)}
    out["fetched"] = fetched[before:]
    print(json.dumps(out), flush=True)
"""


def _interpreter(env: dict[str, str], user: int | None) -> tuple[list[str], dict[str, str]]:
    """A Python that ``user`` may run with obsflow importable: this one, or the system's
    of the same version with this environment's packages on its path (when this one lives
    where that user may not go, e.g. under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = sysconfig.get_paths()["purelib"]
    path = os.pathsep.join([str(SRC), packages])
    for python, extra in (
        (sys.executable, {}),
        (shutil.which(version, path="/usr/bin:/usr/local/bin") or "", {"PYTHONPATH": path}),
    ):
        if not python:
            continue
        probe = [python, "-c", "import obsflow.processing.serverhost, numpy, astropy.io.fits"]
        try:
            done = subprocess.run(
                probe, env={**env, **extra}, **_as(user),
                capture_output=True, timeout=60, cwd=env["HOME"], check=False,
            )  # fmt: skip
        except PermissionError:
            continue
        if done.returncode == 0:
            return [python], {**env, **extra}
    raise AssertionError(f"no Python that user {user} may run with obsflow importable")


def _as(user: int | None) -> dict[str, Any]:
    return {} if user is None else {"user": user, "group": user, "extra_groups": []}


class RemoteWorker(Executor):
    """An executor whose runs execute in another process, as ``user`` (None: this one),
    through the server's API only (one run at a time, in the order submitted)."""

    def __init__(self, server: Server, root: Path, user: int | None) -> None:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "LANG": "C.UTF-8"}
        python, env = _interpreter(env, user)
        self.process = subprocess.Popen(
            [*python, "-c", WORKER, server.url, server.tokens["worker"], str(root / "w"),
             str(server.site.settings.site)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root,
            **_as(user),
        )  # fmt: skip
        assert self.process.stdout is not None and self.process.stdin is not None
        self.site_access = json.loads(self.process.stdout.readline())["site"]
        self.results: list[dict[str, Any]] = []

    def submit(self, run_id: int, queue: str | None = None) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{run_id}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the worker died (exit {self.process.poll()})"
        self.results.append(json.loads(line))

    def close(self, stop: bool = False) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self.process.wait(60)

    @property
    def in_flight(self) -> int:
        return 0


@pytest.fixture
def night(make_site: SiteFactory, frames: list[Path]) -> Iterator[Server]:
    """The small night at a server with the example pipelines (L0 → L3), whose deadlines
    wait half a second of quiet rather than fifteen."""
    settings = make_site("server", pipelines=True)
    pipelines = settings.registry / "ofcam_pipelines.yaml"
    pipelines.write_text(AFTER.sub("after_minutes: 0.008", pipelines.read_text()))
    site = open_site(settings)
    assert len(ingest_paths(site, frames).ingest.archived) == len(frames)
    yield from _serve(site)


@pytest.fixture
def worker_root() -> Iterator[Path]:
    """The worker's own directory, outside the test's (which only its owner may enter)."""
    root = Path(tempfile.mkdtemp(prefix="obsflow-worker-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_a_night_reduced_l0_to_l3_by_a_worker_that_cannot_read_the_site(
    night: Server, worker_root: Path
) -> None:
    """As root (CI), the worker runs as nobody; else as this user, who owns the site
    (the night is still reduced through the server alone, less strictly shown)."""
    site = night.site
    site.settings.site.chmod(0o700)  # nobody may not even look inside
    user = NOBODY if os.geteuid() == 0 else None
    if user is not None:
        os.chown(worker_root, user, user)
    worker = RemoteWorker(night, worker_root, user)
    try:
        assert worker.site_access == ("unreadable" if user is not None else "readable")
        assert process_until_idle(site, worker, timeout=600)
    finally:
        worker.close()
    runs = RunStore(site.catalog).find()
    assert runs and all(r.state is RunState.SUCCEEDED for r in runs), [
        (r.id, r.pipeline, r.error) for r in runs
    ]
    assert [r for r in worker.results if r["state"] != "succeeded"] == []
    files = site.catalog.find(FileQuery())
    assert {f.level for f in files if f.state is FileState.ARCHIVED} == {0, 1, 2, 3}
    made = [f for f in files if (f.level or 0) > 0]
    assert made and all(f.made_by_run is not None for f in made)
    # each input crossed the network once: a night's master bias, flats and every
    # other input are fetched by their first run, then found in the worker's cache
    fetched = [path for r in worker.results for path in r["fetched"]]
    assert len(fetched) == len(set(fetched))
    inputs = {i for r in runs for ids in r.inputs.values() for i in ids}
    assert len(fetched) == len(inputs) < sum(len(ids) for r in runs for ids in r.inputs.values())
    # the run's log came back to the server, beside the site's own runs' logs
    with night.http("admin") as http:
        shown = http.get(f"/runs/{runs[0].id}").json()
    assert shown["log_path"] == str(site.settings.logs / "runs" / f"run-{runs[0].id}.log")
    assert f"==== run {runs[0].id}" in shown["log"]
    assert "the log of worker nobody-worker/t" in shown["log"]
    # the worker wrote nothing in the site (it could not have), and all of its own
    owned = [p for p in site.settings.site.rglob("*") if p.stat().st_uid == NOBODY]
    assert owned == []


# ------------------------------------------------------------------ one run, in process


def test_a_run_executes_through_the_server_and_its_outputs_come_back_with_provenance(
    toy: Server, tmp_path: Path
) -> None:
    (run_id,) = _queued(toy, "toy_bias")
    with toy.host(tmp_path / "worker") as host:
        state = execute_run(host, run_id, "w1", processing=Processing())
    assert state is RunState.SUCCEEDED
    run = RunStore(toy.site.catalog).get(run_id)
    assert run is not None and run.state is RunState.SUCCEEDED
    (made,) = toy.site.catalog.find(FileQuery(product="ofcam_masterbias"))
    assert made.made_by_run == run_id and made.original_name == "ofc_20261121_mbias.fits"
    steps = RunStore(toy.site.catalog).steps(run_id)
    assert [(s.step, s.exit_status) for s in steps] == [("stack", 0)]
    log = (toy.site.settings.logs / "runs" / f"run-{run_id}.log").read_text()
    assert "stack: wrote" in log  # the step's output, from the worker's log
    assert run.log_path == str(toy.site.settings.logs / "runs" / f"run-{run_id}.log")
    # nothing left staged at the server, nor held or staged at the worker
    assert not (toy.site.settings.cache / ".uploads" / "runs" / f"run-{run_id}").exists()
    assert not (tmp_path / "worker" / "staged" / f"run-{run_id}").exists()


def _claim(host: ServerHost, run_id: int, owner: str) -> RunPlan:
    claim = host.claim(run_id, owner)
    assert claim is not None and claim.plan is not None
    return claim.plan


def test_a_second_run_with_the_same_calibration_fetches_nothing_again(
    toy: Server, tmp_path: Path
) -> None:
    (bias,) = _queued(toy, "toy_bias")
    with toy.host(tmp_path / "worker") as host:
        assert execute_run(host, bias, "w1", processing=Processing()) is RunState.SUCCEEDED
        flats = sorted(_queued(toy, "toy_flat"))
        assert len(flats) == 3  # one per filter, each with the night's master bias
        fetched = _data_requests(host)
        for run_id in flats:
            assert execute_run(host, run_id, "w1", processing=Processing()) is (RunState.SUCCEEDED)
    (master,) = toy.site.catalog.find(FileQuery(product="ofcam_masterbias"))
    assert fetched.count(f"/api/v1/files/{master.archive_id}/data") == 1
    assert len(fetched) == 3 + 1  # each run's flat, and the master bias once


def test_an_input_whose_bytes_do_not_match_the_catalog_is_refused(
    toy: Server, tmp_path: Path
) -> None:
    (run_id,) = _queued(toy, "toy_bias")
    run = RunStore(toy.site.catalog).get(run_id)
    assert run is not None
    (first, *_) = toy.site.catalog.records([i for ids in run.inputs.values() for i in ids])
    cached = toy.site.cache.path(first.cache_path or "")
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF  # one bit of rot in the server's cache
    cached.chmod(0o644)
    cached.write_bytes(bytes(data))
    with toy.host(tmp_path / "worker") as host:
        plan = _claim(host, run_id, "w1")
        with pytest.raises(StorageError, match=re.escape(first.archive_id or "?")) as caught:
            host.stage(plan)
        assert "sha256" in str(caught.value) and first.original_name in str(caught.value)
        assert host.inputs.hold(first.sha256) is None  # nothing of it kept
        host.release(run_id, "w1", [])
        assert execute_run(host, run_id, "w1", processing=Processing()) is RunState.FAILED
    failed = RunStore(toy.site.catalog).get(run_id)
    assert failed is not None and (first.archive_id or "?") in (failed.error or "")


# ------------------------------------------------------------------ who may


def test_only_a_worker_token_may_work_and_a_worker_may_do_nothing_else(toy: Server) -> None:
    (run_id,) = _queued(toy, "toy_bias")
    body = {"owner": "w1"}
    for role in ("read", "write"):
        with toy.http(role) as http:
            refused = http.post(f"/runs/{run_id}/claim", json=body)
            assert refused.status_code == 403, refused.text
            assert "needs worker" in refused.json()["detail"]
    with toy.http(None) as http:
        assert http.post(f"/runs/{run_id}/claim", json=body).status_code == 401
    records = toy.site.catalog.find(FileQuery())
    private = next(r for r in records if r.proprietary_until and r.program)
    with toy.http("read") as http:  # a reader of no program: not a proprietary file
        assert http.get(f"/files/{private.archive_id}/data").status_code == 403
    with toy.http("worker") as http:
        data = http.get(f"/files/{private.archive_id}/data")
        assert data.status_code == 200  # a worker reduces proprietary frames
        assert hashlib.sha256(data.content).hexdigest() == private.sha256
        shown = http.get(f"/files/{private.archive_id}").json()
        assert "cache_path" not in shown and "source_path" not in shown  # no paths
        tagged = http.put(f"/files/{private.archive_id}/tags/good")
        assert tagged.status_code == 403, tagged.text
        assert http.post(f"/runs/{run_id}/retry").status_code == 403
        assert http.get("/transfers/X", params={"sha256": "0" * 64}).status_code == 403
        claimed = http.post(f"/runs/{run_id}/claim", json=body)
        assert claimed.status_code == 200, claimed.text
        assert claimed.json()["lease_seconds"] == 30
        assert http.post(f"/runs/{run_id}/claim", json=body).json()["type"].endswith("taken")
    with toy.http("admin") as http:  # admin may do everything a worker may
        assert http.post(f"/runs/{run_id}/lease", json=body).status_code == 409  # not its lease


def test_a_worker_that_lost_its_lease_cannot_publish(toy: Server, tmp_path: Path) -> None:
    (run_id,) = _queued(toy, "toy_bias")
    runs = RunStore(toy.site.catalog)
    output = tmp_path / "ofc_20261121_mbias.fits"
    with toy.host(tmp_path / "worker") as host:
        _claim(host, run_id, "slow")
        _an_output(toy, output)
        # its lease expires; the daemon queues the run again; another worker takes it
        later = toy.site.clock() + timedelta(hours=1)
        assert runs.recover(later, max_attempts=5) == ([run_id], [])
        assert runs.claim(run_id, "other", later, 3600) is not None
        with pytest.raises(ServerError, match="no longer holds its lease"):
            host.publish(run_id, "slow", {"ofcam_masterbias": output})
        assert host.renew(run_id, "slow") is False
        assert host.finish(run_id, "slow", RunState.SUCCEEDED, None, []) is False
    with toy.http() as http:
        sha = hashlib.sha256(output.read_bytes()).hexdigest()
        put = http.put(
            f"/runs/{run_id}/outputs/{output.name}",
            content=output.read_bytes(),
            headers=_upload_headers("slow", sha, output.stat().st_size),
        )
        assert put.status_code == 409 and put.json()["type"].endswith("lease-lost")
        published = http.post(
            f"/runs/{run_id}/publish",
            json={
                "owner": "slow",
                "outputs": [{"product": "ofcam_masterbias", "name": output.name, "sha256": sha}],
            },
        )
        assert published.status_code == 409
    assert runs.outputs(run_id) == []
    assert toy.site.catalog.find(FileQuery(product="ofcam_masterbias")) == []
    run = runs.get(run_id)
    assert run is not None and run.state is RunState.RUNNING  # the other worker's


def test_an_output_is_a_name_the_run_makes_never_a_path(toy: Server, tmp_path: Path) -> None:
    (run_id,) = _queued(toy, "toy_bias")
    with toy.host(tmp_path / "worker") as host:
        _claim(host, run_id, "w1")
    data = b"SIMPLE  =                    T" + b" " * 50
    sha = hashlib.sha256(data).hexdigest()
    headers = _upload_headers("w1", sha, len(data))
    staging = toy.site.settings.cache / ".uploads" / "runs"
    with toy.http() as http:
        for name, status in (
            ("..fits", 422),
            (".hidden.fits", 422),
            ("%2E%2E", 422),
            ("..%2F..%2Fobsflow.yaml", 404),  # a slash is no name: no such route
            ("a/b.fits", 404),
            ("ofc_20261122_0001.fits", 422),  # a raw frame: not what this run makes
            ("notes.txt", 422),  # no product at all
        ):
            put = http.put(f"/runs/{run_id}/outputs/{name}", content=data, headers=headers)
            assert put.status_code == status, (name, put.text)
        too_big = {**headers, "Upload-Length": str(1 << 41)}
        assert (
            http.put(
                f"/runs/{run_id}/outputs/ofc_20261121_mbias.fits", content=data, headers=too_big
            ).status_code
            == 422
        )
        liar = {**headers, "Upload-Length": "10"}  # a body longer than it said
        put = http.put(
            f"/runs/{run_id}/outputs/ofc_20261121_mbias.fits", content=data, headers=liar
        )
        assert put.status_code == 413
        bad_owner = http.post(f"/runs/{run_id}/lease", json={"owner": "../w1"})
        assert bad_owner.status_code == 422
        steps = http.post(
            f"/runs/{run_id}/steps",
            json={"owner": "w1", "steps": [_step("deploy")]},
        )
        assert steps.status_code == 422 and "no step" in steps.json()["detail"]
    leftovers = [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
    assert leftovers == []
    assert not (toy.site.settings.site / "obsflow.yaml.part").exists()


def test_an_interrupted_output_upload_resumes_and_publishing_twice_is_harmless(
    toy: Server, tmp_path: Path
) -> None:
    (run_id,) = _queued(toy, "toy_bias")
    output = tmp_path / "out" / "ofc_20261121_mbias.fits"
    output.parent.mkdir()
    _an_output(toy, output)
    data = output.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    with toy.host(tmp_path / "worker") as host:
        _claim(host, run_id, "w1")
        with toy.http() as http:  # the first attempt is cut halfway
            put = http.put(
                f"/runs/{run_id}/outputs/{output.name}",
                content=data[:half],
                headers=_upload_headers("w1", sha, len(data)),
            )
            assert put.json() == {
                "name": output.name,
                "product": "ofcam_masterbias",
                "state": "partial",
                "offset": half,
            }
        sent: list[tuple[str, str | None]] = []
        host.http.event_hooks["request"] = [
            lambda r: sent.append((r.method, r.headers.get("Upload-Offset")))
        ]
        host.publish(run_id, "w1", {"ofcam_masterbias": output})
        assert ("PUT", str(half)) in sent and ("PUT", "0") not in sent  # only the rest
        (made,) = toy.site.catalog.find(FileQuery(product="ofcam_masterbias"))
        assert made.sha256 == sha and made.made_by_run == run_id
        sent.clear()
        host.publish(run_id, "w1", {"ofcam_masterbias": output})  # an answer lost: again
        assert [m for m, _ in sent if m == "PUT"] == []  # the server holds it: nothing sent
        assert host.finish(run_id, "w1", RunState.SUCCEEDED, None, []) is True
    assert len(toy.site.catalog.find(FileQuery(product="ofcam_masterbias"))) == 1


# ------------------------------------------------------------------ helpers


def _an_output(server: Server, path: Path) -> Path:
    """A FITS file at ``path`` the server has not seen (a stand-in for a step's output):
    a raw frame of the server's, its pixels changed."""
    record: FileRecord = server.site.catalog.find(FileQuery(product="ofcam_raw"))[0]
    with fits.open(server.site.cache.path(record.cache_path or "")) as hdul:
        fits.PrimaryHDU(hdul[0].data + 1, hdul[0].header).writeto(path)
    return path


def _upload_headers(owner: str, sha256: str, length: int) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Obsflow-Owner": owner,
        "Obsflow-Sha256": sha256,
        "Upload-Length": str(length),
        "Upload-Offset": "0",
    }


def _step(name: str) -> dict[str, Any]:
    return {"step": name, "position": 0, "state": "running", "attempts": 1, "argv": ["x"]}

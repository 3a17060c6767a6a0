"""Processing in the daemon: ``obsflow run`` as a real subprocess runs toy pipelines
(L0 → L1 → L2, real step subprocesses of a few tenths of a second) on a night written into
``incoming/`` while it runs. Duplicate events, SIGKILLs while runs execute and a SIGTERM
mid-run must not lose, double or half-publish anything, nor leave a step running.

The steps are ``tests/test_runs_cli.py``'s :data:`~tests.test_runs_cli.TOY_STEP`: each
writes its output's header, sleeps, then writes the data (a kill meanwhile leaves the output
half-written), copies its first input's data verbatim and stamps its run's ID (``RUNID``),
so a published product can be checked for completeness and provenance byte by byte. Each
writes its pid to ``SITE/pids`` (so a test knows a run's step has started) and leaves a
helper process running, as real steps that start helpers do. Each daemon gets a tag in its
environment, which every process it starts inherits: what a daemon leaves running is found
by the tag, and killed when the test ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from obsflow.archive.cache import Cache
from obsflow.catalog import Catalog, schema
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.catalog.runs import RunRecord, RunStore, input_hash
from obsflow.processing.tracker import Tracker
from obsflow.receipt.receiver import Outcome, Received, Receiver
from obsflow.settings import Settings
from obsflow.site import open_site
from obsflow.states import FileState, RunState
from tests.conftest import SiteFactory
from tests.test_daemon import daemon, running, wait_for, write_slowly
from tests.test_runs_cli import toy_site

SETTINGS: dict[str, dict[str, Any]] = {
    "receipt": {"settle_seconds": 0.2},
    "ingest": {"lease_seconds": 2.0, "backoff_seconds": 0.2},
    "daemon": {"reconcile_seconds": 1.0, "status_seconds": 0.3},
    "processing": {"lease_seconds": 3, "max_attempts": 5},  # a run may die with 3 daemons
    "workers": {"runs": 3},
}
EXPECTED_RUNS = {"toy_bias": 1, "toy_flat": 3, "toy_calibrate": 8, "toy_sources": 8}
"""The small night (a bias, a flat in each of B, V and R, eight OBJECT frames), L0 → L2."""
PRODUCTS = {
    "ofcam_raw": 12, "ofcam_masterbias": 1, "ofcam_masterflat": 3, "ofcam_calibrated": 8,
    "ofcam_sources": 8,
}  # fmt: skip
MADE_BY = {
    "ofcam_masterbias": ("toy_bias", "biases"),
    "ofcam_masterflat": ("toy_flat", "flats"),
    "ofcam_calibrated": ("toy_calibrate", "frame"),
    "ofcam_sources": ("toy_sources", "frame"),
}
"""Product → the pipeline that makes it and its input whose data the toy step copies."""
HELPER_SECONDS = 60.0
"""How long a step's helper process lives unless it is killed with its step."""


TAG = "OBSFLOW_TEST_DAEMON"
"""An environment variable each daemon a test starts gets, with a value of its own; every
process it starts (run workers, steps, their helpers) inherits it."""


class Daemons:
    """Starts ``obsflow run`` (``tests/test_daemon.py``'s ``daemon``) with a tag in its
    environment, so that the processes it leaves behind can be found after its death (and
    killed when the test ends)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.tags: list[str] = []

    @contextmanager
    def start(self, settings: Settings) -> Iterator[tuple[subprocess.Popen[str], str]]:
        tag = uuid.uuid4().hex
        self.tags.append(tag)
        self.monkeypatch.setenv(TAG, tag)  # inherited by the daemon started next
        with daemon(settings) as proc:
            wait_for(lambda: running(settings, proc), 30, "the daemon's start-up")
            yield proc, tag

    @staticmethod
    def alive(tag: str) -> dict[int, str]:
        """The live processes with this tag (a zombie has no environment): pid → argv."""
        marker = f"{TAG}={tag}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # gone meanwhile
            found[int(entry.name)] = argv.strip()
        return found

    def kill_all(self) -> None:
        for tag in self.tags:
            for pid in self.alive(tag):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class Steps:
    """The toy steps' pid files: which runs have a step started."""

    def __init__(self, settings: Settings) -> None:
        self.directory = settings.site / "pids"

    def of_run(self, run_id: int) -> list[int]:
        """The pids of the steps (and helpers) of ``run_id`` started so far."""
        mark = f"{os.sep}run-{run_id}{os.sep}"
        if not self.directory.is_dir():
            return []
        return [int(p.stem) for p in self.directory.glob("*.pid") if mark in p.read_text()]


@pytest.fixture
def daemons(monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemons]:
    started = Daemons(monkeypatch)
    try:
        yield started
    finally:
        started.kill_all()


ToySite = Callable[..., tuple[Settings, Steps]]


@pytest.fixture
def toy(make_site: SiteFactory) -> ToySite:
    """Make a site with the toy pipelines L0 → L2: steps of 0.4 s, each leaving a helper
    running, writing pid files (keyword args go to ``toy_pipelines``)."""

    def make(**options: Any) -> tuple[Settings, Steps]:
        settings = toy_site(
            make_site, sections=SETTINGS, sources=True, sleep=0.4, pids=True,
            helper=HELPER_SECONDS, **options,
        )  # fmt: skip
        return settings, Steps(settings)

    return make


@pytest.fixture
def reader() -> Iterator[Callable[[Settings], Catalog]]:
    """The test's own catalog connection (opened once the daemon has made the catalog)."""
    catalogs: list[Catalog] = []

    def open_catalog(settings: Settings) -> Catalog:
        catalogs.append(Catalog.open(settings.catalog_url))
        return catalogs[-1]

    yield open_catalog
    for catalog in catalogs:
        catalog.close()


def gone(tag: str, timeout: float = 15) -> None:
    """Wait until no process of the daemon with ``tag`` is left (it stopped cleanly)."""
    left: dict[int, str] = {}

    def none_left() -> bool:
        left.clear()
        left.update(Daemons.alive(tag))
        return not left

    try:
        wait_for(none_left, timeout, "the daemon's processes to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still running: {left}") from None


def write_night(settings: Settings, frames: list[Path]) -> None:
    for frame in frames:
        write_slowly(frame, settings.incoming / frame.name, pieces=4, pause=0.002)


def runs_of(catalog: Catalog, owner_pid: int) -> list[int]:
    """The runs the daemon with this pid holds as running."""
    runs = schema.runs
    query = select(runs.c.id).where(
        runs.c.state == RunState.RUNNING.value, runs.c.lease_owner.like(f"local-{owner_pid}-%")
    )
    with catalog.read() as conn:
        return sorted(conn.execute(query).scalars())


def mid_step(catalog: Catalog, steps: Steps, proc: subprocess.Popen[str], skip: list[int]) -> int:
    """Wait until the daemon ``proc`` runs a step of a run (not in ``skip``); its run ID."""
    found: list[int] = []

    def one() -> bool:
        found[:] = [r for r in runs_of(catalog, proc.pid) if r not in skip and steps.of_run(r)]
        return bool(found)

    wait_for(one, 60, "a run of this daemon in the middle of a step")
    return found[0]


def summary(catalog: Catalog) -> str:
    runs = RunStore(catalog).find()
    files = catalog.find(FileQuery())
    return (
        f"runs: {sorted((r.pipeline, r.state.value, r.error or '') for r in runs)}; "
        f"files: {sorted((f.product or '', f.state.value) for f in files)}"
    )


def settled(catalog: Catalog) -> bool:
    """Every expected run succeeded and every file, raw or made, is archived."""
    runs = RunStore(catalog).find()
    if any(r.state is not RunState.SUCCEEDED for r in runs) or count(runs) != EXPECTED_RUNS:
        return False
    files = catalog.find(FileQuery())
    products = [f.product or "" for f in files]
    made = {p: products.count(p) for p in products}
    return made == PRODUCTS and all(f.state is FileState.ARCHIVED for f in files)


def wait_settled(catalog: Catalog, timeout: float = 90) -> None:
    try:
        wait_for(lambda: settled(catalog), timeout, "every run succeeded, every file archived")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {summary(catalog)}") from None


def count(runs: list[RunRecord]) -> dict[str, int]:
    pipelines = [r.pipeline for r in runs]
    return {p: pipelines.count(p) for p in pipelines}


def header_size(data: bytes) -> int:
    for pos in range(0, len(data), 80):
        card = data[pos : pos + 80]
        if card[:3] == b"END" and not card[3:].strip():
            return -(-(pos + 80) // 2880) * 2880
    raise AssertionError("no END card: a truncated header")


def card(data: bytes, key: str) -> str:
    for pos in range(0, header_size(data), 80):
        if data[pos : pos + 8].decode().rstrip() == key:
            return data[pos + 10 : pos + 80].decode().split("/")[0].strip().strip("'").strip()
    raise AssertionError(f"no {key} card")


def check_processed(settings: Settings, catalog: Catalog) -> None:
    """Once quiet: one succeeded run per (pipeline, group, input set), each product once,
    complete, made by the run it names, archived with the bytes the catalog says; nothing
    in the cache or the archive that the catalog does not know."""
    store = RunStore(catalog)
    runs = store.find()
    assert {r.state for r in runs} == {RunState.SUCCEEDED}, summary(catalog)
    assert count(runs) == EXPECTED_RUNS
    keys = [(r.pipeline, r.group_key, input_hash(r.inputs)) for r in runs]
    assert len(keys) == len(set(keys)), "a second run of one (pipeline, group, input set)"
    assert len({(r.pipeline, r.group_key) for r in runs}) == len(runs)
    by_id = {r.id: r for r in runs}

    records = catalog.find(FileQuery())
    assert all(r.superseded_by is None for r in records), "a product was made twice"
    names = [r.original_name for r in records]
    assert len(names) == len(set(names)) == sum(PRODUCTS.values())
    files: dict[int, FileRecord] = {r.id: r for r in records}
    stored: dict[int, bytes] = {}
    for record in records:
        assert record.state is FileState.ARCHIVED and record.archive_path is not None
        data = (settings.archive / record.archive_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record.sha256, record.original_name
        assert len(data) == record.size
        stored[record.id] = data
    for record in records:
        if record.product == "ofcam_raw":
            assert record.made_by_run is None and record.level == 0
            continue
        pipeline, primary = MADE_BY[record.product or ""]
        run = by_id[record.made_by_run or -1]
        assert run.pipeline == pipeline and store.outputs(run.id) == [record.id]
        assert record.level == (2 if record.product == "ofcam_sources" else 1)
        data = stored[record.id]
        assert card(data, "RUNID") == str(run.id), "published by another run than it names"
        source = stored[run.inputs[primary][0]]
        assert data[header_size(data) :] == source[header_size(source) :], (
            f"{record.original_name} is not complete: published half-written"
        )
        assert files[run.inputs[primary][0]].night == record.night

    in_archive = {
        str(p.relative_to(settings.archive)) for p in settings.archive.rglob("*") if p.is_file()
    }
    assert in_archive == {r.archive_path for r in records}, "the archive holds unknown files"
    cached = {
        str(p.relative_to(settings.cache))
        for p in settings.cache.rglob("*")
        if p.is_file() and ".tmp" not in p.relative_to(settings.cache).parts
    }
    assert cached <= {r.cache_path for r in records}, "the cache holds unknown files"


def daemon_status(settings: Settings) -> dict[str, Any]:
    status: dict[str, Any] = json.loads((settings.site / ".obsflow" / "daemon.json").read_text())
    return status


@pytest.mark.slow
def test_a_night_arriving_while_the_daemon_runs_is_processed_once_and_duplicates_start_nothing(
    toy: ToySite,
    daemons: Daemons,
    reader: Callable[[Settings], Catalog],
    frames: list[Path],
    tmp_path: Path,
) -> None:
    settings, _ = toy()
    with daemons.start(settings) as (proc, tag):
        catalog = reader(settings)
        write_night(settings, frames)
        wait_settled(catalog)
        check_processed(settings, catalog)
        before = RunStore(catalog).find()

        # the same events again: the frames written again where the watch looks, and the
        # frames and every product handed to `obsflow ingest` while the daemon runs
        write_night(settings, frames)
        again = tmp_path / "again"
        again.mkdir()
        for record in catalog.find(FileQuery()):
            shutil.copyfile(
                settings.archive / (record.archive_path or ""), again / record.original_name
            )
        offered = subprocess.run(
            [sys.executable, "-m", "obsflow", "ingest", "--site", str(settings.site), str(again)],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert offered.returncode == 0, offered.stdout + offered.stderr
        (line,) = [x for x in offered.stdout.splitlines() if "duplicate" in x]
        assert str(sum(PRODUCTS.values())) in line  # every one a duplicate
        wait_for(
            lambda: daemon_status(settings)["received"].get("duplicate", 0) >= len(frames),
            30,
            "the frames written again received as duplicates",
        )
        time.sleep(2.0)  # two passes of the tracker, and a reconcile scan
        assert RunStore(catalog).find() == before
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    check_processed(settings, catalog)
    gone(tag)  # no step, helper or worker outlived the daemon
    assert "stopped cleanly" in (settings.site / "daemon.log").read_text()


@pytest.mark.slow
def test_sigkill_while_runs_execute_loses_doubles_and_half_publishes_nothing(
    toy: ToySite,
    daemons: Daemons,
    reader: Callable[[Settings], Catalog],
    frames: list[Path],
) -> None:
    settings, steps = toy()
    rng = random.Random(11)
    killed: list[int] = []
    hit_running: list[bool] = []
    catalogs: list[Catalog] = []
    for moment in range(3):
        with daemons.start(settings) as (proc, _):
            if moment == 0:
                catalogs.append(reader(settings))
                write_night(settings, frames)
            (catalog,) = catalogs
            victim = mid_step(catalog, steps, proc, killed)
            time.sleep(rng.uniform(0.0, 0.15))  # while its output is half-written
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            killed.append(victim)
            state = RunStore(catalog).get(victim)
            hit_running.append(state is not None and state.state is RunState.RUNNING)
    assert all(hit_running), f"a kill came after its run had finished: {hit_running}"
    with daemons.start(settings) as (proc, tag):
        wait_settled(catalog)  # the dead runs' leases expire, and they run again
        assert runs_of(catalog, proc.pid) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    check_processed(settings, catalog)
    # one attempt per daemon that died while it ran, and the one that finished it
    assert all(1 <= r.attempts <= 1 + len(killed) for r in RunStore(catalog).find())
    gone(tag)  # (what the killed daemons left running: the test below)


@pytest.mark.slow
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_no_process_of_a_sigkilled_daemon_runs_on_once_its_run_is_taken_over(
    toy: ToySite,
    daemons: Daemons,
    reader: Callable[[Settings], Catalog],
    frames: list[Path],
) -> None:
    settings, steps = toy(bias_sleep=6.0)  # a step longer than the lease (3 s)
    with daemons.start(settings) as (proc, killed):
        catalog = reader(settings)
        write_night(settings, frames[:1])  # the bias: one run
        victim = mid_step(catalog, steps, proc, [])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with daemons.start(settings) as (proc, tag):
        wait_for(lambda: victim in runs_of(catalog, proc.pid), 30, "the run taken over")
        left = daemons.alive(killed)
        assert left == {}, f"processes of the killed daemon still run: {left}"
        store = RunStore(catalog)
        wait_for(
            lambda: getattr(store.get(victim), "state", None) is RunState.SUCCEEDED,
            30,
            "the run done again",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    gone(tag)


@pytest.mark.slow
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_sigterm_mid_run_exits_0_and_the_run_is_queued_again_and_completes_at_the_next_start(
    toy: ToySite,
    daemons: Daemons,
    reader: Callable[[Settings], Catalog],
    frames: list[Path],
) -> None:
    settings, steps = toy(bias_sleep=2.5)
    with daemons.start(settings) as (proc, tag):
        catalog = reader(settings)
        write_night(settings, frames)
        victim = mid_step(catalog, steps, proc, [])
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "stopped cleanly" in (settings.site / "daemon.log").read_text()
    gone(tag)  # the stop killed its step, the step's helper, and the run workers
    store = RunStore(catalog)
    run = store.get(victim)
    assert run is not None and run.pipeline == "toy_bias"
    assert run.state is RunState.QUEUED and run.error is None and run.attempts == 0, run
    assert {r.state for r in store.find()} == {RunState.QUEUED}  # nothing failed, none held
    assert catalog.find(FileQuery(product="ofcam_masterbias")) == []  # nothing half-made

    with daemons.start(settings) as (proc, tag):
        wait_settled(catalog)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    run = store.get(victim)
    assert run is not None and run.state is RunState.SUCCEEDED, run
    check_processed(settings, catalog)
    gone(tag)


class GatedCache(Cache):
    """A cache whose placements wait for ``release``: the recorder that calls it holds its
    transaction open with its file's row inserted (its ID taken) but not committed."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.release = threading.Event()

    def place(self, temp: Path, key: str) -> Path:
        self.entered.set()
        if not self.release.wait(60):
            raise TimeoutError("the test never released the placement")
        return super().place(temp, key)


@pytest.mark.parametrize(
    "catalog_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_file_committed_after_a_later_id_still_starts_its_runs(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    """What the daemon does when two runs publish at once, slowed down at the bad moment:
    the first recorder takes the lower file ID, the second commits first, the tracker reads
    in between."""
    settings = toy_site(make_site, inspect=True)
    site = open_site(settings)
    gate = GatedCache(settings.cache)
    slow_receiver = Receiver(settings, site.registry, site.catalog, gate, clock=site.clock)
    results: list[Received] = []
    slow = threading.Thread(target=lambda: results.append(slow_receiver.receive(frames[4])))
    try:
        slow.start()
        assert gate.entered.wait(30)  # frame 0005's row is inserted, not committed
        fast = site.receiver.receive(frames[5])  # frame 0006: a later ID, committed first
        assert fast.outcome is Outcome.CACHED
        tracker = Tracker(site.registry, site.catalog, site.clock)
        tracker.drain()  # reads while 0005 is not visible yet
        gate.release.set()
        slow.join(30)
        (late,) = results
        assert late.outcome is Outcome.CACHED
        assert (late.file_id or 0) < (fast.file_id or 0)  # the order that hurts
        tracker.drain()
        inspected = RunStore(site.catalog).find(pipeline="toy_inspect")
        assert sorted(r.inputs["frame"][0] for r in inspected) == [late.file_id, fast.file_id]
    finally:
        gate.release.set()
        slow.join(30)
        site.close()

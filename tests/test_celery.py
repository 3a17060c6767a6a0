"""Runs on Celery workers, against the real brokers of this machine: Redis (127.0.0.1:6379)
and RabbitMQ (127.0.0.1:5672, guest/guest).

Each test has a broker of its own: a Redis database no one else uses (claimed with a key,
flushed at the end), or RabbitMQ queues whose names carry the test's own suffix (deleted at
the end). Workers are real ``obsflow worker`` subprocesses with one pool process each, each
in a session of its own (a test SIGKILLs a whole worker with its process group) and with a
tag in its environment that every process it starts inherits (what a killed worker left
running is found by it and killed at the end). The tracker and the ingestor run in threads
of the test, as the daemon runs them (:class:`Tracking`), handing runs to a
:class:`~obsflow.processing.celery.CeleryExecutor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import redis
from celery import Celery
from sqlalchemy import select

from obsflow.catalog import Catalog, schema
from obsflow.catalog.records import FileQuery
from obsflow.catalog.runs import RunStore, input_hash
from obsflow.processing.celery import BrokerError, CeleryExecutor
from obsflow.processing.tracker.loop import TrackerLoop
from obsflow.settings import Settings
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import FileState, RunState
from tests.conftest import SiteFactory, service_missing
from tests.faultproxy import FaultProxy, Faults
from tests.test_daemon import wait_for
from tests.test_processing_daemon import Steps, check_processed, summary, wait_settled
from tests.test_runs_cli import toy_site

REDIS = ("127.0.0.1", 6379)
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
CLAIM_KEY = "obsflow-test:claimed-by"
"""Set (NX) in a Redis database by the test that uses it."""
TAG = "OBSFLOW_TEST_CELERY"
WHO = "OBSFLOW_TEST_WORKER"
"""Each worker's name, in its environment: a step can say where it ran."""
WORKER = [sys.executable, "-m", "obsflow", "-v", "worker"]
SQLITE = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


# ---------------------------------------------------------------------- brokers


@dataclass
class Broker:
    """A broker of this test's own: its URL, and the names it gives its queues."""

    kind: str
    url: str
    suffix: str
    queues: set[str] = field(default_factory=set)

    def queue(self, name: str) -> str:
        """A queue name no other test uses."""
        full = f"{name}-{self.suffix}"
        self.queues.add(full)
        return full

    def through(self, port: int) -> str:
        """This broker's URL on another port of 127.0.0.1 (a proxy's)."""
        return re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", self.url, count=1)

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not those a worker took)."""
        with connection(self.url) as conn:
            try:
                _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
            except conn.channel_errors:
                return 0  # never declared: nothing was sent to it
        return int(count)

    def clean(self) -> None:
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            client.flushdb()
            client.close()
            return
        with connection(self.url) as conn:
            for queue in self.queues:
                with contextlib.suppress(*conn.channel_errors):
                    conn.channel().queue_delete(queue)
                with contextlib.suppress(*conn.channel_errors):
                    conn.channel().exchange_delete(queue)


def connection(url: str) -> Any:
    """A kombu connection to ``url`` (through Celery, whose types are Any)."""
    return Celery(broker=url, set_as_current=False).connection_for_write(connect_timeout=5)


def claim_redis_database(token: str) -> int | None:
    """A Redis database (1-15) no one uses, claimed for this test."""
    for db in range(15, 0, -1):
        client = redis.Redis(*REDIS, db=db, socket_connect_timeout=2)
        try:
            if client.set(CLAIM_KEY, token, nx=True, ex=1800):
                if client.dbsize() == 1:
                    return db
                client.delete(CLAIM_KEY)  # someone's data without a claim: not ours
        finally:
            client.close()
    return None


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    suffix = uuid.uuid4().hex[:8]
    if request.param == "redis":
        try:
            db = claim_redis_database(suffix)
        except redis.RedisError as exc:
            service_missing(f"Redis is not reachable at {REDIS[0]}:{REDIS[1]}: {exc}")
            raise
        if db is None:
            service_missing("every Redis database 1-15 is in use")
        made = Broker("redis", f"redis://{REDIS[0]}:{REDIS[1]}/{db}", suffix)
    else:
        try:
            with connection(RABBITMQ) as conn:
                conn.ensure_connection(max_retries=1)
        except Exception as exc:
            service_missing(f"RabbitMQ is not reachable at {RABBITMQ}: {exc}")
        made = Broker("rabbitmq", RABBITMQ, suffix)
    try:
        yield made
    finally:
        made.clean()


def sections(broker: Broker, url: str | None = None, **processing: Any) -> dict[str, Any]:
    """Settings sections of a site whose runs go to ``broker`` (through ``url`` if given),
    on a default queue of the test's own."""
    return {
        "processing": {
            "executor": "celery",
            "broker": url or broker.url,
            "queue": broker.queue("obsflow"),
            **processing,
        },
        "ingest": {"lease_seconds": 5.0, "backoff_seconds": 0.2},
    }


# ---------------------------------------------------------------------- workers


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited: {self.output()[-3000:]}")
        return "obsflow worker: ready" in self.output()

    def kill(self) -> None:
        """SIGKILL the whole worker: its main process and its pool processes."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class Workers:
    """``obsflow worker`` subprocesses, stopped (and whatever they left, killed) at the end."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = directory
        self.tag = uuid.uuid4().hex
        monkeypatch.setenv(TAG, self.tag)
        self.started: list[Worker] = []

    def start(self, settings: Settings, name: str, *options: str, url: str | None = None) -> Worker:
        log = self.directory / f"worker-{name}.log"
        argv = [*WORKER, "--site", str(settings.site), "--concurrency", "1", *options]
        if url is not None:
            argv += ["--broker", url]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, WHO: name, "COLUMNS": "200"},
            )  # fmt: skip
        worker = Worker(name, proc, log)
        self.started.append(worker)
        return worker

    def wait_ready(self, timeout: float = 90) -> None:
        wait_for(lambda: all(w.ready() for w in self.started), timeout, "the workers' start")

    def of_pid(self, pid: int) -> Worker:
        """The worker whose process (a pool process, say) this is."""
        group = os.getpgid(pid)
        (found,) = [w for w in self.started if w.proc.pid == group]
        return found

    def stop(self) -> None:
        for worker in self.started:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)  # warm shutdown
        for worker in self.started:
            try:
                worker.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait(timeout=30)
        for pid in tagged(self.tag):  # steps a killed worker left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def tagged(tag: str) -> list[int]:
    marker = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workers]:
    started = Workers(tmp_path, monkeypatch)
    try:
        yield started
    finally:
        started.stop()


# ---------------------------------------------------------------------- the daemon's part


class Daemon:
    """What the daemon does around the workers, in threads of the test: the tracker's loop
    handing queued runs to a :class:`CeleryExecutor` (and following reductions), and an
    ingestor archiving what the workers publish."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.executor = CeleryExecutor(site.settings, site.registry)
        self.loop = TrackerLoop(site, self.executor, poll_seconds=0.2)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.loop.run, args=(self.stop, threading.Event())),
            threading.Thread(target=self._ingest),
        ]

    @property
    def catalog(self) -> Catalog:
        return self.site.catalog

    def _ingest(self) -> None:
        ingestor = self.site.ingestor()
        while not self.stop.is_set():
            report = ingestor.run_once()
            if not report.archived and not report.errors:
                self.stop.wait(0.1)

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        self.executor.close()


class Tracking(Daemon):
    """:class:`Daemon` on a site of its own, opened with ``frames`` ingested (and closed
    at the end)."""

    def __init__(self, settings: Settings, frames: list[Path]) -> None:
        site = open_site(settings)
        summary = ingest_paths(site, frames)
        assert len(summary.ingest.archived) == len(frames)
        super().__init__(site)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        super().__exit__(kind, value, trace)
        self.site.close()

    def quiet(self) -> bool:
        """No run queued or running, and no group waiting for a deadline."""
        runs = RunStore(self.catalog)
        busy = runs.find(state=RunState.QUEUED, limit=1) + runs.find(
            state=RunState.RUNNING, limit=1
        )
        return not busy and self.loop.tracker.next_deadline() is None


# ---------------------------------------------------------------------- the demo night


EXAMPLE_RUNS = {
    "ofcam_masterbias": 1, "ofcam_masterflat": 3, "ofcam_calibrate": 8, "ofcam_sources": 8,
    "ofcam_nightcat": 1,
}  # fmt: skip
"""The small night through the example pipelines, L0 → L3: groups, as the local executor
makes them (one run each; the nightly catalog's group may have more, one per set of source
catalogs it was made from as they arrived)."""
EXAMPLE_PRODUCTS = {
    "ofcam_raw": (0, 12), "ofcam_masterbias": (1, 1), "ofcam_masterflat": (1, 3),
    "ofcam_calibrated": (1, 8), "ofcam_sources": (2, 8), "ofcam_nightcat": (3, 1),
}  # fmt: skip
"""Product → (level, files not superseded), as the local executor makes them."""


def example_site(make_site: SiteFactory, broker: Broker) -> Settings:
    """The example registry (L0 → L3, the real tools), its deadlines a second after the
    last input instead of 15 s."""
    settings = make_site(pipelines=True, **sections(broker))
    path = settings.registry / "ofcam_pipelines.yaml"
    path.write_text(re.sub(r"after_minutes: [\d.]+", "after_minutes: 0.015", path.read_text()))
    return settings


def check_night(settings: Settings, catalog: Catalog) -> None:
    """Every run succeeded at its first attempt, one per (pipeline, group, input set); each
    product once and archived with the bytes the catalog says, made by a run that
    succeeded; the groups and products the local executor makes."""
    store = RunStore(catalog)
    runs = store.find()
    assert {r.state for r in runs} == {RunState.SUCCEEDED}, summary(catalog)
    assert all(r.attempts == 1 for r in runs), [(r.id, r.attempts) for r in runs]
    keys = [(r.pipeline, r.group_key, input_hash(r.inputs)) for r in runs]
    assert len(keys) == len(set(keys)), "a second run of one (pipeline, group, input set)"
    groups: dict[str, set[str]] = {}
    for run in runs:
        groups.setdefault(run.pipeline, set()).add(str(run.group_key))
    assert {p: len(g) for p, g in groups.items()} == EXAMPLE_RUNS
    by_id = {r.id: r for r in runs}
    live = [f for f in catalog.find(FileQuery()) if f.superseded_by is None]
    made: dict[str, tuple[int, int]] = {}
    for record in live:
        level, count = made.get(record.product or "", (record.level or 0, 0))
        made[record.product or ""] = (level, count + 1)
        assert record.state is FileState.ARCHIVED and record.archive_path is not None
        data = (settings.archive / record.archive_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record.sha256, record.original_name
        if record.made_by_run is not None:
            assert record.id in store.outputs(record.made_by_run)
            assert by_id[record.made_by_run].state is RunState.SUCCEEDED
    assert made == EXAMPLE_PRODUCTS
    names = [f.original_name for f in live]
    assert len(names) == len(set(names)), "a product published twice"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broker", "catalog_url"),
    [
        ("redis", "sqlite"),
        pytest.param("rabbitmq", "postgresql", marks=pytest.mark.postgres),
    ],
    indirect=True,
)
def test_the_demo_night_runs_l0_to_l3_on_two_workers_with_shared_storage(
    make_site: SiteFactory, frames: list[Path], broker: Broker, workers: Workers
) -> None:
    settings = example_site(make_site, broker)
    workers.start(settings, "a")
    workers.start(settings, "b")
    workers.wait_ready()
    with Tracking(settings, frames) as tracking:
        wait_for(lambda: night_done(tracking), 180, "the night L0 → L3")
        check_night(settings, tracking.catalog)
        ran = RunStore(tracking.catalog).find()
    # both workers took part: the run IDs they executed, from their logs
    for worker in workers.started:
        assert re.search(r"run \d+ started", worker.output()), worker.output()[-2000:]
    assert broker.depth(settings.processing.queue) == 0
    assert len(ran) >= sum(EXAMPLE_RUNS.values())


def night_done(tracking: Tracking) -> bool:
    """Nothing left to run or archive, and every level's groups made. Quiet is asked before
    and after the files are read: a run that ends between the two reads publishes a file the
    first read did not see, but then it was running at the first ask."""
    if not tracking.quiet():
        return False
    files = tracking.catalog.find(FileQuery())
    if any(f.state is not FileState.ARCHIVED for f in files) or not tracking.quiet():
        return False
    groups = {(r.pipeline, str(r.group_key)) for r in RunStore(tracking.catalog).find()}
    pipelines = [p for p, _ in groups]
    return {p: pipelines.count(p) for p in pipelines} == EXAMPLE_RUNS


# ---------------------------------------------------------------------- a worker killed


def owners(catalog: Catalog) -> dict[int, str]:
    """Running run → its lease's owner (``celery-HOST-PID``: the pool process)."""
    runs = schema.runs
    query = select(runs.c.id, runs.c.lease_owner).where(runs.c.state == RunState.RUNNING.value)
    with catalog.read() as conn:
        return {int(r.id): str(r.lease_owner) for r in conn.execute(query)}


@pytest.mark.slow
@SQLITE
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_a_worker_sigkilled_mid_run_loses_nothing_and_its_run_executes_again_once(
    make_site: SiteFactory, frames: list[Path], broker: Broker, workers: Workers
) -> None:
    settings = toy_site(
        make_site, sections=sections(broker, lease_seconds=3, max_attempts=5),
        sources=True, sleep=0.1, bias_sleep=2.5, pids=True,
    )  # fmt: skip
    steps = Steps(settings)
    workers.start(settings, "a")
    workers.start(settings, "b")
    workers.wait_ready()
    with Tracking(settings, frames) as tracking:
        store = RunStore(tracking.catalog)
        victims: list[tuple[int, str]] = []

        def mid_step() -> bool:
            victims[:] = [(r, o) for r, o in owners(tracking.catalog).items() if steps.of_run(r)]
            return bool(victims)

        wait_for(mid_step, 60, "a run in the middle of a step")
        victim, owner = victims[0]
        killed = workers.of_pid(int(owner.rsplit("-", 1)[1]))
        time.sleep(random.Random(5).uniform(0.0, 0.3))  # its output half-written
        killed.kill()
        assert store.get(victim).state is RunState.RUNNING  # type: ignore[union-attr]
        wait_settled(tracking.catalog, timeout=120)
        check_processed(settings, tracking.catalog)
        attempts = {r.id: r.attempts for r in store.find()}
    assert attempts.pop(victim) == 2, "the killed run executed again, once"
    assert set(attempts.values()) == {1}
    survivor = next(w for w in workers.started if w is not killed)
    assert survivor.proc.poll() is None


@pytest.mark.slow
@SQLITE
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_sigterm_to_a_worker_lets_the_run_in_progress_finish_then_it_exits(
    make_site: SiteFactory, frames: list[Path], broker: Broker, workers: Workers
) -> None:
    settings = toy_site(make_site, sections=sections(broker), bias_sleep=2.0, pids=True)
    steps = Steps(settings)
    worker = workers.start(settings, "a")
    workers.wait_ready()
    with Tracking(settings, frames[:1]) as tracking:  # the bias: one run
        wait_for(lambda: any(steps.of_run(r) for r in owners(tracking.catalog)), 60, "a step")
        (victim,) = owners(tracking.catalog)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=30) == 0, worker.output()[-2000:]
        run = RunStore(tracking.catalog).get(victim)
    assert run is not None and run.state is RunState.SUCCEEDED and run.attempts == 1, run
    assert broker.depth(settings.processing.queue) == 0  # its message acknowledged


@pytest.mark.slow
@SQLITE
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_when_a_workers_main_process_dies_its_pool_kills_the_steps_and_queues_the_run_again(
    make_site: SiteFactory, frames: list[Path], broker: Broker, workers: Workers
) -> None:
    settings = toy_site(
        make_site, sections=sections(broker), sources=True, sleep=0.1, bias_sleep=20.0,
        pids=True, helper=60.0,
    )  # fmt: skip
    steps = Steps(settings)
    first = workers.start(settings, "a")
    workers.wait_ready()
    with Tracking(settings, frames) as tracking:
        store = RunStore(tracking.catalog)
        wait_for(lambda: any(steps.of_run(r) for r in owners(tracking.catalog)), 60, "a step")
        (victim,) = owners(tracking.catalog)
        started = steps.of_run(victim)  # the step and its helper
        os.kill(first.proc.pid, signal.SIGKILL)  # the main process only (an OOM kill)
        first.proc.wait(timeout=30)

        def released() -> bool:
            run = store.get(victim)
            return run is not None and run.state is RunState.QUEUED

        wait_for(released, 15, "the run queued again by its pool process")
        wait_for(lambda: not tagged_alive(started), 15, "the step and its helper killed")
        assert store.get(victim).attempts == 0  # type: ignore[union-attr]  # not counted
        # the step sleeps 20 s: let another worker take the night over with short steps
        path = settings.registry / "ofcam_pipelines.yaml"
        path.write_text(path.read_text().replace('"20.0"', '"0.1"'))
        workers.start(settings, "b")
        wait_settled(tracking.catalog, timeout=120)
        check_processed(settings, tracking.catalog)
        assert {r.attempts for r in store.find()} == {1}


def tagged_alive(pids: list[int]) -> bool:
    """Any of ``pids`` still runs (a zombie does not count)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
                return True
    return False


# ---------------------------------------------------------------------- the broker cut off


class DroppingProxy(FaultProxy):
    """The fault proxy, able to reset every connection open at once (a link that fails)
    and to go on listening (the link back), so that clients connect again."""

    def drop(self) -> int:
        """Reset every open connection (each client sees a TCP reset); how many."""
        loop = self._loop
        assert loop is not None

        async def cancel() -> int:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()  # the handler resets the client and closes the server side
            await asyncio.gather(*tasks, return_exceptions=True)
            return len(tasks)

        return asyncio.run_coroutine_threadsafe(cancel(), loop).result(10)


@pytest.mark.slow
@SQLITE
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_broker_connections_dropped_mid_night_lose_and_double_nothing(
    make_site: SiteFactory, frames: list[Path], broker: Broker, workers: Workers
) -> None:
    with DroppingProxy(REDIS, seed=11) as proxy:
        url = broker.through(proxy.port)
        # a run whose message the broker lost (a reset took the reply to a worker's pop)
        # is handed over again after dispatch_seconds
        settings = toy_site(
            make_site, sections=sections(broker, url, dispatch_seconds=5), sources=True,
            sleep=0.1, bias_sleep=1.5, pids=True,
        )  # fmt: skip
        steps = Steps(settings)
        workers.start(settings, "a")
        workers.start(settings, "b")
        workers.wait_ready()
        with Tracking(settings, frames) as tracking:
            store = RunStore(tracking.catalog)
            # while the master bias executes: every connection reset, then 3 s of outage
            # (connections refused), then the link back
            wait_for(lambda: any(steps.of_run(r) for r in owners(tracking.catalog)), 60, "a step")
            dropped = [proxy.drop()]
            proxy.faults = Faults(refuse=1.0)
            time.sleep(3.0)
            proxy.faults = Faults()
            # and once more among the calibrations, a quarter of the new connections cut
            # within their first 4 KiB sent from then on
            wait_for(lambda: len(store.find(state=RunState.SUCCEEDED)) >= 6, 90, "six runs done")
            dropped.append(proxy.drop())
            proxy.faults = Faults(cut=0.25, cut_within_bytes=4096)
            wait_settled(tracking.catalog, timeout=150)
            check_processed(settings, tracking.catalog)
            attempts = {r.attempts for r in store.find()}
        stats = proxy.stats
    assert attempts == {1}, "a run executed twice"
    assert all(n >= 3 for n in dropped), f"connections reset: {dropped}"  # both workers, us
    assert stats.refused > 0, stats  # the outage was felt


# ---------------------------------------------------------------------- queues


ROUTED = """
pipelines:
  - id: everyday
    profile: say
    inputs: [{product: ofcam_raw, name: frame, where: "frame_type == 'OBJECT'", max: 1}]
    group: {by: [file]}
  - id: special_by_pipeline
    profile: say
    queue: QUEUE
    inputs: [{product: ofcam_raw, name: frame, where: "frame_type == 'OBJECT'", max: 1}]
    group: {by: [file]}
  - id: special_by_profile
    profile: say_special
    inputs: [{product: ofcam_raw, name: frame, where: "frame_type == 'OBJECT'", max: 1}]
    group: {by: [file]}
profiles:
  - id: say
    steps: [{name: say, command: [sh, -c, 'echo "{frame} ran on $WHO"']}]
  - id: say_special
    queue: QUEUE
    steps: [{name: say, command: [sh, -c, 'echo "{frame} ran on $WHO"']}]
"""


@pytest.mark.slow
@SQLITE
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_a_pipeline_or_profile_queue_is_executed_only_by_workers_of_that_queue(
    make_site: SiteFactory, frames: list[Path], broker: Broker, workers: Workers
) -> None:
    settings = make_site(**sections(broker))
    special = broker.queue("special")
    registry = ROUTED.replace("QUEUE", special).replace("$WHO", f"${WHO}")
    (settings.registry / "ofcam_pipelines.yaml").write_text(registry)
    workers.start(settings, "everyday")
    workers.start(settings, "special", "--queues", special)
    workers.wait_ready()
    with Tracking(settings, frames) as tracking:
        assert tracking.executor.queues == tuple(sorted([settings.processing.queue, special]))
        store = RunStore(tracking.catalog)
        wait_for(
            lambda: tracking.quiet() and len(store.find(state=RunState.SUCCEEDED)) == 3 * 8,
            90,
            "every run done",
        )
        ran_on = {
            (run.pipeline, (step.stdout_tail or "").strip().rsplit(" ", 1)[-1])
            for run in store.find()
            for step in store.steps(run.id)
        }
    assert ran_on == {
        ("everyday", "everyday"),
        ("special_by_pipeline", "special"),
        ("special_by_profile", "special"),
    }


# ---------------------------------------------------------------------- dispatch


@SQLITE
def test_the_tracker_hands_each_queued_run_to_the_broker_once_across_passes_and_restarts(
    make_site: SiteFactory, frames: list[Path], broker: Broker
) -> None:
    settings = toy_site(make_site, sections=sections(broker), inspect=True)
    queue = settings.processing.queue
    site = open_site(settings)
    try:
        ingest_paths(site, frames)
        store = RunStore(site.catalog)
        for _ in range(2):  # a daemon, then the next one (the broker kept what it got)
            executor = CeleryExecutor(settings, site.registry)
            loop = TrackerLoop(site, executor)
            loop.recover()
            for _ in range(4):
                loop.once()
                time.sleep(0.05)
            executor.close()
            queued = store.find(state=RunState.QUEUED)
            assert len(queued) == 1 + 8  # the night's master bias, an inspection per frame
            assert broker.depth(queue) == len(queued)
    finally:
        site.close()


@SQLITE
@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_a_broker_out_of_reach_is_an_error_naming_it_and_the_run_is_handed_over_later(
    make_site: SiteFactory, frames: list[Path], kind: str
) -> None:
    dead = "redis://127.0.0.1:9/0" if kind == "redis" else "amqp://guest:secret@127.0.0.1:9//"
    settings = toy_site(make_site, sections={"processing": {"executor": "celery", "broker": dead}})
    site = open_site(settings)
    try:
        ingest_paths(site, frames[:1])  # the bias: one run
        loop = TrackerLoop(site, CeleryExecutor(settings, site.registry))
        started = time.monotonic()
        with pytest.raises(BrokerError) as raised:
            loop.once()
        assert time.monotonic() - started < 20
        message = str(raised.value)
        assert "127.0.0.1:9" in message and "run " in message
        assert "secret" not in message  # a password is never shown
        assert len(RunStore(site.catalog).to_dispatch(site.clock())) == 1  # not marked sent
    finally:
        site.close()


@SQLITE
def test_obsflow_worker_without_a_broker_names_the_three_ways_to_set_one(
    make_site: SiteFactory,
) -> None:
    settings = make_site()
    env = {k: v for k, v in os.environ.items() if k != "OBSFLOW_BROKER"}

    def worker(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*WORKER, "--site", str(settings.site), *options],
            capture_output=True, text=True, timeout=60, check=False,
            env={**env, "COLUMNS": "200"},
        )  # fmt: skip

    done = worker()
    assert done.returncode == 1
    for way in ("--broker", "$OBSFLOW_BROKER", "processing.broker"):
        assert way in done.stderr, done.stderr
    bad = worker("--broker", "http://nope")
    assert bad.returncode == 2 and "--broker" in bad.stderr, bad.stderr


# ---------------------------------------------------------------------- workers over HTTP


@pytest.mark.slow
@SQLITE
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_the_demo_night_runs_l0_to_l3_on_two_workers_that_only_know_the_servers_url(
    make_site: SiteFactory,
    frames: list[Path],
    broker: Broker,
    workers: Workers,
    tmp_path: Path,
) -> None:
    from obsflow.access import Scope, TokenStore
    from obsflow.api import ApiServer, create_app

    settings = example_site(make_site, broker)
    environ = {k: v for k, v in os.environ.items() if k != "OBSFLOW_SITE"}
    with Tracking(settings, frames) as tracking:
        site = tracking.site
        token = TokenStore(site.catalog).create("cluster", Scope.WORKER, [], site.clock())[0]
        server = ApiServer(site, app=create_app(site)).start()
        try:
            for name in ("a", "b"):
                root = tmp_path / f"root-{name}"  # the worker's own disk: no site at all
                log = tmp_path / f"worker-{name}.log"
                argv = [*WORKER, "--server", server.url, "--token", token]
                argv += ["--broker", broker.url, "--root", str(root), "--concurrency", "1"]
                argv += ["--queues", settings.processing.queue]
                with log.open("ab") as out:
                    proc = subprocess.Popen(
                        argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                        env={**environ, WHO: name, "COLUMNS": "200"},
                        cwd=tmp_path,
                    )  # fmt: skip
                workers.started.append(Worker(name, proc, log))
            workers.wait_ready()
            wait_for(lambda: night_done(tracking), 240, "the night L0 → L3 over HTTP")
            check_night(settings, tracking.catalog)
            ran = RunStore(tracking.catalog).find()
        finally:
            server.stop()
    assert ran and all(r.state is RunState.SUCCEEDED for r in ran)
    made = [f for f in tracking.catalog.find(FileQuery()) if (f.level or 0) > 0]
    assert made and all(f.made_by_run is not None for f in made)
    # the work happened in the workers' own directories, never in the site's
    assert not any(settings.work.glob("run-*"))
    assert any((tmp_path / "root-a").rglob("*")) or any((tmp_path / "root-b").rglob("*"))

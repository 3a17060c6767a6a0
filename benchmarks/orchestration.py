"""What does obsflow's orchestration cost, next to floors that only start the same processes?

Three measurements, in one run on one machine:

1. **Fan-out**: 500 one-step runs whose step is ``true``.
2. **Chains**: 50 runs of 5 steps chained by ``needs``, each step a ``cp`` of a small
   file (4 KiB) from the previous step's output.

   * **obsflow**: a fresh site (``init_site``) with ``workers.runs: 2`` and
     ``processing.executor: local`` (durable state in the site's SQLite catalog), its
     pipelines file replaced by two toy pipelines (no outputs: nothing is published).
     The runs are created queued with :meth:`RunStore.create` (untimed), then every run ID
     is submitted to a :class:`LocalExecutor`; timed from the first submit until the
     executor has none in flight. Afterwards every run must be SUCCEEDED with every step
     SUCCEEDED, or the benchmark fails.
   * **floors**, the same commands: (a) a plain loop of ``subprocess.run``; (b)
     ``concurrent.futures.ProcessPoolExecutor(2)``, one task per run (a chain is one task
     doing its 5 ``cp`` in order). The pool is started and warmed before the clock starts.
     Both run at the CPU priority of obsflow's run workers (``processing.nice``).

   The site (so the runs' work directories) and the floors' files are on the same file
   system: ``/dev/shm`` if it exists, else the temporary directory (printed). Each side
   runs ``--repeat`` times (default 3, interleaved; obsflow on a fresh site each time) and
   the best is reported. Targets, as ratios to the ProcessPool floor: fan-out ≤ 3×,
   chains ≤ 2×. For reference, on this class of machine: Celery + Redis 6.7× and 3.2×;
   Luigi 9.9× and 5.6×; Snakemake 47× and 19×.

   Through Celery (Redis at ``--broker``, default ``redis://127.0.0.1:6379/0``; skipped,
   saying so, when it cannot be reached), the same work on 2 workers of one process each:

   * **obsflow on Celery**: the same site and runs with ``processing.executor: celery``
     and a queue of this benchmark's own; two ``obsflow worker --concurrency 1``
     subprocesses are started and ready before the clock starts; every run ID is handed
     to a :class:`CeleryExecutor`, timed until the catalog says every run has ended.
   * **floor: plain Celery**: an app configured as obsflow's
     (:func:`obsflow.processing.celery.make_app`: late acknowledgement, one prefetch), two
     workers of its own (this script, ``--plain-worker``), one task per run doing the
     same commands (a chain is one task doing its 5 ``cp``) and touching a file when done;
     timed from the first message sent until every task's file is there. What Celery
     itself costs, with nothing of obsflow's book-keeping.

   Target: obsflow on Celery ≤ 1.5× plain Celery, for the fan-out and for the chains.

3. **Tracker cost per arriving file**, with 10k and with 1M files in the catalog. A fresh
   site with the example registry (its 5 pipelines) gets N synthetic ``ofcam_raw`` rows,
   inserted in bulk (untimed, on the driver, each value converted by its column's type):
   500 frames a night (2 % BIAS, 3 % FLAT, the rest OBJECT; filters B/V/R), each with its
   tag, 4 keywords and its ``cached`` ledger stamp; the tracker's groups for those nights
   and every row marked tracked (as if it had seen them all). Then nights of 200 new raw
   frames arrive (same mix; inserted untimed) and :meth:`Tracker.drain` reads and
   evaluates them, its clock at the last arrival; the cost per file is the drain's time
   over 200. One night warms up, then the best of 3 nights is reported. Target: the cost
   at 1M at most 1.2× the cost at 10k. One more night is then drained with every SQL
   statement timed (not part of the figures) and the costliest statements are printed
   with SQLite's ``EXPLAIN QUERY PLAN``, at both sizes: that is where a cost that grows
   with the catalog comes from.

Prints wall times and ratios, and whether each target is met. Exit status is 0 even when
a target is missed (it is a measurement); non-zero when a run fails or the tracker does
not see every arrival. About 3 minutes, most of it inserting the 1M rows.

Run: ``python benchmarks/orchestration.py``; quick (100 runs, 10 chains, catalogs of 2k
and 50k files): ``python benchmarks/orchestration.py --quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import redis
import yaml
from celery import signals
from sqlalchemy import Engine, event, func, select

from obsflow.catalog import Catalog, schema
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.runs import NewRun, RunStore
from obsflow.processing.celery import CeleryExecutor, is_redis, make_app
from obsflow.processing.executor import LocalExecutor
from obsflow.processing.tracker import Tracker
from obsflow.registry import load_registry
from obsflow.settings import Processing, load_settings
from obsflow.site import Site, init_site, open_site
from obsflow.states import RunState, StepState
from synthetic import FILTERS, fill, frame_kind, insert_rows, load, machine, night_rows, verdict

FANOUT_TARGET = 3.0
CHAIN_TARGET = 2.0
CELERY_TARGET = 1.5
BROKER = "redis://127.0.0.1:6379/0"
WORKER_COMMAND = [sys.executable, "-m", "obsflow", "worker"]
READY_SECONDS = 120.0
POLL_SECONDS = 0.01
FLAT_TARGET = 1.2
WORKERS = 2
CHAIN_STEPS = 5
SMALL_FILE = 4096
ARRIVALS = 200
TRACKER_ROUNDS = 3
SHOWN_STATEMENTS = 3
REFERENCE = "Celery + Redis 6.7× / 3.2×; Luigi 9.9× / 5.6×; Snakemake 47× / 19×"


def fail(message: str) -> NoReturn:
    print(f"\nFAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


# ---------------------------------------------------------------- the floors


def run_true(_: int) -> None:
    """One fan-out run of the floors."""
    subprocess.run(["true"], check=True)


def run_chain(source: str, prefix: str) -> None:
    """One chain of the floors: ``cp`` the source, then each copy, in order."""
    previous = source
    for step in range(1, CHAIN_STEPS + 1):
        target = f"{prefix}-s{step}.dat"
        subprocess.run(["cp", previous, target], check=True)
        previous = target


def warm(_: int) -> None:
    """Nothing: makes the pool start its workers before the clock starts."""


def at_workers_priority() -> None:
    """Lower this process to the CPU priority of obsflow's run workers
    (``processing.nice``, by default 10): the floors compete for the CPU as obsflow's
    workers do, so that a machine loaded by others slows both sides alike (a niced
    obsflow against un-niced floors measured the others' load, not orchestration)."""
    wanted = Processing().nice
    if wanted > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, wanted)


def floor_loop(runs: int, chains: int, source: Path, out: Path) -> tuple[float, float]:
    """Seconds for the fan-out and for the chains, one process after another (in a
    process of its own, at the workers' priority)."""
    with ProcessPoolExecutor(1, initializer=at_workers_priority) as one:
        return one.submit(loop_in_process, runs, chains, source, out).result()


def loop_in_process(runs: int, chains: int, source: Path, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    for i in range(runs):
        run_true(i)
    fanout = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(chains):
        run_chain(str(source), str(out / f"loop-{i}"))
    return fanout, time.perf_counter() - start


def floor_pool(runs: int, chains: int, source: Path, out: Path) -> tuple[float, float]:
    """Seconds for the fan-out and for the chains on ``ProcessPoolExecutor(2)``."""
    with ProcessPoolExecutor(WORKERS, initializer=at_workers_priority) as pool:
        list(pool.map(warm, range(WORKERS)))
        start = time.perf_counter()
        list(pool.map(run_true, range(runs)))
        fanout = time.perf_counter() - start
        prefixes = [str(out / f"pool-{i}") for i in range(chains)]
        start = time.perf_counter()
        list(pool.map(run_chain, [str(source)] * chains, prefixes))
        return fanout, time.perf_counter() - start


def check_copies(out: Path, label: str, chains: int) -> None:
    made = [out / f"{label}-{i}-s{CHAIN_STEPS}.dat" for i in range(chains)]
    if not all(p.is_file() and p.stat().st_size == SMALL_FILE for p in made):
        fail(f"the {label} floor did not make every chain's last copy")


# ---------------------------------------------------------------- obsflow


def bench_pipelines(source: Path) -> str:
    """Two toy pipelines: ``true`` once; 5 ``cp`` chained by ``needs``. Their input is a
    raw frame no file will ever be (runs are created directly); they have no outputs."""
    never = "{product: ofcam_raw, name: frames, where: \"frame_type == 'NO SUCH TYPE'\"}"
    steps = ['      - {name: s1, command: [cp, "{source}", "{work}/s1.dat"]}']
    for k in range(2, CHAIN_STEPS + 1):
        steps.append(
            f"      - {{name: s{k}, needs: [s{k - 1}], "
            f'command: [cp, "{{work}}/s{k - 1}.dat", "{{work}}/s{k}.dat"]}}'
        )
    return "\n".join(
        [
            "pipelines:",
            "  - {id: bench_fanout, profile: bench_true, group: {by: [file]},",
            f"     inputs: [{never}]}}",
            "  - {id: bench_chain, profile: bench_copies, group: {by: [file]},",
            f"     inputs: [{never}], parameters: {{source: {json.dumps(str(source))}}}}}",
            "profiles:",
            "  - id: bench_true",
            "    steps:",
            '      - {name: run, command: ["true"]}',
            "  - id: bench_copies",
            "    steps:",
            *steps,
            "",
        ]
    )


def open_bench_site(directory: Path, source: Path) -> Site:
    site_dir = init_site(directory)
    (site_dir / "registry" / "ofcam_pipelines.yaml").write_text(bench_pipelines(source))
    settings = load_settings(site_dir)
    settings = settings.model_copy(
        update={
            "workers": settings.workers.model_copy(update={"runs": WORKERS}),
            "processing": settings.processing.model_copy(update={"executor": "local"}),
        }
    )
    return open_site(settings)


def create_runs(site: Site, pipeline: str, count: int) -> list[int]:
    """``count`` queued runs of ``pipeline``, each its own group, in one transaction."""
    runs = RunStore(site.catalog)
    now = site.clock()
    night = date(2026, 11, 21)
    ids: list[int] = []
    with site.catalog.write() as conn:
        for i in range(count):
            key = GroupKey.of(pipeline, {"night": night.isoformat(), "file": f"b{i:05d}"})
            new = NewRun(pipeline, key, night, inputs={}, reason="bench")
            run_id = runs.create(new, now, conn)
            if run_id is None:
                fail(f"{pipeline}: run {i} was not created")
            ids.append(run_id)
    return ids


def execute(site: Site, run_ids: list[int]) -> float:
    """Submit every run to a LocalExecutor; seconds from the first submit until none is
    in flight."""
    finished = threading.Event()
    executor = LocalExecutor(site, on_done=finished)
    try:
        start = time.perf_counter()
        for run_id in run_ids:
            executor.submit(run_id)
        while True:
            finished.clear()  # before looking, so that a run ending after the look wakes us
            if executor.in_flight == 0:
                break
            finished.wait(1.0)
        return time.perf_counter() - start
    finally:
        executor.close()


def check_runs(site: Site, run_ids: list[int], steps: int) -> None:
    """Every run SUCCEEDED, with ``steps`` steps each SUCCEEDED with exit status 0."""
    runs = RunStore(site.catalog)
    records = runs.find(run_ids=run_ids)
    bad = [r for r in records if r.state is not RunState.SUCCEEDED]
    if len(records) != len(run_ids) or bad:
        shown = "; ".join(f"run {r.id} {r.state.value}: {r.error}" for r in bad[:5])
        fail(
            f"{len(bad) or len(run_ids) - len(records)} of {len(run_ids)} runs did not "
            f"succeed: {shown}"
        )
    for run_id in run_ids:
        done = runs.steps(run_id)
        ok = [s for s in done if s.state is StepState.SUCCEEDED and s.exit_status == 0]
        if len(done) != steps or len(ok) != steps:
            fail(f"run {run_id}: {len(ok)} of {steps} steps succeeded: {done}")


def time_obsflow(work: Path, source: Path, runs: int, chains: int) -> tuple[float, float]:
    """Seconds for the fan-out and for the chains with obsflow, on a fresh site."""
    site = open_bench_site(work / "site", source)
    try:
        fan_ids = create_runs(site, "bench_fanout", runs)
        chain_ids = create_runs(site, "bench_chain", chains)
        fanout = execute(site, fan_ids)
        check_runs(site, fan_ids, 1)
        chain = execute(site, chain_ids)
        check_runs(site, chain_ids, CHAIN_STEPS)
    finally:
        site.close()
    return fanout, chain


# ---------------------------------------------------------------- through Celery


def broker_problem(broker: str) -> str | None:
    """Why ``broker`` cannot be used now, or None."""
    app = make_app(Processing(broker=broker))
    try:
        with app.connection_for_write(connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        app.close()
    return None


@contextlib.contextmanager
def workers(argv: list[str], count: int, ready: str, log: Path) -> Iterator[None]:
    """``count`` worker subprocesses of ``argv``, each started and saying ``ready`` on
    its output (in ``log``) before this yields; stopped (warm, then killed) after."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for n in range(count):
            out = log.with_suffix(f".{n}.log")
            with out.open("wb") as sink:
                procs.append(
                    (
                        subprocess.Popen(
                            argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                        ),
                        out,
                    )
                )
        deadline = time.monotonic() + READY_SECONDS
        for proc, out in procs:
            while ready not in out.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    fail(f"a worker did not start: {out.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
        yield
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def drop_queue(broker: str, queue: str) -> None:
    """Remove ``queue`` and what names it from the broker (each run uses new names)."""
    app = make_app(Processing(broker=broker))
    try:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)
    finally:
        app.close()
    if is_redis(broker):  # kombu keeps its routing table in keys of its own
        client = redis.Redis.from_url(broker)
        client.delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        client.close()


def open_celery_site(directory: Path, source: Path, broker: str, queue: str) -> Site:
    """The benchmark's site, its runs going to ``queue`` of ``broker`` (written in its
    ``obsflow.yaml``: the workers read it)."""
    site_dir = init_site(directory)
    (site_dir / "registry" / "ofcam_pipelines.yaml").write_text(bench_pipelines(source))
    config_path = site_dir / "obsflow.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["processing"].update(executor="celery", broker=broker, queue=queue)
    config_path.write_text(yaml.safe_dump(config))
    return open_site(load_settings(site_dir))


def execute_on_celery(site: Site, executor: CeleryExecutor, run_ids: list[int]) -> float:
    """Hand every run to the workers; seconds from the first until the catalog says every
    one of them has ended."""
    runs = schema.runs
    ended = select(func.count()).where(
        runs.c.id.in_(run_ids),
        runs.c.state.in_([RunState.SUCCEEDED.value, RunState.FAILED.value]),
    )
    start = time.perf_counter()
    for run_id in run_ids:
        executor.submit(run_id)
    while True:
        with site.catalog.read() as conn:
            if conn.execute(ended).scalar() == len(run_ids):
                break
        time.sleep(POLL_SECONDS)
    return time.perf_counter() - start


def time_obsflow_celery(
    work: Path, source: Path, runs: int, chains: int, broker: str
) -> tuple[float, float]:
    """Seconds for the fan-out and for the chains with obsflow on two Celery workers."""
    queue = f"bench-obsflow-{uuid.uuid4().hex[:8]}"
    site = open_celery_site(work / "site", source, broker, queue)
    argv = [*WORKER_COMMAND, "--site", str(site.settings.site), "--concurrency", "1"]
    try:
        fan_ids = create_runs(site, "bench_fanout", runs)
        chain_ids = create_runs(site, "bench_chain", chains)
        with workers(argv, WORKERS, "obsflow worker: ready", work / "worker"):
            executor = CeleryExecutor(site.settings, site.registry)
            try:
                fanout = execute_on_celery(site, executor, fan_ids)
                check_runs(site, fan_ids, 1)
                chain = execute_on_celery(site, executor, chain_ids)
                check_runs(site, chain_ids, CHAIN_STEPS)
            finally:
                executor.close()
    finally:
        site.close()
        drop_queue(broker, queue)
    return fanout, chain


PLAIN_TRUE = "bench.true"
PLAIN_CHAIN = "bench.chain"


def plain_true(marker: str) -> None:
    """A fan-out task of plain Celery: ``true``, then its file says it is done."""
    subprocess.run(["true"], check=True)
    Path(marker).touch()


def plain_worker(broker: str, queue: str) -> None:
    """``--plain-worker``: a Celery worker of plain tasks, configured as obsflow's (and,
    as its workers, at their CPU priority)."""
    at_workers_priority()
    app = make_app(Processing(broker=broker, queue=queue))
    app.task(name=PLAIN_TRUE)(plain_true)
    app.task(name=PLAIN_CHAIN)(run_chain)

    def ready(**_: Any) -> None:
        print("plain worker: ready", file=sys.stderr, flush=True)

    signals.worker_ready.connect(ready, weak=False)
    worker = app.Worker(
        queues=[queue], concurrency=1, pool="prefork", quiet=True,
        without_gossip=True, without_mingle=True, optimization="fair",
        hostname=f"plain-{os.getpid()}@bench",
    )  # fmt: skip
    worker.start()


def until_files(directory: Path, pattern: str, count: int) -> None:
    while sum(1 for _ in directory.glob(pattern)) < count:
        time.sleep(POLL_SECONDS)


def time_plain_celery(
    app: Any, queue: str, out: Path, source: Path, runs: int, chains: int
) -> tuple[float, float]:
    """Seconds for the fan-out and for the chains as plain Celery tasks (workers up)."""
    done = out / "done"
    done.mkdir()
    start = time.perf_counter()
    for i in range(runs):
        app.send_task(PLAIN_TRUE, args=(str(done / f"{i}"),), queue=queue)
    until_files(done, "*", runs)
    fanout = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(chains):
        app.send_task(PLAIN_CHAIN, args=(str(source), str(out / f"celery-{i}")), queue=queue)
    until_files(out, f"celery-*-s{CHAIN_STEPS}.dat", chains)
    return fanout, time.perf_counter() - start


@dataclass(frozen=True)
class Orchestration:
    """Best (fan-out seconds, chains seconds) of each side."""

    obsflow: tuple[float, float]
    loop: tuple[float, float]
    pool: tuple[float, float]
    celery: tuple[float, float] | None = None
    """obsflow on Celery (None: no broker)."""
    plain: tuple[float, float] | None = None
    """Plain Celery tasks (None: no broker)."""


def orchestration(
    root: Path, runs: int, chains: int, repeat: int, broker: str | None
) -> Orchestration:
    source = root / "small.dat"
    source.write_bytes(os.urandom(SMALL_FILE))
    names = ["obsflow", "loop", "pool"] + (["celery", "plain"] if broker else [])
    sides: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        if broker:  # the plain workers serve every round (their start is not timed)
            queue = f"bench-plain-{uuid.uuid4().hex[:8]}"
            stack.callback(drop_queue, broker, queue)
            argv = [sys.executable, __file__, "--plain-worker", broker, queue]
            stack.enter_context(workers(argv, WORKERS, "plain worker: ready", root / "plain"))
            plain_app = make_app(Processing(broker=broker, queue=queue))
            stack.callback(plain_app.close)
        for i in range(repeat):  # interleaved, so that a drifting load hits every side alike
            work = root / f"obsflow-{i}"
            sides["obsflow"].append(time_obsflow(work, source, runs, chains))
            shutil.rmtree(work)
            out = root / f"floor-{i}"
            out.mkdir()
            for name, floor in (("loop", floor_loop), ("pool", floor_pool)):
                sides[name].append(floor(runs, chains, source, out))
                check_copies(out, name, chains)
            if broker:
                work = root / f"celery-{i}"
                sides["celery"].append(time_obsflow_celery(work, source, runs, chains, broker))
                shutil.rmtree(work)
                sides["plain"].append(
                    time_plain_celery(plain_app, queue, out, source, runs, chains)
                )
                check_copies(out, "celery", chains)
            shutil.rmtree(out)
            print(
                f"  round {i + 1}: "
                + ", ".join(
                    f"{name} {t[-1][0]:.2f} s / {t[-1][1]:.2f} s" for name, t in sides.items()
                ),
                flush=True,
            )
    best = {name: (min(t[0] for t in ts), min(t[1] for t in ts)) for name, ts in sides.items()}
    return Orchestration(
        best["obsflow"], best["loop"], best["pool"], best.get("celery"), best.get("plain")
    )


# ---------------------------------------------------------------- the tracker


class StatementClock:
    """Time spent in each SQL statement on ``engine`` while entered (engine events; the
    tracker runs in the calling thread only)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.spent: dict[str, tuple[int, float]] = {}
        """Statement → (calls, seconds)."""
        self.slowest: dict[str, tuple[float, Any]] = {}
        """Statement → (seconds, parameters) of its slowest call."""
        self._started = 0.0

    def _before(self, *args: Any) -> None:
        self._started = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
        seconds = time.perf_counter() - self._started
        calls, total = self.spent.get(statement, (0, 0.0))
        self.spent[statement] = (calls + 1, total + seconds)
        if seconds > self.slowest.get(statement, (-1.0, None))[0]:
            self.slowest[statement] = (seconds, params)

    def __enter__(self) -> StatementClock:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)


@dataclass(frozen=True)
class Statement:
    text: str
    calls: int
    seconds: float
    slowest: float
    plan: str
    """SQLite's EXPLAIN QUERY PLAN with the parameters of its slowest call."""


@dataclass(frozen=True)
class TrackerCost:
    files: int
    per_file: list[float]
    """Seconds per arriving file, one entry per measured night."""
    statements: dict[str, Statement]
    """Of the extra night drained with every statement timed, by statement text."""

    @property
    def best_ms(self) -> float:
        return 1e3 * min(self.per_file)


def fixed(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def arrive_and_track(
    catalog: Catalog,
    tracker: Callable[[datetime], Tracker],
    night: date,
    first_id: int,
    arrivals: int,
    statements: StatementClock | None = None,
) -> float:
    """Insert a fresh night's ``arrivals`` (untimed); seconds the tracker takes for them
    (with every statement it makes timed by ``statements``, if given)."""
    rows = night_rows(first_id, night, arrivals, archived=False)
    insert_rows(catalog, rows)
    drain = tracker(max(r["at"] for r in rows["ledger"])).drain
    with statements or contextlib.nullcontext():
        start = time.perf_counter()
        drain()
        seconds = time.perf_counter() - start
    groups = schema.tracker_groups
    with catalog.read() as conn:
        untracked = conn.execute(select(func.count()).where(schema.is_untracked())).scalar()
        opened = conn.execute(
            select(func.count()).select_from(groups).where(groups.c.night == night)
        ).scalar()
    objects = sum(frame_kind(k, arrivals)[0] == "OBJECT" for k in range(arrivals))
    expected = objects + 1 + len(FILTERS)  # a group per object, the biases, flats per filter
    if untracked != 0 or opened != expected:
        fail(
            f"tracker: {untracked} files left untracked, {opened} groups opened for "
            f"{night} (expected {expected})"
        )
    return seconds


def tracker_cost(root: Path, total: int, arrivals: int, rounds: int) -> TrackerCost:
    site = init_site(root / f"tracker-{total}")
    settings = load_settings(site)
    registry = load_registry(settings.registry)
    catalog = Catalog.open(settings.catalog_url)
    try:
        start = time.perf_counter()
        night = fill(catalog, total)
        filled = time.perf_counter() - start
        print(f"  {total:>9,} files inserted in {filled:.1f} s (untimed)", flush=True)

        def tracker(now: datetime) -> Tracker:
            return Tracker(registry, catalog, fixed(now))

        next_id = total + 1
        per_file: list[float] = []
        for round_ in range(rounds + 1):  # the first night warms up
            night += timedelta(days=1)
            seconds = arrive_and_track(catalog, tracker, night, next_id, arrivals)
            next_id += arrivals
            if round_ > 0:
                per_file.append(seconds / arrivals)
                print(
                    f"    night {night}: {arrivals} files in {seconds:.3f} s, "
                    f"{1e3 * seconds / arrivals:.2f} ms per file",
                    flush=True,
                )
        clock = StatementClock(catalog.engine)
        arrive_and_track(catalog, tracker, night + timedelta(days=1), next_id, arrivals, clock)
        statements = {}
        with catalog.read() as conn:
            for text, (calls, seconds) in clock.spent.items():
                plan = ""
                if text.lstrip().upper().startswith("SELECT"):
                    found = conn.exec_driver_sql(
                        "EXPLAIN QUERY PLAN " + text, clock.slowest[text][1]
                    )
                    plan = "; ".join(str(row[-1]) for row in found)
                slowest = clock.slowest[text][0]
                statements[text] = Statement(short(text), calls, seconds, slowest, plan)
    finally:
        catalog.close()
        shutil.rmtree(site, ignore_errors=True)
    return TrackerCost(total, per_file, statements)


def short(statement: str) -> str:
    """A statement on one line, a long column list shown as ``…``."""
    text = re.sub(r"\s+", " ", statement).strip()
    text = re.sub(r"^SELECT (.{60,}?) FROM ", "SELECT … FROM ", text)
    return text if len(text) <= 200 else text[:199] + "…"


def where_time_goes(small: TrackerCost, large: TrackerCost) -> None:
    ranked = sorted(large.statements.items(), key=lambda kv: -kv[1].seconds)
    spent = sum(s.seconds for s in large.statements.values())
    print(
        f"  where the time goes (SQL of one more night, every statement timed; "
        f"{1e3 * spent:.0f} ms of SQL at {large.files:,} files):"
    )
    for text, ours in ranked[:SHOWN_STATEMENTS]:
        other = small.statements.get(text)
        before = f"{1e3 * other.seconds:.1f} ms" if other else "not run"
        print(
            f"    {1e3 * ours.seconds:8.1f} ms at {large.files:,} ({before} at "
            f"{small.files:,}), {ours.calls} calls, the slowest {1e3 * ours.slowest:.1f} ms: "
            f"{ours.text}"
        )
        if ours.plan:
            print(f"             plan: {ours.plan}")


# ---------------------------------------------------------------- the report


def report_orchestration(result: Orchestration, runs: int, chains: int, repeat: int) -> list[str]:
    """Print both tables; return the summary lines."""
    best_of = f", best of {repeat}" if repeat > 1 else ""
    lines = []
    for index, label, count, target in (
        (0, f"fan-out ({runs} × true)", runs, FANOUT_TARGET),
        (1, f"chains ({chains} × {CHAIN_STEPS} cp)", chains, CHAIN_TARGET),
    ):
        pool = result.pool[index]
        print(f"\n{label}{best_of}")
        print(f"  {'':<38} {'seconds':>8} {'ms/run':>8} {'× pool':>7}")
        rows = [("obsflow (LocalExecutor, SQLite)", "obsflow", result.obsflow[index])]
        if result.celery is not None and result.plain is not None:
            rows += [
                ("obsflow on Celery (Redis, 2 workers)", "obsflow-celery", result.celery[index]),
                ("floor: plain Celery (Redis, 2 workers)", "plain-celery", result.plain[index]),
            ]
        rows += [
            ("floor: loop of subprocess.run", "loop", result.loop[index]),
            ("floor: ProcessPoolExecutor(2)", "pool", pool),
        ]
        for name, _, seconds in rows:
            print(
                f"  {name:<38} {seconds:>8.2f} {1e3 * seconds / count:>8.2f} {seconds / pool:>7.2f}"
            )
        ratio = result.obsflow[index] / pool
        ruling = (
            f"obsflow / ProcessPool {ratio:.2f}×, target ≤ {target:g}×: {verdict(ratio, target)}"
        )
        print(f"  {ruling}")
        if result.celery is not None and result.plain is not None:
            over = result.celery[index] / result.plain[index]
            ruling += (
                f"; obsflow on Celery / plain Celery {over:.2f}×, target ≤ {CELERY_TARGET:g}×: "
                f"{verdict(over, CELERY_TARGET)}"
            )
            print(
                f"  obsflow on Celery / plain Celery {over:.2f}×, target ≤ {CELERY_TARGET:g}×: "
                f"{verdict(over, CELERY_TARGET)}"
            )
        figures = ", ".join(f"{short} {seconds:.2f} s" for _, short, seconds in rows)
        lines.append(f"  {label:<22} {figures}; {ruling}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, to try it out")
    parser.add_argument("--runs", type=int, default=None, help="fan-out runs (default 500)")
    parser.add_argument("--chains", type=int, default=None, help="chains (default 50)")
    parser.add_argument(
        "--sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
        help="files in the catalog for the tracker's cost (default 10000 1000000)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=3, help="time the orchestration N times, report the best"
    )
    parser.add_argument("--tmp", type=Path, default=None, help="where to work (default: /dev/shm)")
    parser.add_argument(
        "--broker", default=BROKER, help=f"the Redis of the Celery rows (default {BROKER})"
    )
    parser.add_argument("--no-celery", action="store_true", help="leave out the Celery rows")
    parser.add_argument(
        "--plain-worker", nargs=2, metavar=("BROKER", "QUEUE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(*args.plain_worker)
        return
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    runs = args.runs or (100 if args.quick else 500)
    chains = args.chains or (10 if args.quick else 50)
    small, large = args.sizes or ((2_000, 50_000) if args.quick else (10_000, 1_000_000))
    if not 0 < small < large:
        parser.error("--sizes: 0 < SMALL < LARGE")

    broker: str | None = None if args.no_celery else args.broker
    problem = broker_problem(broker) if broker else None
    began = time.perf_counter()
    print(f"{machine()}\n{load()} at the start")
    if problem:
        print(f"Celery rows left out: the broker {broker} cannot be reached ({problem})")
        broker = None
    shm = Path("/dev/shm")
    tmp = args.tmp or (shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    root = Path(tempfile.mkdtemp(prefix="obsflow-orchestration-", dir=tmp))
    where = "/dev/shm, in memory" if root.parent == shm else "no /dev/shm: the temporary directory"
    print(f"working in {root} ({where}): the site, its work directories, the floors' files")
    try:
        print(f"\norchestration, fan-out / chains, {args.repeat} round(s):", flush=True)
        result = orchestration(root, runs, chains, args.repeat, broker)
        summary = report_orchestration(result, runs, chains, args.repeat)
        print(f"  (for reference, on this class of machine: {REFERENCE})")

        print(
            f"\ntracker cost per arriving file ({ARRIVALS} raw frames of a fresh night; "
            f"best of {TRACKER_ROUNDS} nights after one to warm up):",
            flush=True,
        )
        costs = [tracker_cost(root, n, ARRIVALS, TRACKER_ROUNDS) for n in (small, large)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = costs[1].best_ms / costs[0].best_ms
    ruling = f"{ratio:.2f}×, target ≤ {FLAT_TARGET:g}×: {verdict(ratio, FLAT_TARGET)}"
    for cost in costs:
        print(f"  {cost.files:>9,} files in the catalog: {cost.best_ms:.2f} ms per file")
    print(f"  {costs[1].files:,} / {costs[0].files:,} files: {ruling}")
    where_time_goes(costs[0], costs[1])
    figures = ", ".join(f"{c.files:,} files {c.best_ms:.2f} ms" for c in costs)
    summary.append(f"  {'tracker, per file':<22} {figures}; {ruling}")

    print(f"\nsummary:\n  {machine()}\n  {load()} at the end")
    print("\n".join(summary))
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

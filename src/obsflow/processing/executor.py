"""Executors: where queued runs execute, behind one small interface.

:class:`Executor` is the seam. :class:`InlineExecutor` executes a run in the caller's
thread (tests, the embedded default's simplest form); :class:`LocalExecutor` executes up
to ``workers.runs`` runs at once on a pool of worker processes, each with its own site
(catalog connections, receiver), so that two runs' book-keeping happens in parallel. Each
step of a run is its own subprocess either way (:mod:`obsflow.processing.controller`). Only run IDs
cross to a worker: a later Celery executor takes the same IDs.

:func:`execute_run` is what every executor does with a run ID, and everything it needs
is in the catalog and the run-time profile:

1. claim the run (queued → running, with a lease; a second claim loses);
2. if an earlier attempt already published all its outputs (it died before saying so),
   finish it as succeeded;
3. resolve the inputs to local paths, fill the profile
   (:mod:`obsflow.processing.profile`), store it;
4. run it with the controller, every step recorded in the catalog and the run's log;
5. if it succeeded, publish its outputs through receipt (recognised by the registry,
   cached, queued for the archive, with the run as provenance), then finish the run.
   Nothing a failed run wrote ever reaches the cache.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from obsflow.archive.retrieval import NotFoundError
from obsflow.catalog.records import FileRecord
from obsflow.catalog.runs import RunRecord, RunStore, StepRow
from obsflow.errors import ObsflowError, RecognitionError, RunError
from obsflow.processing.controller import Controller, StepResult, StopFlag, kill_every_step
from obsflow.processing.inputs import values_of
from obsflow.processing.profile import OUTPUT_DIR, ParameterValue, RuntimeProfile, build_profile
from obsflow.receipt.intake import Wakeable
from obsflow.receipt.receiver import Outcome, Prepared
from obsflow.settings import Settings
from obsflow.site import Site, open_site
from obsflow.states import RunState, StepState

log = logging.getLogger(__name__)


class Executor(ABC):
    """Executes queued runs. Submitting a run twice is harmless: the claim decides."""

    @abstractmethod
    def submit(self, run_id: int) -> None:
        """Execute run ``run_id`` (now or soon)."""

    @abstractmethod
    def close(self, stop: bool = False) -> None:
        """Wait for the runs in flight (``stop``: interrupt them; their leases expire and
        they are retried on the next start)."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Runs submitted and not finished."""


class InlineExecutor(Executor):
    """Executes each run at once, in the thread that submits it."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.owner = f"inline-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def submit(self, run_id: int) -> None:
        execute_run(self.site, run_id, self.owner)

    def close(self, stop: bool = False) -> None:
        return None

    @property
    def in_flight(self) -> int:
        return 0


class LocalExecutor(Executor):
    """Executes up to ``workers.runs`` runs at once, each in a worker process of a pool
    (so the book-keeping of two runs is not serialised by one interpreter's lock), and
    renews their leases from here while they run."""

    def __init__(self, site: Site, on_done: Wakeable | None = None) -> None:
        self.site = site
        self.owner = f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # spawn, not fork: the daemon has threads (triggers, ingestors) a fork would copy
        context = multiprocessing.get_context("spawn")
        self._stop_workers = context.Event()
        workers = site.settings.workers.runs
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_worker_start,
            initargs=(site.settings, self._stop_workers, os.getpid()),
        )
        # start the workers now (a second or so: the imports), not at the first run
        for ready in [self._pool.submit(_worker_ready) for _ in range(workers)]:
            ready.result()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[int, Future[RunState | None]] = {}
        self._on_done = on_done
        self._heartbeat = threading.Thread(target=self._renew, name="run-leases", daemon=True)
        self._heartbeat.start()

    def submit(self, run_id: int) -> None:
        with self._lock:
            if run_id in self._running or self._stop.is_set():
                return
            future = self._pool.submit(_worker_execute, run_id, self.owner)
            self._running[run_id] = future
        future.add_done_callback(lambda f: self._done(run_id, f))

    def _done(self, run_id: int, future: Future[RunState | None]) -> None:
        with self._lock:
            self._running.pop(run_id, None)
        if future.cancelled():
            return  # never started (a shutdown): still queued in the catalog
        error = future.exception()
        if error is not None:
            log.error("run %d: the executor failed: %s", run_id, error, exc_info=error)
        if self._on_done is not None:
            self._on_done.set()

    def _renew(self) -> None:
        seconds = self.site.settings.processing.lease_seconds
        runs = RunStore(self.site.catalog)
        while not self._stop.wait(seconds / 3):
            with self._lock:
                ids = list(self._running)
            try:
                runs.renew(ids, self.owner, self.site.clock(), seconds)
            except Exception:  # the catalog is briefly unreachable: renew next time
                log.exception("could not renew run leases")

    def close(self, stop: bool = False) -> None:
        if stop:
            self._stop_workers.set()  # running steps are killed, their runs queued again
        self._pool.shutdown(wait=True, cancel_futures=stop)
        self._stop.set()
        self._heartbeat.join()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._running)


# A worker process of the LocalExecutor holds its own site (its own catalog connections,
# receiver and storage), made once when the process starts: per-process state is what
# a process pool's initializer is for.
_WORKER: dict[str, tuple[Site, StopFlag]] = {}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker_start(settings: Settings, stop: StopFlag, daemon: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when runs stop
    _die_with(daemon)
    _WORKER["site"] = (open_site(settings), stop)


def _die_with(daemon: int) -> None:
    """Make this worker end, with every step it runs, when its daemon dies, however it
    dies (SIGKILL, OOM): else its steps run on beside the ones of the daemon that takes its
    runs over when their leases expire. Linux tells an orphan by ``PR_SET_PDEATHSIG``
    (the daemon makes its workers from its main thread, whose end is the daemon's). A
    SIGTERM while the daemon lives (an operator, systemd's stop) is the daemon's to
    handle: the worker ignores it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: _orphaned(daemon))
    if sys.platform.startswith("linux"):
        # prctl by hand: a single call, and no maintained binding of it on PyPI
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("PR_SET_PDEATHSIG: %s", os.strerror(ctypes.get_errno()))
    _orphaned(daemon)  # the daemon died before the line above


def _orphaned(daemon: int) -> None:
    if os.getppid() == daemon:
        return
    kill_every_step()
    os._exit(1)


def _worker_ready() -> bool:
    return "site" in _WORKER


def _worker_execute(run_id: int, owner: str) -> RunState | None:
    site, stop = _WORKER["site"]
    return execute_run(site, run_id, owner, stop)


def make_executor(site: Site, on_done: Wakeable | None = None) -> Executor:
    """The executor the site's settings name."""
    if site.settings.processing.executor == "inline":
        return InlineExecutor(site)
    return LocalExecutor(site, on_done)


# ---------------------------------------------------------------------- one run


class _Steps:
    """Records the steps in the catalog as the controller reports them, in as few
    transactions as it can: a step's start is written (with every result since the
    last write, and the first time with the run-time profile) so that ``runs show``
    sees what runs; results are kept until then, or until the run's own finish."""

    def __init__(
        self, runs: RunStore, run_id: int, profile: RuntimeProfile, log_path: Path
    ) -> None:
        self.runs = runs
        self.run_id = run_id
        self.position = {step.name: n for n, step in enumerate(profile.steps)}
        self.profile: tuple[str, str, str] | None = (profile.dumps(), profile.work, str(log_path))
        self.pending: list[StepRow] = []
        self.written: set[str] = set()  # steps with a row

    def step_started(
        self, run_id: str, name: str, attempt: int, argv: tuple[str, ...], at: datetime
    ) -> None:
        started = StepRow(
            name, self.position[name], StepState.RUNNING, attempt, argv, at,
            new=name not in self.written,
        )  # fmt: skip
        self.runs.record_steps(self.run_id, [*self.pending, started], profile=self.profile)
        self.written.update(row.step for row in (*self.pending, started))
        self.pending, self.profile = [], None

    def step_finished(self, run_id: str, result: StepResult) -> None:
        self.pending.append(
            StepRow(
                result.name,
                self.position[result.name],
                result.state,
                result.attempts,
                result.argv,
                started=result.started,
                finished=result.finished,
                exit_status=result.exit_status,
                stdout_tail=result.stdout_tail,
                stderr_tail=result.stderr_tail,
                reason=result.reason or None,
                new=result.name not in self.written,
            )
        )

    def flush(self) -> list[StepRow]:
        """The results not written yet (they go with the run's finish)."""
        if self.profile is not None:  # no step ever started: store the profile now
            self.runs.record_steps(self.run_id, [], profile=self.profile)
            self.profile = None
        pending, self.pending = self.pending, []
        return pending


def execute_run(
    site: Site, run_id: int, owner: str, stop: StopFlag | None = None
) -> RunState | None:
    """Claim and execute one run; its final state, or None if another executor has it."""
    runs = RunStore(site.catalog)
    settings = site.settings.processing
    run = runs.claim(run_id, owner, site.clock(), settings.lease_seconds)
    if run is None:
        return None
    log.info("run %d started: %s %s", run_id, run.pipeline, run.group_key)
    steps: _Steps | None = None
    try:
        if run.attempts > 1 and _already_published(site, run):
            runs.finish(run_id, owner, RunState.SUCCEEDED, site.clock())
            return RunState.SUCCEEDED
        profile = _build(site, run)
        log_path = site.settings.logs / "runs" / f"run-{run_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        steps = _Steps(runs, run_id, profile, log_path)
        controller = Controller(parallel=settings.parallel_steps, clock=site.clock)
        outcome = controller.run(profile, log_path=log_path, listener=steps, stop=stop)
        if not outcome.succeeded and stop is not None and stop.is_set():
            runs.record_steps(run_id, steps.flush())
            runs.release(run_id, owner)  # the daemon stops: the next start runs it again
            log.info("run %d interrupted by the shutdown; queued again", run_id)
            return RunState.QUEUED
        if not outcome.succeeded:
            error = outcome.error or f"run {run_id} failed"
            runs.finish(run_id, owner, RunState.FAILED, site.clock(), error, steps=steps.flush())
            log.warning("run %d failed: %s", run_id, error)
            _unpin(site, run_id)
            return RunState.FAILED
        if profile.outputs:
            _publish(site, run_id, profile)
    except (ObsflowError, OSError) as exc:  # a culprit named; the daemon goes on
        done = steps.flush() if steps is not None else []
        runs.finish(run_id, owner, RunState.FAILED, site.clock(), str(exc), steps=done)
        log.warning("run %d failed: %s", run_id, exc)
        _unpin(site, run_id)
        return RunState.FAILED
    if not runs.finish(run_id, owner, RunState.SUCCEEDED, site.clock(), steps=steps.flush()):
        log.warning("run %d: lease lost before it finished; it will be checked again", run_id)
        return None
    _unpin(site, run_id)
    if not settings.keep_work:
        shutil.rmtree(profile.work, ignore_errors=True)
    log.info("run %d succeeded: %s %s", run_id, run.pipeline, run.group_key)
    return RunState.SUCCEEDED


def _unpin(site: Site, run_id: int) -> None:
    """The run is over: its inputs may leave the cache again (a released run keeps them
    pinned until its next attempt ends)."""
    site.retriever().unpin_holder(f"run:{run_id}")


def _expected_outputs(site: Site, run: RunRecord) -> int:
    pipeline = site.registry.pipelines.get(run.pipeline)
    return 0 if pipeline is None else len(pipeline.outputs)


def _already_published(site: Site, run: RunRecord) -> bool:
    """An earlier attempt published every output, then died before finishing the run."""
    expected = _expected_outputs(site, run)
    return expected > 0 and len(RunStore(site.catalog).outputs(run.id)) >= expected


def _build(site: Site, run: RunRecord) -> RuntimeProfile:
    pipeline = site.registry.pipelines.get(run.pipeline)
    if pipeline is None:
        raise RunError(f"run {run.id}: pipeline {run.pipeline!r} is no longer in the registry")
    profile = site.registry.profiles[pipeline.profile]
    records = {
        r.id: r for r in site.catalog.records([i for ids in run.inputs.values() for i in ids])
    }
    inputs: dict[str, list[Path]] = {}
    for spec in pipeline.inputs:
        inputs[spec.name] = [
            _local_path(site, run, records[i]) for i in run.inputs.get(spec.name, ())
        ]
    primary_ids = run.inputs.get(pipeline.inputs[0].name, ())
    parameters: dict[str, ParameterValue] = {}
    if primary_ids:
        primary = records[primary_ids[0]]
        try:
            values = values_of(primary, site.registry)  # the facts receipt recorded
        except RecognitionError as exc:
            log.error(
                "run %d: input %s",
                run.id,
                exc,
                extra={"archive_id": primary.archive_id, "run_id": run.id},
            )
            raise RunError(f"run {run.id}: input {exc}") from exc
        for name, value in values.items():
            if isinstance(value, str | int | float | bool) or value is None:
                parameters[name] = value
    parameters.update(dict(run.group_key.values))
    parameters.update(_name_parts(parameters))
    parameters.update(pipeline.parameters)
    parameters.update({"site": str(site.settings.site), "python": sys.executable})
    parameters.update(run.overrides)
    work = site.settings.work / f"run-{run.id}"
    shutil.rmtree(work, ignore_errors=True)  # an earlier attempt's leftovers
    (work / OUTPUT_DIR).mkdir(parents=True)
    return build_profile(
        run_id=str(run.id),
        pipeline=pipeline,
        profile=profile,
        parameters=parameters,
        inputs=inputs,
        work=work,
    )


def _name_parts(parameters: dict[str, ParameterValue]) -> dict[str, ParameterValue]:
    """Parameters made to go into file names: ``nightid`` (``20261121``) and
    ``object_slug`` (the object with every run of other characters than letters and
    digits made one ``_``)."""
    parts: dict[str, ParameterValue] = {}
    night, name = parameters.get("night"), parameters.get("object")
    if isinstance(night, str) and night:
        parts["nightid"] = night.replace("-", "")
    if isinstance(name, str) and name:
        parts["object_slug"] = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "object"
    return parts


def _local_path(site: Site, run: RunRecord, record: FileRecord) -> Path:
    """Where an input's bytes are: the cache, or restored there from the archive (the one
    retrieval path, :meth:`obsflow.archive.fetch.Fetcher.fetch`); pinned by the run."""
    if record.archive_id is None:
        raise RunError(f"run {run.id}: input {record.original_name} has no archive ID")
    try:
        return site.retriever().fetch(record.archive_id)
    except NotFoundError as exc:
        raise RunError(f"run {run.id}: input {record.archive_id}: {exc}") from exc


def _publish(site: Site, run_id: int, profile: RuntimeProfile) -> None:
    """Receive every output, with the run as provenance, in one catalog transaction."""
    prepared: list[Prepared] = []
    for product, path in sorted(profile.outputs.items()):
        result = site.receiver.prepare(Path(path))
        if not isinstance(result, Prepared):
            raise RunError(
                f"run {run_id}: output {Path(path).name} (product {product}) was "
                f"{result.outcome.value}: {result.reason}"
            )
        if result.product.id != product:
            raise RunError(
                f"run {run_id}: output {Path(path).name} is recognised as product "
                f"{result.product.id}, not {product}; fix the pipeline's output name"
            )
        prepared.append(replace(result, new=replace(result.new, made_by_run=run_id)))
    for result in site.receiver.commit(prepared):
        if result.outcome not in (Outcome.CACHED, Outcome.DUPLICATE):
            raise RunError(f"run {run_id}: output {result.path.name}: {result.reason}")

"""The life of one run, the same code wherever it executes.

:func:`execute_run` is what every executor does with a run ID (the daemon's pool, a
Celery worker with the site's storage, a Celery worker that only knows the server's
URL)::

    claim (compare-and-set: queued → running, with a lease; a second claim loses;
      │     the inputs are pinned in the cache while the run lives)
    stage the inputs (the cache's paths, or fetched over HTTP and checked by sha256)
      │     and fill the run-time profile with this worker's paths
    execute the steps (the controller: subprocesses or containers, a log per step)
      │     while a heartbeat renews the lease; a lease lost stops the steps
    publish the outputs (through receipt, with the run as provenance, all at once)
      │
    report (succeeded or failed, with the last steps; the pins dropped)

Where the run's book-keeping lives is a :class:`RunHost`: the site itself
(:class:`obsflow.processing.sitehost.SiteHost`: the catalog, the cache) or the archive
server over HTTP (:class:`obsflow.processing.serverhost.ServerHost`). The host decides at
the claim when there is nothing to execute (an earlier attempt published every output
and died before saying so; a run that cannot be planned fails there, naming why).

A run's end is data (:class:`Finish`) until it is written: :func:`execute_run` writes
it alone (:meth:`RunHost.finish`); :func:`execute_claimed` executes a run already claimed
and hands its end to whoever books it (the local pool's worker writes it with the claim
of its next run in one transaction: :meth:`obsflow.processing.sitehost.SiteHost.book`).

A run asked to stop (the daemon shutting down) is released: queued again, its attempt
not counted, its steps forgotten. A run whose worker dies keeps its lease until it
expires; then the daemon queues it again, once (:meth:`obsflow.catalog.runs.RunStore.recover`).
Nothing a failed run wrote reaches the cache.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol

from obsflow.catalog.steps import StepRow
from obsflow.errors import ObsflowError
from obsflow.processing.controller import Controller, StepResult, StopFlag
from obsflow.processing.plan import RunPlan
from obsflow.processing.profile import ParameterValue, RuntimeProfile, build_profile
from obsflow.receipt.receiver import utcnow
from obsflow.settings import Processing
from obsflow.states import RunState, StepState

if TYPE_CHECKING:
    from obsflow.processing.container import ContainerRunner
    from obsflow.processing.controller import StepRunner

log = logging.getLogger(__name__)

StoredProfile = tuple[str, str, str]
"""A run-time profile as stored with its run: (JSON, work directory, log path)."""


@dataclass(frozen=True)
class Claim:
    """What a host answers to a claim that won: a plan to execute, or its decision."""

    run_id: int
    plan: RunPlan | None
    """None when the host decided at once (:attr:`decided`)."""
    decided: RunState | None = None
    """SUCCEEDED: an earlier attempt published every output; FAILED: it cannot be
    planned (:attr:`error` says why). The host has recorded it."""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "plan": None if self.plan is None else self.plan.to_json(),
            "decided": None if self.decided is None else self.decided.value,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Claim:
        plan = data.get("plan")
        decided = data.get("decided")
        return cls(
            run_id=int(data["run_id"]),
            plan=None if plan is None else RunPlan.from_json(plan),
            decided=None if decided is None else RunState(decided),
            error=data.get("error"),
        )


class RunHost(Protocol):
    """Where a run's book-keeping lives, as the lifecycle uses it. Every method but
    :meth:`claim` is called only by the lease's owner; a host may refuse a caller that
    lost the lease (:meth:`renew` False, :meth:`finish` False, :meth:`publish` raises)."""

    @property
    def lease_seconds(self) -> float:
        """How long a lease lasts without a heartbeat."""

    def claim(self, run_id: int, owner: str) -> Claim | None:
        """queued → running for ``owner`` and the inputs pinned; None if another has it
        or it is done."""

    def renew(self, run_id: int, owner: str) -> bool:
        """Extend ``owner``'s lease; False if it was lost (the run taken over)."""

    def stage(self, plan: RunPlan) -> dict[str, list[Path]]:
        """Each input's local path, by input name, in the plan's order."""

    def local_parameters(self) -> dict[str, ParameterValue]:
        """This worker's own parameters (``python``; ``site`` where there is one)."""

    def work_dir(self, run_id: int) -> Path:
        """A fresh, empty work directory for the run on this worker."""

    def log_path(self, run_id: int) -> Path:
        """Where this worker writes the run's log."""

    def record_steps(
        self,
        run_id: int,
        owner: str,
        steps: Sequence[StepRow],
        profile: StoredProfile | None = None,
    ) -> None:
        """Write step rows (and the run-time profile, the first time)."""

    def publish(self, run_id: int, owner: str, outputs: Mapping[str, Path]) -> None:
        """Receive every output (product → local file) with the run as provenance, all
        or none; :class:`~obsflow.errors.RunError` naming the output that was refused."""

    def finish(
        self,
        run_id: int,
        owner: str,
        state: RunState,
        error: str | None,
        steps: Sequence[StepRow],
        log_path: Path | None = None,
        profile: StoredProfile | None = None,
    ) -> bool:
        """running → ``state`` with the last step rows (and the run-time profile if it
        was not written yet), the pins dropped; False if the lease was lost (nothing
        written)."""

    def release(self, run_id: int, owner: str, steps: Sequence[StepRow]) -> None:
        """running → queued (the worker stops): the attempt does not count."""


@dataclass(frozen=True)
class Finish:
    """A run's end as data: what :meth:`RunHost.finish` writes, held until it is written
    (by the host alone, or by :meth:`obsflow.processing.sitehost.SiteHost.book` with the
    ends and claims of other runs in one transaction)."""

    run_id: int
    state: RunState
    """SUCCEEDED or FAILED."""
    error: str | None
    steps: tuple[StepRow, ...]
    """The step rows not written yet."""
    log_path: Path | None = None
    profile: StoredProfile | None = None
    """The run-time profile, if it was not written yet."""


Book = Callable[[Finish], bool]
"""Writes a run's end as its lease's owner; False if the lease was lost (nothing
written)."""


def finish_alone(host: RunHost, owner: str) -> Book:
    """The :data:`Book` of a run whose end is written by itself (:meth:`RunHost.finish`)."""

    def book(end: Finish) -> bool:
        return host.finish(
            end.run_id, owner, end.state, end.error, end.steps, end.log_path, end.profile
        )

    return book


def execute_run(
    host: RunHost,
    run_id: int,
    owner: str,
    *,
    processing: Processing,
    containers: ContainerRunner | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], datetime] = utcnow,
    warm: StepRunner | None = None,
) -> RunState | None:
    """Claim and execute one run; its final state (QUEUED: released by ``stop``), or
    None if another executor has it or the lease was lost on the way. ``warm``: the
    worker's warm step runner (:mod:`obsflow.processing.warm`), if it has one."""
    claim = host.claim(run_id, owner)
    if claim is None:
        return None
    return execute_claimed(
        host,
        claim,
        owner,
        book=finish_alone(host, owner),
        processing=processing,
        containers=containers,
        stop=stop,
        clock=clock,
        warm=warm,
    )


def execute_claimed(
    host: RunHost,
    claim: Claim,
    owner: str,
    *,
    book: Book,
    processing: Processing,
    containers: ContainerRunner | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], datetime] = utcnow,
    warm: StepRunner | None = None,
) -> RunState | None:
    """Execute a run ``owner`` has claimed, and have ``book`` write its end (a
    :class:`Finish`); its final state as :func:`execute_run` says."""
    run_id = claim.run_id
    if claim.plan is None:
        if claim.decided is RunState.FAILED:
            log.warning("run %d failed: %s", run_id, claim.error, extra={"run_id": run_id})
        return claim.decided
    plan = claim.plan
    log.info("run %d started: %s (attempt %d)", run_id, plan.pipeline.id, plan.attempt)
    with Heartbeat(host, run_id, owner) as beat:
        either = _Either(stop, beat.lost)
        ended = _execute(host, plan, owner, processing, containers, either, stop, beat, clock, warm)
        if not isinstance(ended, tuple):
            return ended
        end, work = ended
        # written while the heartbeat still renews the lease (a batch's write may wait)
        if not book(end):
            log.warning("run %d: lease lost before it finished; it will be checked again", run_id)
            return None
    if end.state is RunState.FAILED:
        log.warning("run %d failed: %s", run_id, end.error, extra={"run_id": run_id})
        return RunState.FAILED
    if not processing.keep_work and work is not None:
        shutil.rmtree(work, ignore_errors=True)
    log.info("run %d succeeded: %s", run_id, plan.pipeline.id, extra={"run_id": run_id})
    return RunState.SUCCEEDED


def _execute(
    host: RunHost,
    plan: RunPlan,
    owner: str,
    processing: Processing,
    containers: ContainerRunner | None,
    either: StopFlag,
    stop: StopFlag | None,
    beat: Heartbeat,
    clock: Callable[[], datetime],
    warm: StepRunner | None = None,
) -> tuple[Finish, Path | None] | RunState | None:
    """The run's end to write and its work directory; or QUEUED (released), or None
    (the lease was lost), already dealt with."""
    run_id = plan.run_id
    recorder: StepRecorder | None = None
    try:
        inputs = host.stage(plan)
        work = host.work_dir(run_id)
        profile = build_profile(
            run_id=str(run_id),
            pipeline=plan.pipeline,
            profile=plan.profile,
            parameters=plan.parameters_with(host.local_parameters()),
            inputs=inputs,
            work=work,
        )
        log_path = host.log_path(run_id)
        recorder = StepRecorder(host, run_id, owner, profile, log_path, wake=beat.wake)
        beat.watch(recorder)
        controller = Controller(
            parallel=processing.parallel_steps, clock=clock, containers=containers, warm=warm
        )
        outcome = controller.run(profile, log_path=log_path, listener=recorder, stop=either)
        if beat.lost.is_set():
            log.warning("run %d: lease lost while it ran; another worker has it", run_id)
            return None
        if not outcome.succeeded and stop is not None and stop.is_set():
            host.release(run_id, owner, recorder.flush()[0])
            log.info("run %d interrupted by the shutdown; queued again", run_id)
            return RunState.QUEUED
        if not outcome.succeeded:
            error = outcome.error or f"run {run_id} failed"
            steps, stored = recorder.flush()
            return Finish(run_id, RunState.FAILED, error, tuple(steps), log_path, stored), None
        if profile.outputs:
            recorder.report()  # the run's provenance is there before its products are
            host.publish(run_id, owner, {p: Path(path) for p, path in profile.outputs.items()})
    except (ObsflowError, OSError) as exc:  # a culprit named; the worker goes on
        steps, stored = recorder.flush() if recorder is not None else ([], None)
        logged = recorder.log_path if recorder is not None else None
        return Finish(run_id, RunState.FAILED, str(exc), tuple(steps), logged, stored), None
    steps, stored = recorder.flush()
    return Finish(run_id, RunState.SUCCEEDED, None, tuple(steps), log_path, stored), work


class _Either:
    """Set when either flag is: the worker stops, or the run's lease was lost."""

    def __init__(self, first: StopFlag | None, second: StopFlag) -> None:
        self.first, self.second = first, second

    def is_set(self) -> bool:
        return self.second.is_set() or (self.first is not None and self.first.is_set())


STOP_WITHIN: Final = 2.0
"""Seconds within which a running run learns that it was cancelled (``obsflow runs
cancel``, an aborted reduction: its lease is taken) and kills its steps: its lease is
renewed at least this often. One small UPDATE (or, for a worker over HTTP, one request)
per running run every two seconds; a run of milliseconds renews nothing."""


class Heartbeat:
    """Renews a run's lease every third of its length (at least every
    :data:`STOP_WITHIN` seconds) while the run executes;
    :attr:`lost` is set when the host says the lease is gone (the steps are then
    stopped: another worker has the run). A host that cannot be reached for a while is
    tried again at the next beat: the lease outlasts two failures. It also writes the
    steps of the :class:`StepRecorder` it watches when they are due (:data:`REPORT_AFTER`),
    so that the run's own thread never waits for that.

    The beats of every run a process executes are given by one thread of that process
    (:class:`_Beats`), started when first needed: a thread started and joined for each
    run would cost more than most runs' steps."""

    def __init__(self, host: RunHost, run_id: int, owner: str) -> None:
        self.host, self.run_id, self.owner = host, run_id, owner
        self.lost = threading.Event()
        self.recorder: StepRecorder | None = None
        self.interval = min(host.lease_seconds / 3, STOP_WITHIN)
        self.renew_at = float("inf")

    def watch(self, recorder: StepRecorder) -> None:
        self.recorder = recorder

    def wake(self) -> None:
        """Look again at what is due (a step started)."""
        _the_beats().wake(self.next_due())

    def __enter__(self) -> Heartbeat:
        self.renew_at = time.monotonic() + self.interval
        _the_beats().add(self)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        _the_beats().remove(self)

    def next_due(self) -> float:
        """When :meth:`beat` has something to do (a monotonic time)."""
        recorder = self.recorder
        due = recorder.due if recorder is not None else None
        return self.renew_at if due is None else min(self.renew_at, due)

    def beat(self, now: float) -> None:
        recorder = self.recorder
        if recorder is not None and recorder.due is not None and now >= recorder.due:
            try:
                recorder.report()
            except Exception:  # kept: they go with the next report or the finish
                log.warning("run %d: could not record its steps", self.run_id, exc_info=True)
        if now < self.renew_at:
            return
        self.renew_at = now + self.interval
        try:
            if not self.host.renew(self.run_id, self.owner):
                self.renew_at = float("inf")
                self.lost.set()
        except Exception:  # the catalog or server briefly unreachable: next beat
            log.warning("run %d: could not renew its lease", self.run_id, exc_info=True)


class _Beats:
    """The thread that gives the beats of a process's runs, each when it is due. One
    beat at a time: a host that is slow to answer delays the others, which share its
    catalog or server anyway. A forked child starts afresh (the thread is not there).

    The thread is woken only for what falls due before it would wake anyway
    (:attr:`_until`): a run of a busy worker that ends in less than a beat's interval
    costs it no wake-up at all, where waking it at each run's start and each step's
    (and fighting it for the GIL) was a tenth of what a short run cost its process."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._beats: set[Heartbeat] = set()
        self._beating: Heartbeat | None = None
        self._thread: threading.Thread | None = None
        self._until = float("inf")
        """When the waiting thread looks again of its own accord (a monotonic time);
        -inf while it is not waiting (it looks at every beat before it waits again)."""

    def add(self, beat: Heartbeat) -> None:
        with self._cond:
            self._beats.add(beat)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
                self._thread.start()
            if beat.next_due() < self._until:
                self._cond.notify_all()

    def remove(self, beat: Heartbeat) -> None:
        """Forget ``beat``, once a beat of it in progress has ended (the thread, waking
        for it, finds it gone and waits for the others)."""
        with self._cond:
            self._beats.discard(beat)
            while self._beating is beat:
                self._cond.wait()

    def wake(self, due: float) -> None:
        """Something is due at ``due`` (a monotonic time): wake the thread if it would
        look later than that."""
        with self._cond:
            if due < self._until:
                self._cond.notify_all()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                due = [b for b in self._beats if b.next_due() <= now]
                if not due:
                    self._until = min((b.next_due() for b in self._beats), default=float("inf"))
                    self._cond.wait(None if self._until == float("inf") else self._until - now)
                    self._until = float("-inf")
                    continue
                for beat in due:
                    if beat not in self._beats:  # removed while another beat was given
                        continue
                    self._beating = beat
                    self._cond.release()
                    try:
                        beat.beat(now)
                    finally:
                        self._cond.acquire()
                        self._beating = None
                        self._cond.notify_all()


@functools.cache
def _the_beats() -> _Beats:
    """This process's :class:`_Beats`, made at the first run (no thread at import; two
    made by a race would each serve its own beats correctly)."""
    return _Beats()


REPORT_AFTER: Final = 0.5
"""Seconds a step runs before it is written as running (``runs show`` then sees it): a
shorter step is written once, with its result, in the run's finish. Most steps of a
busy night take milliseconds; one transaction less each is most of what a run costs."""


class StepRecorder:
    """Records the steps through the host as the controller reports them, in as few
    calls as it can: rows wait in :attr:`pending` (one per step, its latest state) until
    a step has run for :data:`REPORT_AFTER` (:meth:`report`, called by the
    :class:`Heartbeat`'s thread; with the run-time profile the first time), or until the
    run's finish (:meth:`flush`)."""

    def __init__(
        self,
        host: RunHost,
        run_id: int,
        owner: str,
        profile: RuntimeProfile,
        log_path: Path,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.host, self.run_id, self.owner = host, run_id, owner
        self.log_path = log_path
        self.position = {step.name: n for n, step in enumerate(profile.steps)}
        self.profile: StoredProfile | None = (profile.dumps(), profile.work, str(log_path))
        self.pending: dict[str, StepRow] = {}
        self.written: set[str] = set()  # steps with a row
        self.due: float | None = None
        """When :meth:`report` should write what is pending (a monotonic time)."""
        self._wake = wake
        self._lock = threading.Lock()  # the controller's thread and the heartbeat's

    def step_started(
        self, run_id: str, name: str, attempt: int, argv: tuple[str, ...], at: datetime
    ) -> None:
        with self._lock:
            self.pending[name] = StepRow(
                name, self.position[name], StepState.RUNNING, attempt, argv, at,
                new=name not in self.written,
            )  # fmt: skip
            if self.due is None:
                self.due = time.monotonic() + REPORT_AFTER
        self._wake()

    def step_finished(self, run_id: str, result: StepResult) -> None:
        with self._lock:
            self.pending[result.name] = StepRow(
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

    def report(self) -> None:
        """Write what is pending now (and the profile, the first time); kept pending if
        the host cannot be reached."""
        with self._lock:
            self.due = None
            if not self.pending and self.profile is None:
                return
            rows = list(self.pending.values())
            self.host.record_steps(self.run_id, self.owner, rows, self.profile)
            self.written.update(row.step for row in rows)
            self.pending, self.profile = {}, None

    def flush(self) -> tuple[list[StepRow], StoredProfile | None]:
        """What was not written yet: the steps' rows, and the profile if it never was
        (they go with the run's finish)."""
        with self._lock:
            self.due = None
            rows, profile = list(self.pending.values()), self.profile
            self.written.update(row.step for row in rows)
            self.pending, self.profile = {}, None
            return rows, profile

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

A run asked to stop (the daemon shutting down) is released: queued again, its attempt
not counted, its steps forgotten. A run whose worker dies keeps its lease until it
expires; then the daemon queues it again, once (:meth:`obsflow.catalog.runs.RunStore.recover`).
Nothing a failed run wrote reaches the cache.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from obsflow.catalog.runs import StepRow
from obsflow.errors import ObsflowError
from obsflow.processing.controller import Controller, StepResult, StopFlag
from obsflow.processing.plan import RunPlan
from obsflow.processing.profile import ParameterValue, RuntimeProfile, build_profile
from obsflow.receipt.receiver import utcnow
from obsflow.settings import Processing
from obsflow.states import RunState, StepState

if TYPE_CHECKING:
    from obsflow.processing.container import ContainerRunner

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
    ) -> bool:
        """running → ``state`` with the last step rows, the pins dropped; False if the
        lease was lost (nothing written)."""

    def release(self, run_id: int, owner: str, steps: Sequence[StepRow]) -> None:
        """running → queued (the worker stops): the attempt does not count."""


def execute_run(
    host: RunHost,
    run_id: int,
    owner: str,
    *,
    processing: Processing,
    containers: ContainerRunner | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> RunState | None:
    """Claim and execute one run; its final state (QUEUED: released by ``stop``), or
    None if another executor has it or the lease was lost on the way."""
    claim = host.claim(run_id, owner)
    if claim is None:
        return None
    if claim.plan is None:
        if claim.decided is RunState.FAILED:
            log.warning("run %d failed: %s", run_id, claim.error, extra={"run_id": run_id})
        return claim.decided
    plan = claim.plan
    log.info("run %d started: %s (attempt %d)", run_id, plan.pipeline.id, plan.attempt)
    with Heartbeat(host, run_id, owner) as beat:
        either = _Either(stop, beat.lost)
        return _execute(host, plan, owner, processing, containers, either, stop, beat, clock)


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
) -> RunState | None:
    run_id = plan.run_id
    recorder: StepRecorder | None = None
    work: Path | None = None
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
        recorder = StepRecorder(host, run_id, owner, profile, log_path)
        controller = Controller(
            parallel=processing.parallel_steps, clock=clock, containers=containers
        )
        outcome = controller.run(profile, log_path=log_path, listener=recorder, stop=either)
        if beat.lost.is_set():
            log.warning("run %d: lease lost while it ran; another worker has it", run_id)
            return None
        if not outcome.succeeded and stop is not None and stop.is_set():
            host.release(run_id, owner, recorder.flush())
            log.info("run %d interrupted by the shutdown; queued again", run_id)
            return RunState.QUEUED
        if not outcome.succeeded:
            error = outcome.error or f"run {run_id} failed"
            host.finish(run_id, owner, RunState.FAILED, error, recorder.flush(), log_path)
            log.warning("run %d failed: %s", run_id, error, extra={"run_id": run_id})
            return RunState.FAILED
        if profile.outputs:
            host.publish(run_id, owner, {p: Path(path) for p, path in profile.outputs.items()})
    except (ObsflowError, OSError) as exc:  # a culprit named; the worker goes on
        done = recorder.flush() if recorder is not None else []
        logged = recorder.log_path if recorder is not None else None
        host.finish(run_id, owner, RunState.FAILED, str(exc), done, logged)
        log.warning("run %d failed: %s", run_id, exc, extra={"run_id": run_id})
        return RunState.FAILED
    if not host.finish(run_id, owner, RunState.SUCCEEDED, None, recorder.flush(), log_path):
        log.warning("run %d: lease lost before it finished; it will be checked again", run_id)
        return None
    if not processing.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    log.info("run %d succeeded: %s", run_id, plan.pipeline.id, extra={"run_id": run_id})
    return RunState.SUCCEEDED


class _Either:
    """Set when either flag is: the worker stops, or the run's lease was lost."""

    def __init__(self, first: StopFlag | None, second: StopFlag) -> None:
        self.first, self.second = first, second

    def is_set(self) -> bool:
        return self.second.is_set() or (self.first is not None and self.first.is_set())


class Heartbeat:
    """Renews a run's lease every third of its length, on a thread of its own, while
    the run executes; :attr:`lost` is set when the host says the lease is gone (the
    steps are then stopped: another worker has the run). A host that cannot be reached
    for a while is tried again at the next beat: the lease outlasts two failures."""

    def __init__(self, host: RunHost, run_id: int, owner: str) -> None:
        self.host, self.run_id, self.owner = host, run_id, owner
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"run-{run_id}-heartbeat", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        interval = self.host.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                if not self.host.renew(self.run_id, self.owner):
                    self.lost.set()
                    return
            except Exception:  # the catalog or server briefly unreachable: next beat
                log.warning("run %d: could not renew its lease", self.run_id, exc_info=True)


class StepRecorder:
    """Records the steps through the host as the controller reports them, in as few
    calls as it can: a step's start is written (with every result since the last
    write, and the first time with the run-time profile) so that ``runs show`` sees
    what runs; results are kept until then, or until the run's own finish."""

    def __init__(
        self, host: RunHost, run_id: int, owner: str, profile: RuntimeProfile, log_path: Path
    ) -> None:
        self.host, self.run_id, self.owner = host, run_id, owner
        self.log_path = log_path
        self.position = {step.name: n for n, step in enumerate(profile.steps)}
        self.profile: StoredProfile | None = (profile.dumps(), profile.work, str(log_path))
        self.pending: list[StepRow] = []
        self.written: set[str] = set()  # steps with a row

    def step_started(
        self, run_id: str, name: str, attempt: int, argv: tuple[str, ...], at: datetime
    ) -> None:
        started = StepRow(
            name, self.position[name], StepState.RUNNING, attempt, argv, at,
            new=name not in self.written,
        )  # fmt: skip
        rows = [*self.pending, started]
        self.host.record_steps(self.run_id, self.owner, rows, self.profile)
        self.written.update(row.step for row in rows)
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
            self.host.record_steps(self.run_id, self.owner, [], self.profile)
            self.profile = None
        pending, self.pending = self.pending, []
        for row in pending:
            self.written.add(row.step)
        return pending

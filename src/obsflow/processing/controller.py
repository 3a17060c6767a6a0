"""The controller: runs the steps of one run-time profile as real processes.

:meth:`Controller.run` takes a :class:`~obsflow.profile.RuntimeProfile` and returns a
:class:`RunOutcome`; it never raises for a step that fails (only :class:`RunError` for a
profile whose ``needs`` do not form a graph of its own steps, before anything runs).

* Each step attempt is one ``subprocess.Popen`` of its argv (no shell) in the run's work
  directory, with the parent environment plus the step's ``env``, stdin from /dev/null,
  stdout and stderr to ``work/logs/STEP.ATTEMPT.out|err``, in a session of its own, so
  that the whole process tree can be signalled: SIGTERM to the group on a timeout or a
  stop, SIGKILL ``kill_grace`` seconds later. When a step's main process ends, whatever
  it left running in its group is killed: a step does not outlive itself.
* Steps start in dependency order (``needs``), at most ``parallel`` at once, ready steps
  in profile order. A step whose ``when`` was false is skipped and counts as done. A step
  that fails (non-zero exit, cannot start, timed out) is tried again up to ``retries``
  more times; if it still fails, every step that needs it, directly or not, is skipped
  and the run fails. Steps that do not depend on the failure still run to the end: an
  operator learns about every broken branch from one run, and no process is left behind.
* A step with a container ``image`` runs through the controller's ``containers`` runner
  (:class:`~obsflow.processing.container.ContainerRunner`: the Docker Engine API, Docker or
  Podman); without one it fails without starting, naming the setting (``containers.host``).
  Both kinds sit behind one seam, :class:`StepRunner` → :class:`StepProcess`: the loop
  below neither knows nor cares whether a step is a process group or a container. A third
  sits there too: the warm runner (:mod:`obsflow.processing.warm`, ``processing.warm``)
  forks a Python tool step from a process that imported its modules once, a process
  group of its own as the subprocess would be.
* When ``stop`` is set, running steps are killed (FAILED, "stopped: ...") and steps not
  started are skipped; it is checked every 0.1 s.
* When every step succeeded, each declared output must exist as a file, or the run fails.
* The run log (appended to ``log_path``) holds the profile JSON, each attempt's argv,
  times, exit status, stdout and stderr (up to 1 MB each), each skip and the outcome.

Which steps are ready is :class:`graphlib.TopologicalSorter`'s to say (``get_ready`` and
``done``); starting them is done in the thread that calls :meth:`Controller.run`, not
with asyncio (whose child watchers want the main thread's event loop, while runs come from
an executor's worker threads): the only waiting is for steps to end, and ``poll()`` on one
file descriptor per step wakes the run's thread the moment one ends, or at the next
deadline, with no fixed sleeps. For a subprocess that descriptor is a pidfd (Linux;
elsewhere a small thread blocks in ``os.waitid`` and closes a pipe); for a container, a
small thread blocks in the engine's ``wait`` and closes a pipe. That one thread does
everything else: it starts, signals and reaps steps, writes the log and calls the
listener, so calls to the listener for one run are never concurrent (no lock needed), and
a process group is only signalled while its leader is unreaped (its ID cannot have been
reused).
"""

from __future__ import annotations

import contextlib
import graphlib
import logging
import math
import os
import select
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Protocol

from obsflow.errors import RunError
from obsflow.processing.profile import OUTPUT_DIR, RuntimeProfile, RuntimeStep
from obsflow.receipt.receiver import utcnow
from obsflow.states import StepState

if TYPE_CHECKING:
    from obsflow.processing.container import ContainerRunner

log = logging.getLogger(__name__)

LOG_DIR: Final = "logs"
"""Each attempt's stdout and stderr are files in ``{work}/logs``."""
LOG_CAP: Final = 1 << 20
"""At most this many bytes of one stream are copied into the run log."""
STOP_CHECK: Final = 0.1
"""Seconds between looks at the ``stop`` event while steps run."""
KILLED_BY_STOP: Final = "stopped: killed when the run was asked to stop"
SKIPPED_BY_STOP: Final = "stopped: the run was asked to stop before this step started"


@dataclass(frozen=True)
class StepResult:
    """How one step ended (SUCCEEDED, FAILED or SKIPPED), as of its last attempt."""

    name: str
    state: StepState
    attempts: int
    """How many attempts were made; 0 if it never started."""
    argv: tuple[str, ...]
    started: datetime | None
    finished: datetime | None
    exit_status: int | None
    """None if it never ran or could not start; negative: killed by that signal."""
    stdout_tail: str
    stderr_tail: str
    reason: str
    """Empty on success, else why it failed or was skipped, for a human."""


class StopFlag(Protocol):
    """Set when the run must stop: a :class:`threading.Event`, or a multiprocessing one."""

    def is_set(self) -> bool: ...


class StepListener(Protocol):
    """How the catalog learns about steps; called only from the thread running the run."""

    def step_started(
        self, run_id: str, name: str, attempt: int, argv: tuple[str, ...], at: datetime
    ) -> None: ...

    def step_finished(self, run_id: str, result: StepResult) -> None: ...


@dataclass(frozen=True)
class RunOutcome:
    succeeded: bool
    steps: tuple[StepResult, ...]
    """In profile order."""
    missing_outputs: tuple[str, ...]
    """Declared outputs that do not exist after every step succeeded."""
    error: str | None
    """One line naming the run, the step and the cause, when the run failed."""


class StepProcess(Protocol):
    """One started attempt of one step, as the controller drives it.

    The controller polls :attr:`fd`, may :meth:`signal` the step while it runs, and calls
    :meth:`finish` exactly once, after ``fd`` became readable (or after a SIGKILL, when a
    run is aborted). :meth:`abandon` may be called from any thread or a signal handler,
    at any time before :meth:`finish`.
    """

    fd: int
    """Readable once the step has ended; :meth:`finish` closes it."""
    kill_grace: float | None
    """Seconds from SIGTERM to SIGKILL for this step; None: the controller's own."""

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to everything the step runs (its process group, its container);
        a step that already ended is no error."""

    def finish(self) -> int:
        """Wait for the end, release everything the step held (what it left running,
        its container, ``fd``) and return its exit status (negative: killed by that
        signal); raise :class:`RunError` when no exit status can be known (the reason)."""

    def abandon(self) -> None:
        """SIGKILL the step and release what it holds now, without waiting: for a worker
        that must end at once (see :func:`kill_every_step`)."""


class StepRunner(Protocol):
    """Where steps run: :class:`SubprocessRunner` (process groups on this machine) or
    :class:`~obsflow.processing.container.ContainerRunner` (a container engine)."""

    def start(
        self, step: RuntimeStep, *, run_id: str, work: Path, stdout: Path, stderr: Path
    ) -> StepProcess:
        """Start one attempt of ``step`` in the run's ``work`` directory, with its standard
        output and error written to the files ``stdout`` and ``stderr``; raise
        :class:`RunError` with the reason (for a human) when it cannot start."""


class SubprocessRunner:
    """Each attempt is one ``subprocess.Popen`` of the step's argv (no shell) in the work
    directory, with the parent's environment plus the step's ``env``, stdin from
    /dev/null, in a session of its own so that its whole process tree can be signalled."""

    def start(
        self, step: RuntimeStep, *, run_id: str, work: Path, stdout: Path, stderr: Path
    ) -> StepProcess:
        env = {**os.environ, **step.env} if step.env else None
        try:
            with open(stdout, "wb") as fo, open(stderr, "wb") as fe:
                proc = subprocess.Popen(
                    step.argv,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=fo,
                    stderr=fe,
                    start_new_session=True,
                )
        except (OSError, ValueError, IndexError) as exc:
            raise RunError(_why_not(step, exc)) from None
        return _ProcessGroup(proc, _exit_fd(proc))


@dataclass(eq=False)
class _ProcessGroup:
    """A step's process, leader of a process group of its own."""

    proc: subprocess.Popen[bytes]
    fd: int
    kill_grace: float | None = None

    def signal(self, sig: signal.Signals) -> None:
        # only before finish() reaps the leader: the group's ID is still its own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def finish(self) -> int:
        self.signal(signal.SIGKILL)  # whatever the step left running in its group
        status = self.proc.wait()
        os.close(self.fd)
        return status

    def abandon(self) -> None:
        self.signal(signal.SIGKILL)


SUBPROCESSES: Final = SubprocessRunner()


class Controller:
    """Runs run-time profiles; holds only settings, so one may serve many threads."""

    def __init__(
        self,
        *,
        parallel: int = 2,
        clock: Callable[[], datetime] = utcnow,
        tail_bytes: int = 4000,
        kill_grace: float = 5.0,
        containers: ContainerRunner | None = None,
        warm: StepRunner | None = None,
    ) -> None:
        """``containers`` runs the steps that name an ``image`` (None: they fail without
        starting); ``warm`` the others (a :class:`~obsflow.processing.warm.WarmRunner`,
        which forks Python tool steps from a warm process and starts the rest as
        subprocesses; None: the subprocess runner); ``kill_grace`` is the subprocesses'
        time from SIGTERM to SIGKILL (a container runner has its own,
        ``containers.stop_seconds``)."""
        if parallel < 1 or tail_bytes < 0 or kill_grace < 0:
            raise ValueError("parallel must be >= 1, tail_bytes and kill_grace >= 0")
        self.parallel = parallel
        self.clock = clock
        self.tail_bytes = tail_bytes
        self.kill_grace = kill_grace
        self.containers = containers
        self.warm = warm

    def runner(self, step: RuntimeStep) -> StepRunner | None:
        """Who runs ``step``: the warm or the subprocess runner, the container runner, or
        nobody."""
        if step.image is None:
            return SUBPROCESSES if self.warm is None else self.warm
        return self.containers

    def run(
        self,
        profile: RuntimeProfile,
        *,
        log_path: Path,
        listener: StepListener | None = None,
        stop: StopFlag | None = None,
    ) -> RunOutcome:
        """Run every step of ``profile``; see the module docstring for the rules."""
        graph = _graph(profile)
        work = Path(profile.work)
        (work / OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        (work / LOG_DIR).mkdir(exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8", errors="replace") as out:
            return _Run(self, profile, work, out, listener, stop, graph).execute()


# The steps running in this process (process groups, containers), whatever run or thread
# started them; a step leaves the set before it is finished (a group's leader reaped: its ID
# cannot be reused while it is here). What must die with a run worker whose daemon died:
# see kill_every_step. (list() of a set holds the GIL throughout: no lock, so a signal
# handler may call kill_every_step in the middle of a run.)
_LIVE: set[StepProcess] = set()


def kill_every_step() -> None:
    """SIGKILL every step this process has running: each process group, each container
    (which is removed, too). For a run worker whose daemon died: a restarted daemon takes
    its runs over, and their old steps must not run on beside the new ones."""
    for process in list(_LIVE):
        process.abandon()


@dataclass(eq=False)
class _Attempt:
    """One running attempt of one step."""

    step: RuntimeStep
    number: int
    process: StepProcess
    started: datetime
    deadline: float
    killed: str = ""  # why it was signalled (a timeout, a stop), "" if not
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM


@dataclass
class _Run:
    """The state of one run; only the thread that called :meth:`Controller.run` uses it."""

    controller: Controller
    profile: RuntimeProfile
    work: Path
    out: IO[str]
    listener: StepListener | None
    stop: StopFlag | None
    graph: graphlib.TopologicalSorter[str]
    ready: set[str] = field(default_factory=set)  # needs resolved, not yet started
    results: dict[str, StepResult] = field(default_factory=dict)
    blocker: dict[str, str] = field(default_factory=dict)  # step → the failed step it waits on
    running: list[_Attempt] = field(default_factory=list)
    poller: select.poll = field(default_factory=select.poll)
    stopped: bool = False

    def execute(self) -> RunOutcome:
        p = self.profile
        self.write(
            f"==== run {p.run_id}  pipeline {p.pipeline}  profile {p.profile}\n"
            f"started {self.now()}  work {self.work}  parallel {self.controller.parallel}\n"
            f"run-time profile:\n{p.dumps()}\n\n"
        )
        self.ready.update(self.graph.get_ready())
        try:
            self.schedule()
            while self.running:
                self.wait()
                self.schedule()
        except BaseException as exc:  # a listener's, ^C: leave no process behind
            for attempt in self.running:
                attempt.process.signal(signal.SIGKILL)
                _LIVE.discard(attempt.process)
                with contextlib.suppress(RunError):
                    attempt.process.finish()
            self.write(f"==== {self.now()}  run {p.run_id} aborted: {exc!r}\n\n")
            raise
        return self.outcome()

    # -- scheduling ---------------------------------------------------------------------

    def schedule(self) -> None:
        """Resolve or start ready steps in profile order until nothing changes (one made
        ready in a pass is taken in that pass if it comes later in the profile)."""
        if self.stop is not None and self.stop.is_set() and not self.stopped:
            self.halt()
        changed = True
        while changed:
            changed = False
            for step in self.profile.steps:
                if step.name in self.ready and self.resolve(step):
                    self.ready.remove(step.name)
                    changed = True

    def resolve(self, step: RuntimeStep) -> bool:
        """Skip, fail or start a ready step; False if it must wait for a free slot."""
        blocked = [self.blocker[n] for n in step.needs if n in self.blocker]
        if blocked:
            self.blocker[step.name] = blocked[0]
            self.end_unrun(step, StepState.SKIPPED, f"needs {blocked[0]}, which failed")
        elif not step.enabled:
            self.end_unrun(step, StepState.SKIPPED, f"when false: {step.when}")
        elif self.controller.runner(step) is None:
            why = f"image {step.image!r} needs a container engine, and none is configured"
            self.end_unrun(step, StepState.FAILED, f"{why} (settings: containers.host)")
        elif len(self.running) < self.controller.parallel:
            self.launch(step, 1)
        else:
            return False
        return True

    def halt(self) -> None:
        """Kill the running steps and skip every step not started; nothing starts after."""
        self.stopped = True
        self.ready.clear()
        for attempt in self.running:
            self.terminate(attempt, KILLED_BY_STOP)
        running = {attempt.step.name for attempt in self.running}
        for step in self.profile.steps:
            if step.name not in self.results and step.name not in running:
                self.end_unrun(step, StepState.SKIPPED, SKIPPED_BY_STOP)

    def wait(self) -> None:
        """Wait for a process to exit, a deadline or a look at ``stop``; act on them."""
        timeout = min(a.kill_at if a.kill_at is not None else a.deadline for a in self.running)
        timeout = min(timeout - time.monotonic(), 86400.0)
        if self.stop is not None and not self.stopped:
            timeout = min(timeout, STOP_CHECK)
        ready = {fd for fd, _ in self.poller.poll(max(0, math.ceil(timeout * 1000)))}
        for attempt in [a for a in self.running if a.process.fd in ready]:
            self.ended(attempt)
        now = time.monotonic()
        for attempt in self.running:
            if attempt.kill_at is not None and now >= attempt.kill_at:
                attempt.process.signal(signal.SIGKILL)
                attempt.kill_at = float("inf")  # nothing more to do but wait
            elif not attempt.killed and now >= attempt.deadline:
                self.terminate(attempt, f"timed out after {attempt.step.timeout:g} s")

    def terminate(self, attempt: _Attempt, why: str) -> None:
        grace = attempt.process.kill_grace
        attempt.killed = why
        attempt.kill_at = time.monotonic() + (
            self.controller.kill_grace if grace is None else grace
        )
        attempt.process.signal(signal.SIGTERM)
        self.write(f"---- {self.now()}  step {attempt.step.name}: {why}; sent SIGTERM\n")

    # -- one step -----------------------------------------------------------------------

    def launch(self, step: RuntimeStep, number: int) -> None:
        """Start attempt ``number`` of ``step``; one that cannot start ends at once."""
        name, tries = step.name, 1 + step.retries
        at = self.now()
        self.write(
            f"---- {at}  step {name} attempt {number}/{tries} started: {shlex.join(step.argv)}\n"
        )
        if self.listener is not None:
            self.listener.step_started(self.profile.run_id, name, number, step.argv, at)
        stdout, stderr = self.stream_paths(name, number)
        runner = self.controller.runner(step)
        assert runner is not None  # resolve() failed the step otherwise
        try:
            process = runner.start(
                step, run_id=self.profile.run_id, work=self.work, stdout=stdout, stderr=stderr
            )
        except RunError as exc:
            self.attempt_done(step, number, at, None, f"cannot start: {exc}")
            return
        _LIVE.add(process)
        attempt = _Attempt(step, number, process, at, time.monotonic() + step.timeout)
        self.poller.register(process.fd, select.POLLIN)
        self.running.append(attempt)

    def ended(self, attempt: _Attempt) -> None:
        """``attempt`` ended (a process not yet reaped, a container not yet removed):
        clean up, reap, judge."""
        self.running.remove(attempt)
        self.poller.unregister(attempt.process.fd)
        _LIVE.discard(attempt.process)
        status: int | None
        try:
            status, failure = attempt.process.finish(), ""
        except RunError as exc:
            status, failure = None, str(exc)
        if attempt.killed:
            reason = attempt.killed
        elif status is None:
            reason = failure
        elif status < 0:
            reason = f"killed by signal {-status} ({signal.strsignal(-status)})"
        else:
            reason = f"exit status {status}" if status else ""
        self.attempt_done(attempt.step, attempt.number, attempt.started, status, reason)

    def attempt_done(
        self, step: RuntimeStep, number: int, started: datetime, status: int | None, reason: str
    ) -> None:
        """Log one finished attempt; retry it, or record the step's result."""
        finished = now = self.now()
        stdout, stderr = self.stream_paths(step.name, number)
        out_text, out_tail = _read_stream(stdout, self.controller.tail_bytes)
        err_text, err_tail = _read_stream(stderr, self.controller.tail_bytes)
        took = (finished - started).total_seconds()
        parts = [
            f"---- {finished}  step {step.name} attempt {number}/{1 + step.retries}: "
            f"{reason or 'succeeded'} ({took:.3f} s)\n"
            f"argv: {shlex.join(step.argv)}\n"
            f"started {started}  finished {finished}  exit status {status}\n"
        ]
        for label, path, text in (("stdout", stdout, out_text), ("stderr", stderr, err_text)):
            parts.append(f"--- {label} ({path}):\n{text}" if text else f"--- {label}: empty\n")
        self.write("".join(parts) + "\n")
        failed = bool(reason)
        if failed and number <= step.retries and not self.stopped:
            self.write(f"---- step {step.name}: trying again\n")
            self.launch(step, number + 1)
            return
        state = StepState.FAILED if failed else StepState.SUCCEEDED
        out, err = out_tail, err_tail
        self.finish(
            StepResult(step.name, state, number, step.argv, started, now, status, out, err, reason)
        )

    def end_unrun(self, step: RuntimeStep, state: StepState, reason: str) -> None:
        """Record a step that never started: SKIPPED, or FAILED without starting."""
        self.write(f"---- {self.now()}  step {step.name} {state}: {reason}\n\n")
        self.finish(StepResult(step.name, state, 0, step.argv, None, None, None, "", "", reason))

    def finish(self, result: StepResult) -> None:
        if result.state is StepState.FAILED:
            self.blocker[result.name] = result.name
        self.results[result.name] = result
        if not self.stopped:  # after a stop nothing more is scheduled
            self.graph.done(result.name)
            self.ready.update(self.graph.get_ready())
        if self.listener is not None:
            self.listener.step_finished(self.profile.run_id, result)

    # -- the end ------------------------------------------------------------------------

    def outcome(self) -> RunOutcome:
        p = self.profile
        steps = tuple(self.results[s.name] for s in p.steps)
        failures = [r for r in self.results.values() if r.state is StepState.FAILED]  # first first
        missing: tuple[str, ...] = ()
        error: str | None = None
        if self.stopped:
            killed = sum(r.reason == KILLED_BY_STOP for r in steps)
            skipped = sum(r.reason == SKIPPED_BY_STOP for r in steps)
            error = f"run {p.run_id}: stopped ({killed} step(s) killed, {skipped} not started)"
        elif failures:
            first = failures[0]
            error = f"run {p.run_id} step {first.name}: {first.reason}"
            lines = [line.strip() for line in first.stderr_tail.splitlines() if line.strip()]
            if lines:
                error += f": {lines[-1][:300]}"
            if len(failures) > 1:
                error += f" (also failed: {', '.join(r.name for r in failures[1:])})"
        else:
            missing = tuple(o for o in p.outputs.values() if not (self.work / o).is_file())
            if missing:
                what = "output " if len(missing) == 1 else "outputs "
                was = " was" if len(missing) == 1 else " were"
                error = f"run {p.run_id}: {what}{', '.join(missing)}{was} not written"
        self.write(
            f"==== {self.now()}  run {p.run_id} {'failed: ' + error if error else 'succeeded'}\n\n"
        )
        log.info("run %s: %s", p.run_id, error or "succeeded", extra={"run_id": p.run_id})
        return RunOutcome(error is None, steps, missing, error)

    # -- helpers ------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.controller.clock()

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def stream_paths(self, name: str, number: int) -> tuple[Path, Path]:
        logs = self.work / LOG_DIR
        return logs / f"{name}.{number}.out", logs / f"{name}.{number}.err"


def _exit_fd(proc: subprocess.Popen[bytes]) -> int:
    """A file descriptor that becomes readable when ``proc`` exits (it stays unreaped)."""
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: a thread waits, then closes a pipe
        readable, writable = os.pipe()
        threading.Thread(target=_await_exit, args=(proc.pid, writable), daemon=True).start()
        return readable


def _await_exit(pid: int, writable: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    os.close(writable)  # the read end sees end-of-file: readable


def _why_not(step: RuntimeStep, exc: BaseException) -> str:
    if not step.argv:
        return "the step has an empty command"
    program = step.argv[0]
    if isinstance(exc, FileNotFoundError):
        return f"no program {program!r}"
    if isinstance(exc, PermissionError):
        return f"{program!r} is not executable (permission denied)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{program!r}: {exc.strerror}"
    return f"{program!r}: {exc}"


def _read_stream(path: Path, tail_bytes: int) -> tuple[str, str]:
    """The stream's text for the run log (capped at LOG_CAP) and its last ``tail_bytes``."""
    try:
        if os.stat(path).st_size == 0:  # most steps say nothing: one call, not nine
            return "", ""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= LOG_CAP:
                data = f.read()
                text = data.decode("utf-8", "replace")
                tail = data[-tail_bytes:] if tail_bytes else b""
            else:
                head = f.read(LOG_CAP // 2)
                f.seek(size - LOG_CAP // 2)
                end = f.read()
                note = f"\n[... {size - LOG_CAP} bytes left out here; all of it is in {path} ...]\n"
                text = head.decode("utf-8", "replace") + note + end.decode("utf-8", "replace")
                tail = end[-tail_bytes:] if tail_bytes else b""
    except FileNotFoundError:
        return "", ""
    while tail and len(tail) < size and tail[0] & 0xC0 == 0x80:  # a cut UTF-8 character
        tail = tail[1:]
    if text and not text.endswith("\n"):
        text += "\n"
    return text, tail.decode("utf-8", "replace")


def _graph(profile: RuntimeProfile) -> graphlib.TopologicalSorter[str]:
    """The steps' ``needs`` as a prepared sorter; :class:`RunError` unless step names are
    unique, usable as file names, and ``needs`` name steps of this profile without a cycle."""
    where = f"run {profile.run_id}"
    if not profile.work:
        raise RunError(f"{where}: the run-time profile has no work directory")
    names = [s.name for s in profile.steps]
    for step in profile.steps:
        if names.count(step.name) > 1 or not step.name or "/" in step.name or "\0" in step.name:
            raise RunError(f"{where}: step name {step.name!r} is used twice or is not usable")
        for need in step.needs:
            if need not in names:
                raise RunError(f"{where} step {step.name}: needs {need!r}, which is not a step")
    graph = graphlib.TopologicalSorter({s.name: s.needs for s in profile.steps})
    try:
        graph.prepare()
    except graphlib.CycleError as exc:
        raise RunError(f"{where}: needs form a cycle: {' -> '.join(exc.args[1])}") from None
    return graph

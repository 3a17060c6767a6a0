"""The warm step runner: Python tool steps forked from a process that imported them once.

A step such as ``{python} -m obsflow.tools.ccd calibrate ...`` spends about a second of
its life importing numpy, scipy and astropy before its own work begins, on every step of
every run. :class:`WarmRunner` is a :class:`~obsflow.processing.controller.StepRunner`
for those steps: each run worker holds one, which starts a **zygote**, a fresh
interpreter (``python -m obsflow.processing.zygote``, which imports nothing of obsflow)
that imports
``processing.warm_modules`` once and then waits for requests. For each step::

    worker ──request (argv, cwd, env) + the log files' and a step socket's fds──► zygote
    zygote ──fork──► supervisor ──fork──► the step (a session of its own: setsid)
    supervisor ──"pid"──► worker                 (now the controller may signal the group)
    supervisor ──"exit status"──► worker         (the step ended; it stays unreaped)
    worker: SIGKILL to what is left of the group, closes the step socket
    supervisor: reaps the step, exits            (the zygote reaps its supervisors)

The step is what the subprocess would have been: ``sys.argv`` as ``python -m`` sets it,
the run's work directory as its cwd (and ``sys.path[0]``), exactly the environment the
subprocess would get (the worker's plus the step's ``env``), stdin from /dev/null, stdout
and stderr to the step's log files (opened by the worker, as for a subprocess), its exit
status (an uncaught exception: the traceback and 1; killed: minus the signal), its own
process group for the controller's timeout and cancel, the worker's nice and ionice (the
zygote is the worker's child: the kernel passes both on). Nothing leaks between steps:
each is a fresh fork of the zygote, which never runs a step itself; numpy's legacy global
random state is seeded afresh in each (Python's ``random`` is, by Python).

The step socket is the handle's :attr:`fd`: readable when the exit status arrives (or the
supervisor died), so the controller waits on it as on a pidfd, without polling. The
supervisor holds the step unreaped until the worker is done with it, so the process group
the controller signals is still the step's (its ID cannot be reused meanwhile); a worker
that dies closes the socket, and the supervisor kills the group.

Steps run as plain subprocesses, as before, when they are not Python tool commands (the
interpreter is not this one's ``sys.executable``, no ``-m MODULE``), when the step's
``env`` sets a ``PYTHON*`` variable (it changes how an interpreter starts), when the
work directory is missing (the subprocess runner says why), or when the zygote is gone.
One difference remains: a module the zygote imported read its environment at import
(e.g. numpy's thread count from ``OMP_NUM_THREADS``) before the step's ``env`` applied.

Hand-written, not :mod:`multiprocessing`'s forkserver: that one runs Python callables in
children it keeps as its own (no process group of their own, no exit status as a
subprocess has one, no log files as stdout), while a step must look to the controller
exactly like the subprocess it replaces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

from obsflow.errors import RunError
from obsflow.processing import zygote
from obsflow.processing.controller import SUBPROCESSES, StepProcess
from obsflow.processing.profile import RuntimeStep
from obsflow.registry import Registry
from obsflow.settings import Processing

log = logging.getLogger(__name__)

START_SECONDS: Final = 120.0
"""A step waits this long at most for the zygote to answer (it may still be importing)."""


def tool_module(step: RuntimeStep, python: str = sys.executable) -> str | None:
    """The module a step runs if it is a Python tool command (``python -m MODULE ...``
    with this interpreter), else None. A step whose ``env`` sets a ``PYTHON*`` variable
    is not one here: it changes how an interpreter starts."""
    argv = step.argv
    if len(argv) < 3 or argv[0] != python or argv[1] != "-m" or step.image is not None:
        return None
    if any(name.startswith("PYTHON") for name in step.env):
        return None
    module = argv[2]
    if not module or module.startswith("-") or not all(p.isidentifier() for p in module.split(".")):
        return None
    return module


def uses_tools(registry: Registry | None) -> bool:
    """Whether a profile of ``registry`` has a Python tool step (``{python} -m MODULE``, not
    in a container). A worker starts its zygote at once only then: the zygote imports
    numpy, scipy and astropy, one to two seconds of CPU that a site whose steps are other
    programs should not pay (with no registry, a worker over HTTP, the first such step
    starts it)."""
    if registry is None:
        return False
    return any(
        step.image is None and step.command[:2] == ("{python}", "-m")
        for profile in registry.profiles.values()
        for step in profile.steps
    )


def warm_runner(processing: Processing, *, now: bool) -> WarmRunner | None:
    """The worker's warm step runner if ``processing.warm`` (None: every step cold), its
    zygote started ``now`` (a worker, after lowering its priority) or at the first step."""
    if not processing.warm:
        return None
    runner = WarmRunner(processing.warm_modules)
    if now:
        runner.warm_up()
    return runner


class WarmRunner:
    """Runs Python tool steps forked from a warm zygote (see the module docstring); any
    other step, or every step once the zygote is gone, through the subprocess runner.

    One per worker process; :meth:`warm_up` starts the zygote (after the worker lowered
    its priority: the zygote and its steps inherit it), else the first Python step does.
    Safe to use from several threads (one request at a time goes to the zygote)."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = tuple(modules)
        self._lock = threading.Lock()
        self._zygote: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._gone = False
        self._ending: weakref.finalize[Any, WarmRunner] | None = None
        """Ends the zygote: at :meth:`close`, or when the runner is collected (an executor
        nobody closed) or the interpreter exits, whichever comes first."""

    @property
    def alive(self) -> bool:
        """The zygote runs (or was never started and may still be)."""
        return not self._gone and (self._zygote is None or self._zygote.poll() is None)

    def warm_up(self) -> None:
        """Start the zygote now (it imports its modules while the worker goes on)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> socket.socket | None:
        if self._gone:
            return None
        if self._channel is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._zygote = subprocess.Popen(
                    [sys.executable, "-m", zygote.__name__, str(theirs.fileno()), *self.modules],
                    stdin=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                    close_fds=True,
                )
            except OSError as exc:
                log.warning("the warm step runner cannot start (%s): steps run cold", exc)
                ours.close()
                self._gone = True
                return None
            finally:
                theirs.close()
            self._channel = ours
            self._ending = weakref.finalize(self, _end_zygote, self._zygote, ours)
        if self._zygote is not None and self._zygote.poll() is not None:
            log.warning(
                "the warm step runner's zygote ended (status %s): steps run cold",
                self._zygote.returncode,
            )
            self._gone = True
            return None
        return self._channel

    def start(
        self, step: RuntimeStep, *, run_id: str, work: Path, stdout: Path, stderr: Path
    ) -> StepProcess:
        """:meth:`StepRunner.start`: warm when it can be, else the subprocess runner's."""
        module = tool_module(step)
        if module is not None and work.is_dir():
            process = self._fork(step, module, work, stdout, stderr)
            if process is not None:
                return process
        return SUBPROCESSES.start(step, run_id=run_id, work=work, stdout=stdout, stderr=stderr)

    def _fork(
        self, step: RuntimeStep, module: str, work: Path, stdout: Path, stderr: Path
    ) -> StepProcess | None:
        env = {**os.environ, **step.env}
        request = json.dumps(
            {"argv": list(step.argv), "module": module, "cwd": str(work), "env": env}
        ).encode()
        if len(request) > zygote.MESSAGE:
            return None
        try:
            out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            try:
                err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            except OSError:
                os.close(out)
                raise
        except OSError as exc:
            raise RunError(f"cannot open the step's log files: {exc}") from None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                channel = self._ensure()
                if channel is None:
                    ours.close()
                    return None
                try:
                    socket.send_fds(channel, [request], [theirs.fileno(), out, err])
                except OSError as exc:
                    log.warning("the warm step runner's zygote is gone (%s): steps run cold", exc)
                    self._gone = True
                    ours.close()
                    return None
        finally:
            theirs.close()
            os.close(out)
            os.close(err)
        handle = _WarmStep(ours)
        if not handle.read_pid(START_SECONDS):
            handle.close()
            log.warning("the warm step runner did not start step %s: it runs cold", step.name)
            return None
        return handle

    def close(self) -> None:
        """End the zygote (steps it started live on with their supervisors)."""
        with self._lock:
            self._gone = True
            self._channel = None
            if self._ending is not None:
                self._ending()


def _end_zygote(zygote: subprocess.Popen[bytes], channel: socket.socket) -> None:
    channel.close()  # the zygote reads end-of-file and exits
    try:
        zygote.wait(timeout=5)
    except subprocess.TimeoutExpired:
        zygote.kill()
        zygote.wait()


@dataclass(eq=False)
class _WarmStep:
    """A warm step as the controller drives it: :attr:`fd` is the step socket."""

    sock: socket.socket
    fd: int = field(init=False)
    pid: int = 0
    kill_grace: float | None = None
    _buffer: bytes = b""
    _closed: bool = False

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()

    def _line(self, timeout: float | None) -> str | None:
        """The next line the supervisor sent; None at end-of-file or after ``timeout``.

        It takes from the socket no byte past the line's end: a step that ends at once
        has its pid and exit status sent back to back, and an exit status read along
        with the pid would sit here while the controller waits for :attr:`fd` to become
        readable, which it then never does."""
        while True:
            if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                return None
            try:
                data = self.sock.recv(4096, socket.MSG_PEEK)
                end = data.find(b"\n")
                # with no line's end in it, what is there is all of this line so far
                data = self.sock.recv(end + 1 if end >= 0 else len(data))
            except OSError:
                return None
            if not data:
                return None
            self._buffer += data
            if end >= 0:
                line, self._buffer = self._buffer[:-1], b""
                return line.decode()

    def read_pid(self, timeout: float) -> bool:
        line = self._line(timeout)
        if line is None or not line.isdigit():
            return False
        self.pid = int(line)
        return True

    def signal(self, sig: signal.Signals) -> None:
        # the supervisor keeps the step unreaped until close(): the group is still its own
        if self.pid and not self._closed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def finish(self) -> int:
        line = self._line(None)
        self.signal(signal.SIGKILL)  # whatever the step left running in its group
        self.close()
        try:
            return int(line) if line is not None else _no_status()
        except ValueError:
            return _no_status()

    def abandon(self) -> None:
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def _no_status() -> NoReturn:
    raise RunError("the warm step runner lost the step (its supervisor died): no exit status")

"""The zygote of the warm step runner (:mod:`obsflow.processing.warm`): the process that
imports the tools once and forks a supervisor, then a step, per request.

Run as ``python -m obsflow.processing.zygote FD MODULE ...`` by a worker's
:class:`~obsflow.processing.warm.WarmRunner`; ``FD`` is its end of the worker's channel
(a ``SOCK_SEQPACKET`` socket): each message is a request (argv, module, cwd, env as JSON)
with three file descriptors (the step socket, stdout, stderr). It imports only the
standard library itself, so that it watches for its worker's death from its first
moments (see :func:`_import_watching`); the protocol is told in :mod:`obsflow.processing.warm`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, Final, NoReturn

MESSAGE: Final = 1 << 20
"""The largest request (argv and environment, as JSON) the zygote reads."""


def serve(channel_fd: int, modules: Sequence[str]) -> NoReturn:
    """Import ``modules``, then fork a supervisor per request until the worker goes (the
    channel's end-of-file: its only other end is the worker's, whichever way it ends)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when steps stop
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    _import_watching(channel_fd, modules)
    channel = socket.socket(fileno=channel_fd)
    while True:
        try:
            request, fds, _, _ = socket.recv_fds(channel, MESSAGE, 3)
        except OSError:
            os._exit(0)
        if not request:
            os._exit(0)  # the worker closed the channel, or died
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        step_fd, out, err = fds
        if os.fork() == 0:
            channel.close()
            _supervise(json.loads(request), step_fd, out, err)
        for fd in fds:
            os.close(fd)


def _import_watching(channel_fd: int, modules: Sequence[str]) -> None:
    """Import ``modules`` (seconds, on a loaded machine), exiting at once if the worker dies
    meanwhile: the loop reads the channel's end-of-file only after the imports. A thread
    watches the channel for its hang-up until then, and is gone before the first fork."""
    done, tell = os.pipe()

    def watch() -> None:
        poller = select.poll()
        poller.register(channel_fd, 0)  # hang-up and errors only: requests wait queued
        poller.register(done, select.POLLIN)
        if any(fd == channel_fd for fd, _ in poller.poll()):
            os._exit(0)

    watcher = threading.Thread(target=watch, name="warm-imports", daemon=True)
    watcher.start()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a module of the list missing here: the others still help
            print(f"obsflow warm runner: cannot import {name}: {exc}", file=sys.stderr)
    os.write(tell, b".")
    watcher.join()
    os.close(done)
    os.close(tell)


def _supervise(request: dict[str, Any], step_fd: int, out: int, err: int) -> NoReturn:
    """Fork the step, tell the worker its pid, then its exit status; reap it when the
    worker is done with it (or gone)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this process waits for its step
    sock = socket.socket(fileno=step_fd)
    pid = os.fork()
    if pid == 0:
        sock.close()
        _step(request, out, err)
    os.close(out)
    os.close(err)
    try:
        sock.sendall(f"{pid}\n".encode())
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(sock, select.POLLIN)
        ended = {fd for fd, _ in poller.poll()}
        if pidfd in ended:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            assert info is not None
            killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
            sock.sendall(f"{-info.si_status if killed else info.si_status}\n".encode())
            while sock.recv(4096):  # the worker signals the group until it closes
                pass
    except OSError:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # the worker went away: the step dies with it
    os.waitpid(pid, 0)
    os._exit(0)


def _step(request: dict[str, Any], out: int, err: int) -> NoReturn:
    """Become the step: what ``python -m MODULE ARGS`` in its cwd and env would be."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            os.close(fd)
        sys.stdin = sys.__stdin__ = _text(0)  # type: ignore[misc]
        sys.stdout = sys.__stdout__ = _text(1)  # type: ignore[misc]
        sys.stderr = sys.__stderr__ = _text(2, errors="backslashreplace", line_buffering=True)  # type: ignore[misc]
        cwd = request["cwd"]
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = cwd  # as `python -m` puts the current directory first
        if "numpy" in sys.modules:  # the zygote's seed would be every step's
            sys.modules["numpy"].random.seed()
        code = _run_module(request["module"], request["argv"])
    except BaseException:  # nothing may return into the zygote's loop
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _text(fd: int, **options: Any) -> io.TextIOWrapper:
    """A fresh text stream on ``fd`` (0: reading), as an interpreter whose streams are no
    terminal makes them."""
    raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
    buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffered, encoding="utf-8", **options)


def _run_module(module: str, argv: Sequence[str]) -> int:
    """``runpy.run_module`` as ``python -m`` runs it; the exit status, as Python's own."""
    import runpy

    if importlib.util.find_spec(module) is None:
        print(f"{argv[0]}: No module named {module}", file=sys.stderr)
        return 1
    sys.argv = ["-m", *argv[3:]]  # run_module puts the module's path first
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code & 0xFF
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:])

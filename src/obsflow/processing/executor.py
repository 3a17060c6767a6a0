"""Executors: where queued runs execute, behind one small interface.

:class:`Executor` is the seam; executors only dispatch run IDs, and what happens to a
run is :func:`obsflow.processing.lifecycle.execute_run`, the same code everywhere.

* :class:`InlineExecutor` executes a run in the caller's thread (tests, the embedded
  default's simplest form);
* :class:`LocalExecutor` executes up to ``workers.runs`` runs at once on a pool of the
  daemon's worker processes, each with its own site (catalog connections, receiver), so
  that two runs' book-keeping happens in parallel;
* :class:`obsflow.processing.celery.CeleryExecutor` sends them to Celery workers
  (``obsflow worker``) through a broker.

The daemon hands each queued run to its executor once
(:meth:`obsflow.catalog.runs.RunStore.to_dispatch`); an executor whose queue lives in
memory (:attr:`Executor.durable` False) loses it with its daemon, so at start the daemon
hands every queued run over again. Each step of a run is its own subprocess or container
(:mod:`obsflow.processing.controller`), or a child forked from the worker's warm zygote
for a Python tool step (:mod:`obsflow.processing.warm`, ``processing.warm``).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING

from obsflow.processing.controller import StopFlag, kill_every_step
from obsflow.processing.lifecycle import execute_run
from obsflow.processing.priority import lower_priority
from obsflow.processing.sitehost import SiteHost
from obsflow.processing.warm import WarmRunner, warm_runner
from obsflow.receipt.intake import Wakeable
from obsflow.settings import Settings
from obsflow.site import Site, open_site
from obsflow.states import RunState

if TYPE_CHECKING:
    from obsflow.processing.container import ContainerRunner

log = logging.getLogger(__name__)


class Executor(ABC):
    """Executes queued runs. Submitting a run twice is harmless: the claim decides."""

    durable: bool = False
    """Runs submitted survive the daemon (a broker keeps them); else they are submitted
    again when the daemon starts."""

    @abstractmethod
    def submit(self, run_id: int, queue: str | None = None) -> None:
        """Execute run ``run_id`` (now or soon), on ``queue`` where the executor has
        queues (None: its default)."""

    @abstractmethod
    def close(self, stop: bool = False) -> None:
        """Wait for the runs in flight (``stop``: interrupt them; their leases expire and
        they are retried on the next start)."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Runs submitted and not finished."""

    @property
    def capacity(self) -> int | None:
        """Runs it executes at once, here (None: they execute elsewhere, on workers that
        report themselves)."""
        return None


class InlineExecutor(Executor):
    """Executes each run at once, in the thread that submits it."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.host = SiteHost(site)
        self.owner = f"inline-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        from obsflow.processing.container import ContainerRunner  # docker-py: at use

        self.containers = ContainerRunner(site.settings.containers, owner=self.owner)
        # its zygote starts at the first Python tool step: most inline sites run few
        self.warm = warm_runner(site.settings.processing, now=False)

    def submit(self, run_id: int, queue: str | None = None) -> None:
        settings = self.site.settings
        execute_run(
            self.host,
            run_id,
            self.owner,
            processing=settings.processing,
            containers=self.containers,
            clock=self.site.clock,
            warm=self.warm,
        )

    def close(self, stop: bool = False) -> None:
        if self.warm is not None:
            self.warm.close()

    @property
    def in_flight(self) -> int:
        return 0

    @property
    def capacity(self) -> int:
        return 1


class LocalExecutor(Executor):
    """Executes up to ``workers.runs`` runs at once, each in a worker process of a pool
    (so the book-keeping of two runs is not serialised by one interpreter's lock)."""

    def __init__(self, site: Site, on_done: Wakeable | None = None) -> None:
        self.site = site
        self.owner = f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # spawn, not fork: the daemon has threads (triggers, ingestors) a fork would copy
        context = multiprocessing.get_context("spawn")
        self._stop_workers = context.Event()
        workers = site.settings.workers.runs
        self._capacity = workers
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

    def submit(self, run_id: int, queue: str | None = None) -> None:
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

    def close(self, stop: bool = False) -> None:
        if stop:
            self._stop_workers.set()  # running steps are killed, their runs queued again
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=stop)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._running)

    @property
    def capacity(self) -> int:
        return self._capacity


# A worker process of the LocalExecutor holds its own site (its own catalog connections,
# receiver and storage), made once when the process starts: per-process state is what
# a process pool's initializer is for.
_WORKER: dict[str, tuple[Site, StopFlag, ContainerRunner, WarmRunner | None]] = {}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker_start(settings: Settings, stop: StopFlag, daemon: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when runs stop
    _die_with(daemon)
    lower_priority(settings.processing)  # the daemon's own work (frames arriving) first
    warm = warm_runner(settings.processing, now=True)  # after: it inherits the priority
    owner = f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    from obsflow.processing.container import ContainerRunner  # docker-py: at use

    containers = ContainerRunner(settings.containers, owner=owner)
    _WORKER["site"] = (open_site(settings), stop, containers, warm)


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
    site, stop, containers, warm = _WORKER["site"]
    return execute_run(
        SiteHost(site),
        run_id,
        owner,
        processing=site.settings.processing,
        containers=containers,
        stop=stop,
        clock=site.clock,
        warm=warm,
    )


def make_executor(site: Site, on_done: Wakeable | None = None) -> Executor:
    """The executor the site's settings name."""
    kind = site.settings.processing.executor
    if kind == "inline":
        return InlineExecutor(site)
    if kind == "celery":
        from obsflow.processing.celery import CeleryExecutor  # Celery loads only if used

        return CeleryExecutor(site.settings, site.registry)
    return LocalExecutor(site, on_done)

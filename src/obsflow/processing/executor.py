"""Executors: where queued runs execute, behind one small interface.

:class:`Executor` is the seam; executors only dispatch run IDs, and what happens to a
run is :func:`obsflow.processing.lifecycle.execute_run`, the same code everywhere.

* :class:`InlineExecutor` executes a run in the caller's thread (tests, the embedded
  default's simplest form);
* :class:`LocalExecutor` executes up to ``workers.runs`` runs at once on a pool of the
  daemon's worker processes, each with its own site (catalog connections, receiver), so
  that two runs' book-keeping happens in parallel. It hands a worker a few runs at once
  (a *batch*); the worker executes them one after another, each run's end written with
  its successor's claim in one catalog transaction
  (:meth:`~obsflow.processing.sitehost.SiteHost.book`), so that a run costs its worker
  one transaction and a fraction of a hand-off, not two transactions and a hand-off;
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
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from obsflow.processing.controller import StepRunner, StopFlag, kill_every_step
from obsflow.processing.lifecycle import Claim, Finish, execute_claimed, execute_run
from obsflow.processing.priority import lower_priority
from obsflow.processing.sitehost import SiteHost
from obsflow.processing.warm import WarmRunner, uses_tools, warm_runner
from obsflow.receipt.intake import Wakeable
from obsflow.receipt.receiver import utcnow
from obsflow.settings import Processing, Settings
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


BATCH_MOST: Final = 8
"""The most runs a worker process is handed at once. Fewer when the queue is short: the
runs waiting are shared between the batches the workers can hold (two each, so that a
worker finds its next batch waiting when it ends one)."""
SHORT_RUN: Final = 0.5
"""Seconds: a run of a batch that lasts longer ends its batch; the runs after it, not
claimed yet, go back to the head of the queue for whichever worker is free first. A long
run then holds up no other run for more than this."""


@dataclass(frozen=True)
class BatchDone:
    """What a worker process did with a batch."""

    states: tuple[tuple[int, RunState | None], ...]
    """Each run it claimed or tried to claim, with its final state (None: another worker
    has it, or its lease was lost; QUEUED: released by a stop)."""
    left: tuple[int, ...] = ()
    """Runs it never claimed (a long run, or a stop, ended the batch early): handed back."""


class LocalExecutor(Executor):
    """Executes up to ``workers.runs`` runs at once, in the worker processes of a pool (so
    the book-keeping of two runs is not serialised by one interpreter's lock), handing
    each worker a few runs at once (:data:`BATCH_MOST`)."""

    def __init__(self, site: Site, on_done: Wakeable | None = None) -> None:
        self.site = site
        self.owner = f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # spawn, not fork: the daemon has threads (triggers, ingestors) a fork would copy
        context = multiprocessing.get_context("spawn")
        self._stop_workers = context.Event()
        self._published = context.Event()
        workers = site.settings.workers.runs
        self._capacity = workers
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_worker_start,
            initargs=(site.settings, self._stop_workers, os.getpid(), self._published),
        )
        # start the workers now (a second or so: the imports), not at the first run
        for ready in [self._pool.submit(_worker_ready) for _ in range(workers)]:
            ready.result()
        self._stop = threading.Event()
        # reentrant: a batch's callback may run in the thread that hands it over
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._pending: deque[int] = deque()
        """Runs submitted and not handed to a worker yet, oldest first."""
        self._known: set[int] = set()
        """Runs submitted and not finished: pending or in a batch."""
        self._batches = 0
        """Batches handed to the pool and not done."""
        self._on_done = on_done
        self._relay: threading.Thread | None = None
        if on_done is not None:
            self._relay = threading.Thread(
                target=self._relay_published, name="run-outputs", daemon=True
            )
            self._relay.start()

    def submit(self, run_id: int, queue: str | None = None) -> None:
        with self._lock:
            if run_id in self._known or self._stop.is_set():
                return
            self._known.add(run_id)
            self._pending.append(run_id)
            self._hand_over()

    def _hand_over(self) -> None:
        """Hand the pending runs to the pool in batches, while it holds fewer than two
        per worker (with the lock held)."""
        while self._pending and self._batches < 2 * self._capacity:
            share = -(-len(self._pending) // (2 * self._capacity))  # rounded up
            batch = tuple(self._pending.popleft() for _ in range(min(BATCH_MOST, share)))
            try:
                future = self._pool.submit(_worker_execute_batch, batch, self.owner)
            except BaseException:  # a broken pool, or closed: they stay queued in the catalog
                self._known.difference_update(batch)
                self._idle.notify_all()
                raise
            self._batches += 1
            future.add_done_callback(functools.partial(self._done, batch))

    def _done(self, batch: tuple[int, ...], future: Future[BatchDone]) -> None:
        with self._lock:
            self._batches -= 1
            left: tuple[int, ...] = ()
            if future.cancelled():
                pass  # never started (a shutdown): still queued in the catalog
            elif (error := future.exception()) is not None:
                log.error("runs %s: the executor failed: %s", batch, error, exc_info=error)
            else:
                left = future.result().left
            self._known.difference_update(r for r in batch if r not in left)
            if left and not self._stop.is_set():
                self._pending.extendleft(reversed(left))  # at the head: they were first
            else:
                self._known.difference_update(left)
            try:
                self._hand_over()
            except Exception:
                log.exception("runs could not be handed to the pool; they stay queued")
                self._known.difference_update(self._pending)
                self._pending.clear()
            self._idle.notify_all()
        if self._on_done is not None:
            self._on_done.set()

    def _relay_published(self) -> None:
        """Wake the daemon (its tracker) as soon as a worker's run publishes outputs (new
        files, which may start the next level's runs), not when its batch ends."""
        assert self._on_done is not None
        while True:
            self._published.wait()
            if self._stop.is_set():
                return
            self._published.clear()  # before the wake: a later publish wakes it again
            self._on_done.set()

    def close(self, stop: bool = False) -> None:
        with self._lock:
            if stop:
                self._stop_workers.set()  # running steps are killed, their runs queued again
                self._known.difference_update(self._pending)
                self._pending.clear()  # still queued in the catalog: the next start has them
            else:
                while self._known and self._batches:  # the runs waiting are handed over too
                    self._idle.wait()
            self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=stop)
        if self._relay is not None:
            self._published.set()
            self._relay.join()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._known)

    @property
    def capacity(self) -> int:
        return self._capacity


@dataclass(frozen=True)
class _Worker:
    """A worker process's own site (its catalog connections, receiver and storage), made
    once when the process starts: per-process state is what a pool's initializer is for."""

    site: Site
    host: SiteHost
    stop: StopFlag
    containers: ContainerRunner
    warm: WarmRunner | None


_WORKER: dict[str, _Worker] = {}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker_start(settings: Settings, stop: StopFlag, daemon: int, published: Wakeable) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when runs stop
    _die_with(daemon)
    lower_priority(settings.processing)  # the daemon's own work (frames arriving) first
    owner = f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    from obsflow.processing.container import ContainerRunner  # docker-py: at use

    site = open_site(settings)
    # after lowering the priority: the zygote inherits it
    warm = warm_runner(settings.processing, now=uses_tools(site.registry))
    host = SiteHost(site, on_published=published.set)
    containers = ContainerRunner(settings.containers, owner=owner)
    _WORKER["worker"] = _Worker(site, host, stop, containers, warm)


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
    return "worker" in _WORKER


def _worker_execute_batch(run_ids: tuple[int, ...], owner: str) -> BatchDone:
    worker = _WORKER["worker"]
    return execute_batch(
        worker.host,
        run_ids,
        owner,
        processing=worker.site.settings.processing,
        containers=worker.containers,
        stop=worker.stop,
        clock=worker.site.clock,
        warm=worker.warm,
    )


def execute_batch(
    host: SiteHost,
    run_ids: Sequence[int],
    owner: str,
    *,
    processing: Processing,
    containers: ContainerRunner | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], datetime] = utcnow,
    warm: StepRunner | None = None,
) -> BatchDone:
    """Execute ``run_ids`` one after another, as :func:`execute_run` would each, but with
    each run's end and its successor's claim written in ONE transaction
    (:meth:`SiteHost.book`). A run never holds a lease before its predecessor has ended:
    the batch's other runs stay queued in the catalog, free for any worker, and a crash
    leaves at most the one claimed run to come back when its lease expires. A run that
    lasts over :data:`SHORT_RUN`, or a ``stop``, ends the batch (the rest handed back,
    unclaimed); a run claimed when ``stop`` comes is released, not started."""
    states: list[tuple[int, RunState | None]] = []
    ahead: list[Claim | None] = []
    """The next run's claim, when it was booked with the previous run's end."""
    for n, run_id in enumerate(run_ids):
        if ahead:
            claim = ahead.pop()
        elif stop is not None and stop.is_set():
            return BatchDone(tuple(states), tuple(run_ids[n:]))
        else:
            claim = host.claim(run_id, owner)
        if claim is None:
            states.append((run_id, None))
            continue
        if claim.plan is not None and stop is not None and stop.is_set():
            host.release(run_id, owner, ())  # claimed with the last end, never started
            states.append((run_id, RunState.QUEUED))
            return BatchDone(tuple(states), tuple(run_ids[n + 1 :]))
        following = run_ids[n + 1] if n + 1 < len(run_ids) else None
        started = time.monotonic()

        def book(end: Finish, following: int | None = following, started: float = started) -> bool:
            claims: list[int] = []
            quick = time.monotonic() - started < SHORT_RUN
            if following is not None and quick and not (stop is not None and stop.is_set()):
                claims.append(following)
            booking = host.book(owner, [end], claims)
            ahead.extend(booking.claims)
            return booking.ended[0]

        try:
            state = execute_claimed(
                host,
                claim,
                owner,
                book=book,
                processing=processing,
                containers=containers,
                stop=stop,
                clock=clock,
                warm=warm,
            )
        except Exception:  # one run's failure to be written is not its batch's
            log.exception("run %d: the executor failed", run_id, extra={"run_id": run_id})
            state = None
        states.append((run_id, state))
        if not ahead and time.monotonic() - started >= SHORT_RUN:
            return BatchDone(tuple(states), tuple(run_ids[n + 1 :]))
    return BatchDone(tuple(states))


def make_executor(site: Site, on_done: Wakeable | None = None) -> Executor:
    """The executor the site's settings name."""
    kind = site.settings.processing.executor
    if kind == "inline":
        return InlineExecutor(site)
    if kind == "celery":
        from obsflow.processing.celery import CeleryExecutor  # Celery loads only if used

        return CeleryExecutor(site.settings, site.registry)
    return LocalExecutor(site, on_done)

"""``obsflow worker``: a Celery worker that executes obsflow runs, on this machine or another.

:func:`run_worker` starts a Celery worker (prefork: one process per run executed at once)
that consumes ``obsflow.run`` messages (:mod:`obsflow.processing.celery`) from its queues
and executes each run with :func:`obsflow.processing.lifecycle.execute_run`, the code the
daemon's own pool runs. Two kinds, by :class:`WorkerConfig`:

* **shared storage** (the site's directories mounted here, e.g. NFS or Lustre; its
  catalog reachable, PostgreSQL past one machine): each pool process opens the site
  once and executes runs through a :class:`~obsflow.processing.sitehost.SiteHost`, with
  the inputs read from the cache; each run's end is written with the next run's claim
  in one transaction (:class:`~obsflow.processing.sitehost.HeldEnds`);
* **no shared storage** (only the archive server's URL and a token): each pool process
  holds a :class:`~obsflow.processing.serverhost.ServerHost`, which fetches inputs over
  HTTP into a local input cache (by sha256, within a size budget), runs the steps in a
  local work directory and sends the outputs back; no path of the site is ever read.

A worker with the site's storage records itself in the site's catalog
(:mod:`obsflow.catalog.processes`): from its main process, at start and every
``daemon.status_seconds`` (its runs in progress and its concurrency), ``stopping`` when
told to stop, ``stopped`` at its end; a server's ``obsflow status`` shows it, or shows it
``lost`` once it is silent. (A worker over HTTP has no catalog to write to.)

What a pool process holds is made once, when Celery starts it (``worker_process_init``):
the run host, a :class:`~obsflow.processing.container.ContainerRunner` for container
steps, and its lease owner's name, ``celery-HOSTNAME-PID``. At start, before any run,
the worker removes the containers that workers of this host left when they died
(:func:`obsflow.processing.container.remove_orphans`).

Stopping:

* **SIGTERM or SIGINT** to the worker's main process (``systemctl stop``, Ctrl-C) is
  Celery's *warm shutdown*: it takes no new message and waits for the runs it executes
  to end; their messages are then acknowledged. Give it the time your longest run takes
  (``TimeoutStopSec=``), and let the signal reach the main process only
  (``KillMode=mixed``): a signal sent to every process of the unit would reach the steps,
  which would fail their runs.
* A second SIGINT, or SIGQUIT, is a *cold shutdown*: Celery ends its pool processes with
  SIGTERM; each kills its running steps (process groups, containers) and releases its run
  (queued again at once, the attempt not counted) before it exits. A pool process whose
  main process died (SIGKILL, OOM) gets SIGTERM from the kernel and does the same.
* **SIGKILL** of every process of the worker: its runs keep their leases until they expire
  (``processing.lease_seconds``); then the tracker queues each again, once, and another
  worker executes it. The messages were not acknowledged: the broker delivers them again
  (RabbitMQ at once, Redis after its visibility timeout) and the claim refuses them. The
  steps that were running, each in a session of its own, are not told: they run to their
  end on this machine. They publish nothing (the lease is another's by then), but a file
  one of them creates late may land in the work directory of the run's next attempt.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from celery import signals

from obsflow.catalog import Catalog
from obsflow.catalog.processes import Health, Identity, ProcessKind, ProcessStore, Workers
from obsflow.processing.celery import TASK, make_app, require_broker, shown
from obsflow.processing.controller import kill_every_step
from obsflow.processing.lifecycle import RunHost, execute_claimed, execute_run
from obsflow.processing.priority import lower_priority
from obsflow.processing.sitehost import HeldEnds, SiteHost
from obsflow.processing.warm import WarmRunner, uses_tools, warm_runner
from obsflow.receipt.receiver import utcnow
from obsflow.registry import Registry
from obsflow.settings import DEFAULT_CACHE_BYTES, Containers, Processing, Settings
from obsflow.site import Site, open_site
from obsflow.states import ProcessState, RunState

if TYPE_CHECKING:
    from obsflow.processing.container import ContainerRunner

log = logging.getLogger(__name__)

OWNER_CHARS: Final = 64
"""A lease owner's name fits the catalog's column."""
EXIT_GRACE: Final = 30.0
"""A pool process told to stop waits this long at most for its run to be released."""
TASK_OPTIONS: Final[dict[str, Any]] = {
    # a run whose book-keeping failed (the catalog or the server out of reach for a moment)
    # is looked at again, up to about 10 minutes later; then the tracker's
    # processing.dispatch_seconds hands it over again if it is still queued
    "autoretry_for": (Exception,),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 12,
}
_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class ServerAccess:
    """A worker without shared storage: where the archive server is, and this worker's
    own directory."""

    url: str
    token: str = field(repr=False)
    root: Path
    """Work directories, run logs and the input cache of this worker."""
    cache_bytes: int = DEFAULT_CACHE_BYTES


@dataclass(frozen=True)
class WorkerConfig:
    """What ``obsflow worker`` was asked for: exactly one of ``site`` (shared storage) and
    ``server`` (no shared storage)."""

    processing: Processing
    """The broker (set), the lease and the steps' settings (a site's, else defaults)."""
    queues: tuple[str, ...]
    concurrency: int
    containers: Containers = field(default_factory=Containers)
    site: Settings | None = None
    server: ServerAccess | None = None

    def __post_init__(self) -> None:
        require_broker(self.processing)  # BrokerError naming the ways to set one
        if (self.site is None) == (self.server is None):
            raise ValueError("a worker has either a site or a server, not both or neither")
        if not self.queues or self.concurrency < 1:
            raise ValueError(f"queues {self.queues}, concurrency {self.concurrency}")

    @classmethod
    def shared(
        cls,
        settings: Settings,
        *,
        queues: tuple[str, ...] = (),
        concurrency: int | None = None,
    ) -> WorkerConfig:
        """A worker with the site's storage (``settings.processing.broker`` set)."""
        processing = settings.processing
        return cls(
            processing=processing,
            queues=queues or (processing.queue,),
            concurrency=concurrency or default_concurrency(),
            containers=settings.containers,
            site=settings,
        )

    @classmethod
    def over_http(
        cls,
        server: ServerAccess,
        processing: Processing,
        *,
        queues: tuple[str, ...] = (),
        concurrency: int | None = None,
        containers: Containers | None = None,
    ) -> WorkerConfig:
        """A worker that reaches the site only through its server's API."""
        return cls(
            processing=processing,
            queues=queues or (processing.queue,),
            concurrency=concurrency or default_concurrency(),
            containers=containers or Containers(),
            server=server,
        )

    @property
    def broker(self) -> str:
        return require_broker(self.processing)

    def describe(self) -> str:
        """One line for the operator: what this worker consumes and where it works."""
        if self.server is not None:
            where = f"server {self.server.url}, root {self.server.root}"
        else:
            where = f"site {self.site.site if self.site is not None else '?'}"
        return (
            f"broker {shown(self.broker)}; queues {', '.join(self.queues)}; "
            f"{self.concurrency} process(es); {where}"
        )


def default_concurrency() -> int:
    """Runs executed at once when not told: one per CPU, as Celery does."""
    return os.cpu_count() or 1


def owner_name(hostname: str, pid: int) -> str:
    """The lease owner of a pool process: ``celery-HOSTNAME-PID``, the host name cut to
    fit :data:`OWNER_CHARS`."""
    tail = f"-{pid}"
    room = OWNER_CHARS - len("celery-") - len(tail)
    return f"celery-{hostname[:room]}{tail}"


def run_worker(
    config: WorkerConfig,
    *,
    on_ready: Callable[[], None] | None = None,
    nodename: str | None = None,
) -> int:
    """Run the Celery worker in this process until it is stopped (see the module
    docstring); its exit status. ``on_ready`` is called once it consumes its queues."""
    registry = _check_site(config.site) if config.site is not None else None
    _remove_orphans(config.containers)
    app = make_app(config.processing)
    start_seconds = config.site.daemon.start_seconds if config.site is not None else 120.0
    # a pool process opens its site (or server) before it says it is up
    app.conf.worker_proc_alive_timeout = start_seconds + 30.0
    pool = PoolProcess(config, registry, os.getpid(), start_seconds)
    app.task(name=TASK, **TASK_OPTIONS)(pool.execute)
    heartbeat = WorkerHeartbeat(config.site, config.concurrency) if config.site else None

    def started(**_: Any) -> None:
        pool.start()

    def stopped(**_: Any) -> None:
        pool.close()

    def ready(**_: Any) -> None:
        log.info("worker ready: %s", config.describe())
        if on_ready is not None:
            on_ready()

    def keep_logging(**_: Any) -> None:
        """Celery leaves logging alone when someone answers this: obsflow's CLI set it up."""

    def shutting_down(**_: Any) -> None:
        if heartbeat is not None:
            heartbeat.stopping()

    receivers = (
        (signals.worker_process_init, started),
        (signals.worker_process_shutdown, stopped),
        (signals.worker_ready, ready),
        (signals.setup_logging, keep_logging),
        (signals.worker_shutting_down, shutting_down),
    )
    for signal_, receiver in receivers:
        signal_.connect(receiver, weak=False)
    worker = app.Worker(
        hostname=nodename or f"obsflow-{os.getpid()}@{socket.gethostname()}",
        queues=list(config.queues),
        concurrency=config.concurrency,
        pool="prefork",
        loglevel=logging.getLogger().getEffectiveLevel(),
        quiet=True,
        # no peers to synchronise with (the catalog is the state): starts faster
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    if heartbeat is not None:
        heartbeat.start()
    try:
        with warnings.catch_warnings():
            # on a lost connection Celery warns that it lets acks_late runs go on; that
            # is the choice this app makes (obsflow.processing.celery says why)
            warnings.filterwarnings(
                "ignore", message=r"\s*In Celery 5\.1 we introduced an optional breaking"
            )
            worker.start()
    finally:
        if heartbeat is not None:
            heartbeat.close()
        for signal_, receiver in receivers:
            signal_.disconnect(receiver)
        app.close()
    return int(worker.exitcode or 0)


class WorkerHeartbeat:
    """The worker's row in its site's catalog (``processes``), kept by a thread of its main
    process: at start, every ``daemon.status_seconds`` (the runs it executes now, of its
    ``concurrency``), ``stopping`` on a warm shutdown, ``stopped`` at :meth:`close`.

    Its catalog connections are the main process's own: a pool process forked from it
    drops them unclosed (SQLAlchemy's way for a fork), never uses them."""

    def __init__(self, settings: Settings, concurrency: int) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.catalog: Catalog | None = None
        self.store: ProcessStore | None = None
        self.state = ProcessState.RUNNING
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the catalog (already migrated: :func:`_check_site`), record the worker,
        and beat from a thread. A catalog out of reach is said in the log, not fatal."""
        settings = self.settings
        try:
            catalog = Catalog.open(settings.catalog_url, migrate=False)
        except Exception as exc:
            log.warning("the worker cannot record itself in the catalog: %s", exc)
            return
        self.catalog = catalog
        os.register_at_fork(after_in_child=self._forked)
        now = utcnow()
        self.store = ProcessStore(
            catalog,
            Identity.of_this_process(ProcessKind.WORKER, now, role=None),
            settings.daemon.status_seconds,
        )
        try:
            self.store.prune(now, settings.daemon.forget_processes_seconds)
        except Exception as exc:
            log.warning("could not forget old processes in the catalog: %s", exc)
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _forked(self) -> None:
        catalog = self.catalog
        if catalog is not None:
            catalog.engine.dispose(close=False)  # the parent's connections: not the child's

    def _run(self) -> None:
        while not self._stop.wait(self.settings.daemon.status_seconds):
            self.beat()

    def health(self) -> Health:
        from celery.worker import state  # the requests this worker's main process accepted

        busy = min(len(state.active_requests), self.concurrency)
        return Health(workers=Workers(busy=busy, total=self.concurrency))

    def beat(self) -> None:
        if self.store is None:
            return
        try:
            self.store.beat(self.health(), utcnow(), self.state)
        except Exception as exc:
            log.warning("could not record the worker's heartbeat in the catalog: %s", exc)

    def stopping(self) -> None:
        """A warm shutdown: it takes no new run and finishes those it has."""
        self.state = ProcessState.STOPPING
        self.beat()

    def close(self) -> None:
        """The worker has ended cleanly: ``stopped``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        store, catalog = self.store, self.catalog
        self.store = self.catalog = None
        if store is not None:
            try:
                now = utcnow()
                store.stop(now)
                store.prune(now, self.settings.daemon.forget_processes_seconds)
            except Exception as exc:
                log.warning("could not record the worker's stop in the catalog: %s", exc)
        if catalog is not None:
            catalog.close()


def _check_site(settings: Settings) -> Registry:
    """Open the site once in the main process (waiting for a catalog that is starting,
    migrating it if it is new), and keep its registry for the pool processes to share;
    close it before Celery forks them (no connection crosses a fork)."""
    site = open_site(settings, retry_seconds=settings.daemon.start_seconds)
    try:
        return site.registry
    finally:
        site.close()


def _remove_orphans(containers: Containers) -> None:
    try:
        from obsflow.processing.container import remove_orphans
    except ImportError as exc:  # no container support installed: nothing to clean
        log.debug("container steps unavailable (%s): no orphaned containers looked for", exc)
        return
    removed = remove_orphans(containers)
    if removed:
        log.warning("removed %d container(s) that dead workers of this host left", removed)


def _container_runner(containers: Containers, owner: str) -> ContainerRunner | None:
    try:
        from obsflow.processing.container import ContainerRunner
    except ImportError as exc:
        log.debug("container steps unavailable: %s", exc)
        return None
    return ContainerRunner(containers, owner=owner)


class PoolProcess:
    """What one pool process of the worker holds, made once when Celery starts it
    (:meth:`start`), and the task it executes (:meth:`execute`). Built in the main
    process; each pool process, forked from it, calls :meth:`start` on its own copy."""

    def __init__(
        self,
        config: WorkerConfig,
        registry: Registry | None,
        main_pid: int,
        start_seconds: float,
    ) -> None:
        self.config = config
        self.registry = registry
        self.main_pid = main_pid
        self.start_seconds = start_seconds
        self.host: RunHost | None = None
        self.site: Site | None = None
        self.owner = ""
        self.containers: ContainerRunner | None = None
        self.warm: WarmRunner | None = None
        self.held: HeldEnds | None = None
        """With the site's catalog: each run's end is written with the next run's claim."""
        self.stop = threading.Event()
        """Set when this process is told to stop: the run's steps are killed and the run is
        queued again."""
        self.idle = threading.Event()
        self.idle.set()

    # -- in the pool process --------------------------------------------------------------

    def start(self) -> None:
        """Made once in each pool process; one that cannot open its run host exits (Celery
        starts another), rather than take messages it cannot execute."""
        self.owner = owner_name(socket.gethostname(), os.getpid())
        _die_with_parent()
        lower_priority(self.config.processing)
        if os.getppid() != self.main_pid:  # the main process died before the line above
            os._exit(1)
        # with the lower priority; at once if the registry's steps are Python tools
        self.warm = warm_runner(self.config.processing, now=uses_tools(self.registry))
        try:
            self._open()
        except Exception:
            log.exception("pool process %d cannot start; it exits", os.getpid())
            os._exit(1)
        log.debug("pool process %d ready as %s", os.getpid(), self.owner)

    def _open(self) -> None:
        config = self.config
        if config.site is not None:
            self.site = open_site(
                config.site, registry=self.registry, retry_seconds=self.start_seconds
            )
            self.host = SiteHost(self.site)
            self.held = HeldEnds(self.host, self.owner, stop=self.stop)
        elif config.server is not None:
            # written alongside; imported only by a worker that uses it
            from obsflow.processing.serverhost import ServerHost

            server = config.server
            self.host = ServerHost(
                server.url, server.token, root=server.root, cache_bytes=server.cache_bytes
            )
        self.containers = _container_runner(config.containers, self.owner)

    def execute(self, run_id: int) -> str | None:
        """The task ``obsflow.run``: claim and execute run ``run_id`` (nothing if another
        has it or it is done); its final state, for the log."""
        if self.host is None:
            raise RuntimeError(f"run {run_id}: this pool process was not started")
        # here, not in start(): after start, billiard makes SIGTERM raise SystemExit,
        # which would leave the run's steps running and its lease to expire
        signal.signal(signal.SIGTERM, self._terminated)
        self.idle.clear()
        how: dict[str, Any] = {
            "processing": self.config.processing,
            "containers": self.containers,
            "stop": self.stop,
            "clock": self.site.clock if self.site is not None else utcnow,
            "warm": self.warm,
        }
        try:
            state: RunState | None
            if self.held is not None:  # its claim written with the last run's end
                claim = self.held.claim(run_id)
                state = None
                if claim is not None:
                    state = execute_claimed(
                        self.host, claim, self.owner, book=self.held.book, **how
                    )
            else:
                state = execute_run(self.host, run_id, self.owner, **how)
        finally:
            self.idle.set()
        if state is None:
            log.info("run %d: not executed here (another worker has it, or it is done)", run_id)
        return None if state is None else state.value

    def close(self) -> None:
        if self.held is not None:
            self.held.close()
        if self.warm is not None:
            self.warm.close()
        if self.containers is not None:
            self.containers.close()
        if self.site is not None:
            self.site.close()
        elif callable(close := getattr(self.host, "close", None)):
            close()  # a server host's HTTP connections

    def _terminated(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM: a cold shutdown, a revoke with ``--terminate``, or the main process
        died. The run in progress stops (its steps killed, itself queued again); then this
        process exits."""
        self.stop.set()
        threading.Thread(target=self._exit_when_idle, name="exit", daemon=True).start()

    def _exit_when_idle(self) -> None:
        if not self.idle.wait(EXIT_GRACE):
            log.warning("pool process %d: its run did not stop in %g s", os.getpid(), EXIT_GRACE)
        time.sleep(0.2)  # let the task's end reach the main process, if it lives
        if self.held is not None:
            with contextlib.suppress(Exception):  # (else its lease expires: queued again)
                self.held.close()
        kill_every_step()
        os._exit(0)


def _die_with_parent() -> None:
    """Have the kernel send SIGTERM (not Celery's SIGKILL, which would leave the steps
    running) to this pool process when the worker's main process dies."""
    if not sys.platform.startswith("linux"):
        return
    # prctl by hand, as obsflow.processing.executor does: one call, no maintained binding
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("PR_SET_PDEATHSIG: %s", os.strerror(ctypes.get_errno()))

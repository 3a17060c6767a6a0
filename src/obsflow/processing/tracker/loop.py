"""The tracker at work: new files → runs queued → handed to the executor, in a loop.

:class:`TrackerLoop` is what ``obsflow run`` runs on a thread of its own: at start it
recovers runs whose executor died (their leases expired) and hands every queued run to
the executor; then, woken whenever receipt commits files (or every ``poll_seconds``), it
reads the new files (:meth:`Tracker.step`), looks at due deadlines (:meth:`Tracker.tick`),
and hands each queued run to the executor, once (:meth:`TrackerLoop.dispatch`: a broker
must not get the same run on every pass). A run's outputs come back through receipt
as new files, which wake it again: that is the cascade L0 → L1 → L2 → L3.

:func:`process_until_idle` does the same without a daemon, until nothing is left to do
(``obsflow ingest --process``, tests).

A pass that fails (the catalog unreachable, a privilege missing) is tried again at the
next turn, forever; :attr:`TrackerLoop.health` says how the passes go (the last error,
the failures in a row, since when), and the daemon writes it into its status file, so
that ``obsflow status`` shows a tracker that keeps failing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from obsflow.catalog.runs import RunStore
from obsflow.processing.executor import Executor
from obsflow.processing.plan import queue_of
from obsflow.processing.reductions import Reductions
from obsflow.processing.sitehost import holder
from obsflow.processing.tracker import Tracker
from obsflow.site import Site
from obsflow.states import RunState

log = logging.getLogger(__name__)
ERROR_CHARS = 500
"""The most of an error's message that :class:`TrackerHealth` keeps."""


@dataclass(frozen=True)
class TrackerHealth:
    """How the tracker's passes go, as ``obsflow status`` shows it (``daemon.tracker``)."""

    ok: bool
    """The last pass succeeded (or none has run yet)."""
    last_error: str | None
    """The error of the last pass that failed (kept once the passes succeed again)."""
    failures: int
    """Passes failed in a row (0 when ``ok``)."""
    since: datetime
    """When ``ok`` took its present value: the first of the failures in a row, the first
    pass that succeeded after them, or the loop's start."""

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "last_error": self.last_error,
            "failures": self.failures,
            "since": self.since.isoformat(),
        }


class TrackerLoop:
    def __init__(self, site: Site, executor: Executor, *, poll_seconds: float = 1.0) -> None:
        self.site = site
        self.executor = executor
        self.tracker = Tracker(site.registry, site.catalog, site.clock)
        self.runs = RunStore(site.catalog)
        self.reductions = Reductions(site)
        self.poll_seconds = poll_seconds
        self._last_recovery = 0.0
        self._started = False
        self.health = TrackerHealth(ok=True, last_error=None, failures=0, since=site.clock())
        """Replaced (never changed) after each pass of :meth:`run`: read it from any thread."""

    def recover(self) -> None:
        """Runs whose executor died (their leases expired) go back to the queue, once,
        or fail for good (their pins dropped); then hand the queue over. The first time,
        an executor that keeps its queue in memory gets every queued run again (the
        last daemon's pool died with it)."""
        settings = self.site.settings.processing
        if not self._started:
            self._started = True
            if not self.executor.durable:
                self.runs.forget_dispatch()
        again, failed = self.runs.recover(self.site.clock(), settings.max_attempts)
        if again or failed:
            log.warning(
                "runs interrupted by a dead executor: %d queued again, %d failed for good",
                len(again),
                len(failed),
            )
        if failed:
            retriever = self.site.retriever()
            for run_id in failed:
                retriever.unpin_holder(holder(run_id))
        self._last_recovery = time.monotonic()
        self.dispatch()

    def dispatch(self) -> int:
        """Hand each queued run not handed over yet to the executor, on its pipeline's
        queue; also those handed over ``processing.dispatch_seconds`` ago and still
        queued (a broker that lost them). Returns how many. A run is marked handed over
        after its submission: a submission that fails leaves it for the next pass."""
        settings = self.site.settings.processing
        stale = self.site.clock() - timedelta(seconds=settings.dispatch_seconds)
        registry = self.site.registry
        sent: list[int] = []
        try:
            # the users' reductions take turns, behind the archive's own runs
            for run_id, pipeline in self.reductions.fair(self.runs.to_dispatch(stale), stale):
                queue = queue_of(registry, pipeline, settings.queue)
                self.executor.submit(run_id, queue)
                sent.append(run_id)
        finally:
            self.runs.dispatched(sent, self.site.clock())
        return len(sent)

    def once(self) -> int:
        """One pass: new files, due deadlines, on-demand reductions followed, (now and
        then) expired leases, and the queue handed to the executor. Returns how many
        runs it queued."""
        started = self.tracker.drain() + self.tracker.tick()
        self.reductions.advance()  # (before the dispatch: a reduction's new runs go now)
        lease = self.site.settings.processing.lease_seconds
        if time.monotonic() - self._last_recovery > lease / 2:
            self.recover()
        else:
            self.dispatch()
        return len(started)

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """Until ``stop``: a pass each time ``wake`` is set, or every ``poll_seconds``
        (the first one after :meth:`recover`). A pass that fails is tried again at the
        next turn; :attr:`health` says how they go."""
        recovered = False
        while not stop.is_set():
            try:
                if not recovered:
                    self.recover()
                    recovered = True
                self.once()
            except Exception as exc:  # the catalog briefly unreachable: never let the loop die
                log.exception("tracker pass failed; trying again")
                self._failed(exc)
            else:
                self._passed()
            if wake.wait(self.poll_seconds):
                wake.clear()

    def _failed(self, exc: Exception) -> None:
        before = self.health
        message = f"{type(exc).__name__}: {(str(exc).strip() or '-').splitlines()[0]}"
        self.health = TrackerHealth(
            ok=False,
            last_error=message[:ERROR_CHARS],
            failures=before.failures + 1,
            since=self.site.clock() if before.ok else before.since,
        )

    def _passed(self) -> None:
        before = self.health
        if not before.ok:
            log.warning("tracker passes succeed again, after %d failure(s)", before.failures)
            self.health = TrackerHealth(
                ok=True, last_error=before.last_error, failures=0, since=self.site.clock()
            )


def process_until_idle(
    site: Site,
    executor: Executor,
    *,
    timeout: float = 600.0,
    idle_seconds: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    until: Callable[[], bool] | None = None,
) -> bool:
    """Track, execute and archive until no run is queued or running, no group waits for
    a deadline, and nothing new starts one for ``idle_seconds``; False if ``timeout``
    came first. With ``until``: as soon as it is true and no run is queued or running
    (the groups' deadlines not waited for: e.g. until a reduction has ended)."""
    loop = TrackerLoop(site, executor)
    loop.recover()
    ingestor = site.ingestor()
    deadline = clock() + timeout
    quiet_since: float | None = None
    while clock() < deadline:
        started = loop.once()
        while True:
            report = ingestor.run_once()
            if not report.archived and not report.errors:
                break
        waiting = until is None and loop.tracker.next_deadline() is not None
        busy = started > 0 or executor.in_flight > 0 or waiting
        busy = busy or bool(
            loop.runs.queued(limit=1) or loop.runs.find(state=RunState.RUNNING, limit=1)
        )
        if until is not None and not busy and until():
            return True
        if busy or until is not None:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = clock()
        elif clock() - quiet_since >= idle_seconds:
            return True
        time.sleep(0.05)
    return False

"""A run's book-keeping at the site itself: the catalog, the cache, receipt.

:class:`SiteHost` is the :class:`~obsflow.processing.lifecycle.RunHost` of a worker that
has the site's storage (the daemon's pool, a Celery worker on shared storage), and also
what the archive server does on behalf of a worker over HTTP
(:mod:`obsflow.api.workers`): one implementation of claim, pins, plan, publish and
finish, whoever calls it.

* :meth:`SiteHost.claim` claims the run (compare-and-set), pins its inputs in the cache
  as ``run:ID`` (a trim cannot evict them while the run lives; a file already evicted is
  restored by :meth:`stage`), and plans it. A run whose earlier attempt published every
  output is finished as succeeded there; a run that cannot be planned fails there.
* :meth:`SiteHost.finish` finishes the run and drops its pins, if the caller still
  holds the lease (a released run keeps its pins until its next attempt ends).
* :meth:`SiteHost.book` writes the ends of several runs and claims several others in
  ONE catalog transaction (as receipt's group commit does for files): a worker that
  executes runs one after another pays one transaction per run, its end and its
  successor's claim, not two. The transaction commits whole or not at all; each claim
  in it is still a compare-and-set that another worker may have won.
* :class:`HeldEnds` does the same for a worker that is handed its runs one at a time (a
  Celery worker: it learns its next run only once the last one's message is
  acknowledged): each run's end waits, at most :data:`HOLD_SECONDS`, to be written with
  the claim of the next run that comes.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Final

from sqlalchemy import Connection

from obsflow.catalog.cachestate import CacheState
from obsflow.catalog.runs import REDUCTION_PREFIX, RunStore
from obsflow.catalog.steps import StepRow
from obsflow.errors import NotFoundError, ObsflowError, RunError
from obsflow.processing.lifecycle import Claim, Finish, StoredProfile, finish_alone
from obsflow.processing.plan import RunPlan, plan_run
from obsflow.processing.profile import OUTPUT_DIR, ParameterValue
from obsflow.receipt.receiver import Outcome, Prepared
from obsflow.site import Site
from obsflow.states import RunState

log = logging.getLogger(__name__)

HOLD_SECONDS: Final = 0.02
"""The longest a run's end waits for the next claim to be written with (the run's
lease, a minute, outlives it by far)."""


@dataclass(frozen=True)
class Booking:
    """What :meth:`SiteHost.book` wrote, in the order it was asked."""

    ended: tuple[bool, ...]
    """Each end: written (False: its lease was lost, nothing written)."""
    claims: tuple[Claim | None, ...]
    """Each claim: won (None: another worker has the run, or it is done)."""


def holder(run_id: int) -> str:
    """The pin holder of a run's inputs."""
    return f"run:{run_id}"


class SiteHost:
    def __init__(self, site: Site, on_published: Callable[[], object] | None = None) -> None:
        self.site = site
        self.on_published = on_published
        """Called when a run's outputs were published (new files, or a user's results):
        the local pool tells its daemon's tracker at once."""
        self.runs = RunStore(site.catalog)
        self.cache = CacheState(site.catalog)
        self._nothing_pinned: set[int] = set()
        """Runs claimed here that have no inputs: their finish has no pins to drop and no
        input to stamp processed."""
        self._made: set[Path] = set()
        """Directories this host made (or found) once and never removes."""

    @property
    def lease_seconds(self) -> float:
        return self.site.settings.processing.lease_seconds

    # -- claim --------------------------------------------------------------------------

    def claim(self, run_id: int, owner: str) -> Claim | None:
        # one write transaction: the claim, the pins and the plan's reads (the catalog's
        # cost per run is its transactions, not its statements)
        with self.site.catalog.write() as conn:
            return self._claim(run_id, owner, self.site.clock(), conn)

    def _claim(self, run_id: int, owner: str, now: datetime, conn: Connection) -> Claim | None:
        site = self.site
        run = self.runs.claim(run_id, owner, now, self.lease_seconds, conn)
        if run is None:
            return None
        self.cache.pin(run.input_ids, holder(run_id), now, conn)
        if not run.input_ids:
            self._nothing_pinned.add(run_id)
        if run.attempts > 1 and self._already_published(run.id, run.pipeline):
            self._end(run_id, owner, RunState.SUCCEEDED, None, (), conn=conn)
            return Claim(run_id, None, RunState.SUCCEEDED)
        try:
            plan = plan_run(site.catalog, site.registry, run, conn)
        except ObsflowError as exc:
            self._end(run_id, owner, RunState.FAILED, str(exc), (), conn=conn)
            return Claim(run_id, None, RunState.FAILED, str(exc))
        return Claim(run_id, plan)

    def book(self, owner: str, ends: Sequence[Finish], claims: Sequence[int]) -> Booking:
        """Write ``ends`` (runs ``owner`` leases) and claim the runs ``claims`` for
        ``owner``, in ONE transaction: all of it is written, or (an error, a crash)
        none of it. An end whose lease was lost writes nothing (False); a claim another
        worker won is None, as :meth:`claim` says."""
        with self.site.catalog.write() as conn:
            now = self.site.clock()
            ended = tuple(
                self._end(e.run_id, owner, e.state, e.error, e.steps, e.profile, conn, now)
                for e in ends
            )
            claimed = tuple(self._claim(run_id, owner, now, conn) for run_id in claims)
        return Booking(ended, claimed)

    def _already_published(self, run_id: int, pipeline_id: str) -> bool:
        """An earlier attempt published every output, then died before finishing."""
        pipeline = self.site.registry.pipelines.get(pipeline_id)
        expected = 0 if pipeline is None else len(pipeline.outputs)
        return expected > 0 and len(self.runs.outputs(run_id)) >= expected

    def renew(self, run_id: int, owner: str) -> bool:
        now = self.site.clock()
        return self.runs.renew([run_id], owner, now, self.lease_seconds) == 1

    def holds(self, run_id: int, owner: str) -> bool:
        return self.runs.holds(run_id, owner, self.site.clock())

    # -- the worker's side ------------------------------------------------------------------

    def stage(self, plan: RunPlan) -> dict[str, list[Path]]:
        """The inputs' paths in the cache (an evicted one restored from the archive by
        the one retrieval path, :meth:`obsflow.archive.fetch.Fetcher.fetch`)."""
        retriever = self.site.retriever()
        staged: dict[str, list[Path]] = {}
        for name, refs in plan.inputs.items():
            paths = staged.setdefault(name, [])
            for ref in refs:
                try:
                    paths.append(retriever.fetch(ref.archive_id))
                except NotFoundError as exc:
                    raise RunError(f"run {plan.run_id}: input {ref.archive_id}: {exc}") from exc
        return staged

    def local_parameters(self) -> dict[str, ParameterValue]:
        return {"site": str(self.site.settings.site), "python": sys.executable}

    def work_dir(self, run_id: int) -> Path:
        work = self.site.settings.work / f"run-{run_id}"
        if work.exists():  # an earlier attempt's leftovers
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / OUTPUT_DIR).mkdir()
        return work

    def log_path(self, run_id: int) -> Path:
        logs = self.site.settings.logs / "runs"
        if logs not in self._made:  # once per host, not once per run
            logs.mkdir(parents=True, exist_ok=True)
            self._made.add(logs)
        return logs / f"run-{run_id}.log"

    # -- reports ------------------------------------------------------------------------

    def record_steps(
        self,
        run_id: int,
        owner: str,
        steps: Sequence[StepRow],
        profile: StoredProfile | None = None,
    ) -> None:
        self.runs.record_steps(run_id, steps, profile=profile)

    def publish(self, run_id: int, owner: str, outputs: Mapping[str, Path]) -> None:
        """Receive every output with the run as provenance, in one catalog transaction;
        only while ``owner`` holds the lease (a worker that lost it publishes nothing)."""
        if not self.holds(run_id, owner):
            raise RunError(f"run {run_id}: {owner} no longer holds its lease; not published")
        run = self.runs.get(run_id)
        if run is not None and run.request.startswith(REDUCTION_PREFIX):
            self._keep_results(run_id, outputs)
        else:
            self._receive(run_id, outputs)
        if self.on_published is not None:
            self.on_published()

    def _receive(self, run_id: int, outputs: Mapping[str, Path]) -> None:
        receiver = self.site.receiver
        prepared: list[Prepared] = []
        for product, path in sorted(outputs.items()):
            result = receiver.prepare(path)
            if not isinstance(result, Prepared):
                raise RunError(
                    f"run {run_id}: output {path.name} (product {product}) was "
                    f"{result.outcome.value}: {result.reason}"
                )
            if result.product.id != product:
                raise RunError(
                    f"run {run_id}: output {path.name} is recognised as product "
                    f"{result.product.id}, not {product}; fix the pipeline's output name"
                )
            prepared.append(replace(result, new=replace(result.new, made_by_run=run_id)))
        for result in receiver.commit(prepared):
            if result.outcome not in (Outcome.CACHED, Outcome.DUPLICATE):
                raise RunError(f"run {run_id}: output {result.path.name}: {result.reason}")

    def _keep_results(self, run_id: int, outputs: Mapping[str, Path]) -> None:
        """A user's reduction made these: its results, not the archive's products (each
        checked to be the product the pipeline names, by its name)."""
        from obsflow.processing.reductions import Reductions  # the tracker's: at use

        for product, path in outputs.items():
            try:
                recognised = self.site.registry.recognise(path.name).product.id
            except ObsflowError as exc:
                raise RunError(f"run {run_id}: output {path.name}: {exc}") from None
            if recognised != product:
                raise RunError(
                    f"run {run_id}: output {path.name} is recognised as product "
                    f"{recognised}, not {product}; fix the pipeline's output name"
                )
        Reductions(self.site).publish(run_id, outputs)

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
        return self._end(run_id, owner, state, error, steps, profile)

    def _end(
        self,
        run_id: int,
        owner: str,
        state: RunState,
        error: str | None,
        steps: Sequence[StepRow],
        profile: StoredProfile | None = None,
        conn: Connection | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Finish as ``owner``, in one transaction (``conn``'s if given); drop the run's
        pins only if it did (else the run's next owner holds them)."""
        if conn is None:
            with self.site.catalog.write() as own:
                return self._end(run_id, owner, state, error, steps, profile, own)
        now = now or self.site.clock()
        inputs = run_id not in self._nothing_pinned
        self._nothing_pinned.discard(run_id)
        moved = self.runs.finish(
            run_id, owner, state, now, error, conn, steps, profile, inputs=inputs
        )
        if moved and inputs:
            self.cache.unpin_holder(holder(run_id), conn)
        return moved

    def release(self, run_id: int, owner: str, steps: Sequence[StepRow]) -> None:
        """Queued again; its steps are forgotten (the next attempt starts afresh), so
        ``steps`` are not kept."""
        self.runs.release(run_id, owner)


class HeldEnds:
    """One worker's runs handed to it one at a time (a Celery pool process): each run's end
    is held back, at most ``hold`` seconds, and written with the next run's claim in one
    transaction (:meth:`SiteHost.book`), as the local pool's batches do; an end that no
    claim comes for in time is written alone, by a thread of its own.

    A held end is the run's only unwritten state: its steps and outputs are written, its
    lease still holds (a minute, against ``hold``'s fraction of a second). A worker killed
    while it holds one loses nothing: the lease expires and the tracker queues the run
    again, whose next claim finds its outputs published (or runs it again, if it has none).
    :meth:`close` writes what it holds; a ``stop`` makes :meth:`book` write at once."""

    def __init__(
        self,
        host: SiteHost,
        owner: str,
        *,
        hold: float = HOLD_SECONDS,
        stop: threading.Event | None = None,
    ) -> None:
        self.host = host
        self.owner = owner
        self.hold = hold
        self.stop = stop
        self._held: Finish | None = None
        self._due = 0.0
        self._closed = False
        self._cond = threading.Condition()
        self._alone = finish_alone(host, owner)
        self._writing = threading.Lock()
        """Held while an end is written: :meth:`close` waits for the thread's write."""
        self._thread = threading.Thread(target=self._write_when_due, name="held-ends", daemon=True)
        self._thread.start()

    def claim(self, run_id: int) -> Claim | None:
        """Claim ``run_id`` (as :meth:`SiteHost.claim`), writing the held end, if any, in
        the same transaction. An error writes neither; the end stays held (the thread
        tries it alone)."""
        with self._writing:
            end = self._take()
            if end is None:
                return self.host.claim(run_id, self.owner)
            try:
                booking = self.host.book(self.owner, [end], [run_id])
            except BaseException:
                self._give_back(end)
                raise
            self._lost(end, booking.ended[0])
            return booking.claims[0]

    def book(self, end: Finish) -> bool:
        """The :data:`~obsflow.processing.lifecycle.Book` of this worker's runs: hold
        ``end`` for the next claim (True: it will be written); written at once, its
        lease's answer returned, once stopping or closed."""
        if self._closed or (self.stop is not None and self.stop.is_set()):
            with self._writing:
                return self._write(end)
        with self._cond:
            earlier, self._held = self._held, end
            self._due = time.monotonic() + self.hold
            self._cond.notify()
        if earlier is not None:  # (not so: each claim takes what is held)
            with self._writing:
                self._write(earlier)
        return True

    def close(self) -> None:
        """Write what is held, and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        with self._writing:
            end = self._take()
            if end is not None:
                self._write(end)

    def _take(self) -> Finish | None:
        with self._cond:
            end, self._held = self._held, None
            return end

    def _give_back(self, end: Finish) -> None:
        with self._cond:
            if self._held is None:
                self._held, self._due = end, time.monotonic() + self.hold
                self._cond.notify()

    def _write(self, end: Finish) -> bool:
        moved = self._alone(end)
        self._lost(end, moved)
        return moved

    def _lost(self, end: Finish, moved: bool) -> None:
        if not moved:
            log.warning(
                "run %d: lease lost before its end was written; it will be checked again",
                end.run_id, extra={"run_id": end.run_id},
            )  # fmt: skip

    def _write_when_due(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._held is None or self._due > time.monotonic()):
                    wait = None if self._held is None else self._due - time.monotonic()
                    self._cond.wait(wait)
                if self._closed:
                    return
            with self._writing:
                end = self._take()  # (unless a claim took it meanwhile)
                if end is None:
                    continue
                try:
                    self._write(end)
                except Exception:  # the lease expires; the tracker queues the run again
                    log.exception(
                        "run %d: its end could not be written", end.run_id,
                        extra={"run_id": end.run_id},
                    )  # fmt: skip

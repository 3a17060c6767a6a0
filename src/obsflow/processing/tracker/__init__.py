"""The observation status tracker: starts each pipeline when all its inputs exist.

The files table is the tracker's durable inbox: each row is recorded untracked, and
:meth:`Tracker.step` reads the untracked rows (a partial index keeps that cheap at any
size of catalog) and marks them tracked once their runs are queued, so a file cached
while the tracker was down is seen when it starts again, and a file whose transaction
commits after a later one (concurrent writers on PostgreSQL) is never skipped. For each
new file it finds the pipelines that take its product through the registry's index
(never a scan of every pipeline), then the groups the file belongs to:

* as a pipeline's **primary** input (the first one), the file makes or joins the group
  whose key it computes (:mod:`obsflow.processing.tracker.grouping`);
* as a **secondary** input (a master bias for the night's flats), it joins every group of
  that pipeline and night whose ``where`` it meets (found by the groups' night index).

What a ``where`` sees of a file comes from its catalog row, as receipt recorded it
(:mod:`obsflow.processing.inputs`); its name is not recognised again. A file whose
values cannot be read is left out of every group and reported (:meth:`Tracker.step`
raises, naming it), never matched as if it had no name groups.

Each touched group is evaluated: its candidates are read per input (by product and
night, an index lookup), :func:`~obsflow.processing.tracker.readiness.readiness` decides, and a
ready group gets a queued run. The catalog's unique constraint on (pipeline, group, input
set) makes a duplicate event or a second tracker harmless. When a group already ran, a
different input set starts a new run version only if the pipeline says
``on_new_input: rerun``. A deadline kickoff is a ``due_at`` on the group, which
:meth:`Tracker.tick` picks up. The groups' rows are read and written through
:class:`~obsflow.catalog.tracking.TrackerGroups`; no SQL is written here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from obsflow.catalog import Catalog
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.records import FileRecord
from obsflow.catalog.runs import NewRun, RunStore, input_hash
from obsflow.catalog.tracking import TrackerGroups
from obsflow.errors import RecognitionError
from obsflow.processing.inputs import values_of
from obsflow.processing.tracker.grouping import group_key, group_values, matches, night_end
from obsflow.processing.tracker.readiness import Candidate, Decision, readiness
from obsflow.registry import Registry
from obsflow.registry.specs import GroupBy, OnNewInput, PipelineSpec
from obsflow.states import FileState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    """A run the tracker queued."""

    run_id: int
    pipeline: str
    group: GroupKey
    degraded: bool


@dataclass(frozen=True)
class Waiting:
    """A group that waits for its pipeline's deadline: what it has, what it lacks."""

    group: GroupKey
    until: datetime
    """The deadline: the run starts then (degraded, or not at all, if inputs still lack)."""
    rule: str
    """The kickoff rule it waits by, in words, e.g. ``2 min after its last input``."""
    has: dict[str, int]
    """Input name → how many files it has chosen so far."""
    lacks: tuple[str, ...]
    """What it still lacks to be complete, e.g. ``flats: 3 of at least 5``."""


@dataclass(frozen=True)
class Reprocessing:
    """What :meth:`Tracker.reprocess` queued: the runs, and the groups it skipped."""

    request: str
    """The request label of its runs (``reprocess-<time>-<random>``)."""
    queued: tuple[int, ...]
    skipped: tuple[tuple[GroupKey, tuple[str, ...]], ...]
    """Groups not ready even with every deadline passed, with what they lack."""


class Tracker:
    def __init__(self, registry: Registry, catalog: Catalog, clock: Callable[[], datetime]) -> None:
        self.registry = registry
        self.catalog = catalog
        self.runs = RunStore(catalog)
        self.groups = TrackerGroups(catalog)
        self.clock = clock
        self.unreadable: dict[int, RecognitionError] = {}
        """Files whose values could not be read since the last :meth:`step` raised them
        (by file ID): left out of every group, each logged once with its archive ID."""

    # ------------------------------------------------------------ events

    def step(self, limit: int = 200) -> list[Started]:
        """Read the files not tracked yet (at most ``limit``), queue the runs they make
        ready, and mark them tracked. Returns the runs queued."""
        return self._step(limit)[1]

    def drain(self) -> list[Started]:
        """:meth:`step` until no untracked file is left."""
        started: list[Started] = []
        while True:
            read, batch = self._step(200)
            started += batch
            if not read:
                return started

    def _step(self, limit: int) -> tuple[int, list[Started]]:
        """One batch of the inbox, then marked tracked. A file whose values cannot be read
        (recorded before the catalog kept name groups, and no longer recognised) is left
        out of every group rather than block the others; once the batch is marked, the
        first such error is raised (RecognitionError naming the file) for the caller to
        report."""
        new = self.catalog.untracked(limit)
        started: list[Started] = []
        for record in new:
            if record.state is not FileState.REJECTED:
                started += self.on_file(record)
        if new:
            # marked only once its runs are queued: a crash in between reads it again,
            # and the unique (pipeline, group, input set) makes that harmless
            self.catalog.mark_tracked([record.id for record in new])
        if self.unreadable:
            failed = list(self.unreadable.values())
            self.unreadable.clear()
            more = f" (and {len(failed) - 1} more file(s), see the log)" if len(failed) > 1 else ""
            raise RecognitionError(failed[0].path, f"{failed[0].detail}{more}")
        return len(new), started

    def tick(self) -> list[Started]:
        """Evaluate the groups whose deadline has come."""
        now = self.clock()
        started: list[Started] = []
        for due in self.groups.due(now):
            pipeline = self.registry.pipelines.get(due.key.pipeline)
            if pipeline is not None:
                started += self.evaluate(pipeline, due.key)
            # cleared once its run exists (never a moment with neither: an observer would
            # think the group done), unless the evaluation set a later deadline
            self.groups.clear_due(due, now)
        return started

    def next_deadline(self) -> datetime | None:
        """The earliest deadline a group waits for, if any."""
        return self.groups.next_deadline()

    def on_file(self, record: FileRecord) -> list[Started]:
        """The groups ``record`` makes or joins, evaluated."""
        if record.product is None or record.superseded_by is not None:
            return []
        values = self._values(record)
        if values is None:
            return []
        started: list[Started] = []
        for pipeline in self.registry.consumers.get(record.product, ()):
            for position, spec in enumerate(pipeline.inputs):
                if spec.product != record.product:
                    continue
                if position == 0:
                    key = group_key(pipeline, record)
                    if not matches(spec, values, group_values(key, values), primary=True):
                        continue
                    self.groups.open(key, record.night, record.id, self.clock())
                    started += self.evaluate(pipeline, key)
                else:
                    for key, primary in self._groups_of_night(pipeline, record.night):
                        primary_values = self._values(primary)
                        if primary_values is None:
                            continue
                        group = group_values(key, primary_values)
                        if matches(spec, values, group, primary=False):
                            started += self.evaluate(pipeline, key)
        return started

    # ------------------------------------------------------------ deciding

    def evaluate(self, pipeline: PipelineSpec, key: GroupKey) -> list[Started]:
        """Decide whether the group is ready; queue its run if so."""
        primary = self.groups.primary(key)
        if primary is None:
            return []
        decision = self.decide(pipeline, key, primary)
        now = self.clock()
        if not decision.ready:
            if decision.wait_until is not None:
                self.groups.set_due(key, decision.wait_until, self.clock())
            return []
        selected = {name: ids for name, ids in decision.selected.items() if ids}
        latest = self.runs.latest_for_group(key)
        reason = "deadline, inputs short (degraded)" if decision.degraded else "inputs ready"
        if latest is not None:  # (a reprocessing run too: it is the group's newest)
            if input_hash(latest.inputs) == input_hash(selected):
                return []  # this input set has its run already
            if pipeline.on_new_input is OnNewInput.IGNORE:
                return []  # it ran (or runs) on what was there then; the registry says so
            reason = f"new input since run {latest.id} (on_new_input: rerun)"
        new = NewRun(
            pipeline=pipeline.id,
            group_key=key,
            night=date.fromisoformat(key.night) if key.night else None,
            inputs=selected,
            reason=reason,
            degraded=decision.degraded,
        )
        run_id = self.runs.create(new, now)
        if run_id is None:
            return []  # this input set has its run already
        log.info("run %d queued: %s %s (%s)", run_id, pipeline.id, key, reason)
        return [Started(run_id, pipeline.id, key, decision.degraded)]

    def decide(
        self,
        pipeline: PipelineSpec,
        key: GroupKey,
        primary: FileRecord,
        *,
        deadline_passed: bool = False,
    ) -> Decision:
        """The readiness of one group, from its candidates in the catalog
        (``deadline_passed``: as if every deadline had come, for reprocessing)."""
        primary_values = self._values(primary)
        if primary_values is None:
            reason = f"its first file {primary.archive_id} cannot be read"
            return Decision(False, False, {}, (reason,), None)
        group = group_values(key, primary_values)
        chosen: dict[str, list[FileRecord]] = {}
        for position, spec in enumerate(pipeline.inputs):
            matched = chosen.setdefault(spec.name, [])
            if position == 0 and GroupBy.FILE in pipeline.group.by:
                pool: Iterable[FileRecord] = [primary]
            else:
                pool = self._of_night(spec.product, primary.night)
            for record in pool:
                if record.superseded_by is not None:
                    continue
                if position == 0 and group_key(pipeline, record) != key:
                    continue
                values = self._values(record)
                if values is not None and matches(spec, values, group, primary=position == 0):
                    matched.append(record)
        arrived = self.groups.cached_at([r.id for records in chosen.values() for r in records])
        candidates = {
            name: [Candidate(r.id, arrived.get(r.id, r.start or self.clock())) for r in records]
            for name, records in chosen.items()
        }
        end = None
        instrument = self.registry.instruments.get(primary.instrument or "")
        if primary.night is not None and instrument is not None:
            end = night_end(primary.night, instrument.zone, instrument.night_end)
        now = self.clock()
        if deadline_passed:
            now = max([now, *(c.arrived for cs in candidates.values() for c in cs)])
            now += timedelta(minutes=pipeline.kickoff.after_minutes, days=2)
        return readiness(pipeline, candidates, now=now, night_end=end)

    def waiting(self) -> list[Waiting]:
        """Every group that waits for a deadline, the soonest first, with what it has
        and lacks (a group of a pipeline gone from the registry is left out)."""
        found: list[Waiting] = []
        for due in self.groups.waiting():
            spec = self.registry.pipelines.get(due.key.pipeline)
            primary = self.groups.primary(due.key)
            if spec is None or primary is None:
                continue
            decision = self.decide(spec, due.key, primary)
            kickoff = spec.kickoff
            base = "the night's end" if kickoff.deadline == "night_end" else "its last input"
            rule = f"{kickoff.after_minutes:g} min after {base}"
            has = {name: len(ids) for name, ids in decision.selected.items()}
            found.append(Waiting(due.key, due.due_at, rule, has, decision.unmet))
        return found

    def known_groups(
        self, pipeline: PipelineSpec, night: date | None = None
    ) -> list[tuple[GroupKey, FileRecord]]:
        """Every group of ``pipeline`` the tracker has seen (of one night), with the file
        that made it."""
        return self.groups.of_pipeline(pipeline.id, night)

    def reprocess(
        self,
        pipeline: PipelineSpec,
        *,
        night: date | None = None,
        group: GroupKey | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Reprocessing:
        """Queue ``pipeline`` again on every group it knows (of one ``night``; or only
        ``group``), as if every deadline had come: new run versions under one request,
        whose products supersede the older ones. What ``obsflow reprocess`` and the
        API's ``POST /api/v1/runs/{n}/reprocess`` (and so the dashboard) do."""
        request = f"reprocess-{self.clock():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        queued: list[int] = []
        skipped: list[tuple[GroupKey, tuple[str, ...]]] = []
        for key, primary in self.known_groups(pipeline, night):
            if group is not None and key != group:
                continue
            decision = self.decide(pipeline, key, primary, deadline_passed=True)
            if not decision.ready:
                skipped.append((key, decision.unmet))
                continue
            run_id = self.runs.create(
                NewRun(
                    pipeline=pipeline.id,
                    group_key=key,
                    night=date.fromisoformat(key.night) if key.night else None,
                    inputs={k: v for k, v in decision.selected.items() if v},
                    reason=f"reprocess ({request})",
                    degraded=decision.degraded,
                    request=request,
                    overrides=dict(overrides or {}),
                ),
                self.clock(),
            )
            if run_id is not None:
                queued.append(run_id)
        return Reprocessing(request, tuple(queued), tuple(skipped))

    # ------------------------------------------------------------ the catalog

    def _values(self, record: FileRecord) -> dict[str, object] | None:
        """What a ``where`` sees of ``record``, from its row; None (the file is noted in
        :attr:`unreadable`, and :meth:`step` raises) if its name groups were never
        recorded and its name is no longer recognised."""
        try:
            return values_of(record, self.registry)
        except RecognitionError as exc:
            if record.id not in self.unreadable:
                self.unreadable[record.id] = exc
                log.error(
                    "left out of every group: %s", exc, extra={"archive_id": record.archive_id}
                )
            return None

    def _of_night(self, product: str, night: date | None) -> list[FileRecord]:
        if night is None:
            return []
        return self.catalog.of_night(product, night)

    def _groups_of_night(
        self, pipeline: PipelineSpec, night: date | None
    ) -> list[tuple[GroupKey, FileRecord]]:
        if night is None:
            return []
        return self.groups.of_night(pipeline.id, night)

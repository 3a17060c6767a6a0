"""On-demand reductions: a user asks the archive to reduce archived frames with a
registry pipeline; obsflow determines the steps needed, reusing what it holds.

The plan resolves backwards through the registry, from the pipeline asked for to the
frames given. For every upstream product it needs (the calibrated frame, the master
bias and flat of that night and filter), it **reuses** the archive's own product when
the archive's run of that group on the same inputs succeeded with the pipeline's own
parameters; else it **runs** that pipeline now, as the archive's own run (what it makes
is the archive's product, as the tracker would have made it at the group's deadline).
Only the pipeline asked for runs with the user's parameters, as the reduction's run
(request ``reduction-<id>``): what it makes are the user's **results**, kept under the
site's ``reductions/`` directory, never files of the archive (they supersede nothing
and start no pipeline). A request with the pipeline's own parameters whose product the
archive holds is answered with the archive's product, at once.

The key of a reduction is its pipeline's and profile's specs, its effective parameters
and its inputs' sha256s: an identical request shares the runs of the one before it
(completed: answered at once; in flight: the same runs), until those results expire
(``reductions.keep_days``); asked again after that, they are made again.

:meth:`Reductions.advance` (the tracker loop, every pass) plans what waited for an
upstream run, follows each reduction's runs to its phase (UWS: QUEUED, EXECUTING,
COMPLETED, ERROR, ABORTED) and deletes expired results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from obsflow.access import Principal, may_read_data
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.records import FileRecord
from obsflow.catalog.reductions import (
    NewReduction,
    ReductionRecord,
    ReductionStore,
    Result,
    RunLink,
)
from obsflow.catalog.runs import NewRun, RunStore, input_hash
from obsflow.errors import ObsflowError
from obsflow.processing.inputs import values_of
from obsflow.processing.tracker import Tracker
from obsflow.processing.tracker.grouping import group_key, group_values, matches
from obsflow.registry.specs import PipelineSpec
from obsflow.site import Site
from obsflow.states import FileState, ReductionPhase, RunState

log = logging.getLogger(__name__)

REUSE: Final = "reuse"
RUN: Final = "run"
MAX_DEPTH: Final = 8
"""The longest chain of pipelines a plan follows back from the one asked for."""
CHUNK: Final = 1 << 20


class ReductionError(ObsflowError):
    """A reduction that cannot be asked for as it is, or cannot be planned; ``kind``
    says how the API answers: ``invalid`` (422), ``not-found`` (404), ``forbidden``
    (403), ``quota`` (429)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Request:
    """What a user asks for."""

    pipeline: str
    inputs: tuple[str, ...]
    """Archive IDs."""
    parameters: Mapping[str, Any]
    priority: str = "normal"


@dataclass(frozen=True)
class Action:
    """One step of a plan: a pipeline's group, reused from the archive or run."""

    pipeline: str
    action: str
    """:data:`REUSE` or :data:`RUN`."""
    group: str
    products: tuple[str, ...]
    """Reuse: the archive IDs reused. Run: empty."""
    run_id: int | None
    """Run: its run (None until what it needs exists, or in a dry run)."""
    final: bool
    """The pipeline asked for (its products are the reduction's results)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "action": self.action,
            "group": self.group,
            "products": list(self.products),
            "run_id": self.run_id,
            "final": self.final,
        }


@dataclass(frozen=True)
class Checked:
    """A request checked: its pipeline, files, parameters and key."""

    pipeline: PipelineSpec
    records: tuple[FileRecord, ...]
    overrides: dict[str, Any]
    """The parameters given, as the pipeline takes them."""
    effective: dict[str, Any]
    """Every parameter of the pipeline: the defaults, then the given ones."""
    key: str
    input_bytes: int


class Reductions:
    """The reductions of one site (the archive server's)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.store = ReductionStore(site.catalog)
        self.runs = RunStore(site.catalog)
        self.tracker = Tracker(site.registry, site.catalog, site.clock)
        self.settings = site.settings.reductions
        self.root = site.settings.site / "reductions"

    # ------------------------------------------------------------ asking

    def check(self, who: Principal, request: Request) -> Checked:
        """The request as it will be planned, or :class:`ReductionError` naming what is
        wrong (the pipeline, a parameter, an input)."""
        registry = self.site.registry
        spec = registry.pipelines.get(request.pipeline)
        if spec is None:
            known = ", ".join(sorted(p.id for p in registry.pipelines.values() if p.on_demand))
            raise ReductionError(
                f"unknown pipeline {request.pipeline!r}; expected one of: {known or '(none)'}"
            )
        if not spec.on_demand:
            raise ReductionError(
                f"pipeline {spec.id!r} does not take on-demand reductions (on_demand: false)",
                "forbidden",
            )
        overrides: dict[str, Any] = {}
        for name, value in request.parameters.items():
            declared = spec.parameters.get(name)
            if declared is None:
                known = ", ".join(sorted(spec.parameters)) or "(none)"
                raise ReductionError(
                    f"pipeline {spec.id!r} has no parameter {name!r}; its parameters: {known}"
                )
            try:
                overrides[name] = declared.check(value)
            except ValueError as exc:
                raise ReductionError(f"parameter {name!r}: {exc}") from None
        if not request.inputs:
            raise ReductionError("no inputs: give at least one archive ID")
        if len(request.inputs) > self.settings.max_inputs:
            raise ReductionError(
                f"{len(request.inputs)} inputs; one request may name at most "
                f"{self.settings.max_inputs} (reductions.max_inputs)",
                "quota",
            )
        now = self.site.clock()
        records: list[FileRecord] = []
        for archive_id in dict.fromkeys(request.inputs):
            record = self.site.catalog.get(archive_id)
            if record is None or record.state in (FileState.REJECTED, FileState.FAILED):
                raise ReductionError(f"no file with archive ID {archive_id!r}", "not-found")
            if not may_read_data(who, record, now):
                until = record.proprietary_until
                raise ReductionError(
                    f"{archive_id} is proprietary to its program"
                    + (f" until {until:%Y-%m-%d}" if until else ""),
                    "forbidden",
                )
            if not self.fits(record, spec):
                raise ReductionError(
                    f"{archive_id} ({record.product}) is not an input {spec.id} can reduce: "
                    f"{self._chain(record, spec)[0].id} takes "
                    f"{self._chain(record, spec)[0].inputs[0].product} where "
                    f"{self._chain(record, spec)[0].inputs[0].where}"
                )
            records.append(record)
        total = sum(r.size for r in records)
        if total > self.settings.max_input_bytes:
            raise ReductionError(
                f"the inputs hold {total} bytes; one request may reduce at most "
                f"{self.settings.max_input_bytes} (reductions.max_input_bytes)",
                "quota",
            )
        effective = {**spec.defaults, **overrides}
        profile = registry.profiles[spec.profile]
        identity = {
            "pipeline": spec.model_dump(mode="json", exclude={"source"}),
            "profile": profile.model_dump(mode="json", exclude={"source"}),
            "parameters": effective,
            "inputs": sorted(r.sha256 for r in records),
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return Checked(spec, tuple(records), overrides, effective, key, total)

    def fits(self, record: FileRecord, pipeline: PipelineSpec | None) -> bool:
        """Whether ``pipeline`` can reduce ``record``: a chain of pipelines leads from
        its product to it, and it meets the first one's ``where`` (ReductionError when
        no chain does)."""
        if pipeline is None:
            return False
        first = self._chain(record, pipeline)[0]
        try:
            values = values_of(record, self.site.registry)
        except ObsflowError:
            return False
        group = group_values(group_key(first, record), values)
        return matches(first.inputs[0], values, group, primary=True)

    def submit(self, who: Principal, request: Request) -> tuple[ReductionRecord, bool]:
        """Record and plan a reduction; (it, True) when an identical one answered it."""
        checked = self.check(who, request)
        if self.store.active(who.user) >= self.settings.max_active:
            raise ReductionError(
                f"{who.user} has {self.settings.max_active} reductions queued or executing "
                "(reductions.max_active); ask again when one has ended",
                "quota",
            )
        new = NewReduction(
            owner=who.user,
            pipeline=checked.pipeline.id,
            key=checked.key,
            parameters=checked.effective,
            inputs=[r.archive_id or "" for r in checked.records],
            priority=request.priority,
            input_bytes=checked.input_bytes,
        )
        now = self.site.clock()
        earlier = self.store.reusable(checked.key)
        if earlier is not None:
            reduction_id = self.store.create(new, now, runs_request=earlier.runs_request)
            for link in self.store.runs_of(earlier.id):
                self.store.link(reduction_id, [link.run_id], final=link.final)
            self.store.update(reduction_id, plan=earlier.plan, phase=ReductionPhase.QUEUED)
            record = self.refresh(reduction_id)
            log.info("reduction %d shares the runs of reduction %d", reduction_id, earlier.id)
            return record, record.phase is ReductionPhase.COMPLETED
        reduction_id = self.store.create(new, now)
        made = self.store.get(reduction_id)
        assert made is not None
        try:
            actions = self._plan(checked, made.runs_request, create=True)
            self._keep(reduction_id, actions)
        except Exception as exc:  # never left pending (it would count against the quota)
            self.store.update(
                reduction_id, phase=ReductionPhase.ERROR, error=str(exc), finished=now
            )
            raise
        log.info(
            "reduction %d of %s by %s: %d action(s)",
            reduction_id,
            new.pipeline,
            who.user,
            len(actions),
        )
        return self.refresh(reduction_id), False

    def dry_run(self, who: Principal, request: Request) -> list[Action]:
        """The plan, creating nothing."""
        return self._plan(self.check(who, request), "", create=False)

    def abort(self, reduction_id: int, who: Principal) -> ReductionRecord:
        """Stop a reduction: its runs no other reduction needs are stopped (their steps
        killed by their worker within two seconds: lifecycle.STOP_WITHIN)."""
        record = self.store.get(reduction_id)
        if record is None:
            raise ReductionError(f"no reduction {reduction_id}", "not-found")
        if record.phase.finished:
            return record
        now = self.site.clock()
        mine = [link.run_id for link in self.store.runs_of(reduction_id) if link.final]
        keep = self.store.shared(mine, besides=reduction_id)
        stopped = self.store.stop_runs(
            [r for r in mine if r not in keep],
            f"aborted by {who.user} (reduction {reduction_id})",
            now,
        )
        self.store.update(
            reduction_id,
            phase=ReductionPhase.ABORTED,
            finished=now,
            expires=now + timedelta(days=self.settings.keep_days),
            error=f"aborted by {who.user}",
            only_unfinished=True,
        )
        log.info("reduction %d aborted by %s; runs stopped: %s", reduction_id, who.user, stopped)
        got = self.store.get(reduction_id)
        assert got is not None
        return got

    # ------------------------------------------------------------ following

    def advance(self) -> int:
        """Plan what waited, follow every unfinished reduction to its phase, and delete
        expired results. Returns how many reductions changed phase."""
        changed = 0
        for record in self.store.unfinished():
            try:
                before = record.phase
                if self._waiting(record) and self._upstream_done(record):
                    self._replan(record)
                if self.refresh(record.id).phase is not before:
                    changed += 1
            except ReductionError as exc:
                now = self.site.clock()
                self.store.update(
                    record.id,
                    phase=ReductionPhase.ERROR,
                    error=str(exc),
                    finished=now,
                    expires=now + timedelta(days=self.settings.keep_days),
                    only_unfinished=True,
                )
                changed += 1
        self.expire()
        return changed

    def refresh(self, reduction_id: int) -> ReductionRecord:
        """The reduction with its phase brought up to date from its runs."""
        record = self.store.get(reduction_id)
        assert record is not None
        if record.phase.finished:
            return record
        links = self.store.runs_of(reduction_id)
        phase, error = self._phase(record, links)
        if phase is not record.phase or error:
            now = self.site.clock()
            done = phase.finished
            self.store.update(
                reduction_id,
                phase=phase,
                error=error,
                finished=now if done else None,
                expires=now + timedelta(days=self.settings.keep_days) if done else None,
                only_unfinished=True,
            )
            got = self.store.get(reduction_id)
            assert got is not None
            return got
        return record

    def results(self, record: ReductionRecord) -> list[dict[str, Any]]:
        """What the reduction made (its runs' results, or the archive's products it
        answered with): name, product, sha256, size, and where to get it."""
        if record.phase is not ReductionPhase.COMPLETED or record.expired is not None:
            return []
        out: list[dict[str, Any]] = []
        final_runs = [a["run_id"] for a in record.plan if a["final"] and a["action"] == RUN]
        for result in self.store.results_of([r for r in final_runs if r is not None]):
            out.append(
                {
                    "name": result.name,
                    "product": result.product,
                    "sha256": result.sha256,
                    "size": result.size,
                    "url": f"/api/v1/reductions/{record.id}/results/{result.name}",
                }
            )
        for action in record.plan:
            if action["final"] and action["action"] == REUSE:
                for archive_id in action["products"]:
                    file = self.site.catalog.get(archive_id)
                    if file is not None:
                        out.append(
                            {
                                "name": file.original_name,
                                "product": file.product,
                                "sha256": file.sha256,
                                "size": file.size,
                                "url": f"/api/v1/files/{archive_id}/data",
                                "archive_id": archive_id,
                            }
                        )
        return out

    def result_file(self, record: ReductionRecord, name: str) -> tuple[Result, Path] | None:
        """One of the reduction's own results and its file, if it has it."""
        for result in self.own_results(record):
            if result.name == name:
                path = self._dir(result.run_id) / result.name
                return (result, path) if path.is_file() else None
        return None

    def own_results(self, record: ReductionRecord) -> list[Result]:
        """The results the reduction's own runs made (while they are kept)."""
        if record.phase is not ReductionPhase.COMPLETED or record.expired is not None:
            return []
        runs = [a["run_id"] for a in record.plan if a["final"] and a["action"] == RUN]
        return self.store.results_of([r for r in runs if r is not None])

    def fair(
        self, candidates: Sequence[tuple[int, str]], stale_before: datetime
    ) -> list[tuple[int, str]]:
        """Of the queued runs to hand to the executor (run ID, pipeline), in the order to
        hand them: high-priority reductions' runs, the archive's own runs, then the
        users' reductions' runs taken in turn from each user, at most
        ``reductions.fair_share`` of one user's at the executor at once (the rest wait
        for a later pass), so that one user's 500 frames do not starve another's one."""
        owners = self.store.owners([run_id for run_id, _ in candidates])
        if not owners:
            return list(candidates)
        high: list[tuple[int, str]] = []
        archive: list[tuple[int, str]] = []
        queues: dict[str, list[tuple[int, str]]] = {}
        for candidate in candidates:
            found = owners.get(candidate[0])
            if found is None:
                archive.append(candidate)
            elif found[1] == "high":
                high.append(candidate)
            else:
                queues.setdefault(found[0], []).append(candidate)
        busy = self.store.in_flight(stale_before)
        turns: list[tuple[int, str]] = []
        while True:
            took = False
            for owner, waiting in queues.items():
                if waiting and busy.get(owner, 0) < self.settings.fair_share:
                    turns.append(waiting.pop(0))
                    busy[owner] = busy.get(owner, 0) + 1
                    took = True
            if not took:
                return [*high, *archive, *turns]

    # ------------------------------------------------------------ results

    def publish(self, run_id: int, outputs: Mapping[str, Path]) -> None:
        """Keep a reduction's run's outputs as its results (copied, sha256 while copying)."""
        target = self._dir(run_id)
        target.mkdir(parents=True, exist_ok=True)
        rows: list[Result] = []
        for product, path in sorted(outputs.items()):
            digest = hashlib.sha256()
            size = 0
            part = target / f".{path.name}.part"
            with path.open("rb") as source, part.open("wb") as sink:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
                    size += len(chunk)
            part.replace(target / path.name)
            rows.append(Result(run_id, path.name, product, digest.hexdigest(), size))
        self.store.add_results(rows, self.site.clock())

    def expire(self) -> int:
        """Delete the results of reductions past ``expires_at`` (each keeps its record,
        with ``expired``); returns how many reductions expired."""
        due = self.store.due_to_expire(self.site.clock())
        if not due:
            return 0
        gone = self.store.expire([r.id for r in due], self.site.clock())
        for run_id in gone:
            shutil.rmtree(self._dir(run_id), ignore_errors=True)
        log.info("%d reduction(s) expired; results of %d run(s) deleted", len(due), len(gone))
        return len(due)

    def _dir(self, run_id: int) -> Path:
        return self.root / f"run-{run_id}"

    # ------------------------------------------------------------ planning

    def _plan(self, checked: Checked, label: str, *, create: bool) -> list[Action]:
        """Every action the reduction needs, upstream first; runs created if ``create``."""
        spec = checked.pipeline
        actions: dict[tuple[str, str], Action] = {}
        finals: dict[GroupKey, list[FileRecord]] = {}
        waiting: list[str] = []
        for record in checked.records:
            chain = self._chain(record, spec)
            current: FileRecord | None = record
            for position, upstream in enumerate(chain[:-1]):
                assert current is not None
                action = self._ensure(
                    upstream, group_key(upstream, current), current, actions, create, 0
                )
                if action.action == RUN:
                    current = None
                    break
                wanted = chain[position + 1].inputs[0].product
                current = self._product_of(action, wanted)
                if current is None:
                    raise ReductionError(
                        f"the archive's {upstream.id} for {action.group} made no current {wanted}",
                        "invalid",
                    )
            if current is None:
                waiting.append(record.archive_id or "")
            else:
                finals.setdefault(group_key(spec, current), []).append(current)
        out = list(actions.values())
        for key, primaries in finals.items():
            out.append(self._final(checked, key, primaries, label, actions, create))
            out.extend(a for a in actions.values() if a not in out)
        if waiting:
            out.append(Action(spec.id, RUN, f"from {', '.join(waiting)}", (), None, True))
        return out

    def _final(
        self,
        checked: Checked,
        key: GroupKey,
        primaries: Sequence[FileRecord],
        label: str,
        actions: dict[tuple[str, str], Action],
        create: bool,
    ) -> Action:
        spec = checked.pipeline
        decision = self.tracker.decide(spec, key, primaries[0], deadline_passed=True)
        selected = {name: tuple(ids) for name, ids in decision.selected.items()}
        selected[spec.inputs[0].name] = tuple(sorted({r.id for r in primaries}))
        short = [i for i in spec.inputs if not i.optional and len(selected.get(i.name, ())) < i.min]
        if short:
            self._make_missing(spec, short, primaries[0], actions, create, 0, key)
            return Action(spec.id, RUN, key.text(), (), None, True)
        inputs = {name: ids for name, ids in selected.items() if ids}
        digest = input_hash(inputs)
        own = all(spec.defaults.get(n) == v for n, v in checked.overrides.items())
        if own:
            reused = self._reusable(key, digest)
            if reused is not None:
                return Action(spec.id, REUSE, key.text(), reused, None, True)
        run_id = self.store.run_with(key, digest, label) if label else None
        if run_id is None and create:
            run_id = self.runs.create(
                NewRun(
                    pipeline=spec.id,
                    group_key=key,
                    night=date.fromisoformat(key.night) if key.night else None,
                    inputs=inputs,
                    reason=f"on-demand ({label})",
                    degraded=decision.degraded,
                    request=label,
                    overrides=checked.overrides,
                ),
                self.site.clock(),
            ) or self.store.run_with(key, digest, label)
        return Action(spec.id, RUN, key.text(), (), run_id, True)

    def _ensure(
        self,
        pipeline: PipelineSpec,
        key: GroupKey,
        primary: FileRecord,
        actions: dict[tuple[str, str], Action],
        create: bool,
        depth: int,
    ) -> Action:
        """The archive's product of one group: reused, being made, or made now."""
        known = actions.get((pipeline.id, key.text()))
        if known is not None:
            return known
        if depth > MAX_DEPTH:
            raise ReductionError(f"the registry's chain to {pipeline.id} is too deep to plan")
        decision = self.tracker.decide(pipeline, key, primary, deadline_passed=True)
        if not decision.ready:
            short = [
                i
                for i in pipeline.inputs[1:]
                if not i.optional and len(decision.selected.get(i.name, ())) < i.min
            ]
            first = pipeline.inputs[0]
            have = len(decision.selected.get(first.name, ()))
            enough = have >= first.min or (pipeline.kickoff.degraded_ok and have > 0)
            if not short or not enough:
                raise ReductionError(
                    f"{pipeline.id} for {key} cannot run: {'; '.join(decision.unmet)}",
                    "invalid",
                )
            self._make_missing(pipeline, short, primary, actions, create, depth, key)
            action = Action(pipeline.id, RUN, key.text(), (), None, False)
            actions[(pipeline.id, key.text())] = action
            return action
        inputs = {name: ids for name, ids in decision.selected.items() if ids}
        digest = input_hash(inputs)
        reused = self._reusable(key, digest)
        if reused is not None:
            action = Action(pipeline.id, REUSE, key.text(), reused, None, False)
        else:
            run_id = self._archive_run(pipeline, key, inputs, digest, decision.degraded, create)
            action = Action(pipeline.id, RUN, key.text(), (), run_id, False)
        actions[(pipeline.id, key.text())] = action
        return action

    def _make_missing(
        self,
        pipeline: PipelineSpec,
        short: Sequence[Any],
        primary: FileRecord,
        actions: dict[tuple[str, str], Action],
        create: bool,
        depth: int,
        key: GroupKey,
    ) -> None:
        """Plan the archive's runs that make the inputs ``pipeline`` lacks: the groups
        of their producers, of the primary's night, whose first file meets the input's
        ``where`` (a product takes its values from its first input: the master flat of
        the frame's filter, not the others'). A group that cannot be planned is left
        out; ReductionError when no group can make an input."""
        wanted = group_values(key, values_of(primary, self.site.registry))
        for spec_in in short:
            planned = 0
            why: list[str] = []
            for producer in self._producers(spec_in.product):
                for group, first in self.tracker.known_groups(producer, primary.night):
                    try:
                        values = values_of(first, self.site.registry)
                    except ObsflowError:
                        continue
                    if not matches(spec_in, values, wanted, primary=False):
                        continue
                    try:
                        self._ensure(producer, group, first, actions, create, depth + 1)
                    except ReductionError as exc:
                        why.append(str(exc))
                        continue
                    planned += 1
            if not planned:
                reason = f": {why[0]}" if why else ""
                raise ReductionError(
                    f"{pipeline.id} for {key} needs {spec_in.name} ({spec_in.product}); the "
                    f"archive holds none for night {primary.night} and cannot make one" + reason,
                    "invalid",
                )

    def _archive_run(
        self,
        pipeline: PipelineSpec,
        key: GroupKey,
        inputs: Mapping[str, tuple[int, ...]],
        digest: str,
        degraded: bool,
        create: bool,
    ) -> int | None:
        """The archive's run of this group on these inputs: the one queued or running,
        else a new one (None in a dry run)."""
        found = self.store.archive_run(key, digest)
        if found is not None and found[1] in (RunState.QUEUED, RunState.RUNNING):
            return found[0]
        if not create:
            return None
        request = "" if found is None else f"ondemand-{self.site.clock():%Y%m%dT%H%M%S%f}"
        run_id = self.runs.create(
            NewRun(
                pipeline=pipeline.id,
                group_key=key,
                night=date.fromisoformat(key.night) if key.night else None,
                inputs=inputs,
                reason="an on-demand reduction needs it",
                degraded=degraded,
                request=request,
            ),
            self.site.clock(),
        )
        return run_id if run_id is not None else self.store.run_with(key, digest, request)

    def _reusable(self, key: GroupKey, digest: str) -> tuple[str, ...] | None:
        """The archive IDs of the current products the archive's succeeded run of this
        group on these inputs made with its own parameters, if there is one."""
        found = self.store.archive_run(key, digest)
        if found is None or found[1] is not RunState.SUCCEEDED or found[2]:
            return None
        made = self.site.catalog.records(self.runs.outputs(found[0]))
        current = tuple(r.archive_id for r in made if r.archive_id and r.superseded_by is None)
        return current or None

    def _product_of(self, action: Action, product: str) -> FileRecord | None:
        for archive_id in action.products:
            record = self.site.catalog.get(archive_id)
            if record is not None and record.product == product and record.superseded_by is None:
                return record
        return None

    def _producers(self, product: str) -> list[PipelineSpec]:
        return [
            p
            for p in self.site.registry.pipelines.values()
            if any(o.product == product for o in p.outputs)
        ]

    def _chain(self, record: FileRecord, target: PipelineSpec) -> list[PipelineSpec]:
        """The pipelines from ``record``'s product to ``target`` (itself last), each
        taking the one before's product as its first input; ReductionError if none."""
        if record.product == target.inputs[0].product:
            return [target]
        # breadth first, backwards from the target: the shortest chain
        frontier: list[list[PipelineSpec]] = [[target]]
        seen = {target.id}
        for _ in range(MAX_DEPTH):
            following: list[list[PipelineSpec]] = []
            for chain in frontier:
                for producer in self._producers(chain[0].inputs[0].product):
                    if producer.id in seen:
                        continue
                    seen.add(producer.id)
                    longer = [producer, *chain]
                    if producer.inputs[0].product == record.product:
                        return longer
                    following.append(longer)
            frontier = following
        raise ReductionError(
            f"pipeline {target.id!r} cannot be made from {record.archive_id} (product "
            f"{record.product}): nothing in the registry leads from {record.product} to "
            f"its input {target.inputs[0].product}"
        )

    # ------------------------------------------------------------ phases

    def _keep(self, reduction_id: int, actions: Sequence[Action]) -> None:
        """Link the plan's runs, then keep the plan (a pending reduction becomes queued:
        the tracker loop follows it from then on)."""
        for final in (False, True):
            ids = [a.run_id for a in actions if a.final is final and a.run_id is not None]
            self.store.link(reduction_id, ids, final=final)
        record = self.store.get(reduction_id)
        phase = ReductionPhase.QUEUED if record and record.phase is ReductionPhase.PENDING else None
        self.store.update(reduction_id, plan=[a.to_json() for a in actions], phase=phase)

    def _waiting(self, record: ReductionRecord) -> bool:
        return any(a["action"] == RUN and a["run_id"] is None for a in record.plan)

    def _upstream_done(self, record: ReductionRecord) -> bool:
        return all(link.state.finished for link in self.store.runs_of(record.id) if not link.final)

    def _replan(self, record: ReductionRecord) -> None:
        owner = _Owner(record.owner)
        checked = self.check(
            owner.principal(), Request(record.pipeline, record.inputs, self._given(record))
        )
        actions = self._plan(checked, record.runs_request, create=True)
        # what it ran stays in the plan as run (with the run, and now its products),
        # ahead of the rest
        ran = {(a["pipeline"], a["group"]): a for a in record.plan if a["run_id"] is not None}
        kept: list[Action] = []
        for action in actions:
            before = ran.pop((action.pipeline, action.group), None)
            if before is not None and action.action == REUSE:
                kept.append(replace(action, action=RUN, run_id=before["run_id"]))
            else:
                kept.append(action)
        earlier = [
            Action(
                a["pipeline"],
                a["action"],
                a["group"],
                tuple(a["products"]),
                a["run_id"],
                a["final"],
            )
            for a in ran.values()
        ]
        self._keep(record.id, [*earlier, *kept])

    def _given(self, record: ReductionRecord) -> dict[str, Any]:
        spec = self.site.registry.pipelines.get(record.pipeline)
        defaults = {} if spec is None else spec.defaults
        return {k: v for k, v in record.parameters.items() if defaults.get(k) != v}

    def _phase(
        self, record: ReductionRecord, links: Sequence[RunLink]
    ) -> tuple[ReductionPhase, str | None]:
        failed = [link for link in links if link.state is RunState.FAILED]
        if failed:
            first = failed[0]
            run = self.runs.get(first.run_id)
            pipeline = "" if run is None else f" ({run.pipeline})"
            return ReductionPhase.ERROR, f"run {first.run_id}{pipeline} failed: {first.error}"
        if any(link.state is RunState.RUNNING for link in links):
            return ReductionPhase.EXECUTING, None
        if record.phase is ReductionPhase.PENDING or self._waiting(record):
            return record.phase, None  # (pending: being planned)
        finals = [a for a in record.plan if a["final"]]
        made = {link.run_id for link in links if link.final and link.state is RunState.SUCCEEDED}
        if finals and all(a["action"] == REUSE or a["run_id"] in made for a in finals):
            return ReductionPhase.COMPLETED, None
        return ReductionPhase.QUEUED, None


@dataclass(frozen=True)
class _Owner:
    """A reduction's owner, as the replanning of a waiting reduction sees it: its
    inputs were checked against the owner's token when it was asked for."""

    user: str

    def principal(self) -> Principal:
        from obsflow.access import Scope

        return Principal(user=self.user, scope=Scope.ADMIN, programs=frozenset(), token_id=None)

"""On-demand reductions in the catalog: the requests, the runs that serve them, and
their results.

A reduction is a user's request (pipeline, inputs, parameters) with its plan and phase.
Its runs are ordinary runs (``runs``): the archive's own for what it reuses or makes of
its own products, and the reduction's for what the user asked (their request label
starts with :data:`~obsflow.catalog.runs.REDUCTION_PREFIX`). Identical requests share
those runs. What a reduction's run makes is not a file of the archive: each result is a
row of ``reduction_results`` (name, product, sha256, size) and a file under the site's
``reductions/`` directory, kept until every reduction that points at it has expired.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update

from obsflow.catalog import Catalog, schema
from obsflow.catalog.cancel import cancel_runs
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.runs import REDUCTION_PREFIX
from obsflow.states import ReductionPhase, RunState

reductions = schema.reductions
links = schema.reduction_runs
results = schema.reduction_results
runs = schema.runs


@dataclass(frozen=True)
class ReductionRecord:
    id: int
    owner: str
    pipeline: str
    key: str
    runs_request: str
    parameters: dict[str, Any]
    inputs: tuple[str, ...]
    plan: tuple[dict[str, Any], ...]
    phase: ReductionPhase
    priority: str
    input_bytes: int
    created: datetime
    finished: datetime | None
    expires: datetime | None
    expired: datetime | None
    error: str | None


@dataclass(frozen=True)
class RunLink:
    """One run of a reduction, as its phase needs it."""

    run_id: int
    final: bool
    state: RunState
    error: str | None


@dataclass(frozen=True)
class Result:
    """One file a reduction's run made."""

    run_id: int
    name: str
    product: str
    sha256: str
    size: int


@dataclass(frozen=True)
class NewReduction:
    owner: str
    pipeline: str
    key: str
    parameters: dict[str, Any]
    inputs: Sequence[str]
    priority: str
    input_bytes: int


class ReductionStore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # ------------------------------------------------------------- requests

    def create(self, new: NewReduction, now: datetime, runs_request: str | None = None) -> int:
        """Record a reduction, ``pending`` until its plan is kept (:meth:`update` with
        a phase): the tracker loop follows only queued and executing ones. Its runs'
        request label is ``runs_request`` (an identical reduction's, to share its runs)
        or its own."""
        with self.catalog.write() as conn:
            reduction_id = conn.execute(
                insert(reductions)
                .values(
                    owner=new.owner,
                    pipeline=new.pipeline,
                    key=new.key,
                    runs_request=runs_request or "",
                    parameters=json.dumps(new.parameters, sort_keys=True),
                    inputs=json.dumps(list(new.inputs)),
                    plan="[]",
                    phase=ReductionPhase.PENDING.value,
                    priority=new.priority,
                    input_bytes=new.input_bytes,
                    created_at=now,
                )
                .returning(reductions.c.id)
            ).scalar_one()
            if runs_request is None:
                conn.execute(
                    update(reductions)
                    .where(reductions.c.id == reduction_id)
                    .values(runs_request=f"{REDUCTION_PREFIX}{reduction_id}")
                )
        return int(reduction_id)

    def get(self, reduction_id: int) -> ReductionRecord | None:
        with self.catalog.read() as conn:
            row = conn.execute(select(reductions).where(reductions.c.id == reduction_id)).first()
        return None if row is None else _record(row)

    def page(self, owner: str | None, after: int | None, limit: int) -> list[ReductionRecord]:
        """Reductions by id (of ``owner``; None: everyone's), after the id ``after``."""
        query = select(reductions).order_by(reductions.c.id).limit(limit)
        if owner is not None:
            query = query.where(reductions.c.owner == owner)
        if after is not None:
            query = query.where(reductions.c.id > after)
        with self.catalog.read() as conn:
            return [_record(r) for r in conn.execute(query)]

    def reusable(self, key: str) -> ReductionRecord | None:
        """The newest reduction with ``key`` whose runs can serve an identical request:
        in flight, or completed with its results kept."""
        query = (
            select(reductions)
            .where(
                reductions.c.key == key,
                reductions.c.expired_at.is_(None),
                reductions.c.phase.in_(
                    [
                        ReductionPhase.QUEUED.value,
                        ReductionPhase.EXECUTING.value,
                        ReductionPhase.COMPLETED.value,
                    ]
                ),
            )
            .order_by(reductions.c.id.desc())
            .limit(1)
        )
        with self.catalog.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else _record(row)

    def active(self, owner: str) -> int:
        """How many of ``owner``'s reductions are being planned, queued or executing."""
        query = select(func.count()).where(
            reductions.c.owner == owner,
            reductions.c.phase.in_(
                [
                    ReductionPhase.PENDING.value,
                    ReductionPhase.QUEUED.value,
                    ReductionPhase.EXECUTING.value,
                ]
            ),
        )
        with self.catalog.read() as conn:
            return int(conn.execute(query).scalar_one())

    def unfinished(self) -> list[ReductionRecord]:
        query = (
            select(reductions)
            .where(
                reductions.c.phase.in_(
                    [ReductionPhase.QUEUED.value, ReductionPhase.EXECUTING.value]
                )
            )
            .order_by(reductions.c.id)
        )
        with self.catalog.read() as conn:
            return [_record(r) for r in conn.execute(query)]

    def update(
        self,
        reduction_id: int,
        *,
        phase: ReductionPhase | None = None,
        plan: Sequence[dict[str, Any]] | None = None,
        finished: datetime | None = None,
        expires: datetime | None = None,
        error: str | None = None,
        only_unfinished: bool = False,
    ) -> bool:
        """Set what is given; ``only_unfinished``: unless the reduction ended meanwhile
        (an abort wins over a run that ends at the same moment)."""
        values: dict[str, Any] = {}
        if phase is not None:
            values["phase"] = phase.value
        if plan is not None:
            values["plan"] = json.dumps(list(plan))
        if finished is not None:
            values["finished_at"] = finished
        if expires is not None:
            values["expires_at"] = expires
        if error is not None:
            values["error"] = error
        if not values:
            return False
        statement = update(reductions).where(reductions.c.id == reduction_id).values(**values)
        if only_unfinished:
            statement = statement.where(
                reductions.c.phase.in_(
                    [
                        ReductionPhase.PENDING.value,
                        ReductionPhase.QUEUED.value,
                        ReductionPhase.EXECUTING.value,
                    ]
                )
            )
        with self.catalog.write() as conn:
            return bool(conn.execute(statement).rowcount)

    # ------------------------------------------------------------- runs

    def link(self, reduction_id: int, run_ids: Iterable[int], *, final: bool) -> None:
        """Add runs to a reduction (those it has already are left as they are)."""
        with self.catalog.write() as conn:
            have = set(
                conn.execute(
                    select(links.c.run_id).where(links.c.reduction_id == reduction_id)
                ).scalars()
            )
            rows = [
                {"reduction_id": reduction_id, "run_id": run_id, "final": final}
                for run_id in sorted(set(run_ids) - have)
            ]
            if rows:
                conn.execute(insert(links), rows)

    def runs_of(self, reduction_id: int) -> list[RunLink]:
        query = (
            select(links.c.run_id, links.c.final, runs.c.state, runs.c.error)
            .join(runs, runs.c.id == links.c.run_id)
            .where(links.c.reduction_id == reduction_id)
            .order_by(links.c.run_id)
        )
        with self.catalog.read() as conn:
            return [
                RunLink(r.run_id, bool(r.final), RunState(r.state), r.error)
                for r in conn.execute(query)
            ]

    def shared(self, run_ids: Sequence[int], besides: int) -> set[int]:
        """Of ``run_ids``, those an unfinished reduction other than ``besides`` needs."""
        query = (
            select(links.c.run_id)
            .join(reductions, reductions.c.id == links.c.reduction_id)
            .where(
                links.c.run_id.in_(list(run_ids)),
                links.c.reduction_id != besides,
                reductions.c.phase.in_(
                    [ReductionPhase.QUEUED.value, ReductionPhase.EXECUTING.value]
                ),
            )
        )
        with self.catalog.read() as conn:
            return set(conn.execute(query).scalars())

    def owners(self, run_ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """Of ``run_ids``, the runs of unfinished reductions' own (final) runs: run ID →
        (owner, priority) of the first reduction that asked for it."""
        if not run_ids:
            return {}
        query = (
            select(links.c.run_id, reductions.c.owner, reductions.c.priority)
            .join(reductions, reductions.c.id == links.c.reduction_id)
            .where(
                links.c.run_id.in_(list(run_ids)),
                links.c.final,
                reductions.c.phase.in_(
                    [ReductionPhase.QUEUED.value, ReductionPhase.EXECUTING.value]
                ),
            )
            .order_by(links.c.reduction_id.desc())
        )
        with self.catalog.read() as conn:
            return {int(r.run_id): (r.owner, r.priority) for r in conn.execute(query)}

    def in_flight(self, stale_before: datetime) -> dict[str, int]:
        """Per owner, the final runs of their unfinished reductions handed to the
        executor and not ended (running, or queued and dispatched since
        ``stale_before``: one handed over before is lost, and handed over again)."""
        handed = or_(
            runs.c.state == RunState.RUNNING.value,
            and_(runs.c.state == RunState.QUEUED.value, runs.c.dispatched_at >= stale_before),
        )
        query = (
            select(reductions.c.owner, func.count(func.distinct(links.c.run_id)))
            .select_from(links)
            .join(reductions, reductions.c.id == links.c.reduction_id)
            .join(runs, runs.c.id == links.c.run_id)
            .where(links.c.final, handed)
            .group_by(reductions.c.owner)
        )
        with self.catalog.read() as conn:
            return {str(owner): int(n) for owner, n in conn.execute(query)}

    def archive_run(
        self, key: GroupKey, input_hash: str
    ) -> tuple[int, RunState, dict[str, Any]] | None:
        """The archive's newest run of this group on this input set (not a reduction's):
        its id, state and parameter overrides."""
        query = (
            select(runs.c.id, runs.c.state, runs.c.overrides)
            .where(
                runs.c.pipeline == key.pipeline,
                runs.c.group_key == key.text(),
                runs.c.input_hash == input_hash,
                ~runs.c.request.startswith(REDUCTION_PREFIX),
            )
            .order_by(runs.c.id.desc())
            .limit(1)
        )
        with self.catalog.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return int(row.id), RunState(row.state), json.loads(row.overrides or "{}")

    def run_with(self, key: GroupKey, input_hash: str, request: str) -> int | None:
        """The run of this group, input set and request label, if it exists."""
        query = select(runs.c.id).where(
            runs.c.pipeline == key.pipeline,
            runs.c.group_key == key.text(),
            runs.c.input_hash == input_hash,
            runs.c.request == request,
        )
        with self.catalog.read() as conn:
            found = conn.execute(query).scalar()
        return None if found is None else int(found)

    def stop_runs(self, run_ids: Sequence[int], reason: str, now: datetime) -> list[int]:
        """Queued or running runs cancelled with ``reason`` (as ``obsflow runs cancel``
        does: a worker executing one loses its lease at its next heartbeat and kills its
        steps). Returns the runs stopped."""
        return cancel_runs(self.catalog, run_ids, now, reason)

    # ------------------------------------------------------------- results

    def add_results(self, rows: Sequence[Result], now: datetime) -> None:
        """Record a run's results (again: replaced, so a second publish is harmless)."""
        if not rows:
            return
        with self.catalog.write() as conn:
            for run_id in {r.run_id for r in rows}:
                conn.execute(delete(results).where(results.c.run_id == run_id))
            conn.execute(
                insert(results),
                [
                    {
                        "run_id": r.run_id,
                        "name": r.name,
                        "product": r.product,
                        "sha256": r.sha256,
                        "size": r.size,
                        "created_at": now,
                    }
                    for r in rows
                ],
            )

    def results_of(self, run_ids: Sequence[int]) -> list[Result]:
        if not run_ids:
            return []
        query = (
            select(results)
            .where(results.c.run_id.in_(list(run_ids)))
            .order_by(results.c.run_id, results.c.name)
        )
        with self.catalog.read() as conn:
            return [
                Result(r.run_id, r.name, r.product, r.sha256, r.size) for r in conn.execute(query)
            ]

    def due_to_expire(self, now: datetime) -> list[ReductionRecord]:
        query = select(reductions).where(
            reductions.c.expires_at <= now, reductions.c.expired_at.is_(None)
        )
        with self.catalog.read() as conn:
            return [_record(r) for r in conn.execute(query)]

    def expire(self, reduction_ids: Sequence[int], now: datetime) -> list[int]:
        """Mark reductions expired; returns the final runs whose results no unexpired
        reduction needs any more (their files may go), their result rows deleted."""
        if not reduction_ids:
            return []
        with self.catalog.write() as conn:
            conn.execute(
                update(reductions)
                .where(reductions.c.id.in_(list(reduction_ids)))
                .values(expired_at=now)
            )
            candidates = set(
                conn.execute(
                    select(links.c.run_id).where(
                        links.c.reduction_id.in_(list(reduction_ids)), links.c.final
                    )
                ).scalars()
            )
            if not candidates:
                return []
            kept = set(
                conn.execute(
                    select(links.c.run_id)
                    .join(reductions, reductions.c.id == links.c.reduction_id)
                    .where(links.c.run_id.in_(candidates), reductions.c.expired_at.is_(None))
                ).scalars()
            )
            gone = sorted(candidates - kept)
            if gone:
                conn.execute(delete(results).where(results.c.run_id.in_(gone)))
        return gone


def _record(row: Any) -> ReductionRecord:
    return ReductionRecord(
        id=int(row.id),
        owner=row.owner,
        pipeline=row.pipeline,
        key=row.key,
        runs_request=row.runs_request,
        parameters=json.loads(row.parameters),
        inputs=tuple(json.loads(row.inputs)),
        plan=tuple(json.loads(row.plan)),
        phase=ReductionPhase(row.phase),
        priority=row.priority,
        input_bytes=int(row.input_bytes),
        created=row.created_at,
        finished=row.finished_at,
        expires=row.expires_at,
        expired=row.expired_at,
        error=row.error,
    )


__all__ = [
    "NewReduction",
    "ReductionRecord",
    "ReductionStore",
    "Result",
    "RunLink",
]

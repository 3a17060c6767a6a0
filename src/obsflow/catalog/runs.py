"""Pipeline runs in the catalog: created once per (pipeline, group, input set), handed
to an executor once, leased by a worker, their steps recorded, finished (the tracker's
groups are :mod:`obsflow.catalog.tracking`).

Every state change goes through :class:`RunStore`, which checks it against
:class:`~obsflow.states.RunState`'s moves with a compare-and-set ``UPDATE ... WHERE
state = ...``: two executors cannot both claim a run, and a finished run stays finished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Row,
    Select,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from obsflow.catalog import Catalog, schema
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.steps import StepRecord, StepRow, iso
from obsflow.states import LedgerEvent, RunState, StepState

runs = schema.runs
run_inputs = schema.run_inputs
run_steps = schema.run_steps
files = schema.files


# The executor's hot path, built once (building a statement costs more than running it):
# every value is a bound parameter.
_CLAIM = (
    update(runs)
    .where(runs.c.id == bindparam("b_id"), runs.c.state == RunState.QUEUED.value)
    .values(
        state=RunState.RUNNING.value,
        lease_owner=bindparam("b_owner"),
        lease_expires=bindparam("b_expires"),
        attempts=runs.c.attempts + 1,
        started_at=bindparam("b_now"),
        finished_at=None,
        error=None,
    )
    .returning(*runs.c)
)
_FORGET_STEPS = delete(run_steps).where(run_steps.c.run_id == bindparam("b_id"))
_INPUT_ORDER = (  # each input's files in a defined order, so a re-run makes the same
    # outputs: observation time (a file without one last, on both engines), then name, row
    run_inputs.c.run_id,
    run_inputs.c.input,
    files.c.start_utc.is_(None),
    files.c.start_utc,
    files.c.original_name,
    files.c.id,
)
_INPUTS_OF = select(run_inputs.c.run_id, run_inputs.c.input, run_inputs.c.file_id).join(
    files, files.c.id == run_inputs.c.file_id
)
_INPUTS = _INPUTS_OF.where(run_inputs.c.run_id.in_(bindparam("b_ids", expanding=True))).order_by(
    *_INPUT_ORDER
)
_INPUTS_OF_ONE = _INPUTS_OF.where(run_inputs.c.run_id == bindparam("b_id")).order_by(*_INPUT_ORDER)
"""One run's (a claim's): an expanding IN is rendered again at every execution, which
cost a claim more than the query itself."""
_STEP_COLUMNS = (
    "position", "state", "attempts", "argv", "started_at", "finished_at", "exit_status",
    "stdout_tail", "stderr_tail", "reason",
)  # fmt: skip
_INSERT_STEP = insert(run_steps).values(
    run_id=bindparam("b_run"), step=bindparam("b_step"), **{c: bindparam(c) for c in _STEP_COLUMNS}
)
_UPDATE_STEP = (
    update(run_steps)
    .where(run_steps.c.run_id == bindparam("b_run"), run_steps.c.step == bindparam("b_step"))
    .values(**{c: bindparam(c) for c in _STEP_COLUMNS})
)
_SET_PROFILE = (
    update(runs)
    .where(runs.c.id == bindparam("b_id"))
    .values(
        profile=bindparam("b_profile"), work_dir=bindparam("b_work"), log_path=bindparam("b_log")
    )
)
_FINISH = (
    update(runs)
    .where(
        runs.c.id == bindparam("b_id"),
        runs.c.state == RunState.RUNNING.value,
        runs.c.lease_owner == bindparam("b_owner"),
    )
    .values(
        state=bindparam("b_state"),
        finished_at=bindparam("b_now"),
        error=bindparam("b_error"),
        lease_owner=None,
        lease_expires=None,
    )
)
_FINISH_WITH_PROFILE = _FINISH.values(
    profile=bindparam("b_profile"), work_dir=bindparam("b_work"), log_path=bindparam("b_log")
)


_LEDGER = schema.ledger
_UNSTAMPED_INPUTS = (
    select(
        run_inputs.c.file_id,
        literal(LedgerEvent.PROCESSED.value),
        bindparam("b_now", type_=_LEDGER.c.at.type),
    )
    .where(
        run_inputs.c.run_id == bindparam("b_run"),
        ~exists().where(
            _LEDGER.c.file_id == run_inputs.c.file_id,
            _LEDGER.c.event == LedgerEvent.PROCESSED.value,
        ),
    )
    .distinct()
)
# ON CONFLICT DO NOTHING as well: on PostgreSQL two runs of one input (two flats of one
# master bias) may end in concurrent transactions, each seeing no stamp yet
_STAMP_PROCESSED = {
    name: insert_of(_LEDGER)
    .on_conflict_do_nothing()
    .from_select(["file_id", "event", "at"], _UNSTAMPED_INPUTS)
    for name, insert_of in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}


REDUCTION_PREFIX: Final = "reduction-"
"""The request label of an on-demand reduction's runs (``reduction-<id>``): what they
make are the user's results, not the archive's products, and the tracker does not count
them as a group's runs."""


@dataclass(frozen=True)
class NewRun:
    pipeline: str
    group_key: GroupKey
    night: date | None
    inputs: Mapping[str, tuple[int, ...]]
    """Input name → file IDs."""
    reason: str
    degraded: bool = False
    request: str = ""
    """Empty, or the reprocessing request that asks for this run on purpose."""
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group_key.pipeline != self.pipeline:
            raise ValueError(
                f"run of {self.pipeline!r} given a group key of {self.group_key.pipeline!r}"
            )

    @property
    def input_hash(self) -> str:
        return input_hash(self.inputs)


def input_hash(inputs: Mapping[str, Sequence[int]]) -> str:
    """A stable digest of an input set: the same files under the same names, in any order."""
    canonical = ";".join(
        f"{name}={','.join(map(str, sorted(ids)))}" for name, ids in sorted(inputs.items())
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class RunRecord:
    id: int
    pipeline: str
    group_key: GroupKey
    night: date | None
    version: int
    state: RunState
    degraded: bool
    reason: str
    request: str
    attempts: int
    created: datetime
    started: datetime | None
    finished: datetime | None
    work_dir: str | None
    log_path: str | None
    profile: str | None
    error: str | None
    overrides: Mapping[str, Any]
    inputs: Mapping[str, tuple[int, ...]]
    """Input name → file IDs."""

    @property
    def input_ids(self) -> list[int]:
        """Every input file's row ID, in input order."""
        return [i for ids in self.inputs.values() for i in ids]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.id,
            "pipeline": self.pipeline,
            "group": self.group_key.text(),
            "night": None if self.night is None else self.night.isoformat(),
            "version": self.version,
            "state": self.state.value,
            "degraded": self.degraded,
            "reason": self.reason,
            "request": self.request or None,
            "attempts": self.attempts,
            "created": iso(self.created),
            "started": iso(self.started),
            "finished": iso(self.finished),
            "error": self.error,
            "overrides": dict(self.overrides),
            "work_dir": self.work_dir,
            "log_path": self.log_path,
        }


class RunStore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # ------------------------------------------------------------- creating

    def create(self, new: NewRun, now: datetime, conn: Connection | None = None) -> int | None:
        """Record a queued run; None if this (pipeline, group, input set, request) has one."""
        if conn is None:
            with self.catalog.write() as own:
                return self.create(new, now, own)
        digest = new.input_hash
        exists = select(runs.c.id).where(
            runs.c.pipeline == new.pipeline,
            runs.c.group_key == new.group_key.text(),
            runs.c.input_hash == digest,
            runs.c.request == new.request,
        )
        if conn.execute(exists).first() is not None:
            return None
        version = conn.execute(
            select(func.coalesce(func.max(runs.c.version), 0)).where(
                runs.c.pipeline == new.pipeline, runs.c.group_key == new.group_key.text()
            )
        ).scalar_one()
        try:
            with conn.begin_nested():  # a concurrent creator (PostgreSQL) loses here, quietly
                run_id = conn.execute(
                    insert(runs)
                    .values(
                        pipeline=new.pipeline,
                        group_key=new.group_key.text(),
                        night=new.night,
                        input_hash=digest,
                        request=new.request,
                        version=int(version) + 1,
                        state=RunState.QUEUED.value,
                        degraded=new.degraded,
                        reason=new.reason,
                        overrides=json.dumps(dict(new.overrides)) if new.overrides else None,
                        created_at=now,
                    )
                    .returning(runs.c.id)
                ).scalar_one()
        except IntegrityError:
            return None
        rows = [
            {"run_id": run_id, "input": name, "file_id": file_id}
            for name, ids in new.inputs.items()
            for file_id in sorted(set(ids))
        ]
        if rows:
            conn.execute(insert(run_inputs), rows)
        return int(run_id)

    # ------------------------------------------------------------- executing

    def claim(
        self,
        run_id: int,
        owner: str,
        now: datetime,
        lease_seconds: float,
        conn: Connection | None = None,
    ) -> RunRecord | None:
        """queued → running for ``owner``; the run as claimed, or None if someone else has
        it or it is done. One transaction (``conn``'s, if given): the claim and the read
        of what it needs."""
        if conn is None:
            with self.catalog.write() as own:
                return self.claim(run_id, owner, now, lease_seconds, own)
        expires = now + timedelta(seconds=lease_seconds)
        row = conn.execute(
            _CLAIM, {"b_id": run_id, "b_owner": owner, "b_expires": expires, "b_now": now}
        ).first()
        if row is None:
            return None
        if row.attempts > 1:  # an earlier attempt's steps (its executor died)
            conn.execute(_FORGET_STEPS, {"b_id": run_id})
        return _records(conn, [row])[0]

    def renew(self, run_ids: Sequence[int], owner: str, now: datetime, lease_seconds: float) -> int:
        """Extend the leases ``owner`` holds on running runs (its heartbeat); returns how
        many it extended (fewer than asked: a lease was lost, its run taken over)."""
        if not run_ids:
            return 0
        with self.catalog.write() as conn:
            return conn.execute(
                update(runs)
                .where(
                    runs.c.id.in_(list(run_ids)),
                    runs.c.lease_owner == owner,
                    runs.c.state == RunState.RUNNING.value,
                )
                .values(lease_expires=now + timedelta(seconds=lease_seconds))
            ).rowcount

    def record_steps(
        self,
        run_id: int,
        steps: Sequence[StepRow],
        *,
        profile: tuple[str, str, str] | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Write step rows (one row per step: its latest attempt; ``StepRow.new`` says
        whether the row exists yet), and with ``profile`` = (JSON, work dir, log path)
        store the run-time profile, all in one transaction (``conn``'s, if given)."""
        if conn is None:
            with self.catalog.write() as own:
                self.record_steps(run_id, steps, profile=profile, conn=own)
            return
        if profile is not None:
            text, work_dir, log_path = profile
            conn.execute(
                _SET_PROFILE,
                {"b_id": run_id, "b_profile": text, "b_work": work_dir, "b_log": log_path},
            )
        fresh = [{"b_run": run_id, "b_step": s.step, **s.values()} for s in steps if s.new]
        known = [{"b_run": run_id, "b_step": s.step, **s.values()} for s in steps if not s.new]
        if fresh:
            conn.execute(_INSERT_STEP, fresh)
        if known:
            conn.execute(_UPDATE_STEP, known)

    def finish(
        self,
        run_id: int,
        owner: str,
        state: RunState,
        now: datetime,
        error: str | None = None,
        conn: Connection | None = None,
        steps: Sequence[StepRow] = (),
        profile: tuple[str, str, str] | None = None,
        *,
        inputs: bool = True,
    ) -> bool:
        """running → succeeded or failed, by the lease's owner, with the last ``steps``
        rows (and the run-time ``profile``, if it was not stored yet); False if it lost
        the lease (nothing is written then). A success stamps its inputs ``processed``
        (``inputs`` False: the caller knows it has none)."""
        if not RunState.RUNNING.can_move_to(state) or state is RunState.QUEUED:
            raise ValueError(f"run {run_id}: cannot finish as {state.value}")
        if conn is None:
            with self.catalog.write() as own:
                return self.finish(
                    run_id, owner, state, now, error, own, steps, profile, inputs=inputs
                )
        values = {
            "b_id": run_id,
            "b_owner": owner,
            "b_state": state.value,
            "b_now": now,
            "b_error": error,
        }
        statement = _FINISH
        if profile is not None:  # with the state, in the same statement
            statement = _FINISH_WITH_PROFILE
            values.update(b_profile=profile[0], b_work=profile[1], b_log=profile[2])
        moved = conn.execute(statement, values).rowcount
        if moved and steps:
            self.record_steps(run_id, steps, conn=conn)
        if moved and inputs and state is RunState.SUCCEEDED:
            _stamp_processed(conn, run_id, now)
        return bool(moved)

    def release(self, run_id: int, owner: str) -> bool:
        """running → queued by its owner, which stops without finishing it (a shutdown);
        the attempt does not count."""
        with self.catalog.write() as conn:
            moved = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id,
                    runs.c.state == RunState.RUNNING.value,
                    runs.c.lease_owner == owner,
                )
                .values(
                    state=RunState.QUEUED.value,
                    lease_owner=None,
                    lease_expires=None,
                    attempts=runs.c.attempts - 1,
                    dispatched_at=None,
                )
            ).rowcount
            if moved:  # its next attempt starts with no steps
                conn.execute(_FORGET_STEPS, {"b_id": run_id})
        return bool(moved)

    def recover(self, now: datetime, max_attempts: int) -> tuple[list[int], list[int]]:
        """Runs whose executor died (lease expired): back to queued while they have
        attempts left, else failed. Returns (requeued, failed) run IDs."""
        expired = and_(runs.c.state == RunState.RUNNING.value, runs.c.lease_expires < now)
        with self.catalog.write() as conn:
            rows = conn.execute(select(runs.c.id, runs.c.attempts).where(expired)).all()
            again = [r.id for r in rows if r.attempts < max_attempts]
            given_up = [r.id for r in rows if r.attempts >= max_attempts]
            if again:
                conn.execute(
                    update(runs)
                    .where(runs.c.id.in_(again), expired)
                    .values(
                        state=RunState.QUEUED.value,
                        lease_owner=None,
                        lease_expires=None,
                        dispatched_at=None,  # to be handed to an executor again, once
                    )
                )
            if given_up:
                conn.execute(
                    update(runs)
                    .where(runs.c.id.in_(given_up), expired)
                    .values(
                        state=RunState.FAILED.value,
                        lease_owner=None,
                        lease_expires=None,
                        finished_at=now,
                        error=f"the executor died while running it, {max_attempts} time(s)",
                    )
                )
        return again, given_up

    def retry(self, run_id: int) -> bool:
        """failed → queued (after fixing the cause); False if the run is not failed."""
        with self.catalog.write() as conn:
            moved = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.state == RunState.FAILED.value)
                .values(
                    state=RunState.QUEUED.value,
                    attempts=0,
                    error=None,
                    finished_at=None,
                    dispatched_at=None,
                )
            ).rowcount
            if moved:  # its next attempt starts with no steps
                conn.execute(_FORGET_STEPS, {"b_id": run_id})
        return bool(moved)

    # ------------------------------------------------------------- dispatching

    def to_dispatch(self, stale_before: datetime, limit: int = 1000) -> list[tuple[int, str]]:
        """Queued runs to hand to the executor, oldest first, as (run ID, pipeline): those
        never handed over since they were last queued, and those handed over before
        ``stale_before`` that are still queued (a broker that lost them)."""
        query = (
            select(runs.c.id, runs.c.pipeline)
            .where(
                runs.c.state == RunState.QUEUED.value,
                or_(runs.c.dispatched_at.is_(None), runs.c.dispatched_at < stale_before),
            )
            .order_by(runs.c.id)
            .limit(limit)
        )
        with self.catalog.read() as conn:
            return [(int(r.id), str(r.pipeline)) for r in conn.execute(query)]

    def dispatched(self, run_ids: Sequence[int], now: datetime) -> None:
        """Record that these queued runs were handed to the executor (after the handing:
        a crash in between hands them over twice, which the claim makes harmless)."""
        if not run_ids:
            return
        with self.catalog.write() as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id.in_(list(run_ids)), runs.c.state == RunState.QUEUED.value)
                .values(dispatched_at=now)
            )

    def forget_dispatch(self) -> int:
        """Forget every queued run's handing-over: an executor that keeps its queue in
        memory (the daemon's own pool) lost it when its daemon stopped. Returns how many."""
        with self.catalog.write() as conn:
            return int(
                conn.execute(
                    update(runs)
                    .where(runs.c.state == RunState.QUEUED.value, runs.c.dispatched_at.is_not(None))
                    .values(dispatched_at=None)
                ).rowcount
            )

    def holds(self, run_id: int, owner: str, now: datetime) -> bool:
        """``owner`` holds a live lease on running run ``run_id``."""
        with self.catalog.read() as conn:
            found = conn.execute(
                select(runs.c.id).where(
                    runs.c.id == run_id,
                    runs.c.state == RunState.RUNNING.value,
                    runs.c.lease_owner == owner,
                    runs.c.lease_expires >= now,
                )
            ).first()
        return found is not None

    # ------------------------------------------------------------- reading

    def queued(self, limit: int = 1000) -> list[int]:
        with self.catalog.read() as conn:
            query = select(runs.c.id).where(runs.c.state == RunState.QUEUED.value)
            return list(conn.execute(query.order_by(runs.c.id).limit(limit)).scalars())

    def get(self, run_id: int) -> RunRecord | None:
        found = self.find(run_ids=[run_id])
        return found[0] if found else None

    def find(
        self,
        *,
        state: RunState | None = None,
        pipeline: str | None = None,
        night: date | None = None,
        run_ids: Sequence[int] | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs, oldest first, narrowed by every argument given."""
        query = _narrowed(select(runs).order_by(runs.c.id), state, pipeline, night)
        if run_ids is not None:
            query = query.where(runs.c.id.in_(list(run_ids)))
        if limit is not None:
            query = query.limit(limit)
        with self.catalog.read() as conn:
            return _read(conn, query)

    def page(
        self,
        after: int,
        limit: int,
        *,
        state: RunState | None = None,
        pipeline: str | None = None,
        night: date | None = None,
    ) -> list[int]:
        """The IDs of up to ``limit`` runs whose ID is over ``after``, in ID order, narrowed
        by every argument given: one page of a listing whose cursor is the last ID shown
        (``GET /api/v1/runs``), which reads the runs themselves with :meth:`find`."""
        query = _narrowed(select(runs.c.id).where(runs.c.id > after), state, pipeline, night)
        with self.catalog.read() as conn:
            return list(conn.execute(query.order_by(runs.c.id).limit(limit)).scalars())

    def newest(self, limit: int, *, state: RunState | None = None) -> list[int]:
        """The IDs of the ``limit`` latest runs (in ``state``), newest first: what an
        operator looks at first (the dashboard's failed runs)."""
        query = _narrowed(select(runs.c.id), state, None, None)
        with self.catalog.read() as conn:
            return list(conn.execute(query.order_by(runs.c.id.desc()).limit(limit)).scalars())

    def steps(self, run_id: int) -> list[StepRecord]:
        with self.catalog.read() as conn:
            rows = conn.execute(
                select(run_steps).where(run_steps.c.run_id == run_id).order_by(run_steps.c.position)
            ).all()
        return [
            StepRecord(
                step=r.step,
                position=r.position,
                state=StepState(r.state),
                attempts=r.attempts,
                argv=tuple(json.loads(r.argv)),
                started=r.started_at,
                finished=r.finished_at,
                exit_status=r.exit_status,
                stdout_tail=r.stdout_tail,
                stderr_tail=r.stderr_tail,
                reason=r.reason,
            )
            for r in rows
        ]

    def outputs(self, run_id: int) -> list[int]:
        """The file IDs this run made (provenance)."""
        with self.catalog.read() as conn:
            query = select(files.c.id).where(files.c.made_by_run == run_id).order_by(files.c.id)
            return list(conn.execute(query).scalars())

    def latest_for_group(self, key: GroupKey) -> RunRecord | None:
        """The group's newest run (of any request but a user's reduction), if any."""
        with self.catalog.read() as conn:
            run_id = conn.execute(
                select(runs.c.id)
                .where(
                    runs.c.pipeline == key.pipeline,
                    runs.c.group_key == key.text(),
                    ~runs.c.request.startswith(REDUCTION_PREFIX),
                )
                .order_by(runs.c.version.desc())
                .limit(1)
            ).scalar()
        return None if run_id is None else self.get(int(run_id))


def _narrowed(
    query: Select[Any], state: RunState | None, pipeline: str | None, night: date | None
) -> Select[Any]:
    """``query`` narrowed to the runs in ``state``, of ``pipeline``, of ``night`` (each
    if given): the one filter of :meth:`RunStore.find` and :meth:`RunStore.page`."""
    if state is not None:
        query = query.where(runs.c.state == state.value)
    if pipeline is not None:
        query = query.where(runs.c.pipeline == pipeline)
    if night is not None:
        query = query.where(runs.c.night == night)
    return query


def _read(conn: Connection, query: Select[Any]) -> list[RunRecord]:
    return _records(conn, conn.execute(query).all())


def _records(conn: Connection, rows: Sequence[Row[Any]]) -> list[RunRecord]:
    ids = [r.id for r in rows]
    inputs: dict[int, dict[str, list[int]]] = {}
    if ids:
        found = (
            conn.execute(_INPUTS_OF_ONE, {"b_id": ids[0]})
            if len(ids) == 1
            else conn.execute(_INPUTS, {"b_ids": ids})
        )
        for r in found:
            inputs.setdefault(r.run_id, {}).setdefault(r.input, []).append(r.file_id)
    return [
        RunRecord(
            id=r.id,
            pipeline=r.pipeline,
            group_key=GroupKey.parse(r.pipeline, r.group_key),
            night=r.night,
            version=r.version,
            state=RunState(r.state),
            degraded=bool(r.degraded),
            reason=r.reason,
            request=r.request,
            attempts=r.attempts,
            created=r.created_at,
            started=r.started_at,
            finished=r.finished_at,
            work_dir=r.work_dir,
            log_path=r.log_path,
            profile=r.profile,
            error=r.error,
            overrides=json.loads(r.overrides) if r.overrides else {},
            inputs={k: tuple(v) for k, v in inputs.get(r.id, {}).items()},
        )
        for r in rows
    ]


def _stamp_processed(conn: Connection, run_id: int, now: datetime) -> None:
    """The ledger's ``processed`` moment of each input: its first successful run."""
    conn.execute(_STAMP_PROCESSED[conn.dialect.name], {"b_run": run_id, "b_now": now})

"""An operator's cancelling of runs (``obsflow runs cancel``), as one compare-and-set.

A queued or running run becomes ``failed`` with the error ``cancelled ...``, its lease
and its pins dropped, in one transaction; a run that has finished meanwhile is left as
it is (the statement's ``WHERE state IN (queued, running)`` decides, not a read before
it). A running run's worker learns it within two seconds (its lease is gone), stops
its steps and writes nothing; ``obsflow runs retry`` queues a cancelled run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

from sqlalchemy import delete, select, update

from obsflow.catalog import Catalog, schema
from obsflow.states import RunState

runs = schema.runs
CANCELLABLE: Final = (RunState.QUEUED, RunState.RUNNING)


def cancel_runs(catalog: Catalog, run_ids: Sequence[int], now: datetime, why: str) -> list[int]:
    """Cancel those of ``run_ids`` that are queued or running; the IDs cancelled."""
    if not run_ids:
        return []
    open_ = runs.c.state.in_([s.value for s in CANCELLABLE])
    chosen = runs.c.id.in_(list(run_ids))
    with catalog.write() as conn:
        ids = sorted(int(i) for i in conn.execute(select(runs.c.id).where(chosen, open_)).scalars())
        if not ids:
            return []
        conn.execute(
            update(runs)
            .where(runs.c.id.in_(ids), open_)
            .values(
                state=RunState.FAILED.value,
                error=f"cancelled: {why}",
                finished_at=now,
                lease_owner=None,
                lease_expires=None,
            )
        )
        holders = [f"run:{i}" for i in ids]
        conn.execute(delete(schema.pins).where(schema.pins.c.holder.in_(holders)))
    return ids

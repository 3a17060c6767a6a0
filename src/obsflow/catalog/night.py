"""The night as the operator's dashboard shows it: frames per instrument since a moment,
the latency acquired → archived over the night as a series, and the latest rejected files.

* :func:`flow_by_instrument`: the frames (level 0, and files refused before a level was
  known) whose ``acquired`` stamp is at or after ``since``, by instrument: how many were
  acquired, are archived, are still on the way (cached), failed, were rejected. One
  grouped query over the ledger's ``ix_ledger_event_at`` and the files.
* :func:`latency_series`: the files archived since ``since`` (the ledger's stamps, read by
  :func:`obsflow.catalog.latency.archived_stamps`) in equal time bins by their
  ``archived`` stamp, each bin's acquired → archived percentiles by
  :meth:`~obsflow.catalog.latency.Percentiles.of` (nearest rank, as everywhere).
* :func:`rejected_files`: the newest rejected files (quarantined, with their reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import and_, func, or_, select

from obsflow.catalog import Catalog, schema
from obsflow.catalog.latency import TOTAL, Percentiles, archived_stamps, stage_name
from obsflow.catalog.records import FileRecord
from obsflow.states import FileState, LedgerEvent

UNRECOGNISED: Final = "(unrecognised)"
"""The instrument of a frame refused before its instrument was known."""


@dataclass(frozen=True)
class InstrumentFlow:
    """An instrument's frames acquired since a moment, and where they stand now."""

    instrument: str
    acquired: int
    archived: int
    in_flight: int
    """Cached, not archived yet."""
    failed: int
    rejected: int


def flow_by_instrument(catalog: Catalog, since: datetime) -> list[InstrumentFlow]:
    """The frames acquired at or after ``since`` by instrument (by name; refused frames
    of no known instrument under :data:`UNRECOGNISED`)."""
    files, led = schema.files, schema.ledger
    query = (
        select(files.c.instrument, files.c.state, func.count())
        .select_from(files.join(led, led.c.file_id == files.c.id))
        .where(
            led.c.event == LedgerEvent.ACQUIRED.value,
            led.c.at >= since,
            or_(files.c.level == 0, files.c.level.is_(None)),
        )
        .group_by(files.c.instrument, files.c.state)
    )
    with catalog.read() as conn:
        rows = conn.execute(query).all()
    counts: dict[str, dict[FileState, int]] = {}
    for instrument, state, n in rows:
        counts.setdefault(instrument or UNRECOGNISED, {})[FileState(state)] = int(n)
    return [
        InstrumentFlow(
            instrument=name,
            acquired=sum(by.values()),
            archived=by.get(FileState.ARCHIVED, 0),
            in_flight=by.get(FileState.CACHED, 0),
            failed=by.get(FileState.FAILED, 0),
            rejected=by.get(FileState.REJECTED, 0),
        )
        for name, by in sorted(counts.items())
    ]


@dataclass(frozen=True)
class LatencyBin:
    """The files archived in ``[start, end)`` and their acquired → archived latency."""

    start: datetime
    end: datetime
    total: Percentiles


def latency_series(
    catalog: Catalog, since: datetime, until: datetime, bins: int = 24
) -> list[LatencyBin]:
    """``bins`` equal bins from the first file archived at or after ``since`` to ``until``,
    each with the acquired → archived percentiles of the files archived in it (a bin
    nothing was archived in has count 0); none if nothing was archived."""
    found = archived_stamps(catalog, since)
    first = min((s.archived for s in found if s.archived is not None), default=None)
    if first is not None:
        since = max(since, first)
    if bins < 1 or until <= since:
        return []
    width = (until - since) / bins
    spans: list[list[float]] = [[] for _ in range(bins)]
    total = stage_name(*TOTAL)
    for stamps in found:
        at = stamps.archived
        if at is None or at >= until:
            continue
        index = min(int((at - since) / width), bins - 1)
        spans[index] += [seconds * 1000 for name, seconds in stamps.stages() if name == total]
    return [
        LatencyBin(since + width * i, since + width * (i + 1), Percentiles.of(values))
        for i, values in enumerate(spans)
    ]


def rejected_files(
    catalog: Catalog, since: datetime | None = None, limit: int = 50
) -> list[FileRecord]:
    """The newest rejected files (rejected at or after ``since``, if given), newest first."""
    files, led = schema.files, schema.ledger
    query = (
        select(files.c.id)
        .select_from(
            files.outerjoin(
                led, and_(led.c.file_id == files.c.id, led.c.event == LedgerEvent.REJECTED.value)
            )
        )
        .where(schema.is_rejected())
        .order_by(files.c.id.desc())
        .limit(max(limit, 0))
    )
    if since is not None:
        query = query.where(led.c.at >= since)
    with catalog.read() as conn:
        ids = [int(i) for i in conn.execute(query).scalars()]
    found = {r.id: r for r in catalog.records(ids)}
    return [found[i] for i in ids if i in found]

"""The latency ledger: how long files take from the instrument to the archive, and which
files are stuck on the way (``obsflow status --latency``).

Latencies come from the ``ledger`` table (one stamp per file and event). A *stage*
is the time between two events of one file: acquired → received → validated →
cached → archived, and the total acquired → archived. A file counts in a stage
when it has both stamps and the stage's *end* is at or after ``since`` (so the
total and cached → archived are windowed on the ``archived`` stamp). One query
pivots the ledger (``MAX(CASE ...)`` grouped by file) for the files with an
event in the window, found through ``ix_ledger_event_at``; percentiles are taken
in Python by the **nearest-rank** method: the p-th percentile of n sorted values
is the value at rank ``ceil(p / 100 * n)`` (1-based), always one of the values.

*Stuck* are files in state ``cached`` whose ``cached`` stamp is older than a
threshold, files in state ``failed`` (with their error), and ingest requests
whose lease has expired (their ingestor crashed): oldest first, capped, with the
total count.

:func:`archived_stamps` gives the stamps of each file archived since a moment, for
``/metrics`` to observe each file's latencies once, in its histogram.

*Science latency* (:func:`science_latencies`, per processing level): a derived product's
own ``acquired`` stamp is when its run wrote it, which says nothing of how long the sky
waited for it. Its science "acquired" is the acquisition of its **raw ancestors** (files
no run made), found through the run provenance: the product's run's inputs, their runs'
inputs, and so on (one recursive query, on both engines); the **latest** raw ancestor
counts (for a calibrated frame, its science frame, not the biases of its master bias).
A level-0 frame is its own raw ancestor: its science latency is its acquired → archived.
Files are windowed on their ``archived`` stamp.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from sqlalchemy import Connection, RowMapping, Select, and_, case, func, or_, select

from obsflow.catalog import Catalog, schema
from obsflow.states import FileState, LedgerEvent, RequestState

DEFAULT_WINDOW = timedelta(hours=24)
"""Without ``since``, the window is the 24 hours before ``now``."""
DEFAULT_STUCK_AFTER = 300.0
"""Seconds a file may stay ``cached`` before it counts as stuck."""
STUCK_LIMIT = 100
"""At most this many stuck files are listed (the report says how many there are)."""

_WAY = (
    LedgerEvent.ACQUIRED,
    LedgerEvent.RECEIVED,
    LedgerEvent.VALIDATED,
    LedgerEvent.CACHED,
    LedgerEvent.ARCHIVED,
)
STAGES: tuple[tuple[LedgerEvent, LedgerEvent], ...] = tuple(pairwise(_WAY))
"""The stages between consecutive events, in order."""
TOTAL = (LedgerEvent.ACQUIRED, LedgerEvent.ARCHIVED)

_PERCENTILES = (50, 90, 99)


def stage_name(start: LedgerEvent, end: LedgerEvent) -> str:
    """A stage's key in :attr:`LatencyReport.stages` and in JSON: ``acquired_to_received``."""
    return f"{start.value}_to_{end.value}"


@dataclass(frozen=True)
class Percentiles:
    """Latencies of ``count`` files in milliseconds (all None when ``count`` is 0)."""

    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @classmethod
    def of(cls, values_ms: Iterable[float]) -> Percentiles:
        """Nearest-rank percentiles: the value at rank ``ceil(p * n / 100)`` of the sorted n."""
        ordered = sorted(values_ms)
        n = len(ordered)
        if n == 0:
            return cls(0, None, None, None, None)
        p50, p90, p99 = (ordered[-(-p * n // 100) - 1] for p in _PERCENTILES)
        return cls(n, p50, p90, p99, ordered[-1])

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


@dataclass(frozen=True)
class StuckFile:
    """A file stuck on its way to the archive.

    ``state`` is ``cached`` (not archived ``seconds`` after it was cached), ``failed``
    (ingestion failed for good; ``detail`` is the error) or ``leased`` (its ingest
    request's lease expired: the ingestor holding it died). ``since`` is when the file
    entered that state, ``seconds`` how long ago that is.
    """

    archive_id: str | None
    original_name: str
    state: str
    since: datetime
    seconds: float
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "archive_id": self.archive_id,
            "original_name": self.original_name,
            "state": self.state,
            "since": self.since.isoformat(),
            "seconds": self.seconds,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class StuckList:
    files: tuple[StuckFile, ...]
    """Oldest first, at most the limit asked for."""
    total: int
    """How many files are stuck in all."""


@dataclass(frozen=True)
class LatencyReport:
    now: datetime
    since: datetime
    total: Percentiles
    """acquired → archived."""
    stages: Mapping[str, Percentiles]
    """Each stage between consecutive events, by :func:`stage_name`, in order."""
    stuck: tuple[StuckFile, ...]
    stuck_total: int
    stuck_after: float
    levels: Mapping[int, Percentiles] = field(default_factory=dict)
    """Science latency by processing level, levels in order: the latest raw ancestor's
    acquired → the file archived (:func:`science_latencies`)."""

    def to_json(self) -> dict[str, Any]:
        """What ``obsflow status --latency --json`` prints: the total's numbers at the top;
        ``levels`` keyed ``L0``, ``L1`` ..."""
        return {
            **self.total.to_json(),
            "since": self.since.isoformat(),
            "now": self.now.isoformat(),
            "stages": {name: p.to_json() for name, p in self.stages.items()},
            "levels": {level_name(n): p.to_json() for n, p in self.levels.items()},
            "stuck": [f.to_json() for f in self.stuck],
            "stuck_total": self.stuck_total,
            "stuck_after_seconds": self.stuck_after,
        }


def latency_report(
    catalog: Catalog,
    now: datetime,
    since: datetime | None = None,
    stuck_after: float = DEFAULT_STUCK_AFTER,
    stuck_limit: int = STUCK_LIMIT,
    level: int | None = None,
) -> LatencyReport:
    """Latencies of the files that reached a stage since ``since`` (default: 24 h before
    ``now``), and the files stuck as of ``now``, read in one transaction."""
    window_start = now - DEFAULT_WINDOW if since is None else since
    with catalog.read() as conn:
        total, stages = _latencies(conn, window_start, level)
        levels = _science(conn, window_start, level)
        stuck = _stuck_files(conn, now, stuck_after, stuck_limit)
    return LatencyReport(
        now=now,
        since=window_start,
        total=total,
        stages=stages,
        stuck=stuck.files,
        stuck_total=stuck.total,
        stuck_after=stuck_after,
        levels=levels,
    )


def level_name(level: int) -> str:
    """A processing level's key in JSON and its label: ``L0``, ``L2``."""
    return f"L{level}"


def science_latencies(
    catalog: Catalog, since: datetime, level: int | None = None
) -> dict[int, Percentiles]:
    """Science latency by processing level (or of one ``level``), of the files archived at
    or after ``since``: from the acquisition of each file's latest raw ancestor (see the
    module docstring) to the file's ``archived`` stamp. Levels in order; a level without
    such files is absent."""
    with catalog.read() as conn:
        return _science(conn, since, level)


def _science(conn: Connection, since: datetime, level: int | None) -> dict[int, Percentiles]:
    files, led, inputs = schema.files, schema.ledger, schema.run_inputs
    archived = led.alias("archived")
    recent = (
        select(archived.c.file_id.label("file_id"), archived.c.file_id.label("ancestor"))
        .join(files, files.c.id == archived.c.file_id)
        .where(
            archived.c.event == LedgerEvent.ARCHIVED.value,
            archived.c.at >= since,
            files.c.level.is_not(None),
        )
    )
    if level is not None:
        recent = recent.where(files.c.level == level)
    # (file, ancestor) pairs, each file its own first ancestor; then the inputs of the run
    # that made an ancestor. UNION, not UNION ALL: a shared ancestor (a night's master
    # bias under every calibrated frame of an L3 catalog) is walked once per file.
    ancestry = recent.cte("ancestry", recursive=True)
    made = files.alias("made")
    ancestry = ancestry.union(
        select(ancestry.c.file_id, inputs.c.file_id)
        .join(made, made.c.id == ancestry.c.ancestor)
        .join(inputs, inputs.c.run_id == made.c.made_by_run)
    )
    raw, acquired = files.alias("raw"), led.alias("acquired")
    origin = (
        select(ancestry.c.file_id, func.max(acquired.c.at).label("acquired_at"))
        .join(raw, and_(raw.c.id == ancestry.c.ancestor, raw.c.made_by_run.is_(None)))
        .join(
            acquired,
            and_(acquired.c.file_id == raw.c.id, acquired.c.event == LedgerEvent.ACQUIRED.value),
        )
        .group_by(ancestry.c.file_id)
        .subquery("origin")
    )
    query = (
        select(files.c.level, origin.c.acquired_at, archived.c.at.label("archived_at"))
        .join(files, files.c.id == origin.c.file_id)
        .join(
            archived,
            and_(
                archived.c.file_id == origin.c.file_id,
                archived.c.event == LedgerEvent.ARCHIVED.value,
            ),
        )
    )
    spans: dict[int, list[float]] = {}
    for row in conn.execute(query):
        spans.setdefault(int(row.level), []).append(_ms(row.archived_at - row.acquired_at))
    return {n: Percentiles.of(spans[n]) for n in sorted(spans)}


def latencies(
    catalog: Catalog, since: datetime, level: int | None = None
) -> tuple[Percentiles, dict[str, Percentiles]]:
    """The total (acquired → archived) and each stage, for stages ending at or after ``since``
    (of the files of one processing ``level`` if given: 0 for the instruments' frames)."""
    with catalog.read() as conn:
        return _latencies(conn, since, level)


def _latencies(
    conn: Connection, since: datetime, level: int | None
) -> tuple[Percentiles, dict[str, Percentiles]]:
    led = schema.ledger
    recent = select(led.c.file_id).where(
        led.c.event.in_([e.value for e in _WAY[1:]]), led.c.at >= since
    )
    if level is not None:
        files = schema.files
        recent = recent.where(led.c.file_id.in_(select(files.c.id).where(files.c.level == level)))
    rows = [dict(row._mapping) for row in conn.execute(_pivot(recent))]

    def stage(start: LedgerEvent, end: LedgerEvent) -> Percentiles:
        return Percentiles.of(
            _ms(row[end.value] - row[start.value])
            for row in rows
            if row[start.value] is not None
            and row[end.value] is not None
            and row[end.value] >= since
        )

    return stage(*TOTAL), {stage_name(a, b): stage(a, b) for a, b in STAGES}


@dataclass(frozen=True)
class FileStamps:
    """One file's stamps on the way to the archive (None for an event it has none of)."""

    file_id: int
    at: Mapping[LedgerEvent, datetime | None]

    @property
    def archived(self) -> datetime | None:
        return self.at[LedgerEvent.ARCHIVED]

    def stages(self) -> Iterator[tuple[str, float]]:
        """(stage name, seconds) of the total and of each stage the file has both ends of;
        a negative span (clocks of two machines) counts as 0."""
        for start, end in (TOTAL, *STAGES):
            began, ended = self.at[start], self.at[end]
            if began is not None and ended is not None:
                yield stage_name(start, end), max((ended - began).total_seconds(), 0.0)


def archived_stamps(catalog: Catalog, since: datetime) -> list[FileStamps]:
    """The stamps of each file whose ``archived`` stamp is at or after ``since``."""
    led = schema.ledger
    archived = select(led.c.file_id).where(
        led.c.event == LedgerEvent.ARCHIVED.value, led.c.at >= since
    )
    with catalog.read() as conn:
        rows = conn.execute(_pivot(archived, led.c.file_id)).all()
    return [FileStamps(row.file_id, {e: row._mapping[e.value] for e in _WAY}) for row in rows]


def _pivot(file_ids: Select[Any], *columns: Any) -> Select[Any]:
    """One row per file of ``file_ids``: ``columns``, then the time of each event on the way
    (labelled by its value), by ``MAX(CASE ...)`` over the ledger grouped by file."""
    led = schema.ledger
    stamps = (func.max(case((led.c.event == e.value, led.c.at))).label(e.value) for e in _WAY)
    return (
        select(*columns, *stamps)
        .where(led.c.file_id.in_(file_ids), led.c.event.in_([e.value for e in _WAY]))
        .group_by(led.c.file_id)
    )


def stuck_files(
    catalog: Catalog,
    now: datetime,
    stuck_after: float = DEFAULT_STUCK_AFTER,
    limit: int = STUCK_LIMIT,
) -> StuckList:
    """Files stuck as of ``now``, oldest first, at most ``limit`` of them, and how many in all."""
    with catalog.read() as conn:
        return _stuck_files(conn, now, stuck_after, limit)


def _stuck_files(conn: Connection, now: datetime, stuck_after: float, limit: int) -> StuckList:
    files, req = schema.files, schema.ingest_requests
    cached = schema.ledger.alias("cached_stamp")
    expired = and_(req.c.state == RequestState.LEASED.value, req.c.lease_expires < now)
    base = (
        select(
            files.c.archive_id,
            files.c.original_name,
            files.c.reason,
            req.c.state.label("request_state"),
            req.c.attempts,
            req.c.last_error,
            req.c.lease_owner,
            req.c.lease_expires,
            func.count().over().label("total"),
        )
        .select_from(
            files.outerjoin(req, req.c.file_id == files.c.id).outerjoin(
                cached,
                and_(
                    cached.c.file_id == files.c.id,
                    cached.c.event == LedgerEvent.CACHED.value,
                ),
            )
        )
        .limit(max(limit, 1))
    )
    failed_at = func.coalesce(req.c.updated_at, cached.c.at)
    queries: list[tuple[str, Select[Any]]] = [
        (
            FileState.FAILED.value,
            base.add_columns(failed_at.label("since"))
            .where(files.c.state == FileState.FAILED.value)
            .order_by(failed_at, files.c.id),
        ),
        (
            RequestState.LEASED.value,
            base.add_columns(req.c.updated_at.label("since"))
            .where(files.c.state == FileState.CACHED.value, expired)
            .order_by(req.c.updated_at, files.c.id),
        ),
        (
            FileState.CACHED.value,
            base.add_columns(cached.c.at.label("since"))
            .where(
                files.c.state == FileState.CACHED.value,
                cached.c.at < now - timedelta(seconds=stuck_after),
                or_(req.c.state.is_(None), ~expired),
            )
            .order_by(cached.c.at, files.c.id),
        ),
    ]
    found: list[StuckFile] = []
    total = 0
    for state, query in queries:
        rows = conn.execute(query).all()
        total += rows[0].total if rows else 0
        found += [
            StuckFile(
                r.archive_id,
                r.original_name,
                state,
                r.since,
                _ms(now - r.since) / 1000,
                _detail(state, r._mapping),
            )
            for r in rows
        ]
    found.sort(key=lambda f: (f.since, f.original_name))
    return StuckList(tuple(found[: max(limit, 0)]), total)


def _detail(state: str, row: RowMapping) -> str | None:
    if state == FileState.FAILED.value:
        error: str | None = row["reason"] or row["last_error"]
        return error
    if state == RequestState.LEASED.value:
        expires = row["lease_expires"]
        return (
            f"lease of {row['lease_owner']} expired at {expires.isoformat()} "
            f"(attempt {row['attempts']})"
        )
    if row["request_state"] is None:
        return "no ingest request"
    error = f"; last error: {row['last_error']}" if row["last_error"] else ""
    return f"ingest request {row['request_state']}, {row['attempts']} attempt(s){error}"


def _ms(delta: timedelta) -> float:
    """Milliseconds, exact to the microsecond (no float drift for whole milliseconds)."""
    return (delta // timedelta(microseconds=1)) / 1000

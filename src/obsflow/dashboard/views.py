"""What each page of the dashboard shows, as typed view models built from the site's
stores and the one status snapshot (no SQL here: the catalog's modules answer).

Every fact a visitor sees passes the API's access rule: files through
:func:`obsflow.access.visible_fields` (via :func:`obsflow.api.files.file_detail`), runs
through :func:`obsflow.api.runs.run_detail` / :func:`~obsflow.api.runs.run_page`;
what the API shows admin tokens only (the daemon's status, stuck files' names and
errors, rejected files' names and reasons, hosts, process IDs, trigger errors, paths)
is shown to admins only here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from typing import Any, Final

from obsflow.access import Scope, may_read_data
from obsflow.api.files import FileDetail, file_detail
from obsflow.api.problems import ProblemError
from obsflow.api.runs import RunDetail, RunOut, newest_runs, run_detail
from obsflow.api.services import Services
from obsflow.catalog import latency, night
from obsflow.catalog.latency import Percentiles, StuckFile
from obsflow.catalog.night import InstrumentFlow, LatencyBin
from obsflow.catalog.obscore import derived_from
from obsflow.catalog.status import site_status
from obsflow.daemon import read_status as read_daemon_status
from obsflow.dashboard.session import Session
from obsflow.receipt.metadata import night_of
from obsflow.states import FileState, LedgerEvent, RunState

PLOT_WIDTH: Final = 640
PLOT_HEIGHT: Final = 200
PLOT_BINS: Final = 24
PROVENANCE_DEPTH: Final = 6
"""How many levels of inputs a file's provenance follows (raw → … → L3 is four)."""


# ------------------------------------------------------------------ tonight


@dataclass(frozen=True)
class TriggerView:
    name: str
    healthy: bool
    last_event: str | None
    error: str | None
    """Admins only (an error quotes paths and addresses)."""


@dataclass(frozen=True)
class ProcessView:
    kind: str
    role: str | None
    state: str
    healthy: bool
    age_seconds: float | None
    host: str | None
    """Admins only, as :attr:`pid`."""
    pid: int | None
    version: str | None
    triggers: tuple[TriggerView, ...]
    workers: str | None
    """``busy / total``."""
    outbox_depth: int | None
    epics: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class StageView:
    name: str
    count: int
    p50: str
    p99: str


@dataclass(frozen=True)
class Plot:
    """The latency acquired → archived over the night, as an inline SVG's parts."""

    width: int
    height: int
    p50: tuple[tuple[float, float], ...]
    """The points (x, y) of the p50 line, in the SVG's coordinates."""
    p99: tuple[tuple[float, float], ...]
    y_ticks: tuple[tuple[float, str], ...]
    """(y, label)."""
    x_ticks: tuple[tuple[float, str], ...]
    empty: bool
    summary: str
    """The plot in words (its alt text)."""


@dataclass(frozen=True)
class Tonight:
    now: datetime
    since: datetime
    role: str
    instruments: tuple[InstrumentFlow, ...]
    total: Percentiles
    total_p50: str
    total_p99: str
    stages: tuple[StageView, ...]
    plot: Plot
    queue_depth: int
    outbox_depth: int | None
    runs: dict[str, int]
    untracked: int
    groups_waiting: int
    processes: tuple[ProcessView, ...]
    stuck_total: int
    admin: bool


def ms(value: float | None) -> str:
    """A latency for people: ``850 ms``, ``12.3 s``, ``4.2 min``; ``–`` for none."""
    if value is None:
        return "–"
    if value < 1000:
        return f"{value:.0f} ms"
    if value < 120_000:
        return f"{value / 1000:.1f} s"
    return f"{value / 60_000:.1f} min"


def tonight_began(svc: Services, now: datetime) -> datetime:
    """When tonight began: local noon of the night ``now`` belongs to (obsflow's nights
    run noon to noon in each instrument's time zone), the earliest of the site's
    instruments; without an instrument, twelve hours ago."""
    starts = []
    for instrument in svc.site.registry.instruments.values():
        zone = instrument.zone
        if not isinstance(zone, tzinfo):
            zone = timezone(timedelta(hours=zone))
        began = datetime.combine(night_of(now, zone), time(12, 0), tzinfo=zone)
        starts.append(began.astimezone(UTC))
    return min(starts, default=now - timedelta(hours=12))


def tonight(svc: Services, session: Session) -> Tonight:
    """The night so far: frames per instrument, latency, stages, queue, health."""
    now = svc.now()
    since = tonight_began(svc, now)
    settings = svc.site.settings
    catalog = svc.site.catalog
    status = site_status(
        catalog, now, role=settings.transfer.role, daemon=read_daemon_status(settings.site, now)
    )
    snapshot = status.to_json()
    report = latency.latency_report(catalog, now, since)
    admin = session.may(Scope.ADMIN)
    series = night.latency_series(catalog, since, now, PLOT_BINS)
    outbox = snapshot.get("outbox")
    return Tonight(
        now=now,
        since=since,
        role=status.role.value,
        instruments=tuple(night.flow_by_instrument(catalog, since)),
        total=report.total,
        total_p50=ms(report.total.p50_ms),
        total_p99=ms(report.total.p99_ms),
        stages=tuple(
            StageView(name.replace("_to_", " → "), p.count, ms(p.p50_ms), ms(p.p99_ms))
            for name, p in report.stages.items()
        ),
        plot=plot(series),
        queue_depth=status.queue_depth,
        outbox_depth=outbox["depth"] if isinstance(outbox, dict) else None,
        runs={state.value: n for state, n in status.runs.items()},
        untracked=status.untracked,
        groups_waiting=status.groups_waiting,
        processes=processes(snapshot, admin),
        stuck_total=report.stuck_total,
        admin=admin,
    )


def processes(snapshot: dict[str, Any], admin: bool) -> tuple[ProcessView, ...]:
    """The site's processes from the snapshot's ``processes`` (daemons, agents, workers,
    with their triggers), or, from a catalog that does not record them, the daemon's
    status file as the snapshot carries it."""
    listed = snapshot.get("processes")
    if isinstance(listed, list):
        return tuple(_process(p, admin) for p in listed if isinstance(p, dict))
    daemon = snapshot.get("daemon")
    if not isinstance(daemon, dict):
        return ()
    alive = bool(daemon.get("alive"))
    triggers = tuple(
        TriggerView(
            name=_trigger_name(str(t.get("name", "?")), admin),
            healthy=bool(t.get("ok")),
            last_event=None,
            error=(t.get("detail") or None) if admin else None,
        )
        for t in daemon.get("triggers") or ()
        if isinstance(t, dict)
    )
    in_flight = daemon.get("runs_in_flight")
    return (
        ProcessView(
            kind="daemon",
            role=daemon.get("role"),
            state=("ready" if daemon.get("ready") else "starting") if alive else "stopped",
            healthy=alive and all(t.healthy for t in triggers),
            age_seconds=None,
            host=None,
            pid=daemon.get("pid") if admin else None,
            version=None,
            triggers=triggers,
            workers=f"{in_flight} runs in flight" if in_flight is not None else None,
            outbox_depth=None,
            epics=(),
        ),
    )


def _process(data: dict[str, Any], admin: bool) -> ProcessView:
    triggers = tuple(
        TriggerView(
            name=_trigger_name(str(t.get("name", "?")), admin),
            healthy=bool(t.get("healthy")),
            last_event=t.get("last_event"),
            error=(t.get("error") or None) if admin else None,
        )
        for t in data.get("triggers") or ()
        if isinstance(t, dict)
    )
    workers = data.get("workers")
    epics = data.get("epics")
    state = str(data.get("state", "?"))
    return ProcessView(
        kind=str(data.get("kind", "?")),
        role=data.get("role"),
        state=state,
        healthy=state in ("running", "ready", "alive", "ok") and all(t.healthy for t in triggers),
        age_seconds=data.get("age_seconds"),
        host=data.get("host") if admin else None,
        pid=data.get("pid") if admin else None,
        version=data.get("version"),
        triggers=triggers,
        workers=(
            f"{workers.get('busy', '?')} / {workers.get('total', '?')}"
            if isinstance(workers, dict)
            else None
        ),
        outbox_depth=data.get("outbox_depth"),
        epics=tuple((str(k), str(v)) for k, v in epics.items())
        if admin and isinstance(epics, dict)
        else (),
    )


def _trigger_name(name: str, admin: bool) -> str:
    """A trigger as a visitor may see it: its kind only unless admin (``watch:<path>``)."""
    return name if admin else name.partition(":")[0]


def plot(series: list[LatencyBin]) -> Plot:
    """The series as an SVG's polylines, on a square-root axis from 0 to the largest p99."""
    width, height, left, bottom = PLOT_WIDTH, PLOT_HEIGHT, 56.0, 24.0
    filled = [b for b in series if b.total.count]
    top = max((b.total.p99_ms or 0.0 for b in filled), default=0.0)
    if not filled or top <= 0:
        return Plot(width, height, (), (), (), (), True, "no frame archived yet tonight")
    top = _nice(top)
    span = len(series)

    def x(i: int) -> float:
        return left + (width - left - 8) * (i + 0.5) / span

    def y(value_ms: float) -> float:
        return float((height - bottom) * (1 - math.sqrt(value_ms / top)) + 4)

    def line(attr: str) -> tuple[tuple[float, float], ...]:
        return tuple(
            (round(x(i), 1), round(y(getattr(b.total, attr) or 0.0), 1))
            for i, b in enumerate(series)
            if b.total.count
        )

    y_ticks = tuple((y(v), ms(v)) for v in (0.0, top / 16, top / 4, top))
    step = max(span // 6, 1)
    short = series[-1].end - series[0].start < timedelta(hours=2)
    clock = "%H:%M:%S" if short else "%H:%M"
    x_ticks = tuple((x(i), series[i].start.strftime(clock)) for i in range(0, span, step))
    worst = max(filled, key=lambda b: b.total.p99_ms or 0.0)
    summary = (
        f"latency acquired to archived, {len(filled)} of {span} intervals with frames; "
        f"worst p99 {ms(worst.total.p99_ms)} at {worst.start:%H:%M} UTC"
    )
    return Plot(width, height, line("p50_ms"), line("p99_ms"), y_ticks, x_ticks, False, summary)


def _nice(value: float) -> float:
    """The smallest of 1, 2, 5 × 10^n at or above ``value``."""
    scale = 1.0
    while scale * 10 < value:
        scale *= 10
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= value)


# ------------------------------------------------------------------ stuck and failed


@dataclass(frozen=True)
class RejectedView:
    archive_id: str | None
    instrument: str | None
    name: str | None
    """Admins only (a file name may carry a target's name)."""
    reason: str | None
    """Admins only (it quotes paths and header values)."""
    at: datetime | None


@dataclass(frozen=True)
class FailedRun:
    run: RunOut
    step: str | None
    """The step that failed, if the visitor may see the run's steps."""
    tail: str | None
    """The end of its stderr (or stdout)."""


@dataclass(frozen=True)
class Trouble:
    stuck: tuple[StuckFile, ...]
    stuck_total: int
    stuck_after: float
    rejected: tuple[RejectedView, ...]
    failed: tuple[FailedRun, ...]
    admin: bool


TAIL_LINES: Final = 20


def trouble(svc: Services, session: Session) -> Trouble:
    """Files stuck in a state too long, rejected files, failed runs and why."""
    now = svc.now()
    admin = session.may(Scope.ADMIN)
    report = latency.latency_report(svc.site.catalog, now, tonight_began(svc, now))
    stuck = tuple(
        f if admin else StuckFile(f.archive_id, "", f.state, f.since, f.seconds, None)
        for f in report.stuck
    )
    rejected = tuple(
        RejectedView(
            archive_id=r.archive_id,
            instrument=r.instrument,
            name=r.original_name if admin else None,
            reason=r.reason if admin else None,
            at=next((e.at for e in svc.site.catalog.ledger(r.id) if e.event is _REJECTED), None),
        )
        for r in night.rejected_files(svc.site.catalog, limit=50)
    )
    latest = newest_runs(svc, session.who, RunState.FAILED, svc.page_limit)
    failed = tuple(_failed(svc, session, r) for r in latest)  # the newest first
    return Trouble(stuck, report.stuck_total, report.stuck_after, rejected, failed, admin)


_REJECTED: Final = LedgerEvent.REJECTED


def _failed(svc: Services, session: Session, run: RunOut) -> FailedRun:
    if run.proprietary:
        return FailedRun(run, None, None)
    detail = run_detail(svc, session.who, run.run_id)
    for step in detail.steps or ():
        if step.state.value == "failed":
            text = step.stderr_tail or step.stdout_tail or step.reason or ""
            return FailedRun(run, step.step, _tail(text))
    return FailedRun(run, None, _tail(detail.error or ""))


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------ a run


@dataclass(frozen=True)
class RunPageView:
    run: RunDetail
    may_retry: bool
    may_reprocess: bool
    inputs: tuple[tuple[str, tuple[str, ...]], ...]


def run_view(svc: Services, session: Session, run_id: int) -> RunPageView:
    detail = run_detail(svc, session.who, run_id)
    writer = session.may(Scope.WRITE) and not detail.proprietary
    return RunPageView(
        run=detail,
        may_retry=writer and detail.state is RunState.FAILED,
        may_reprocess=writer and detail.state.finished,
        inputs=tuple((name, tuple(ids)) for name, ids in detail.inputs.items()),
    )


# ------------------------------------------------------------------ a file


@dataclass(frozen=True)
class LedgerStep:
    event: str
    at: datetime
    after: str
    """Since the previous event (``+1.2 s``); empty for the first."""
    offset: float
    """Where on the timeline, 0..1."""


@dataclass(frozen=True)
class ProvenanceNode:
    """A file in a provenance tree, and (upward) what it was made from."""

    archive_id: str
    product: str | None
    level: int | None
    made_by: tuple[int, str] | None
    """(run, pipeline)."""
    inputs: tuple[tuple[str, tuple[ProvenanceNode, ...]], ...]
    """Input name → the files (their own trees)."""
    link: bool
    """Whether the file exists (a page to follow)."""


@dataclass(frozen=True)
class FileView:
    file: FileDetail
    readable: bool
    """The visitor may have its bytes and preview."""
    ledger: tuple[LedgerStep, ...]
    made_from: ProvenanceNode
    derived: tuple[ProvenanceNode, ...]
    keywords: tuple[tuple[str, str], ...]


def file_view(svc: Services, session: Session, archive_id: str) -> FileView:
    """One file as the visitor may see it, with its ledger as a timeline and its
    provenance up to the raw frames and down to what was made from it."""
    detail = file_detail(svc, session.who, archive_id)
    record = svc.site.catalog.get(archive_id)
    readable = record is not None and may_read_data(session.who, record, svc.now())
    entries = detail.ledger or []
    steps: list[LedgerStep] = []
    if entries:
        first, last = entries[0].at, entries[-1].at
        span = max((last - first).total_seconds(), 1e-9)
        for i, entry in enumerate(entries):
            gap = (entry.at - entries[i - 1].at).total_seconds() * 1000 if i else None
            steps.append(
                LedgerStep(
                    entry.event.value,
                    entry.at,
                    f"+{ms(gap)}" if gap is not None else "",
                    (entry.at - first).total_seconds() / span,
                )
            )
    derived: list[ProvenanceNode] = []
    if detail.id is not None:
        for file_id in derived_from(svc.site.catalog, detail.id):
            found = svc.site.catalog.get_by_id(file_id)
            if found is not None and found.archive_id:
                derived.append(
                    ProvenanceNode(found.archive_id, found.product, found.level, None, (), True)
                )
    return FileView(
        file=detail,
        readable=readable,
        ledger=tuple(steps),
        made_from=_provenance(svc, session, detail, PROVENANCE_DEPTH, set()),
        derived=tuple(derived),
        keywords=tuple((k, _text(v)) for k, v in sorted((detail.keywords or {}).items())),
    )


def _provenance(
    svc: Services, session: Session, detail: FileDetail, depth: int, seen: set[str]
) -> ProvenanceNode:
    archive_id = detail.archive_id or "?"
    seen.add(archive_id)
    made = detail.made_by
    inputs: list[tuple[str, tuple[ProvenanceNode, ...]]] = []
    if made is not None and depth > 0:
        for name, ids in made.inputs.items():
            nodes = []
            for input_id in ids:
                nodes.append(_input(svc, session, input_id, depth - 1, seen))
            inputs.append((name, tuple(nodes)))
    return ProvenanceNode(
        archive_id,
        detail.product,
        detail.level,
        (made.run_id, made.pipeline) if made is not None else None,
        tuple(inputs),
        True,
    )


def _input(
    svc: Services, session: Session, archive_id: str, depth: int, seen: set[str]
) -> ProvenanceNode:
    if archive_id in seen or archive_id.startswith("#"):
        return ProvenanceNode(archive_id, None, None, None, (), not archive_id.startswith("#"))
    try:
        detail = file_detail(svc, session.who, archive_id)
    except ProblemError:  # gone (superseded files stay; a deleted row does not)
        return ProvenanceNode(archive_id, None, None, None, (), False)
    return _provenance(svc, session, detail, depth, seen)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def file_states() -> tuple[str, ...]:
    return tuple(s.value for s in FileState if s is not FileState.REJECTED)

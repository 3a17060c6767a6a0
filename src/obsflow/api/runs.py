"""``/api/v1/runs``: pipeline runs, one run with its steps and log, retrying a failed
run and reprocessing a run's group (the dashboard's buttons call the same functions:
:func:`retry`, :func:`reprocess`).

A run is as proprietary as its files: a caller who may not read every one of its
inputs and outputs (:func:`~obsflow.access.may_read_data`) sees its public part
only -- pipeline, state, times, the archive IDs of its inputs and outputs -- and
``"proprietary": true``; its group (which may name the object), reason, error,
parameters, steps, run-time profile and log are withheld. Its work directory and
log path are shown to admin tokens only, and so are site paths anywhere in a run
(steps' argv and output, the profile, the log, messages): others see them relative
to the run (``./out.fits``) or to the site's directories (``<cache>/...``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from pathlib import Path as FsPath
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field

from obsflow.access import Principal, Scope, may_read_data
from obsflow.api import pages
from obsflow.api.auth import Caller, Writer, denied
from obsflow.api.params import NAME, Day, RowId
from obsflow.api.problems import ProblemError, documented
from obsflow.api.services import Services, json_response, services
from obsflow.catalog.records import FileRecord
from obsflow.catalog.runs import RunRecord
from obsflow.processing.tracker import Tracker
from obsflow.states import RunState, StepState

router = APIRouter(prefix="/api/v1", tags=["runs"])
Svc = Annotated[Services, Depends(services)]
RunId = Annotated[RowId, Path(description="The run's number.")]

LOG_TAIL: Final = 256 * 1024
"""The most bytes of a run's log one answer holds (the end of it)."""


class StepOut(BaseModel):
    step: str
    state: StepState
    attempts: int
    argv: list[str]
    started: datetime | None
    finished: datetime | None
    exit_status: int | None
    stdout_tail: str | None
    stderr_tail: str | None
    reason: str | None


class RunOut(BaseModel):
    """A run as the caller may see it (withheld fields are absent)."""

    run_id: int
    pipeline: str
    version: int
    state: RunState
    night: date | None = None
    group: str | None = None
    degraded: bool | None = None
    reason: str | None = None
    request: str | None = None
    attempts: int | None = None
    created: datetime | None = None
    started: datetime | None = None
    finished: datetime | None = None
    error: str | None = None
    overrides: dict[str, Any] | None = None
    work_dir: str | None = Field(default=None, description="Admin tokens only.")
    log_path: str | None = Field(default=None, description="Admin tokens only.")
    inputs: dict[str, list[str]] = Field(description="Archive IDs by input name.")
    outputs: list[str] = Field(description="Archive IDs of the files the run made.")
    proprietary: bool | None = Field(
        default=None, description="True when fields are withheld (proprietary inputs)."
    )


class RunDetail(RunOut):
    steps: list[StepOut] | None = None
    profile: str | None = Field(default=None, description="The run-time profile (YAML).")
    log: str | None = Field(default=None, description="The run's log (its end, if long).")
    log_truncated: bool | None = None


class RunPage(BaseModel):
    items: list[RunOut]
    next: str | None = Field(description="The cursor of the next page; null on the last.")


_PUBLIC: Final = frozenset(
    {
        "run_id",
        "pipeline",
        "version",
        "state",
        "night",
        "degraded",
        "request",
        "attempts",
        "created",
        "started",
        "finished",
    }
)
_ADMIN: Final = frozenset({"work_dir", "log_path"})


@router.get("/runs", response_model=RunPage, summary="Pipeline runs", responses=documented(401))
def list_runs(
    who: Caller,
    svc: Svc,
    state: RunState | None = None,
    pipeline: Annotated[str | None, Query(pattern=NAME)] = None,
    night: Day | None = None,
    limit: pages.LimitParam = None,
    cursor: pages.CursorParam = None,
) -> Response:
    """Runs in the order they were created, a page at a time."""
    page = run_page(
        svc, who, state=state, pipeline=pipeline, night=night, limit=limit, cursor=cursor
    )
    return json_response(page)


@router.get(
    "/runs/{run_id}",
    response_model=RunDetail,
    summary="One run, with its steps and log",
    responses=documented(401, 404),
)
def get_run(run_id: RunId, who: Caller, svc: Svc) -> Response:
    """Site paths in the steps' argv, the run-time profile, the log and the messages
    are shown to admin tokens only; others see them relative to the run (``./out.fits``)
    or to the site's directories (``<cache>/...``)."""
    return json_response(run_detail(svc, who, run_id))


@router.post(
    "/runs/{run_id}/retry",
    response_model=RunOut,
    status_code=202,
    summary="Queue a failed run again",
    responses=documented(401, 403, 404, 409),
)
def retry_run(run_id: RunId, who: Writer, svc: Svc) -> Response:
    """Queue a failed run again (after its cause was fixed); the daemon runs it. Needs
    write scope, and a run whose files the caller may read."""
    return json_response(retry(svc, who, run_id), 202)


class ReprocessOut(BaseModel):
    request: str = Field(description="The request label of the runs queued.")
    queued: list[int] = Field(description="The runs queued (new versions of the group).")
    skipped: list[str] = Field(description="Why the group was not ready, if it was not.")


@router.post(
    "/runs/{run_id}/reprocess",
    response_model=ReprocessOut,
    status_code=202,
    summary="Run a run's pipeline again on its group",
    responses=documented(401, 403, 404, 409),
)
def reprocess_run(run_id: RunId, who: Writer, svc: Svc) -> Response:
    """Queue a new version of the run: its pipeline on its group, with the group's
    inputs as they are now and every deadline passed (``obsflow reprocess``, for one
    group); its products supersede the older ones. Needs write scope, and a run whose
    files the caller may read."""
    return json_response(reprocess(svc, who, run_id), 202)


def run_detail(svc: Services, who: Principal, run_id: int) -> RunDetail:
    """One run with its steps and log, as ``who`` may see it (``GET /runs/{n}``; also
    the dashboard's). A :class:`ProblemError` 404 if there is no such run."""
    run = _lookup(svc, run_id)
    view = _views(svc, who, [run])[run.id]
    if not view.get("proprietary"):
        view["steps"] = [s.to_json() for s in svc.runs.steps(run.id)]
        view["profile"] = run.profile
        view["log"], view["log_truncated"] = _log(svc, run)
    if not who.may(Scope.ADMIN):
        view = _redacted(view, _site_paths(svc, run))
    return RunDetail.model_validate(view)


def run_page(
    svc: Services,
    who: Principal,
    *,
    state: RunState | None = None,
    pipeline: str | None = None,
    night: date | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> RunPage:
    """A page of runs as ``who`` may see them (``GET /runs``; also the dashboard's)."""
    size = pages.page_size(limit, svc.page_limit)
    after = pages.after(cursor)
    ids = svc.runs.page(after, size + 1, state=state, pipeline=pipeline, night=night)
    shown, cursor_next = pages.next_cursor(ids, size)
    found = svc.runs.find(run_ids=shown) if shown else []
    views = _views(svc, who, found)
    items = [RunOut.model_validate(views[r.id]) for r in found]
    return RunPage(items=items, next=cursor_next)


def newest_runs(svc: Services, who: Principal, state: RunState, limit: int) -> list[RunOut]:
    """The latest ``limit`` runs in ``state``, newest first, as ``who`` may see them."""
    ids = svc.runs.newest(limit, state=state)
    found = sorted(svc.runs.find(run_ids=ids) if ids else [], key=lambda r: -r.id)
    views = _views(svc, who, found)
    return [RunOut.model_validate(views[r.id]) for r in found]


def retry(svc: Services, who: Principal, run_id: int) -> RunOut:
    """Queue a failed run again, for ``who`` (write scope, and the run's files readable):
    the one retry of the API and the dashboard. A :class:`ProblemError` says why not."""
    run = _writable(svc, who, run_id)
    if not svc.runs.retry(run_id):
        current = svc.runs.get(run_id)
        state = current.state.value if current else "gone"
        raise ProblemError(409, f"run {run_id} is {state}, not failed", kind="not-failed")
    queued = _lookup(svc, run.id)
    return RunOut.model_validate(_views(svc, who, [queued])[run_id])


def reprocess(svc: Services, who: Principal, run_id: int) -> ReprocessOut:
    """Queue a new version of run ``run_id``'s group, for ``who`` (write scope, and the
    run's files readable): :meth:`obsflow.processing.tracker.Tracker.reprocess`, as
    ``obsflow reprocess`` does, for the API and the dashboard alike."""
    run = _writable(svc, who, run_id)
    registry = svc.site.registry
    spec = registry.pipelines.get(run.pipeline)
    if spec is None:
        raise ProblemError(
            409, f"pipeline {run.pipeline} is no longer in the registry", kind="no-pipeline"
        )
    tracker = Tracker(registry, svc.site.catalog, svc.site.clock)
    done = tracker.reprocess(spec, group=run.group_key)
    if not done.queued and not done.skipped:
        raise ProblemError(
            409, f"the tracker knows no group {run.group_key} of {run.pipeline}", kind="no-group"
        )
    skipped = [f"{key}: not ready ({'; '.join(unmet)})" for key, unmet in done.skipped]
    return ReprocessOut(request=done.request, queued=list(done.queued), skipped=skipped)


def _writable(svc: Services, who: Principal, run_id: int) -> RunRecord:
    """The run, if ``who`` may change it: write scope and every one of its files readable."""
    if not who.may(Scope.WRITE):
        raise denied(who, f"{who.user} has {who.scope.value} scope; this needs write")
    run = _lookup(svc, run_id)
    if _views(svc, who, [run])[run.id].get("proprietary"):
        raise denied(who, f"run {run_id} works on another program's proprietary files")
    return run


def _lookup(svc: Services, run_id: int) -> RunRecord:
    run = svc.runs.get(run_id)
    if run is None:
        raise ProblemError(404, f"no run {run_id}", kind="no-such-run")
    return run


def _views(svc: Services, who: Principal, found: Iterable[RunRecord]) -> dict[int, dict[str, Any]]:
    """Each run's JSON as ``who`` may see it, by run ID."""
    found = list(found)
    outputs = {r.id: svc.runs.outputs(r.id) for r in found}
    wanted = {i for r in found for ids in r.inputs.values() for i in ids}
    wanted |= {i for ids in outputs.values() for i in ids}
    records = {f.id: f for f in svc.site.catalog.records(sorted(wanted))}
    now = svc.now()
    views: dict[int, dict[str, Any]] = {}
    for run in found:
        ids = [i for group in run.inputs.values() for i in group] + outputs[run.id]
        readable = all(_may_read(who, records.get(i), now) for i in ids)
        data = run.to_json()
        data["inputs"] = {k: [_name(records, i) for i in v] for k, v in run.inputs.items()}
        data["outputs"] = [_name(records, i) for i in outputs[run.id]]
        keep: set[str] = set(_PUBLIC) | {"inputs", "outputs"}
        if readable:
            keep = set(data) - (set() if who.may(Scope.ADMIN) else _ADMIN)
        view = {k: v for k, v in data.items() if k in keep}
        if not readable:
            view["proprietary"] = True
        if not who.may(Scope.ADMIN):
            view = _redacted(view, _site_paths(svc, run))
        views[run.id] = view
    return views


def _site_paths(svc: Services, run: RunRecord) -> list[tuple[str, str]]:
    """(a site path, what a non-admin sees instead), longest first: the run's work
    directory is ``.``, the site's directories ``<name>``, the site itself ``<site>``."""
    settings = svc.site.settings
    named: list[tuple[FsPath, str]] = [(FsPath(run.work_dir), ".")] if run.work_dir else []
    for name in ("work", "cache", "archive", "quarantine", "incoming", "logs", "registry"):
        named.append((getattr(settings, name), f"<{name}>"))
    named.append((settings.site, "<site>"))
    pairs: dict[str, str] = {}
    for path, shown in named:
        for form in (str(path), str(path.resolve()), str(path.absolute())):
            pairs.setdefault(form.rstrip("/"), shown)
    return sorted(pairs.items(), key=lambda pair: -len(pair[0]))


def _redacted(value: Any, paths: list[tuple[str, str]]) -> Any:
    """``value`` (JSON-like) with every site path in its strings replaced."""
    if isinstance(value, str):
        for path, shown in paths:
            if path and path in value:
                value = value.replace(path, shown)
        return value
    if isinstance(value, dict):
        return {k: _redacted(v, paths) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, paths) for v in value]
    return value


def _may_read(who: Principal, record: FileRecord | None, now: datetime) -> bool:
    return record is None or may_read_data(who, record, now)


def _name(records: dict[int, FileRecord], file_id: int) -> str:
    record = records.get(file_id)
    return record.archive_id if record is not None and record.archive_id else f"#{file_id}"


def _log(svc: Services, run: RunRecord) -> tuple[str | None, bool | None]:
    """The end of the run's log, and whether it was cut; only a log in the site's logs."""
    if not run.log_path:
        return None, None
    path = FsPath(run.log_path).resolve()
    if not path.is_relative_to(svc.site.settings.logs.resolve()) or not path.is_file():
        return None, None
    with path.open("rb") as log:
        size = log.seek(0, 2)
        log.seek(max(size - LOG_TAIL, 0))
        tail = log.read(LOG_TAIL)
    cut = size > LOG_TAIL
    if cut:
        tail = tail.partition(b"\n")[2]  # from the first whole line
    return tail.decode("utf-8", errors="replace"), cut

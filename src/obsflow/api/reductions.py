"""``/api/v1/reductions``: on-demand reductions of archived frames, asynchronous (IVOA
UWS phases), reusing what the archive holds (:mod:`obsflow.processing.reductions`).

A token is needed to ask (401 without). A reduction belongs to the user who asked for
it: another user's is 404, as if it did not exist (admins see every one). Inputs are
checked with the proprietary rule of every other route: a frame the caller may not
read is 403, an unknown one 404; a wrong parameter 422 naming it; over a quota 429
with ``Retry-After``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path as FsPath
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from obsflow.access import Principal, ReadRule, Scope
from obsflow.api import pages
from obsflow.api.auth import Caller, denied
from obsflow.api.data import ranged
from obsflow.api.params import NAME, RowId
from obsflow.api.problems import ProblemError, documented
from obsflow.api.services import Services, json_response, services
from obsflow.api.workers import SMALL
from obsflow.catalog.records import FileQuery
from obsflow.catalog.reductions import ReductionRecord, Result
from obsflow.processing.reductions import ReductionError, Reductions
from obsflow.processing.reductions import Request as Asked
from obsflow.states import ReductionPhase

router = APIRouter(prefix="/api/v1", tags=["reductions"])
Svc = Annotated[Services, Depends(services)]
ReductionId = Annotated[RowId, Path(description="The reduction's number.")]

STATUS: Final = {"invalid": 422, "not-found": 404, "forbidden": 403, "quota": 429}
RETRY_AFTER: Final = "30"
CHUNK: Final = 1 << 20
LOG_TAIL: Final = 4000
"""The most characters of a failed step's output an error shows."""


class InputQuery(BaseModel):
    """Inputs chosen by what they are instead of by archive ID."""

    model_config = ConfigDict(extra="forbid")
    night: date
    object: str | None = Field(default=None, max_length=128)
    product: str | None = Field(default=None, pattern=NAME)


class ReductionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipeline: str = Field(pattern=NAME, description="A registry pipeline (on_demand).")
    inputs: list[Annotated[str, Field(max_length=128)]] | InputQuery = Field(
        description="Archive IDs, or a query: {night, object, product}."
    )
    parameters: dict[Annotated[str, Field(max_length=64)], str | int | float | bool] = Field(
        default_factory=dict, description="The pipeline's declared parameters."
    )
    priority: Literal["normal", "high"] = Field(
        default="normal",
        description="high (admin tokens only): ahead of every user's queue (transient follow-up).",
    )


class ActionOut(BaseModel):
    pipeline: str
    action: str = Field(description="reuse (the archive's product) or run.")
    group: str
    products: list[str]
    run_id: int | None
    final: bool = Field(description="The pipeline asked for: its products are the results.")


class ResultOut(BaseModel):
    name: str
    product: str | None
    sha256: str
    size: int
    url: str
    archive_id: str | None = None


class StepProgress(BaseModel):
    run_id: int
    pipeline: str
    state: str
    steps: dict[str, str] = Field(description="Step name → its state.")


class ReductionOut(BaseModel):
    reduction_id: int
    owner: str
    pipeline: str
    phase: ReductionPhase
    parameters: dict[str, Any]
    inputs: list[str]
    plan: list[ActionOut]
    created: datetime
    finished: datetime | None
    expires: datetime | None
    expired: bool
    error: str | None
    progress: list[StepProgress] = Field(default_factory=list)
    results: list[ResultOut] = Field(default_factory=list)


class PlanOut(BaseModel):
    pipeline: str
    parameters: dict[str, Any]
    inputs: list[str]
    plan: list[ActionOut]


class ReductionPage(BaseModel):
    items: list[ReductionOut]
    next: str | None


def _service(svc: Svc) -> Reductions:
    return Reductions(svc.site)


Service = Annotated[Reductions, Depends(_service)]


def _asker(who: Caller) -> Principal:
    if who.anonymous:
        raise denied(who, "asking for a reduction")
    return who


Asker = Annotated[Principal, Depends(_asker)]


def _problem(exc: ReductionError) -> ProblemError:
    status = STATUS.get(exc.kind, 422)
    headers = {"Retry-After": RETRY_AFTER} if status == 429 else None
    return ProblemError(status, str(exc), kind=exc.kind, headers=headers)


@router.post(
    "/reductions",
    summary="Ask for a reduction (asynchronous)",
    status_code=202,
    responses={
        200: {"description": "Answered at once (an identical reduction), or a dry run's plan."},
        202: {"description": "Accepted: follow its Location.", "model": ReductionOut},
        **documented(400, 401, 403, 404, 413, 429),  # 400: a body that is not JSON
    },
    dependencies=SMALL,
)
def create_reduction(
    body: ReductionIn,
    who: Asker,
    reductions: Service,
    svc: Svc,
    dry_run: Annotated[bool, Query(description="Only plan: return the plan, run nothing.")] = False,
) -> Response:
    """Plan the reduction (reusing the archive's products) and queue its runs; 202 with
    ``Location``. An identical reduction already completed answers at once (200)."""
    if body.priority == "high" and not who.may(Scope.ADMIN):
        raise ProblemError(403, "priority: high needs an admin token", kind="forbidden")
    inputs = _inputs(body, who, svc)
    asked = Asked(body.pipeline, tuple(inputs), dict(body.parameters), body.priority)
    try:
        if dry_run:
            actions = reductions.dry_run(who, asked)
            checked = reductions.check(who, asked)
            plan = PlanOut(
                pipeline=body.pipeline,
                parameters=checked.effective,
                inputs=inputs,
                plan=[ActionOut(**a.to_json()) for a in actions],
            )
            return json_response(plan)
        record, answered = reductions.submit(who, asked)
    except ReductionError as exc:
        raise _problem(exc) from None
    if svc.wake is not None:
        svc.wake.set()  # the tracker loop dispatches its runs now
    response = json_response(_out(reductions, record), status_code=200 if answered else 202)
    response.headers["Location"] = f"/api/v1/reductions/{record.id}"
    return response


def _inputs(body: ReductionIn, who: Principal, svc: Services) -> list[str]:
    if isinstance(body.inputs, list):
        return list(body.inputs)
    query = body.inputs
    limit = svc.site.settings.reductions.max_inputs
    found = svc.site.catalog.find(
        FileQuery(
            night=query.night,
            object=query.object,
            product=query.product,
            include_superseded=False,
            live_only=True,
            readable_by=ReadRule.of(who, svc.now()),
            limit=limit + 1,
        )
    )
    pipeline = svc.site.registry.pipelines.get(body.pipeline)
    reductions = Reductions(svc.site)
    chosen = [r.archive_id for r in found if r.archive_id and reductions.fits(r, pipeline)]
    if not chosen:
        raise ProblemError(422, "the query found no file this pipeline can reduce", kind="invalid")
    return chosen


@router.get(
    "/reductions",
    response_model=ReductionPage,
    summary="Reductions (your own; an admin's: everyone's)",
    responses=documented(401),
)
def list_reductions(
    who: Asker,
    reductions: Service,
    svc: Svc,
    mine: Annotated[bool, Query(description="Only your own (an admin sees all else).")] = False,
    limit: pages.LimitParam = None,
    cursor: pages.CursorParam = None,
) -> Response:
    size = pages.page_size(limit, svc.page_limit)
    owner = None if who.may(Scope.ADMIN) and not mine else who.user
    records = reductions.store.page(owner, pages.after(cursor), size + 1)
    ids, following = pages.next_cursor([r.id for r in records], size)
    items = [_out(reductions, reductions.refresh(r.id)) for r in records if r.id in set(ids)]
    return json_response(ReductionPage(items=items, next=following))


@router.get(
    "/reductions/{reduction_id}",
    response_model=ReductionOut,
    summary="One reduction: its phase, plan, progress and results",
    responses=documented(401, 404),
)
def get_reduction(reduction_id: ReductionId, who: Asker, reductions: Service) -> Response:
    record = _own(reductions, reduction_id, who)
    return json_response(_out(reductions, reductions.refresh(record.id)))


@router.post(
    "/reductions/{reduction_id}/abort",
    response_model=ReductionOut,
    summary="Abort a reduction (its runs stopped, their steps killed)",
    responses=documented(401, 404),
)
def abort_reduction(reduction_id: ReductionId, who: Asker, reductions: Service) -> Response:
    _own(reductions, reduction_id, who)
    try:
        record = reductions.abort(reduction_id, who)
    except ReductionError as exc:
        raise _problem(exc) from None
    return json_response(_out(reductions, record))


@router.get(
    "/reductions/{reduction_id}/results/{name}",
    response_class=Response,
    summary="One result's bytes (Range requests welcome)",
    responses=documented(401, 404, 416),
)
def get_result(
    reduction_id: ReductionId,
    name: Annotated[str, Path(max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")],
    request: Request,
    who: Asker,
    reductions: Service,
) -> Response:
    record = _own(reductions, reduction_id, who)
    found = reductions.result_file(record, name)
    if found is None:
        raise ProblemError(
            404, f"reduction {reduction_id} has no result {name!r}", kind="not-found"
        )
    result, path = found
    headers = {
        "ETag": f'"{result.sha256}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": "private",
        "Content-Disposition": f'attachment; filename="{name}"',
    }
    fits = name.endswith((".fits", ".fit", ".fts"))
    kind = "application/fits" if fits else "application/octet-stream"
    return ranged(path.open("rb"), request, headers, kind, name)


@router.get(
    "/reductions/{reduction_id}/results.tar",
    response_class=StreamingResponse,
    summary="Every result at once, as one tar stream",
    responses=documented(401, 404),
)
def get_results_tar(reduction_id: ReductionId, who: Asker, reductions: Service) -> Response:
    """The reduction's own results (not the archive's products it answered with: fetch
    those by their ``url``), streamed as a POSIX tar without a temporary file."""
    record = _own(reductions, reduction_id, who)
    files = [
        (result, path)
        for result in reductions.own_results(record)
        if (found := reductions.result_file(record, result.name)) is not None
        for _, path in [found]
    ]
    if not files:
        raise ProblemError(404, f"reduction {reduction_id} has no results", kind="not-found")
    return StreamingResponse(
        _tar(files),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="reduction-{reduction_id}.tar"'},
    )


def _tar(files: list[tuple[Result, FsPath]]) -> Iterator[bytes]:
    """A tar stream of ``files``: each member's header, its bytes, padding to 512; two
    empty blocks at the end (tarfile writes only to a file object: this streams)."""
    for result, path in files:
        info = tarfile.TarInfo(result.name)
        info.size = path.stat().st_size
        info.mtime = int(path.stat().st_mtime)
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as source:
            while chunk := source.read(CHUNK):
                yield chunk
        if info.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _own(reductions: Reductions, reduction_id: int, who: Principal) -> ReductionRecord:
    """The reduction if ``who`` asked for it (or is admin); 404 otherwise, as if there
    were none (another user's reductions are not shown to exist)."""
    record = reductions.store.get(reduction_id)
    if record is None or (record.owner != who.user and not who.may(Scope.ADMIN)):
        raise ProblemError(404, f"no reduction {reduction_id}", kind="not-found")
    return record


def _out(reductions: Reductions, record: ReductionRecord) -> ReductionOut:
    progress: list[StepProgress] = []
    error = record.error
    for link in reductions.store.runs_of(record.id):
        run = reductions.runs.get(link.run_id)
        if run is None:
            continue
        steps = reductions.runs.steps(link.run_id)
        progress.append(
            StepProgress(
                run_id=run.id,
                pipeline=run.pipeline,
                state=run.state.value,
                steps={s.step: s.state.value for s in steps},
            )
        )
        if record.phase is ReductionPhase.ERROR and link.state.value == "failed":
            tails = [
                f"step {s.step}: {(s.stderr_tail or s.stdout_tail or s.reason or '').strip()}"
                for s in steps
                if s.state.value == "failed"
            ]
            if tails and error is not None and "step " not in error:
                error = f"{error}\n" + "\n".join(t[-LOG_TAIL:] for t in tails)
    return ReductionOut(
        reduction_id=record.id,
        owner=record.owner,
        pipeline=record.pipeline,
        phase=record.phase,
        parameters=record.parameters,
        inputs=list(record.inputs),
        plan=[ActionOut(**a) for a in record.plan],
        created=record.created,
        finished=record.finished,
        expires=record.expires,
        expired=record.expired is not None,
        error=error,
        progress=progress,
        results=[ResultOut(**r) for r in reductions.results(record)],
    )

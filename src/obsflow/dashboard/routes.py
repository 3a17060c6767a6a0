"""The dashboard's pages: server-rendered HTML (Jinja2), made live by htmx and one
server-sent event stream.

==========================================  ========================================
``GET /``                                    tonight: frames, latency, stages, health
``GET /ui/events``                           tonight again, as server-sent events
``GET|POST /login``, ``POST /logout``        sign in with a token, sign out
``GET /ui/trouble``                          stuck files, rejected files, failed runs
``GET /ui/runs``, ``/ui/runs/{n}``           runs (filters), one run with its steps
``POST /ui/runs/{n}/retry|reprocess``        the API's retry and reprocess (write scope,
                                             CSRF token)
``GET /ui/reductions``                       on-demand reductions (signed in)
``GET /ui/files``, ``/ui/files/{id}``        search; one file: ledger, header, tags,
                                             provenance, preview, download
``GET /ui/static/...``                       htmx, its SSE extension, the style sheet
==========================================  ========================================

Each page reads what the API would answer the visitor (:mod:`obsflow.dashboard.views`
calls the API's own functions with the visitor's principal), so a page shows no more
than the API would. The routes stay out of the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from obsflow.access import Scope
from obsflow.api import files as api_files
from obsflow.api import runs as api_runs
from obsflow.api.params import ARCHIVE_ID, CONE, NAME, TAG, TEXT
from obsflow.api.problems import ProblemError
from obsflow.api.reductions import ReductionPage, list_reductions
from obsflow.api.services import Services, services
from obsflow.dashboard import session as sessions
from obsflow.dashboard import views
from obsflow.dashboard.session import Session
from obsflow.ivoa import datalink
from obsflow.processing.reductions import Reductions
from obsflow.states import FileState, ReductionPhase, RunState

STATIC: Final = Path(__file__).parent / "static"
EVENT_SECONDS: Final = 1.0
"""How often the event stream looks for a change of tonight's figures."""
STREAM_SECONDS: Final = 300.0
"""How long one event stream lasts; the browser's EventSource then connects again."""

router = APIRouter(include_in_schema=False)
Svc = Annotated[Services, Depends(services)]

_env = Environment(
    loader=PackageLoader("obsflow.dashboard", "templates"),
    autoescape=select_autoescape(("html", "svg")),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["ms"] = views.ms
_env.filters["moment"] = lambda at: "" if at is None else f"{at:%Y-%m-%d %H:%M:%S} UTC"


def install(app: FastAPI) -> None:
    """Mount the dashboard (its pages and its static files) on ``app``."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="dashboard-static")


def visitor(request: Request, svc: Svc) -> Session:
    """The visitor of the page (a FastAPI dependency): the session cookie's, or anonymous."""
    return sessions.session_of(request, svc)


Visitor = Annotated[Session, Depends(visitor)]


def page(
    template: str, request: Request, visitor: Session, status_code: int = 200, **context: Any
) -> HTMLResponse:
    html = _env.get_template(template).render(
        request=request, visitor=visitor, path=request.url.path, **context
    )
    headers = {"Cache-Control": "no-store", "X-Frame-Options": "DENY"}
    return HTMLResponse(html, status_code=status_code, headers=headers)


def problem_page(request: Request, visitor: Session, problem: ProblemError) -> HTMLResponse:
    return page(
        "error.html",
        request,
        visitor,
        status_code=problem.status,
        title=f"{problem.status}",
        detail=problem.detail,
    )


def refused(request: Request, visitor: Session) -> HTMLResponse:
    """A change without the session's CSRF token (or by nobody signed in): 403."""
    detail = (
        "this form is out of date or did not come from this dashboard: reload the page"
        if visitor.signed_in
        else "sign in first"
    )
    return page("error.html", request, visitor, status_code=403, title="403", detail=detail)


# ------------------------------------------------------------------ tonight


@router.get("/", response_class=HTMLResponse)
def home(request: Request, svc: Svc, who: Visitor) -> HTMLResponse:
    return page("tonight.html", request, who, night=views.tonight(svc, who))


@router.get("/ui/tonight", response_class=HTMLResponse)
def tonight_fragment(request: Request, svc: Svc, who: Visitor) -> HTMLResponse:
    return page("_tonight.html", request, who, night=views.tonight(svc, who))


@router.get("/ui/events")
async def events(request: Request, svc: Svc, who: Visitor) -> StreamingResponse:
    """Tonight's panel as server-sent events (``event: tonight``), each time it changes;
    htmx's SSE extension swaps it in. A comment every 15 s keeps proxies from closing it."""
    stopping = getattr(request.app.state, "stopping", None)
    template = _env.get_template("_tonight.html")

    def render() -> str:
        night = views.tonight(svc, who)
        return template.render(request=request, visitor=who, night=night)

    async def stream() -> AsyncIterator[str]:
        yield f"retry: {int(EVENT_SECONDS * 1000)}\n\n"
        last, began, quiet = "", time.monotonic(), time.monotonic()
        while time.monotonic() - began < STREAM_SECONDS:
            if isinstance(stopping, threading.Event) and stopping.is_set():
                return
            html = await run_in_threadpool(render)
            if html != last:
                last = html
                quiet = time.monotonic()
                data = "".join(f"data: {line}\n" for line in html.splitlines())
                yield f"event: tonight\n{data}\n"
            elif time.monotonic() - quiet > 15:
                quiet = time.monotonic()
                yield ": still here\n\n"
            await asyncio.sleep(EVENT_SECONDS)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# ------------------------------------------------------------------ signing in


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, who: Visitor) -> HTMLResponse:
    return page("login.html", request, who, error=None)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    svc: Svc,
    who: Visitor,
    token: Annotated[str, Form(max_length=256)] = "",
) -> Response:
    if not sessions.same_origin(request):
        return page("error.html", request, who, status_code=403, title="403",
                    detail="sign in from this dashboard's own page")  # fmt: skip
    found = svc.tokens.verify(token.strip()) if token.strip() else None
    if found is None:
        error = "that token is unknown or revoked" if token.strip() else "give a token"
        return page("login.html", request, who, status_code=401, error=error)
    response = RedirectResponse("/", status_code=303)
    sessions.sign_in(response, request, token.strip())
    return response


@router.post("/logout")
def logout(
    request: Request,
    who: Visitor,
    csrf: Annotated[str | None, Form(max_length=128)] = None,
) -> Response:
    if not sessions.csrf_ok(request, who, csrf):
        return refused(request, who)
    response = RedirectResponse("/", status_code=303)
    sessions.sign_out(response, request)
    return response


# ------------------------------------------------------------------ stuck and failed


@router.get("/ui/trouble", response_class=HTMLResponse)
def trouble(request: Request, svc: Svc, who: Visitor) -> HTMLResponse:
    return page("trouble.html", request, who, trouble=views.trouble(svc, who))


# ------------------------------------------------------------------ runs

Said = Literal["retried", "reprocessed"]


@router.get("/ui/runs", response_class=HTMLResponse)
def runs(
    request: Request,
    svc: Svc,
    who: Visitor,
    state: Annotated[str | None, Query(max_length=16)] = None,
    pipeline: Annotated[str | None, Query(max_length=64)] = None,
    night: Annotated[str | None, Query(max_length=10)] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> HTMLResponse:
    error = None
    chosen_state = next((s for s in RunState if s.value == state), None)
    chosen_night = None
    if night:
        try:
            chosen_night = date.fromisoformat(night)
        except ValueError:
            error = f"{night!r} is not a date (YYYY-MM-DD)"
    name = pipeline.strip() if pipeline and pipeline.strip() else None
    try:
        found = api_runs.run_page(
            svc,
            who.who,
            state=chosen_state,
            pipeline=name,
            night=chosen_night,
            cursor=cursor or None,
        )
    except ProblemError as problem:
        return problem_page(request, who, problem)
    query = {"state": state or "", "pipeline": pipeline or "", "night": night or ""}
    return page(
        "runs.html",
        request,
        who,
        page=found,
        query=query,
        states=[s.value for s in RunState],
        pipelines=sorted(svc.site.registry.pipelines),
        error=error,
    )


@router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
def run(
    request: Request,
    run_id: int,
    svc: Svc,
    who: Visitor,
    said: Said | None = None,
) -> HTMLResponse:
    try:
        shown = views.run_view(svc, who, run_id)
    except ProblemError as problem:
        return problem_page(request, who, problem)
    return page("run.html", request, who, view=shown, said=said)


@router.post("/ui/runs/{run_id}/retry")
def retry(
    request: Request,
    run_id: int,
    svc: Svc,
    who: Visitor,
    csrf: Annotated[str | None, Form(max_length=128)] = None,
) -> Response:
    """The API's retry (:func:`obsflow.api.runs.retry`), for the signed-in visitor."""
    if not sessions.csrf_ok(request, who, csrf):
        return refused(request, who)
    try:
        api_runs.retry(svc, who.who, run_id)
    except ProblemError as problem:
        return problem_page(request, who, problem)
    return RedirectResponse(f"/ui/runs/{run_id}?said=retried", status_code=303)


@router.post("/ui/runs/{run_id}/reprocess")
def reprocess(
    request: Request,
    run_id: int,
    svc: Svc,
    who: Visitor,
    csrf: Annotated[str | None, Form(max_length=128)] = None,
) -> Response:
    """The API's reprocess (:func:`obsflow.api.runs.reprocess`), for the signed-in visitor."""
    if not sessions.csrf_ok(request, who, csrf):
        return refused(request, who)
    try:
        done = api_runs.reprocess(svc, who.who, run_id)
    except ProblemError as problem:
        return problem_page(request, who, problem)
    if not done.queued:
        detail = "; ".join(done.skipped) or "nothing to run again"
        return problem_page(request, who, ProblemError(409, detail))
    return RedirectResponse(f"/ui/runs/{done.queued[0]}?said=reprocessed", status_code=303)


# ------------------------------------------------------------------ reductions


@router.get("/ui/reductions", response_class=HTMLResponse)
def reductions(
    request: Request,
    svc: Svc,
    who: Visitor,
    phase: Annotated[str | None, Query(max_length=16)] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> HTMLResponse:
    found: ReductionPage | None = None
    if who.signed_in:
        try:
            answer = list_reductions(
                who=who.who,
                reductions=Reductions(svc.site),
                svc=svc,
                mine=False,
                limit=None,
                cursor=cursor or None,
            )
        except ProblemError as problem:
            return problem_page(request, who, problem)
        found = ReductionPage.model_validate_json(bytes(answer.body))
        if phase:
            found = ReductionPage(
                items=[r for r in found.items if r.phase.value == phase], next=found.next
            )
    return page(
        "reductions.html",
        request,
        who,
        page=found,
        phase=phase or "",
        phases=[p.value for p in ReductionPhase],
    )


# ------------------------------------------------------------------ files


class Search(BaseModel):
    """The search form, checked as the API checks its query (the same patterns)."""

    archive_id: str | None = Field(default=None, pattern=ARCHIVE_ID, max_length=96)
    product: str | None = Field(default=None, pattern=NAME, max_length=64)
    instrument: str | None = Field(default=None, pattern=NAME, max_length=64)
    program: str | None = Field(default=None, pattern=NAME, max_length=64)
    night: date | None = None
    level: int | None = Field(default=None, ge=0, le=99)
    state: FileState | None = None
    object: str | None = Field(default=None, pattern=TEXT, max_length=128)
    tag: str | None = Field(default=None, pattern=TAG, max_length=64)
    frame_type: str | None = Field(default=None, pattern=TEXT, max_length=32)
    filter: str | None = Field(default=None, pattern=TEXT, max_length=32)
    cone: str | None = Field(default=None, pattern=CONE, max_length=64)


_SEARCH_FIELDS: Final = tuple(Search.model_fields)


@router.get("/ui/files", response_class=HTMLResponse)
def search(
    request: Request,
    svc: Svc,
    who: Visitor,
    archive_id: Annotated[str | None, Query(max_length=96)] = None,
    product: Annotated[str | None, Query(max_length=64)] = None,
    instrument: Annotated[str | None, Query(max_length=64)] = None,
    program: Annotated[str | None, Query(max_length=64)] = None,
    night: Annotated[str | None, Query(max_length=10)] = None,
    level: Annotated[str | None, Query(max_length=2)] = None,
    state: Annotated[str | None, Query(max_length=16)] = None,
    object: Annotated[str | None, Query(max_length=128)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    frame_type: Annotated[str | None, Query(max_length=32)] = None,
    filter: Annotated[str | None, Query(max_length=32)] = None,
    cone: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> HTMLResponse:
    """The API's file search (:func:`obsflow.api.files.list_files`) as a form."""
    given = {
        "archive_id": archive_id,
        "product": product,
        "instrument": instrument,
        "program": program,
        "night": night,
        "level": level,
        "state": state,
        "object": object,
        "tag": tag,
        "frame_type": frame_type,
        "filter": filter,
        "cone": cone,
    }
    filled = {k: v.strip() for k, v in given.items() if v is not None and v.strip()}
    error = None
    found: api_files.FilePage | None = None
    try:
        form = Search.model_validate(filled)
    except ValidationError as exc:
        first = exc.errors()[0]
        error = f"{first['loc'][0]}: {first['msg']}"
    else:
        try:
            answer = api_files.list_files(
                who=who.who,
                svc=svc,
                **form.model_dump(),
                cursor=cursor or None,
            )
        except ProblemError as problem:
            error = problem.detail
        else:
            found = api_files.FilePage.model_validate_json(bytes(answer.body))
    query = {k: filled.get(k, "") for k in _SEARCH_FIELDS}
    return page(
        "files.html",
        request,
        who,
        page=found,
        query=query,
        error=error,
        states=views.file_states(),
        products=sorted(svc.site.registry.products),
        instruments=sorted(svc.site.registry.instruments),
    )


ArchiveId = api_files.ArchiveId


@router.get("/ui/files/{archive_id}", response_class=HTMLResponse)
def file(request: Request, archive_id: ArchiveId, svc: Svc, who: Visitor) -> HTMLResponse:
    try:
        shown = views.file_view(svc, who, archive_id)
    except ProblemError as problem:
        return problem_page(request, who, problem)
    return page("file.html", request, who, view=shown)


@router.get("/ui/files/{archive_id}/preview.png")
def preview(archive_id: ArchiveId, svc: Svc, who: Visitor) -> Response:
    """DataLink's ``#preview`` (:func:`obsflow.ivoa.datalink.get_preview`), for the visitor."""
    return datalink.get_preview(who=who.who, svc=svc, ID=archive_id)


@router.get("/ui/files/{archive_id}/data")
def download(request: Request, archive_id: ArchiveId, svc: Svc, who: Visitor) -> Response:
    """The API's download (:func:`obsflow.api.files.get_file_data`), for the visitor."""
    try:
        return api_files.get_file_data(archive_id, request, who.who, svc)
    except ProblemError as problem:
        return problem_page(request, who, problem)


def may_write(visitor: Session) -> bool:
    return visitor.may(Scope.WRITE)


_env.globals["may_write"] = may_write
_env.globals["csrf_field"] = sessions.CSRF_FIELD

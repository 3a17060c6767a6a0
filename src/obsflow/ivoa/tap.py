"""TAP 1.1 at ``/tap``: synchronous ADQL queries over ObsCore and TAP_SCHEMA, and the
VOSI resources (capabilities, availability, tables) that describe the service.

A query goes: parameters (names case-insensitive, DALI) → :func:`~obsflow.ivoa.adql.translate`
(the user's ADQL parsed and regenerated) → :func:`~obsflow.catalog.obscore.run_query`
with ObsCore made for this reader (:class:`~obsflow.access.ReadRule`, the rule the
REST API uses) → a VOTable, CSV or JSON. Every error is a VOTable error document.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from sqlalchemy import Dialect
from starlette.concurrency import run_in_threadpool

from obsflow.access import Principal, ReadRule
from obsflow.api.auth import Caller
from obsflow.api.params import READS_ITS_OWN_QUERY
from obsflow.api.services import Services, services
from obsflow.catalog.obscore import (
    URL_PARAMETER,
    ObsCoreView,
    QueryError,
    Statement,
    compiled,
    literal_table,
    run_query,
)
from obsflow.errors import ObsflowError
from obsflow.ivoa import datalink, soda, vosi
from obsflow.ivoa.adql import AdqlError, translate
from obsflow.ivoa.obscore import OBSCORE, ColumnInfo, TableInfo, facts_of
from obsflow.ivoa.tapschema import PUBLISHED, rows_of
from obsflow.ivoa.uws import (
    LIFETIME,
    Job,
    JobStore,
    Phase,
    UwsError,
    format_time,
    job_xml,
    jobs_xml,
    parse_time,
    part_xml,
)
from obsflow.ivoa.votable import Format, FormatError, Result, error_document, parse_format, render
from obsflow.registry import Registry

log = logging.getLogger(__name__)

__all__ = ["TapError", "TapQuery", "execute", "install", "router"]

router = APIRouter(prefix="/tap", tags=[READS_ITS_OWN_QUERY], include_in_schema=False)

Svc = Annotated[Services, Depends(services)]

RUN_NAMES: Final = {t.name: t.name.replace(".", "_") for t in PUBLISHED}
"""ADQL table name → the name its SELECT runs under (a common table expression)."""
KNOWN_COLUMNS: Final[dict[str, ColumnInfo]] = {
    c.sql_name: c for t in reversed(PUBLISHED) for c in t.columns
}
COLUMN_NAMES: Final = {t.name: frozenset(c.sql_name for c in t.columns) for t in PUBLISHED}
LANGS: Final = frozenset({"ADQL", "ADQL-2.0", "ADQL-2.1"})


class TapError(ObsflowError):
    """A TAP request obsflow cannot answer (names the parameter and its value)."""


@dataclass(frozen=True)
class TapQuery:
    """A TAP query's parameters, checked."""

    query: str
    format: Format
    maxrec: int


def parse_query(params: Mapping[str, str], svc: Services) -> TapQuery:
    """The parameters of a query (names case-insensitive); :class:`TapError` if wrong."""
    request = params.get("REQUEST")
    if request is not None and request != "doQuery":
        raise TapError(f"unknown REQUEST {request!r}: expected doQuery")
    lang = params.get("LANG")
    if lang is None:
        raise TapError("LANG is missing: expected LANG=ADQL")
    if lang.upper() not in LANGS:
        raise TapError(f"unknown LANG {lang!r}: expected ADQL")
    query = params.get("QUERY")
    if query is None or not query.strip():
        raise TapError("QUERY is missing: expected an ADQL query")
    if params.get("UPLOAD"):
        raise TapError("UPLOAD is not supported by this service")
    try:
        fmt = parse_format(params.get("RESPONSEFORMAT") or params.get("FORMAT"))
    except FormatError as exc:
        raise TapError(str(exc)) from None
    settings = svc.site.settings.ivoa
    text = params.get("MAXREC")
    if text is None or not text.strip():
        maxrec = settings.maxrec
    else:
        try:
            maxrec = int(text)
        except ValueError:
            raise TapError(f"MAXREC {text!r} is not a whole number") from None
        if maxrec < 0:
            raise TapError(f"MAXREC {text!r} is negative")
    return TapQuery(query, fmt, min(maxrec, settings.max_maxrec))


def execute(svc: Services, who: Principal, query: TapQuery, base_url: str) -> Result:
    """Run ``query`` for ``who``; raises :class:`AdqlError` or :class:`QueryError`."""
    catalog = svc.site.catalog
    dialect = catalog.engine.dialect.name
    translated = translate(
        query.query,
        RUN_NAMES,
        dialect,
        limit=query.maxrec + 1,
        columns=COLUMN_NAMES,
        sky=catalog.sky_index,
    )
    rule = ReadRule.of(who, svc.now())
    tables: dict[str, Statement] = {}
    for table in PUBLISHED:
        run_name = RUN_NAMES[table.name]
        if f'"{run_name}"' not in translated.sql:
            continue
        if table is OBSCORE:
            view = _view(svc)
            tables[run_name] = view.statement(
                rule, catalog.engine.dialect, hidden=translated.hidden
            )
        else:
            tables[run_name] = _literal(table, catalog.engine.dialect)
    found = run_query(
        catalog,
        translated.sql,
        tables,
        seconds=svc.site.settings.ivoa.query_seconds,
        params={URL_PARAMETER: f"{base_url}api/v1/files/"},
    )
    rows = found.rows
    overflow = len(rows) > query.maxrec and (
        translated.top is None or translated.top > query.maxrec
    )
    return Result(found.columns, rows[: query.maxrec], overflow, KNOWN_COLUMNS)


_LITERALS: dict[tuple[str, str], Statement] = {}


def _literal(table: TableInfo, dialect: Dialect) -> Statement:
    """A TAP_SCHEMA table (constant), compiled once per engine."""
    key = (table.name, dialect.name)
    found = _LITERALS.get(key)
    if found is None:
        names = [c.sql_name for c in table.columns]
        found = _LITERALS[key] = compiled(literal_table(names, rows_of(table)), dialect)
    return found


_VIEWS: dict[int, tuple[Registry, ObsCoreView]] = {}
_VIEWS_LOCK: Final = threading.Lock()


def _view(svc: Services) -> ObsCoreView:
    """The site's ObsCore view, built once per registry (a few, for tests' many sites)."""
    registry = svc.site.registry
    with _VIEWS_LOCK:
        found = _VIEWS.get(id(registry))
        if found is not None and found[0] is registry:
            return found[1]
        if len(_VIEWS) >= 8:
            _VIEWS.clear()
        view = ObsCoreView(facts_of(registry, svc.site.settings.ivoa.authority, ""))
        _VIEWS[id(registry)] = (registry, view)
        return view


def _params(pairs: list[tuple[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs:
        if isinstance(value, str):
            out.setdefault(key.upper(), value)
    return out


async def request_params(request: Request) -> dict[str, str]:
    """A request's parameters, GET's and POST's (form or multipart) alike."""
    pairs: list[tuple[str, Any]] = list(request.query_params.multi_items())
    if request.method == "POST":
        form = await request.form()
        pairs.extend(form.multi_items())
    return _params(pairs)


def error_response(message: str, status: int = 400) -> Response:
    return Response(error_document(message), status, media_type=Format.VOTABLE.media_type)


class Running:
    """How many queries each reader runs now, within ``ivoa.queries_per_user``: one
    reader's burst of heavy queries cannot take every connection of the catalog."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, owner: str, most: int) -> bool:
        with self._lock:
            if self._count.get(owner, 0) >= most:
                return False
            self._count[owner] = self._count.get(owner, 0) + 1
            return True

    def leave(self, owner: str) -> None:
        with self._lock:
            left = self._count.get(owner, 1) - 1
            if left:
                self._count[owner] = left
            else:
                self._count.pop(owner, None)


RUNNING: Final = Running()


def answer(svc: Services, who: Principal, params: Mapping[str, str], base_url: str) -> Response:
    owner, most = _owner(who), svc.site.settings.ivoa.queries_per_user
    if not RUNNING.enter(owner, most):
        return error_response(
            f"{who.user} runs {most} queries already (ivoa.queries_per_user): wait for one to end",
            429,
        )
    try:
        query = parse_query(params, svc)
        result = execute(svc, who, query, base_url)
    except (TapError, AdqlError, QueryError) as exc:
        return error_response(str(exc))
    finally:
        RUNNING.leave(owner)
    return Response(render(result, query.format), media_type=query.format.media_type)


@router.api_route("/sync", methods=["GET", "POST"])
async def sync(request: Request, who: Caller, svc: Svc) -> Response:
    """Run an ADQL query and answer with its result (TAP 1.1 §2.1)."""
    params = await request_params(request)
    return await run_in_threadpool(answer, svc, who, params, str(request.base_url))


@router.get("")
def root(request: Request) -> Response:
    base = str(request.base_url)
    return Response(
        f"obsflow TAP service: {base}tap (sync: {base}tap/sync; "
        f"capabilities: {base}tap/capabilities; tables: {base}tap/tables)\n",
        media_type="text/plain",
    )


@router.get("/capabilities")
def capabilities(request: Request) -> Response:
    return Response(vosi.capabilities(str(request.base_url)), media_type="text/xml")


@router.get("/availability")
def availability(svc: Svc) -> Response:
    try:
        svc.site.catalog.revision()
    except Exception as exc:  # any failure means: not available
        return Response(vosi.availability(False, f"the catalog does not answer: {exc}"),
                        media_type="text/xml")  # fmt: skip
    return Response(vosi.availability(True, "the service is accepting queries"),
                    media_type="text/xml")  # fmt: skip


@router.get("/tables")
def tables() -> Response:
    return Response(vosi.tables(PUBLISHED), media_type="text/xml")


# ------------------------------------------------------------------ async (UWS 1.1)

_RUNNING: Final = threading.BoundedSemaphore(2)
"""Async queries that run at once per process (more wait QUEUED): a burst of jobs
cannot take every connection of the catalog."""


def install(app: FastAPI, svc: Services) -> None:
    """Mount ``/tap`` (with the job store of its async queries), ``/datalink`` and
    ``/soda`` on ``app``."""
    settings = svc.site.settings.ivoa
    app.state.tap_jobs = JobStore(svc.site.clock, math.ceil(settings.query_seconds))
    app.include_router(router)
    app.include_router(datalink.router)
    app.include_router(soda.router)


def _jobs(request: Request) -> JobStore:
    store = request.app.state.tap_jobs
    assert isinstance(store, JobStore)
    return store


def _owner(who: Principal) -> str:
    return "anonymous" if who.anonymous else f"{who.user}#{who.token_id}"


def _not_found(job_id: str) -> Response:
    return Response(f"no such job: {job_id}\n", 404, media_type="text/plain")


def _see(url: str) -> Response:
    return Response(status_code=303, headers={"Location": url})


def _run(store: JobStore, job: Job, svc: Services, who: Principal, base_url: str) -> None:
    """Execute a QUEUED job in this thread (see :func:`_start`)."""
    with _RUNNING:
        current = store.update(job.id, phase=Phase.EXECUTING, started=svc.now())
        if current is None or current.phase is not Phase.EXECUTING:
            return  # aborted or deleted while it waited
        try:
            query = parse_query(current.parameters, svc)
            result = execute(svc, who, query, base_url)
            body = render(result, query.format)
        except (TapError, AdqlError, QueryError) as exc:
            store.update(job.id, phase=Phase.ERROR, ended=svc.now(), error=str(exc))
            return
        except Exception as exc:  # a job's thread must record why it died
            log.exception("TAP job %s failed", job.id)
            store.update(job.id, phase=Phase.ERROR, ended=svc.now(), error=f"internal: {exc}")
            return
        store.update(
            job.id,
            phase=Phase.COMPLETED,
            ended=svc.now(),
            result=body,
            media_type=query.format.media_type,
            rows=len(result.rows),
        )


def _start(request: Request, job: Job, svc: Services, who: Principal) -> None:
    store = _jobs(request)
    queued = store.update(job.id, phase=Phase.QUEUED)
    if queued is None or queued.phase is not Phase.QUEUED:
        return
    thread = threading.Thread(
        target=_run,
        args=(store, queued, svc, who, str(request.base_url)),
        name=f"tap-job-{job.id}",
        daemon=True,
    )
    thread.start()


def _apply(
    request: Request, job: Job, params: Mapping[str, str], svc: Services, who: Principal
) -> Response | None:
    """PHASE, DESTRUCTION, EXECUTIONDURATION posted to a job; a response if refused."""
    store = _jobs(request)
    if "DESTRUCTION" in params:
        try:
            when = parse_time(params["DESTRUCTION"])
        except UwsError as exc:
            return error_response(str(exc))
        store.update(job.id, destruction=min(when, job.created + LIFETIME * 7))
    if "EXECUTIONDURATION" in params:
        text = params["EXECUTIONDURATION"]
        if not text.strip().isdigit():
            return error_response(f"EXECUTIONDURATION {text!r} is not a whole number of seconds")
        # never longer than the site's limit (ivoa.query_seconds), which stops the query
        store.update(job.id, execution_seconds=min(int(text), job.execution_seconds) or 1)
    phase = params.get("PHASE")
    if phase is not None:
        if phase == "RUN":
            _start(request, job, svc, who)
        elif phase == "ABORT":
            store.update(job.id, phase=Phase.ABORTED, ended=svc.now())
        else:
            return error_response(f"unknown PHASE {phase!r}: expected RUN or ABORT")
    return None


@router.get("/async")
def job_list(request: Request, who: Caller) -> Response:
    phases = {p.upper() for p in request.query_params.getlist("PHASE")}
    jobs = [j for j in _jobs(request).of(_owner(who)) if not phases or j.phase.value in phases]
    return Response(jobs_xml(jobs, f"{request.base_url}tap/async"), media_type="text/xml")


@router.post("/async")
async def create_job(request: Request, who: Caller, svc: Svc) -> Response:
    params = await request_params(request)
    try:
        job = _jobs(request).create(_owner(who), {k: v for k, v in params.items() if k != "PHASE"})
    except UwsError as exc:
        return error_response(str(exc), 403)
    refused = _apply(request, job, {k: v for k, v in params.items() if k == "PHASE"}, svc, who)
    return refused or _see(f"{request.base_url}tap/async/{job.id}")


@router.get("/async/{job_id}")
async def get_job(request: Request, job_id: str, who: Caller) -> Response:
    store = _jobs(request)
    wait = request.query_params.get("WAIT")
    job = store.get(_owner(who), job_id)
    if job is None:
        return _not_found(job_id)
    if wait is not None:
        try:
            seconds = float(wait)
        except ValueError:
            return error_response(f"WAIT {wait!r} is not a number of seconds")
        seconds = 60.0 if seconds < 0 else min(seconds, 60.0)
        text = request.query_params.get("PHASE")
        phase = Phase(text) if text is not None and text in Phase.__members__ else None
        found = await run_in_threadpool(store.wait, _owner(who), job_id, seconds, phase)
        job = found or job
    base = f"{request.base_url}tap/async/{job.id}"
    return Response(job_xml(job, base), media_type="text/xml")


@router.post("/async/{job_id}")
async def post_job(request: Request, job_id: str, who: Caller, svc: Svc) -> Response:
    params = await request_params(request)
    store = _jobs(request)
    job = store.get(_owner(who), job_id)
    if job is None:
        return _not_found(job_id)
    if params.get("ACTION") == "DELETE":
        store.delete(_owner(who), job_id)
        return _see(f"{request.base_url}tap/async")
    refused = _apply(request, job, params, svc, who)
    return refused or _see(f"{request.base_url}tap/async/{job_id}")


@router.delete("/async/{job_id}")
def delete_job(request: Request, job_id: str, who: Caller) -> Response:
    if not _jobs(request).delete(_owner(who), job_id):
        return _not_found(job_id)
    return _see(f"{request.base_url}tap/async")


@router.post("/async/{job_id}/{field}")
async def post_job_field(
    request: Request, job_id: str, field: str, who: Caller, svc: Svc
) -> Response:
    params = await request_params(request)
    store = _jobs(request)
    job = store.get(_owner(who), job_id)
    if job is None:
        return _not_found(job_id)
    wanted = {"phase": "PHASE", "destruction": "DESTRUCTION",
              "executionduration": "EXECUTIONDURATION"}  # fmt: skip
    if field == "parameters":
        try:
            store.set_parameters(_owner(who), job_id, params)
        except UwsError as exc:
            return error_response(str(exc), 409)
    elif field in wanted:
        if wanted[field] not in params:
            return error_response(f"expected {wanted[field]}=... for {field}")
        refused = _apply(request, job, {wanted[field]: params[wanted[field]]}, svc, who)
        if refused:
            return refused
    else:
        return _not_found(f"{job_id}/{field}")
    return _see(f"{request.base_url}tap/async/{job_id}")


@router.get("/async/{job_id}/{field}")
def get_job_field(request: Request, job_id: str, field: str, who: Caller) -> Response:
    job = _jobs(request).get(_owner(who), job_id)
    if job is None:
        return _not_found(job_id)
    base = f"{request.base_url}tap/async/{job.id}"
    text = {
        "phase": job.phase.value,
        "executionduration": str(job.execution_seconds),
        "destruction": format_time(job.destruction),
        "quote": "",
        "owner": job.owner,
    }
    if field in text:
        return Response(text[field], media_type="text/plain")
    if field == "error":
        if job.phase is not Phase.ERROR:
            return _not_found(f"{job_id}/error")
        return error_response(job.error or "the job failed", 200)
    if field in {"results", "parameters"}:
        return Response(part_xml(job, base, field), media_type="text/xml")
    return _not_found(f"{job_id}/{field}")


@router.get("/async/{job_id}/results/result")
def job_result(request: Request, job_id: str, who: Caller) -> Response:
    job = _jobs(request).get(_owner(who), job_id)
    if job is None or job.phase is not Phase.COMPLETED or job.result is None:
        return _not_found(f"{job_id}/results/result")
    return Response(job.result, media_type=job.media_type)

"""TAP 1.1 at ``/tap``: synchronous ADQL queries over ObsCore and TAP_SCHEMA, and the
VOSI resources (capabilities, availability, tables) that describe the service.

A query goes: parameters (names case-insensitive, DALI) → :func:`~obsflow.ivoa.adql.translate`
(the user's ADQL parsed and regenerated) → :func:`~obsflow.catalog.obscore.run_query`
with ObsCore made for this reader (:class:`~obsflow.access.ReadRule`, the rule the
REST API uses) → a VOTable, CSV or JSON. Every error is a VOTable error document.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from obsflow.access import Principal, ReadRule
from obsflow.api.auth import Caller
from obsflow.api.services import Services, services
from obsflow.catalog.obscore import QueryError, literal_table, obscore_select, run_query
from obsflow.catalog.schema import files
from obsflow.errors import ObsflowError
from obsflow.ivoa import vosi
from obsflow.ivoa.adql import AdqlError, translate
from obsflow.ivoa.obscore import OBSCORE, ColumnInfo, facts_of
from obsflow.ivoa.tapschema import PUBLISHED, rows_of
from obsflow.ivoa.votable import Format, FormatError, Result, error_document, parse_format, render

log = logging.getLogger(__name__)

__all__ = ["TapError", "TapQuery", "execute", "router"]

router = APIRouter(prefix="/tap", tags=["ivoa"], include_in_schema=False)

Svc = Annotated[Services, Depends(services)]

RUN_NAMES: Final = {t.name: t.name.replace(".", "_") for t in PUBLISHED}
"""ADQL table name → the name its SELECT runs under (a common table expression)."""
KNOWN_COLUMNS: Final[dict[str, ColumnInfo]] = {
    c.name: c for t in reversed(PUBLISHED) for c in t.columns
}
COLUMN_NAMES: Final = {t.name: frozenset(c.name for c in t.columns) for t in PUBLISHED}
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
        query.query, RUN_NAMES, dialect, limit=query.maxrec + 1, columns=COLUMN_NAMES
    )
    rule = ReadRule.of(who, svc.now())
    readable = rule.sql(files.c.proprietary_until, files.c.program)
    facts = facts_of(
        svc.site.registry, svc.site.settings.ivoa.authority, f"{base_url}api/v1/files/"
    )
    tables: dict[str, Any] = {}
    for table in PUBLISHED:
        run_name = RUN_NAMES[table.name]
        if f'"{run_name}"' not in translated.sql:
            continue
        if table is OBSCORE:
            tables[run_name] = obscore_select(facts, readable)
        else:
            tables[run_name] = literal_table([c.name for c in table.columns], rows_of(table))
    found = run_query(catalog, translated.sql, tables, seconds=svc.site.settings.ivoa.query_seconds)
    rows = found.rows
    overflow = len(rows) > query.maxrec and (
        translated.top is None or translated.top > query.maxrec
    )
    return Result(found.columns, rows[: query.maxrec], overflow, KNOWN_COLUMNS)


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


def answer(svc: Services, who: Principal, params: Mapping[str, str], base_url: str) -> Response:
    try:
        query = parse_query(params, svc)
        result = execute(svc, who, query, base_url)
    except (TapError, AdqlError, QueryError) as exc:
        return error_response(str(exc))
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

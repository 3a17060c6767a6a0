"""Errors as problem details (RFC 9457): every 4xx and 5xx answer of the API is
``application/problem+json`` with ``type``, ``title``, ``status``, ``detail`` and
``instance`` -- unknown routes, wrong methods and failed validation included.

Handlers raise :class:`ProblemError`; :func:`install` maps it, Starlette's HTTP
exceptions, FastAPI's validation errors and anything unexpected to a
:class:`Problem`. :func:`documented` is what a route declares in its ``responses``
so that the OpenAPI document says which problems it may answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from obsflow.errors import CatalogError

log = logging.getLogger(__name__)

MEDIA_TYPE: Final = "application/problem+json"
TYPE_PREFIX: Final = "urn:obsflow:problem:"
"""Problem types specific to obsflow are URNs: ``urn:obsflow:problem:proprietary``."""


class FieldError(BaseModel):
    """One reason a request was invalid (a ``422`` problem lists them)."""

    loc: list[str | int] = Field(description="Where: e.g. ['query', 'limit'].")
    msg: str
    type: str


class Problem(BaseModel):
    """A problem detail (RFC 9457)."""

    type: str = Field(
        default="about:blank",
        description="A URI naming the kind of problem; 'about:blank' when the status says all.",
    )
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(ge=400, le=599, description="The HTTP status code.")
    detail: str | None = Field(default=None, description="What went wrong in this request.")
    instance: str | None = Field(default=None, description="The request's path.")
    errors: list[FieldError] | None = Field(
        default=None, description="For a validation problem (422): each invalid part."
    )


class ProblemResponse(JSONResponse):
    media_type = MEDIA_TYPE


class ProblemError(Exception):
    """Raised by a handler to answer with a problem detail."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.headers = dict(headers or {})


def problem_response(
    request: Request,
    status: int,
    detail: str | None,
    *,
    kind: str | None = None,
    headers: Mapping[str, str] | None = None,
    errors: list[FieldError] | None = None,
) -> ProblemResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    problem = Problem(
        type=TYPE_PREFIX + kind if kind else "about:blank",
        title=title,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors,
    )
    return ProblemResponse(
        problem.model_dump(exclude_none=True), status_code=status, headers=dict(headers or {})
    )


async def _api_problem(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(request, exc.status, exc.detail, kind=exc.kind, headers=exc.headers)


async def _http_exception(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such resource: {request.url.path}"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        detail = (
            f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
        )
    return problem_response(request, exc.status_code, detail, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method of every route matching the request's path (Starlette's own ``Allow``
    names only the first route's: ``GET`` for a path also served by ``PUT``)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def _validation(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(
            loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            msg=str(e.get("msg", "")),
            type=str(e.get("type", "")),
        )
        for e in exc.errors()
    ]
    where = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors[:5])
    return problem_response(
        request, 422, f"invalid request: {where}", kind="invalid-request", errors=errors
    )


async def _unavailable(request: Request, exc: Exception) -> ProblemResponse:
    log.error("catalog unavailable during %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request,
        503,
        "the catalog is unavailable; try again later",
        kind="unavailable",
        headers={"Retry-After": "5"},
    )


async def _unexpected(request: Request, exc: Exception) -> ProblemResponse:
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, "an unexpected error; the server's log has the details")


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` with a problem detail."""
    app.add_exception_handler(ProblemError, _api_problem)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(CatalogError, _unavailable)
    app.add_exception_handler(Exception, _unexpected)


_DESCRIPTIONS: Final = {
    400: "Bad request (e.g. a malformed Range header).",
    401: "No valid token: it is missing (for what needs one), unknown or revoked.",
    403: "The token may not do this (scope), or the file is proprietary to another program.",
    404: "No such file, run or tag.",
    409: "The resource is not in a state that allows this.",
    416: "The byte range cannot be satisfied.",
    422: "Invalid parameters (each is listed in 'errors').",
    503: "The catalog is unavailable.",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may answer these problems (and always 422,
    500 and 503), for the OpenAPI document."""
    schema = {"$ref": "#/components/schemas/Problem"}
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, 422, 500, 503}):
        out[status] = {
            "description": _DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
            "content": {MEDIA_TYPE: {"schema": schema}},
        }
    return out


def add_schemas(openapi: dict[str, Any]) -> None:
    """Put :class:`Problem` (and what it refers to) into the document's components."""
    schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas["Problem"] = schema

"""The shapes of what a request may say, shared by the routes: checked before any of
it reaches the catalog."""

from __future__ import annotations

import difflib
import re
from datetime import UTC, date, datetime
from typing import Annotated, Final

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BeforeValidator, Field

from obsflow.api.problems import ProblemError

ARCHIVE_ID: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
"""What an archive ID may look like (the catalog's column holds 96 characters)."""
TAG: Final = r"^[A-Za-z0-9_.:-]{1,64}$"
"""A tag, as the registry's (ASCII letters only)."""
NAME: Final = r"^[A-Za-z0-9_.:-]{1,64}$"
"""A product, instrument, program or pipeline ID."""
TEXT: Final = r"^[^\x00-\x1f\x7f]*$"
"""Printable text: no control characters (nor NUL, which PostgreSQL refuses)."""
MAX_ROW_ID: Final = 2**31 - 1
"""The largest row ID (the catalog's ID columns are 32-bit integers on PostgreSQL)."""
_RA: Final = r"(?:360(?:\.0+)?|(?:3[0-5]\d|[12]\d\d|\d{1,2})(?:\.\d{1,17})?)"
_DEC: Final = r"[+-]?(?:90(?:\.0+)?|[0-8]?\d(?:\.\d{1,17})?)"
_RADIUS: Final = r"(?:180(?:\.0+)?|(?:1[0-7]\d|\d{1,2})(?:\.\d{1,17})?)"
CONE: Final = rf"^{_RA},{_DEC},{_RADIUS}$"
"""A cone, ``RA,DEC,RADIUS`` in degrees (RA 0..360, DEC -90..90, radius 0..180): one
parameter, so that its three parts are given together and the document can say so."""
KEYWORD: Final = r"^[A-Za-z0-9_-]{1,72}=[^\x00-\x1f\x7f]{0,255}$"
"""A header keyword filter, NAME=VALUE."""


_TIME: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_INTEGER: Final = re.compile(r"[+-]?\d{1,19}", re.ASCII)


def _rfc3339(value: object) -> object:
    """Only an RFC 3339 time (what the OpenAPI document promises), not every string
    pydantic could make a time of (a bare date, a Unix timestamp, no offset)."""
    if isinstance(value, str) and not _TIME.fullmatch(value):
        raise ValueError("expected an RFC 3339 time with its offset, e.g. 2026-11-22T05:00:00Z")
    return value


def _full_date(value: object) -> object:
    if isinstance(value, str) and not _DATE.fullmatch(value):
        raise ValueError("expected a date, e.g. 2026-11-21")
    return value


def _integer(value: object) -> object:
    if isinstance(value, str) and not _INTEGER.fullmatch(value):
        raise ValueError("expected an integer, e.g. 12")
    return value


# An integer in a query or a path is digits only (not 1.0, not 1e3). The bounds come
# before the validator: so pydantic writes them as minimum/maximum in the document.
PageLimit = Annotated[int, Field(ge=1), BeforeValidator(_integer)]
Level = Annotated[int, Field(ge=0, le=99), BeforeValidator(_integer)]
RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID), BeforeValidator(_integer)]
Time = Annotated[datetime, BeforeValidator(_rfc3339)]
"""A time in a query: RFC 3339, with ``Z`` or an offset."""
Day = Annotated[date, BeforeValidator(_full_date)]
"""A date in a query: ``YYYY-MM-DD``."""


def utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC; one that would leave the calendar in UTC (0001-01-01T00:00+05:00)
    is the first or last time there is, which is what it means to a filter."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return (datetime.min if value.year < 5000 else datetime.max).replace(tzinfo=UTC)


READS_ITS_OWN_QUERY: Final = "ivoa"
"""The tag of routes whose query parameters :func:`known_query` leaves to them."""
_KNOWN: dict[int, frozenset[str]] = {}
"""The query parameters each route declares, by the route's ``id`` (worked out once)."""


def known_query(request: Request) -> None:
    """Refuse (422) a query parameter the route does not declare: a misspelt filter
    (``?prodcut=...``) is an error that names it, not a filter silently ignored that
    answers with every file. Installed on the whole app by :func:`obsflow.api.create_app`.
    Not on the IVOA services' routes (tagged :data:`READS_ITS_OWN_QUERY`): their protocols
    (DALI) name parameters case-insensitively, and they read them themselves."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or READS_ITS_OWN_QUERY in route.tags:
        return
    names = _KNOWN.get(id(route))
    if names is None:
        names = _KNOWN[id(route)] = frozenset(_query_names(route.dependant))
    unknown = sorted(set(request.query_params) - names)
    if not unknown:
        return
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{name!r}{hint}")
    listed = ", ".join(sorted(names)) if names else "none"
    raise ProblemError(
        422,
        f"unknown query parameter {', '.join(problems)}: {request.url.path} takes {listed}",
        kind="unknown-parameter",
    )


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route's handler and its dependencies declare."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names

"""The shapes of what a request may say, shared by the routes: checked before any of
it reaches the catalog."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Final

from pydantic import BeforeValidator, Field

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

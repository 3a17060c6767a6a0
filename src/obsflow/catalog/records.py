"""Frozen records the catalog hands out, and the one query of files (:class:`FileQuery`)
that ``obsflow find`` and the REST listing build."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Protocol

from obsflow.states import FileState, LedgerEvent, RequestState

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement


@dataclass(frozen=True)
class FileRecord:
    """One row of the files table, with its tags and archived keywords."""

    id: int
    archive_id: str | None
    product: str | None
    instrument: str | None
    level: int | None
    original_name: str
    source_path: str
    size: int
    sha256: str
    state: FileState
    reason: str | None
    start: datetime | None
    stop: datetime | None
    start_mjd: float | None
    stop_mjd: float | None
    night: date | None
    exptime: float | None
    ra: float | None
    dec: float | None
    object: str | None
    frame_type: str | None
    filter: str | None
    program: str | None
    observer: str | None
    telescope: str | None
    proprietary_until: datetime | None
    cache_path: str | None
    archive_path: str | None
    quarantine_path: str | None
    version: int
    superseded_by: int | None
    made_by_run: int | None = None
    """The run that made this file, if a pipeline did (provenance)."""
    name_groups: Mapping[str, str] | None = None
    """The named regex groups of ``original_name`` that receipt recognised ``product``
    by (e.g. ``date``, ``frame``); None for a row recorded before the catalog kept them
    (schema 0007) or a file no product recognised."""
    virtual: bool = False
    """Evicted from the cache: its bytes are only in the archive (fetch restores them)."""
    last_access: datetime | None = None
    tags: tuple[str, ...] = ()
    keywords: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO times), as ``find --json`` and ``show --json`` print."""
        # by each value's type, looked up, not asked of isinstance one by one: a page of
        # the REST listing converts 100 records, and the checks were half its time
        out = self.__dict__.copy()
        for name, value in out.items():
            kind = type(value)
            if kind in _PLAIN:
                continue
            convert = _JSON_OF.get(kind)
            if convert is not None:
                out[name] = convert(value)
            elif isinstance(value, datetime | date):
                out[name] = value.isoformat()
            elif isinstance(value, FileState):
                out[name] = value.value
            elif isinstance(value, tuple):
                out[name] = list(value)
            elif isinstance(value, Mapping):
                out[name] = dict(value)
        return out


_PLAIN: Final = frozenset({str, int, float, bool, type(None)})
_JSON_OF: Final[dict[type, Callable[[Any], Any]]] = {
    datetime: datetime.isoformat,
    date: date.isoformat,
    FileState: lambda state: state.value,
    tuple: list,
    dict: dict,
}


@dataclass(frozen=True)
class LedgerEntry:
    event: LedgerEvent
    at: datetime


@dataclass(frozen=True)
class RequestRecord:
    id: int
    file_id: int
    state: RequestState
    attempts: int
    next_attempt_at: datetime
    last_error: str | None


class FileOrder(StrEnum):
    """The order :meth:`~obsflow.catalog.Catalog.find` returns files in."""

    START = "start"
    """By start time, then ID (``obsflow find``); with a tag, from the tag's start index."""
    RECORDED = "recorded"
    """By ID: the order the files were recorded (the REST listing, whose cursor is an ID)."""


class ReadRule(Protocol):
    """Whom a file's data may be shown to, as SQL: the catalog asks only for the condition
    over a file's two columns the rule reads. :class:`obsflow.access.ReadRule` is the one
    implementation, beside its Python form; the catalog does not import the policy."""

    def sql(
        self, proprietary_until: ColumnElement[Any], program: ColumnElement[Any]
    ) -> ColumnElement[bool]: ...


@dataclass(frozen=True)
class KeywordIs:
    """A header keyword the file has with this value: the text as written, or, if the
    text reads as a finite number, that number (``1.5`` matches ``1.50`` and ``1.5e0``)."""

    name: str
    value: str


@dataclass(frozen=True)
class Cone:
    """A circle on the sky: the files whose (ra, dec) are at most ``radius`` degrees from
    (``ra``, ``dec``) (all in degrees, ICRS as the headers give them)."""

    ra: float
    dec: float
    radius: float

    def __post_init__(self) -> None:
        for name, value, low, high in (
            ("ra", self.ra, 0.0, 360.0),
            ("dec", self.dec, -90.0, 90.0),
            ("radius", self.radius, 0.0, 180.0),
        ):
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"cone {name} {value!r} is not within [{low:g}, {high:g}] degrees")


@dataclass(frozen=True)
class FileQuery:
    """What ``obsflow find`` and ``GET /api/v1/files`` ask for; every field narrows the
    result (all are ANDed)."""

    product: str | None = None
    instrument: str | None = None
    since: datetime | None = None
    """Files whose [start, stop] overlaps [since, until] (bounded by the spans: see
    :mod:`obsflow.catalog.spans`)."""
    until: datetime | None = None
    night: date | None = None
    tag: str | None = None
    object: str | None = None
    state: FileState | None = None
    archive_id: str | None = None
    original_name: str | None = None
    include_superseded: bool = True
    limit: int | None = None
    program: str | None = None
    level: int | None = None
    keywords: tuple[KeywordIs, ...] = ()
    """Header keywords the file has, each with its value."""
    filter: str | None = None
    """The filter (the instrument's mapped keyword, e.g. FILTER), exactly."""
    frame_type: str | None = None
    """The frame type (BIAS, FLAT, OBJECT, ...), exactly."""
    exptime_min: float | None = None
    """Exposure time at least this (seconds)."""
    exptime_max: float | None = None
    """Exposure time at most this (seconds)."""
    cone: Cone | None = None
    """Only files whose position is in this circle."""
    readable_by: ReadRule | None = None
    """Only files this rule lets the reader read (see :class:`ReadRule`)."""
    live_only: bool = False
    """Only files that are not rejected and have an archive ID (what the REST API lists)."""
    order: FileOrder = FileOrder.START
    after: int | None = None
    """Only files with a greater ID: a cursor, for :attr:`FileOrder.RECORDED` only."""

    def __post_init__(self) -> None:
        if self.after is not None and self.order is not FileOrder.RECORDED:
            raise ValueError("FileQuery.after is a cursor over IDs: it needs FileOrder.RECORDED")

"""Frozen records the catalog hands out, and the query the ``find`` command builds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from obsflow.states import FileState, LedgerEvent, RequestState


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
    virtual: bool = False
    """Evicted from the cache: its bytes are only in the archive (fetch restores them)."""
    last_access: datetime | None = None
    tags: tuple[str, ...] = ()
    keywords: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO times), as ``find --json`` and ``show --json`` print."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime | date):
                value = value.isoformat()
            elif isinstance(value, FileState):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[name] = value
        return out


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


@dataclass(frozen=True)
class FileQuery:
    """What ``obsflow find`` asks for; every field narrows the result (all are ANDed)."""

    product: str | None = None
    instrument: str | None = None
    since: datetime | None = None
    """Files whose [start, stop] overlaps [since, until]."""
    until: datetime | None = None
    night: date | None = None
    tag: str | None = None
    object: str | None = None
    state: FileState | None = None
    archive_id: str | None = None
    original_name: str | None = None
    include_superseded: bool = True
    limit: int | None = None

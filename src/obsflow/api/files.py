"""``/api/v1/files``: find files, show one (metadata, ledger, provenance), stream its
bytes, and tag it.

Every file is listed, but each with what the caller may see
(:func:`~obsflow.access.visible_fields`): a proprietary file of another program
shows only its public fields and ``"proprietary": true``. Filters on withheld fields
(original name, object, header keywords) match only files the caller may read, so a
filter cannot confirm a guess about a proprietary file.

An archive ID in a path is checked against :data:`ARCHIVE_ID` before anything else,
and resolves only through the catalog: no request names a path on disk.

The ledger (when the file passed each station) and the provenance (which run made it,
from which archive IDs) are shown to anyone, as the observing log and the public
fields are.

``/data`` of a file the caller may not read answers ``403`` (``401`` without a token),
not ``404``: the listing shows that the file exists anyway, and the problem says until
when it is proprietary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated, Any, BinaryIO, Final

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from obsflow.access import Principal, ReadRule, Scope, may_read_data, visible_fields
from obsflow.api import pages
from obsflow.api.auth import Caller, Writer, denied
from obsflow.api.data import ranged
from obsflow.api.params import ARCHIVE_ID, CONE, KEYWORD, NAME, TAG, TEXT, Day, Level, Time, utc
from obsflow.api.problems import ProblemError, documented
from obsflow.api.services import Services, json_response, services
from obsflow.archive.retrieval import InvalidTagError, NotFoundError
from obsflow.catalog.records import Cone, FileOrder, FileQuery, FileRecord, KeywordIs
from obsflow.errors import StorageError
from obsflow.states import FileState, LedgerEvent, RequestState, RunState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["files"])
Svc = Annotated[Services, Depends(services)]

FITS: Final = "application/fits"

ArchiveId = Annotated[
    str, Path(pattern=ARCHIVE_ID, max_length=96, description="The file's archive ID.")
]
TagPath = Annotated[str, Path(pattern=TAG, max_length=64, description="A tag.")]


# ------------------------------------------------------------------ models

KeywordValue = str | int | float | bool | None


class FileOut(BaseModel):
    """A file as the caller may see it: fields withheld from the caller are absent
    (and ``proprietary`` is true); paths are shown to admin tokens only."""

    id: int | None = None
    archive_id: str | None = None
    product: str | None = None
    instrument: str | None = None
    level: int | None = None
    original_name: str | None = None
    source_path: str | None = None
    size: int | None = None
    sha256: str | None = None
    state: FileState | None = None
    reason: str | None = None
    start: datetime | None = None
    stop: datetime | None = None
    start_mjd: float | None = None
    stop_mjd: float | None = None
    night: date | None = None
    exptime: float | None = None
    ra: float | None = None
    dec: float | None = None
    object: str | None = None
    frame_type: str | None = None
    filter: str | None = None
    program: str | None = None
    observer: str | None = None
    telescope: str | None = None
    proprietary_until: datetime | None = None
    cache_path: str | None = None
    archive_path: str | None = None
    quarantine_path: str | None = None
    version: int | None = None
    superseded_by: int | None = None
    made_by_run: int | None = None
    virtual: bool | None = None
    last_access: datetime | None = None
    tags: list[str] | None = None
    keywords: dict[str, KeywordValue] | None = None
    proprietary: bool | None = Field(
        default=None, description="True when fields are withheld until proprietary_until."
    )


class FilePage(BaseModel):
    items: list[FileOut]
    next: str | None = Field(description="The cursor of the next page; null on the last.")


class LedgerOut(BaseModel):
    event: LedgerEvent
    at: datetime


class ProvenanceOut(BaseModel):
    """Which run made the file, from which inputs (archive IDs by input name)."""

    run_id: int
    pipeline: str
    version: int
    state: RunState
    inputs: dict[str, list[str]]


class IngestOut(BaseModel):
    state: RequestState
    attempts: int
    last_error: str | None = Field(default=None, description="Shown to admin tokens only.")


class FileDetail(FileOut):
    ledger: list[LedgerOut] | None = None
    made_by: ProvenanceOut | None = None
    ingest: IngestOut | None = None


class FileTags(BaseModel):
    archive_id: str
    tags: list[str]


class TagCount(BaseModel):
    tag: str
    files: int


# ------------------------------------------------------------------ listing

NameQuery = Annotated[str | None, Query(pattern=NAME, max_length=64)]


@router.get(
    "/files",
    response_model=FilePage,
    summary="Find files",
    responses=documented(401),
)
def list_files(
    who: Caller,
    svc: Svc,
    archive_id: Annotated[str | None, Query(pattern=ARCHIVE_ID, max_length=96)] = None,
    original_name: Annotated[str | None, Query(pattern=TEXT, min_length=1, max_length=255)] = None,
    product: NameQuery = None,
    instrument: NameQuery = None,
    program: NameQuery = None,
    level: Level | None = None,
    state: FileState | None = None,
    night: Annotated[Day | None, Query(description="The night (a local date).")] = None,
    since: Annotated[
        Time | None, Query(description="Files whose [start, stop] overlaps [since, until].")
    ] = None,
    until: Annotated[Time | None, Query(description="See since.")] = None,
    tag: Annotated[str | None, Query(pattern=TAG, max_length=64)] = None,
    object: Annotated[str | None, Query(pattern=TEXT, min_length=1, max_length=128)] = None,
    keyword: Annotated[
        list[Annotated[str, StringConstraints(pattern=KEYWORD, max_length=330)]] | None,
        Query(
            max_length=8,
            description="NAME=VALUE: a header keyword the file has with this value "
            "(numbers compare as numbers); repeat for several.",
        ),
    ] = None,
    filter: Annotated[
        str | None, Query(pattern=TEXT, min_length=1, max_length=32, description="The filter.")
    ] = None,
    frame_type: Annotated[
        str | None,
        Query(pattern=TEXT, min_length=1, max_length=32, description="BIAS, FLAT, OBJECT, ..."),
    ] = None,
    exptime_min: Annotated[
        float | None, Query(ge=0, le=1e9, description="Exposure time at least (seconds).")
    ] = None,
    exptime_max: Annotated[
        float | None, Query(ge=0, le=1e9, description="Exposure time at most (seconds).")
    ] = None,
    cone: Annotated[
        str | None,
        Query(
            pattern=CONE,
            max_length=64,
            description="RA,DEC,RADIUS in degrees: the files at most RADIUS from (RA, DEC), "
            "e.g. 52.0,19.5,0.5 (matches only files whose position the caller may read).",
        ),
    ] = None,
    limit: pages.LimitParam = None,
    cursor: pages.CursorParam = None,
) -> Response:
    """Files in the order they were recorded, a page at a time."""
    circle = _cone(cone)
    size = pages.page_size(limit, svc.page_limit)
    now = svc.now()
    since_utc, until_utc = utc(since), utc(until)
    if since_utc and until_utc and since_utc > until_utc:  # an empty interval: no overlap
        return json_response(FilePage(items=[], next=None))
    words = tuple(_keyword(k) for k in keyword or ())
    # filters on withheld fields match only the files the caller may read
    private = original_name is not None or object is not None or bool(words) or circle is not None
    query = FileQuery(
        archive_id=archive_id,
        original_name=original_name,
        product=product,
        instrument=instrument,
        program=program,
        level=level,
        state=state,
        night=night,
        since=since_utc,
        until=until_utc,
        tag=tag,
        object=object,
        keywords=words,
        filter=filter,
        frame_type=frame_type,
        exptime_min=exptime_min,
        exptime_max=exptime_max,
        cone=circle,
        readable_by=ReadRule.of(who, now) if private else None,
        live_only=True,
        order=FileOrder.RECORDED,
        after=pages.after(cursor),
        limit=size + 1,
    )
    records = svc.site.catalog.find(query)
    shown, cursor_next = pages.next_cursor([r.id for r in records], size)
    items = [_file_out(who, r, now) for r in records[: len(shown)]]
    return json_response(FilePage(items=items, next=cursor_next))


def _cone(text: str | None) -> Cone | None:
    """The :class:`Cone` of a ``cone`` parameter (its pattern has checked it)."""
    if text is None:
        return None
    ra, dec, radius = (float(part) for part in text.split(","))
    return Cone(ra, dec, radius)


def _keyword(text: str) -> KeywordIs:
    name, _, value = text.partition("=")
    return KeywordIs(name, value)


def _file_out(who: Principal, record: FileRecord, now: datetime) -> FileOut:
    return FileOut.model_validate(visible_fields(who, record, now))


# ------------------------------------------------------------------ one file


def _lookup(svc: Services, archive_id: str) -> FileRecord:
    """The live file with this archive ID, or a 404 problem."""
    record = svc.site.catalog.get(archive_id)
    if record is None or record.state is FileState.REJECTED:
        raise ProblemError(404, f"no file with archive ID {archive_id!r}", kind="no-such-file")
    return record


@router.get(
    "/files/{archive_id}",
    response_model=FileDetail,
    summary="One file: metadata, ledger, provenance",
    responses=documented(401, 404),
)
def get_file(archive_id: ArchiveId, who: Caller, svc: Svc) -> Response:
    """The file's metadata as the caller may see it, its latency ledger, its ingest
    request, and which run made it from which inputs (if a pipeline did)."""
    return json_response(file_detail(svc, who, archive_id))


def file_detail(svc: Services, who: Principal, archive_id: str) -> FileDetail:
    """One live file as ``who`` may see it, with its ledger, ingest request and
    provenance (``GET /files/{id}``; also the dashboard's). A :class:`ProblemError` 404
    if there is no such file."""
    record = _lookup(svc, archive_id)
    now = svc.now()
    data: dict[str, Any] = visible_fields(who, record, now)
    data["ledger"] = [{"event": e.event, "at": e.at} for e in svc.site.catalog.ledger(record.id)]
    data["made_by"] = _provenance(svc, record)
    requests = svc.site.queue.requests_for([record.id])
    if requests:
        ingest: dict[str, Any] = {"state": requests[0].state, "attempts": requests[0].attempts}
        if who.may(Scope.ADMIN):
            ingest["last_error"] = requests[0].last_error
        data["ingest"] = ingest
    else:
        data["ingest"] = None
    return FileDetail.model_validate(data)


def _provenance(svc: Services, record: FileRecord) -> dict[str, Any] | None:
    if record.made_by_run is None:
        return None
    run = svc.runs.get(record.made_by_run)
    if run is None:
        return None
    ids = [i for group in run.inputs.values() for i in group]
    names = {r.id: r.archive_id or f"#{r.id}" for r in svc.site.catalog.records(ids)}
    return {
        "run_id": run.id,
        "pipeline": run.pipeline,
        "version": run.version,
        "state": run.state,
        "inputs": {k: [names.get(i, f"#{i}") for i in v] for k, v in run.inputs.items()},
    }


_BYTES = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/files/{archive_id}/data",
    response_class=Response,
    summary="The file's bytes (Range requests welcome)",
    responses={
        200: {"description": "The whole file.", "content": {FITS: _BYTES}},
        206: {"description": "The range asked for.", "content": {FITS: _BYTES}},
        304: {"description": "Not modified (If-None-Match)."},
        **documented(401, 403, 404, 416),
    },
)
def get_file_data(archive_id: ArchiveId, request: Request, who: Caller, svc: Svc) -> Response:
    """Stream the file's bytes; a virtual file (evicted from the cache) is restored from
    the archive first, its checksum verified. The ETag is the file's sha256."""
    record = _lookup(svc, archive_id)
    if not may_read_data(who, record, svc.now()):
        until = record.proprietary_until.isoformat() if record.proprietary_until else "?"
        raise denied(
            who,
            f"{archive_id} is proprietary to program {record.program} until {until}",
            kind="proprietary",
        )
    etag = f'"{record.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private",
        "Vary": "Authorization",
        "Content-Disposition": f'attachment; filename="{archive_id}"',
    }
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return ranged(_open(svc, archive_id), request, headers, FITS, archive_id)


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    return header.strip() == "*" or etag in (
        t.strip().removeprefix("W/") for t in header.split(",")
    )


def _open(svc: Services, archive_id: str) -> BinaryIO:
    """Open the file's bytes in the cache (restoring them from the archive if need be).

    A trim may evict the file between ``fetch`` and ``open``; then fetch again (it
    restores). Once open, an eviction no longer matters: the descriptor keeps the bytes.
    """
    root = svc.site.cache.root.resolve()
    for _attempt in range(3):
        try:
            path = svc.retriever.fetch(archive_id)
        except NotFoundError:
            raise ProblemError(
                404, f"no file with archive ID {archive_id!r}", kind="no-such-file"
            ) from None
        except StorageError as exc:
            log.error("cannot serve %s: %s", archive_id, exc, extra={"archive_id": archive_id})
            raise ProblemError(
                503,
                f"the bytes of {archive_id} cannot be read now; try again later",
                kind="unavailable",
                headers={"Retry-After": "30"},
            ) from None
        resolved = path.resolve()
        if not resolved.is_relative_to(root):  # never: fetch gives cache paths
            log.error("%s: fetch gave %s, outside the cache %s", archive_id, resolved, root)
            raise ProblemError(500, f"the bytes of {archive_id} cannot be served")
        try:
            return resolved.open("rb")
        except FileNotFoundError:
            log.info("%s was evicted while being fetched; fetching again", archive_id)
    raise ProblemError(
        503,
        f"{archive_id} keeps being evicted from the cache; try again",
        kind="unavailable",
        headers={"Retry-After": "5"},
    )


# ------------------------------------------------------------------ tags


@router.get(
    "/tags",
    response_model=list[TagCount],
    summary="Tags in use",
    tags=["tags"],
    responses=documented(401),
)
def list_tags(who: Caller, svc: Svc) -> Response:
    """Every tag with how many files have it."""
    rows = svc.site.catalog.tag_counts()
    body = "[" + ",".join(TagCount(tag=t, files=n).model_dump_json() for t, n in rows) + "]"
    return Response(body, media_type="application/json")


@router.get(
    "/files/{archive_id}/tags",
    response_model=FileTags,
    summary="A file's tags",
    tags=["tags"],
    responses=documented(401, 404),
)
def get_tags(archive_id: ArchiveId, who: Caller, svc: Svc) -> Response:
    record = _lookup(svc, archive_id)
    return json_response(FileTags(archive_id=archive_id, tags=list(record.tags)))


@router.put(
    "/files/{archive_id}/tags/{tag}",
    response_model=FileTags,
    summary="Tag a file",
    tags=["tags"],
    responses=documented(401, 403, 404),
)
def add_tag(archive_id: ArchiveId, tag: TagPath, who: Writer, svc: Svc) -> Response:
    """Add a tag (idempotent). Needs write scope, and a file the caller may read."""
    _writable(svc, archive_id, who)
    _tagging(lambda: svc.retriever.add_tag(archive_id, tag), archive_id)
    return json_response(FileTags(archive_id=archive_id, tags=list(_lookup(svc, archive_id).tags)))


@router.delete(
    "/files/{archive_id}/tags/{tag}",
    response_model=FileTags,
    summary="Untag a file",
    tags=["tags"],
    responses=documented(401, 403, 404),
)
def remove_tag(archive_id: ArchiveId, tag: TagPath, who: Writer, svc: Svc) -> Response:
    """Remove a tag; 404 if the file does not have it. Needs write scope, and a file
    the caller may read."""
    _writable(svc, archive_id, who)
    if not _tagging(lambda: svc.retriever.remove_tag(archive_id, tag), archive_id):
        raise ProblemError(404, f"{archive_id} has no tag {tag!r}", kind="no-such-tag")
    return json_response(FileTags(archive_id=archive_id, tags=list(_lookup(svc, archive_id).tags)))


def _writable(svc: Services, archive_id: str, who: Principal) -> FileRecord:
    record = _lookup(svc, archive_id)
    if not may_read_data(who, record, svc.now()):
        raise denied(who, f"{archive_id} is proprietary to another program", kind="proprietary")
    return record


def _tagging(change: Callable[[], bool], archive_id: str) -> bool:
    try:
        return change()
    except NotFoundError:
        raise ProblemError(
            404, f"no file with archive ID {archive_id!r}", kind="no-such-file"
        ) from None
    except InvalidTagError as exc:
        raise ProblemError(422, str(exc), kind="invalid-request") from None

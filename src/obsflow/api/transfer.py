"""``/api/v1/transfers``: the archive server's side of the transfer protocol.

An observatory agent (:mod:`obsflow.transfer.agent`) sends each frame it has received, under
the archive ID it gave it:

1. ``GET /transfers/{id}?sha256=H`` — what the server has: ``archived`` or ``cached``
   (these very bytes: nothing to send), ``conflict`` (other bytes under that ID),
   ``partial`` with the ``offset`` of the bytes it holds of an interrupted upload, or
   ``absent``.
2. ``PUT /transfers/{id}`` — the bytes from ``Upload-Offset`` on (0, or the offset of
   a partial upload), streamed, with ``Upload-Length`` (the whole size),
   ``Obsflow-Sha256``, ``Obsflow-Name`` (the original file name), and the agent's
   ``Obsflow-Acquired`` and ``Obsflow-Received`` moments (RFC 3339). The server appends
   them to a partial file; once it is whole, checks its sha256 (a mismatch is refused
   with 422 and the partial file removed: the agent sends it again), then receives it
   as any file (the registry recognises it, the header is validated and mapped) under
   the agent's archive ID, if it is the one the server's own registry gives the file
   (:mod:`obsflow.receipt.identity`: the ID, the header's instrument, the token's
   programs; else 422 ``refused`` with nothing kept), into the cache with its ingest
   request in one transaction,
   and waits up to ``transfer.confirm_seconds`` for its ingestors to archive it. The
   answer says ``archived`` or ``cached`` (the agent asks again later).

The same ID with the same bytes again is a success that writes nothing; with other
bytes, 409 ``conflict`` (never overwritten). With more than ``transfer.max_queue`` files
waiting for the archive, uploads are answered 503 with ``Retry-After``. Both need a
token with write scope.

Bounds: an ``Upload-Length`` over ``transfer.max_bytes`` (413) or over the cache's free
space less ``transfer.reserve_bytes`` (507) is refused before any byte is written; an
upload that sends nothing for ``transfer.idle_seconds`` is cut (408, its ID freed, what
came kept to resume from); partial uploads untouched for ``transfer.partial_seconds``
are removed, at start-up and then as uploads come.

The partial file, the offsets and the checksum are :mod:`obsflow.api.upload`'s, which
the workers' outputs (:mod:`obsflow.api.workers`) share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import time
from dataclasses import replace
from enum import StrEnum
from pathlib import Path as FilePath
from typing import Annotated, Final

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, Field

from obsflow.access import Principal, Scope
from obsflow.api import upload as uploads
from obsflow.api.auth import Writer
from obsflow.api.files import ArchiveId
from obsflow.api.params import Time, utc
from obsflow.api.problems import ProblemError, documented
from obsflow.api.services import Services, json_response, services
from obsflow.api.upload import FILE_NAME, MAX_SIZE, SHA256
from obsflow.catalog.holdings import Holdings
from obsflow.errors import RecognitionError
from obsflow.receipt import identity
from obsflow.receipt.receiver import Delivery, Outcome
from obsflow.site import Site
from obsflow.states import FileState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["transfers"])
Svc = Annotated[Services, Depends(services)]

UPLOADS: Final = ".uploads"  # under the cache (the same file system): partial files
CONFIRM_POLL: Final = 0.25
"""Seconds between an upload's questions to the catalog while it waits for the archive."""


class TransferStatus(StrEnum):
    ABSENT = "absent"  # nothing of it here
    PARTIAL = "partial"  # part of an interrupted upload: resume at ``offset``
    CACHED = "cached"  # received, waiting for the archive
    ARCHIVED = "archived"  # in the archive, its checksum verified
    CONFLICT = "conflict"  # this archive ID holds other bytes


class TransferState(BaseModel):
    archive_id: str
    state: TransferStatus
    offset: int = Field(0, description="Bytes the server holds of a partial upload.")
    detail: str | None = None


Sha256Query = Annotated[
    str, Query(pattern=SHA256, description="The sha256 of the bytes the agent has (hex).")
]


@router.get(
    "/transfers/{archive_id}",
    response_model=TransferState,
    summary="What the server has of a file an agent would send",
    responses=documented(401, 403),
)
def transfer_state(archive_id: ArchiveId, sha256: Sha256Query, who: Writer, svc: Svc) -> Response:
    """``archived``/``cached``: the server has these bytes (send nothing);
    ``conflict``: other bytes under this ID; ``partial``: resume at ``offset``;
    ``absent``: send it all. Only for IDs the token may send (its instruments and
    programs): for others, 403."""
    _may_ask(svc, who, archive_id)
    return json_response(_state(svc, archive_id, sha256))


@router.put(
    "/transfers/{archive_id}",
    response_model=TransferState,
    summary="Upload a file under its archive ID (resumable)",
    responses=documented(401, 403, 408, 409, 413, 507),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def upload(
    archive_id: ArchiveId,
    request: Request,
    who: Writer,
    svc: Svc,
    name: Annotated[str, Header(alias="Obsflow-Name", pattern=FILE_NAME)],
    sha256: Annotated[str, Header(alias="Obsflow-Sha256", pattern=SHA256)],
    length: Annotated[int, Header(alias="Upload-Length", ge=0, le=MAX_SIZE)],
    offset: Annotated[int, Header(alias="Upload-Offset", ge=0, le=MAX_SIZE)] = 0,
    acquired: Annotated[Time | None, Header(alias="Obsflow-Acquired")] = None,
    received: Annotated[Time | None, Header(alias="Obsflow-Received")] = None,
) -> Response:
    """Append the body to what the server holds of this file from ``Upload-Offset``;
    when the file is whole, verify it and receive it. See the module's docstring."""
    settings = svc.site.settings.transfer
    if offset > length:
        raise ProblemError(422, f"Upload-Offset {offset} is past Upload-Length {length}")
    try:
        instrument = svc.site.registry.instrument_of(svc.site.registry.recognise(name).product)
    except RecognitionError as exc:
        raise ProblemError(422, f"{name}: refused: {exc.detail}", kind="refused") from None
    if not who.may_send(instrument.name):
        raise ProblemError(
            403, f"this token may not send frames of {instrument.name}", kind="forbidden"
        )
    uploads.check_room(
        svc.site.settings.cache / UPLOADS,
        length,
        offset,
        most=settings.max_bytes,
        reserve=settings.reserve_bytes,
    )  # (before any byte is written)
    await anyio.to_thread.run_sync(request.app.state.sweeper.maybe)
    waiting = await anyio.to_thread.run_sync(_waiting, svc)
    if waiting > settings.max_queue:
        raise ProblemError(
            503,
            f"the archive is busy: {waiting} files wait for it (more than {settings.max_queue})",
            kind="busy",
            headers={"Retry-After": "2"},
        )
    state = await anyio.to_thread.run_sync(_asked, svc, who, archive_id, sha256)
    if state.state is TransferStatus.CONFLICT:
        raise ProblemError(409, state.detail or "conflict", kind="conflict")
    if state.state in (TransferStatus.CACHED, TransferStatus.ARCHIVED):
        return json_response(state)  # these bytes are here already: nothing to write
    uploads.check_offset(state.offset, offset, archive_id)
    with uploads.claimed(svc.uploads, archive_id, archive_id):
        part = _part(svc, archive_id, sha256)
        size, digest = await uploads.append(
            request, part, offset, length, idle=settings.idle_seconds
        )
        if size < length:
            return json_response(
                TransferState(archive_id=archive_id, state=TransferStatus.PARTIAL, offset=size)
            )
        programs = None if who.may(Scope.ADMIN) or not who.programs else who.programs
        delivery = Delivery(archive_id, sha256, utc(acquired), utc(received), programs=programs)
        state = await anyio.to_thread.run_sync(_receive, svc, part, name, delivery, digest)
    if state.state is TransferStatus.CACHED:
        state = await _confirm(svc, state, settings.confirm_seconds)
    return json_response(state, status_code=200)


# ------------------------------------------------------------------ the steps


def sweeper(site: Site) -> uploads.Sweeper:
    """What removes the partial uploads untouched for ``transfer.partial_seconds``."""
    settings = site.settings
    return uploads.Sweeper(settings.cache / UPLOADS, settings.transfer.partial_seconds)


def _may_ask(svc: Services, who: Principal, archive_id: str) -> None:
    """403 unless ``who`` may send the file under ``archive_id``: of the file held there,
    its instrument and program; of an ID no file holds, an instrument whose template
    gives it. (Else the state would be an oracle: whether some bytes are another
    program's file.)"""
    here = Holdings(svc.site.catalog).of(archive_id)
    if here is not None:
        programs = who.programs if who.programs and not who.may(Scope.ADMIN) else None
        allowed = here.instrument is not None and who.may_send(here.instrument)
        allowed = allowed and (programs is None or here.program in programs)
    else:
        instruments = identity.instruments_of(archive_id, svc.site.registry.instruments.values())
        if not instruments:
            raise ProblemError(
                422,
                f"{archive_id} is not an archive ID: no instrument's template gives it",
                kind="refused",
            )
        allowed = any(who.may_send(i) for i in instruments)
    if not allowed:
        raise ProblemError(
            403, f"this token may not send a file under {archive_id}", kind="forbidden"
        )


def _asked(svc: Services, who: Principal, archive_id: str, sha256: str) -> TransferState:
    _may_ask(svc, who, archive_id)
    return _state(svc, archive_id, sha256)


def _state(svc: Services, archive_id: str, sha256: str) -> TransferState:
    here = Holdings(svc.site.catalog).of(archive_id)
    if here is not None:
        if here.sha256 != sha256:  # (never a part of either sha256: no oracle)
            return TransferState(
                archive_id=archive_id,
                state=TransferStatus.CONFLICT,
                detail=f"{archive_id} holds other bytes: never overwritten",
            )
        archived = here.state is FileState.ARCHIVED
        status = TransferStatus.ARCHIVED if archived else TransferStatus.CACHED
        return TransferState(archive_id=archive_id, state=status)
    held = uploads.held(_part(svc, archive_id, sha256))
    if held is None:
        return TransferState(archive_id=archive_id, state=TransferStatus.ABSENT)
    return TransferState(archive_id=archive_id, state=TransferStatus.PARTIAL, offset=held)


def _waiting(svc: Services) -> int:
    return svc.site.queue.depth()


def _part(svc: Services, archive_id: str, sha256: str) -> FilePath:
    """Where the partial upload of these bytes lives (named by the bytes too: another
    upload under the same ID, with other bytes, is another partial file)."""
    return svc.site.settings.cache / UPLOADS / f"{archive_id}.{sha256[:16]}.part"


def _receive(
    svc: Services, part: FilePath, name: str, delivery: Delivery, digest: hashlib._Hash | None
) -> TransferState:
    """Verify the whole file and receive it under its archive ID (a worker thread)."""
    archive_id = delivery.archive_id
    uploads.verify(part, delivery.sha256, digest, archive_id)
    folder = part.with_suffix(".d")  # the file under its own name, for recognition
    folder.mkdir(exist_ok=True)
    path = folder / name
    part.rename(path)
    try:  # (verified: receipt moves it into the cache rather than copying it again)
        result = svc.site.receiver.receive(path, replace(delivery, verified=True))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if result.outcome is Outcome.CACHED:
        if svc.wake is not None:
            svc.wake.set()  # the ingestors, the tracker
        return TransferState(archive_id=archive_id, state=TransferStatus.CACHED)
    if result.outcome is Outcome.DUPLICATE:  # these bytes are here under another ID
        return _state(svc, result.archive_id or archive_id, delivery.sha256)
    if result.outcome in (Outcome.REJECTED, Outcome.IGNORED, Outcome.REFUSED):
        raise ProblemError(422, f"{name}: refused: {result.reason}", kind="refused")
    raise ProblemError(
        503, f"{name}: the server could not take it now: {result.reason}", kind="busy",
        headers={"Retry-After": "5"},
    )  # fmt: skip


async def _confirm(svc: Services, state: TransferState, seconds: float) -> TransferState:
    """Wait (up to ``seconds``) until the ingestors have archived the file: woken by this
    process's ingestors the moment they archive it (:mod:`obsflow.archive.notice`), and
    asking the catalog every :data:`CONFIRM_POLL` seconds meanwhile (an ingestor in
    another process tells this one nothing)."""
    holdings = Holdings(svc.site.catalog)

    def archived() -> bool:
        return holdings.is_archived(state.archive_id)

    deadline = time.monotonic() + seconds
    with svc.site.archived.waiting(state.archive_id) as told:
        while True:
            if await anyio.to_thread.run_sync(archived):  # (the event loop never waits on SQL)
                return TransferState(archive_id=state.archive_id, state=TransferStatus.ARCHIVED)
            left = deadline - time.monotonic()
            if left <= 0:
                return state
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(told.wait(), min(left, CONFIRM_POLL))
            told.clear()  # (told once: later waits are the polls')

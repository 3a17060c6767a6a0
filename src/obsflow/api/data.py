"""A file's bytes over HTTP: one byte range (RFC 9110 §14) or all of them, streamed
from a file that is already open.

Why not Starlette's ``FileResponse`` (which does ranges too): it opens the file by
its path *after* the handler has returned. Between the two, the cache may evict the
file (a rename and an unlink), which would turn a good request into a server error
or a cut-off body. :class:`OpenFileResponse` streams from a descriptor the handler
opened, which outlives an eviction.

Ranges: a single ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` gets ``206`` with
``Content-Range``; one that starts past the end gets ``416`` (the handler answers
that as a problem). A Range header this module does not serve -- another unit,
bad syntax, several ranges -- is ignored, as RFC 9110 allows, and the whole file
is sent (``200``). ``If-Range`` with another ETag also sends the whole file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Final

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from obsflow.api.problems import ProblemError

CHUNK: Final = 256 * 1024
_SPEC = re.compile(r"bytes=(\d{0,19})-(\d{0,19})", re.ASCII)


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class UnsatisfiableError(Exception):
    """The range starts past the end of the file (or the file is empty)."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one range ``header`` asks of a file of ``size`` bytes, or None for all of
    it (no header, or one to ignore). Raises :class:`UnsatisfiableError`."""
    if header is None:
        return None
    match = _SPEC.fullmatch(header.strip())
    if match is None:
        return None  # another unit, several ranges, or not a range at all: ignored
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise UnsatisfiableError
        return ByteRange(max(size - n, 0), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignored
    if start >= size:
        raise UnsatisfiableError
    return ByteRange(start, min(end, size - 1))


class OpenFileResponse(Response):
    """Stream ``length`` bytes of an open binary file from ``offset``; closes it after."""

    def __init__(
        self,
        file: BinaryIO,
        *,
        status_code: int,
        offset: int,
        length: int,
        headers: dict[str, str],
        media_type: str,
    ) -> None:
        super().__init__(
            status_code=status_code,
            headers={**headers, "content-length": str(length)},
            media_type=media_type,
        )
        self.file = file
        self.offset = offset
        self.length = length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            start = {"type": "http.response.start", "status": self.status_code}
            await send({**start, "headers": self.raw_headers})
            if scope.get("method", "GET").upper() == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await anyio.to_thread.run_sync(self.file.seek, self.offset)
            left = self.length
            while left > 0:
                chunk = await anyio.to_thread.run_sync(self.file.read, min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.file.name}: shorter than {self.offset + self.length}")
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
            if self.length == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.file.close()


def ranged(
    file: BinaryIO, request: Request, headers: dict[str, str], media_type: str, what: str
) -> OpenFileResponse:
    """The answer to a GET of an open file: all of it (200) or the one range asked for
    (206; ``If-Range`` with another ETag than ``headers``' sends all), or a 416 problem
    naming ``what`` (the file is closed then). The response closes the file after."""
    try:
        size = os.fstat(file.fileno()).st_size
        if_range = request.headers.get("if-range")
        asked = request.headers.get("range") if if_range in (None, headers.get("ETag")) else None
        wanted = parse_range(asked, size)
    except UnsatisfiableError:
        file.close()
        raise ProblemError(
            416,
            f"range {asked!r} is outside {what} ({size} bytes)",
            kind="range-not-satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        ) from None
    except BaseException:
        file.close()
        raise
    if wanted is None:
        return OpenFileResponse(
            file, status_code=200, offset=0, length=size, headers=headers, media_type=media_type
        )
    return OpenFileResponse(
        file,
        status_code=206,
        offset=wanted.start,
        length=wanted.length,
        headers={**headers, "Content-Range": f"bytes {wanted.start}-{wanted.end}/{size}"},
        media_type=media_type,
    )

"""A file's bytes into the server: the resumable, verified upload that the transfer
protocol (:mod:`obsflow.api.transfer`, an agent's frames) and the workers' outputs
(:mod:`obsflow.api.workers`, a run's products) share.

The bytes of one upload go to a *partial file* on the server. A client asks how many
bytes the server holds (:func:`held`) and sends the rest with ``Upload-Offset`` (where
they start) and ``Upload-Length`` (the whole size); an upload cut midway leaves the
partial file, and the next request resumes from its end. Once it is whole, its sha256
is checked against the one the client declared (:func:`verify`): a mismatch removes it
(the client sends it all again). One upload of a file at a time (:func:`claimed`).

The client's half is :func:`obsflow.transfer.client.send_resumable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from fastapi import Request
from starlette.requests import ClientDisconnect

from obsflow.api.problems import ProblemError
from obsflow.api.services import Uploads

log = logging.getLogger(__name__)

SHA256: Final = r"^[0-9a-f]{64}$"
FILE_NAME: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}$"
"""A file's name, never a path: no ``/``, no leading dot (``..``, hidden files)."""
MAX_SIZE: Final = 1 << 40  # 1 TiB: more is a mistake, not a frame
HASH_CHUNK: Final = 1 << 20


def held(part: Path) -> int | None:
    """The bytes the server holds of an upload (None: nothing)."""
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return None


def check_offset(holds: int, offset: int, label: str) -> None:
    """409 ``wrong-offset`` (with ``Upload-Offset`` saying where) unless the client
    sends from the end of what the server holds."""
    if holds != offset:
        raise ProblemError(
            409,
            f"the server holds {holds} bytes of {label}, not {offset}: resume from there",
            kind="wrong-offset",
            headers={"Upload-Offset": str(holds)},
        )


@contextmanager
def claimed(uploads: Uploads, key: str, label: str) -> Iterator[None]:
    """While one request uploads ``key``, another is answered 409 ``in-progress``."""
    if not uploads.claim(key):
        raise ProblemError(
            409, f"{label} is being uploaded already", kind="in-progress",
            headers={"Retry-After": "1"},
        )  # fmt: skip
    try:
        yield
    finally:
        uploads.release(key)


def check_room(folder: Path, length: int, offset: int, *, most: int, reserve: int) -> None:
    """Refuse, before any byte is written, an upload declaring more than ``most`` bytes
    (413 ``too-large``) or more than the free space of ``folder``'s file system minus
    ``reserve`` (507 ``no-room``)."""
    if length > most:
        raise ProblemError(
            413,
            f"Upload-Length {length:,} is more than this server takes ({most:,} bytes: "
            "transfer.max_bytes)",
            kind="too-large",
        )
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if length - offset > free - reserve:
        raise ProblemError(
            507,
            f"Upload-Length {length:,} does not fit: {free:,} bytes free, of which "
            f"{reserve:,} are kept in reserve (transfer.reserve_bytes)",
            kind="no-room",
            headers={"Retry-After": "60"},
        )


def sweep(folder: Path, older_than: float, now: float | None = None) -> int:
    """Remove the partial uploads (and leftovers) in ``folder`` untouched for
    ``older_than`` seconds; return how many. Never raises (a sweep is housekeeping)."""
    limit = (time.time() if now is None else now) - older_than
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.lstat().st_mtime >= limit:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        except OSError:
            continue
    if removed:
        log.info(
            "removed %d partial upload(s) older than %g s from %s", removed, older_than, folder
        )
    return removed


class Sweeper:
    """Sweeps a folder of partial uploads at most once per ``every`` seconds, when asked
    (at start-up, and by each upload request: a server that takes no uploads adds none)."""

    def __init__(self, folder: Path, older_than: float, every: float = 60.0) -> None:
        self.folder = folder
        self.older_than = older_than
        self.every = min(every, older_than)
        self._last = -math.inf
        self._lock = threading.Lock()

    def maybe(self) -> int:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.every:
                return 0
            self._last = now
        return sweep(self.folder, self.older_than)


async def append(
    request: Request, part: Path, offset: int, length: int, *, idle: float | None = None
) -> tuple[int, hashlib._Hash | None]:
    """Append the request's body to ``part`` from ``offset``; return its size after
    (short of ``length`` when the client went away midway: it resumes from there) and,
    for an upload sent in one piece, the sha256 of its bytes so far (a resumed one is
    hashed by :func:`verify` from the file). A client that sends nothing for ``idle``
    seconds is cut: 408 ``idle`` with ``Upload-Offset`` (what was received stays, to
    resume from)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256() if offset == 0 else None
    size = offset
    with part.open("r+b" if offset else "wb") as out:
        out.truncate(offset)
        out.seek(offset)
        try:
            async for chunk in _idle_cut(request.stream(), idle):
                if size + len(chunk) > length:  # what this request added goes
                    out.truncate(offset)
                    if offset == 0:
                        part.unlink(missing_ok=True)
                    raise ProblemError(
                        413, f"the body is longer than Upload-Length {length}", kind="too-long"
                    )
                out.write(chunk)  # (to the page cache: too quick to be worth a thread)
                if digest is not None:
                    digest.update(chunk)
                size += len(chunk)
        except ClientDisconnect:
            log.info("upload of %s cut at %d of %d bytes", part.name, size, length)
        except TimeoutError:
            log.warning(
                "upload of %s idle for %g s: cut at %d of %d bytes", part.name, idle, size, length
            )
            raise ProblemError(
                408,
                f"nothing was sent for {idle:g} s (transfer.idle_seconds): the upload is cut "
                f"at {size:,} of {length:,} bytes; resume from there",
                kind="idle",
                headers={"Upload-Offset": str(size), "Connection": "close"},
            ) from None
    return size, digest


async def _idle_cut(chunks: AsyncIterator[bytes], idle: float | None) -> AsyncIterator[bytes]:
    """``chunks``, raising TimeoutError when the next takes more than ``idle`` seconds.
    One timeout moved on at each chunk (a frame comes in over a hundred chunks: a task
    per chunk, as ``asyncio.wait_for`` makes, cost more than writing it)."""
    if idle is None:
        async for chunk in chunks:
            yield chunk
        return
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(idle) as deadline:
        async for chunk in chunks:
            deadline.reschedule(None)  # (not while the chunk is written and hashed)
            yield chunk
            deadline.reschedule(loop.time() + idle)


def verify(part: Path, sha256: str, digest: hashlib._Hash | None, label: str) -> None:
    """Check the whole ``part`` has ``sha256`` (blocking: call it on a worker thread);
    else remove it and answer 422 ``checksum-mismatch`` (the client sends it again)."""
    if digest is None:  # a resumed upload: hash what the parts add up to
        digest = hashlib.sha256()
        with part.open("rb") as src:
            while chunk := src.read(HASH_CHUNK):
                digest.update(chunk)
    got = digest.hexdigest()
    if got != sha256:
        part.unlink(missing_ok=True)
        raise ProblemError(
            422,
            f"{label}: the bytes received have sha256 {got[:12]}…, not {sha256[:12]}…; "
            "send it again",
            kind="checksum-mismatch",
        )

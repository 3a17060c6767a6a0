"""The transfer protocol's client: the agent's side of ``/api/v1/transfers``, over HTTP.

:meth:`Client.send` returns once the archive server has archived a frame: it asks the
server what it has (nothing is sent twice), streams what is missing from where an
interrupted upload stopped, and reads the server's answer. Everything else is a
:class:`TransferError` whose subclass tells the agent (:mod:`obsflow.transfer.agent`)
what to do next::

    TransferError      cannot connect, reset, cut, timeout, 5xx, an upload that never completes
    ├── BusyError      503 busy, or 409 upload in progress: wait ``retry_after`` seconds
    ├── PendingError   the server has it cached, not archived yet
    ├── RefusedError   422: a wrong checksum, a file the server does not take
    ├── ConflictError  409: the server holds other bytes under this archive ID
    └── DeniedError    401/403: the server does not accept the agent's token

The server's side, and the protocol itself, is :mod:`obsflow.api.transfer`. The
resumable upload underneath (ask what the server holds, send the rest from there) is
:func:`send_resumable`, which a remote worker's outputs use too
(:mod:`obsflow.processing.serverhost`); its server's half is :mod:`obsflow.api.upload`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

from obsflow.errors import StorageError

CHUNK: Final = 1 << 20


class TransferError(StorageError):
    """A frame could not be transferred this time; the subclass says what to do next."""


class BusyError(TransferError):
    """The server asked to be left alone for ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PendingError(TransferError):
    """The server has the frame cached, not yet archived."""


class RefusedError(TransferError):
    """The server refused the bytes (a wrong checksum, a file it does not take)."""


class ConflictError(TransferError):
    """The server holds other bytes under this archive ID."""


class DeniedError(TransferError):
    """The server does not accept the agent's token."""


@dataclass(frozen=True)
class Outgoing:
    """One frame to send, as the agent's catalog knows it."""

    archive_id: str
    path: Path
    name: str
    sha256: str
    size: int
    acquired: datetime | None
    received: datetime | None


class Client:
    """The transfer protocol over HTTP, for one server (thread-safe: httpx pools)."""

    def __init__(self, server: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=f"{self.server}/api/v1",
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_keepalive_connections=8),
        )

    def close(self) -> None:
        self.http.close()

    def state(self, archive_id: str, sha256: str) -> dict[str, Any]:
        response = self._call("GET", f"/transfers/{archive_id}", params={"sha256": sha256})
        return self._json(response, archive_id)

    def send(self, out: Outgoing) -> None:
        """Return once the server has archived ``out``; else raise a TransferError."""
        send_resumable(
            self._call,
            f"/transfers/{out.archive_id}",
            out.path,
            size=out.size,
            sha256=out.sha256,
            resume_at=lambda: self._resume_at(out, self.state(out.archive_id, out.sha256)),
            done=lambda answer: self._resume_at(out, self._json(answer, out.archive_id)) is None,
            headers={
                "Obsflow-Name": out.name,
                **({"Obsflow-Acquired": out.acquired.isoformat()} if out.acquired else {}),
                **({"Obsflow-Received": out.received.isoformat()} if out.received else {}),
            },
            label=out.archive_id,
        )

    # ---------------------------------------------------------------- helpers

    def _resume_at(self, out: Outgoing, state: dict[str, Any]) -> int | None:
        """None when the server has archived the frame; else where to send from."""
        status = state.get("state")
        if status == "archived":
            return None
        if status == "cached":
            raise PendingError(f"{out.archive_id}: cached at the server, not archived yet")
        if status == "conflict":
            raise ConflictError(str(state.get("detail") or f"{out.archive_id}: other bytes"))
        if status == "partial":
            return int(state.get("offset") or 0)
        return 0

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise TransferError(f"{self.server}: {type(exc).__name__}: {exc}") from exc

    def _json(self, response: httpx.Response, archive_id: str) -> dict[str, Any]:
        status = response.status_code
        if status == 200:
            body = response.json()
            assert isinstance(body, dict)
            return body
        detail = problem_detail(response)
        if status in (401, 403):
            raise DeniedError(f"{self.server} refused the agent's token ({status}): {detail}")
        if status == 409 and problem_kind(response) == "conflict":
            raise ConflictError(detail)
        if status == 409 and problem_kind(response) == "in-progress":
            raise BusyError(detail, _retry_after(response, 1.0))
        if status == 422:
            raise RefusedError(f"{archive_id}: {detail}")
        if status == 503:
            raise BusyError(f"{self.server} is busy: {detail}", _retry_after(response, 5.0))
        raise TransferError(f"{archive_id}: {self.server} answered {status}: {detail}")


def send_resumable(
    call: Callable[..., httpx.Response],
    url: str,
    path: Path,
    *,
    size: int,
    sha256: str,
    resume_at: Callable[[], int | None],
    done: Callable[[httpx.Response], bool],
    headers: Mapping[str, str],
    label: str,
    tries: int = 5,
) -> None:
    """Send ``path`` (``size`` bytes with ``sha256``) to ``url`` by the resumable upload
    (:mod:`obsflow.api.upload`): ask the server where to start (``resume_at``: None when
    it holds the bytes already), ``PUT`` them from there with ``Upload-Offset`` and
    ``Upload-Length``, and read the answer (``done``: whether the server has them all;
    it raises for a refusal). A cut upload, or a ``409 wrong-offset`` (the server's
    offset moved: a concurrent attempt), asks again, ``tries`` times at most; then
    :class:`TransferError` naming ``label``. ``call`` makes a request (and turns a
    network error into the caller's own error)."""
    for _ in range(tries):
        offset = resume_at()
        if offset is None:
            return
        response = call(
            "PUT",
            url,
            content=_read_from(path, offset),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size - offset),
                "Upload-Length": str(size),
                "Upload-Offset": str(offset),
                "Obsflow-Sha256": sha256,
                **headers,
            },
        )
        if response.status_code == 409 and problem_kind(response) == "wrong-offset":
            continue
        if done(response):
            return
    raise TransferError(f"{label}: the upload did not complete after {tries} tries")


def _read_from(path: Path, offset: int) -> Iterator[bytes]:
    with path.open("rb") as src:
        src.seek(offset)
        while chunk := src.read(CHUNK):
            yield chunk


def problem_kind(response: httpx.Response) -> str:
    """The kind of a problem answer: ``wrong-offset`` of ``urn:obsflow:problem:wrong-offset``
    (:mod:`obsflow.api.problems`; also the last part of a URL type); "" for none."""
    try:
        body = response.json()
    except ValueError:
        return ""
    kind = body.get("type", "") if isinstance(body, dict) else ""
    return re.split(r"[:/]", str(kind))[-1]


def problem_detail(response: httpx.Response) -> str:
    """What a problem answer says went wrong (its ``detail``), else its text's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)[:200]


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.1, float(response.headers.get("Retry-After", default)))
    except ValueError:
        return default

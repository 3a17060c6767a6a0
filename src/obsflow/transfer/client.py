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

The server's side, and the protocol itself, is :mod:`obsflow.api.transfer`.
"""

from __future__ import annotations

from collections.abc import Iterator
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
        for _ in range(5):  # the offset moved under us (a cut, a concurrent attempt)
            state = self.state(out.archive_id, out.sha256)
            offset = self._resume_at(out, state)
            if offset is None:
                return
            response = self._call(
                "PUT",
                f"/transfers/{out.archive_id}",
                content=_read_from(out.path, offset),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(out.size - offset),
                    "Upload-Length": str(out.size),
                    "Upload-Offset": str(offset),
                    "Obsflow-Sha256": out.sha256,
                    "Obsflow-Name": out.name,
                    **({"Obsflow-Acquired": out.acquired.isoformat()} if out.acquired else {}),
                    **({"Obsflow-Received": out.received.isoformat()} if out.received else {}),
                },
            )
            if response.status_code == 409 and _kind(response) == "wrong-offset":
                continue
            if self._resume_at(out, self._json(response, out.archive_id)) is None:
                return
        raise TransferError(f"{out.archive_id}: the upload did not complete after 5 tries")

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
        detail = _detail(response)
        if status in (401, 403):
            raise DeniedError(f"{self.server} refused the agent's token ({status}): {detail}")
        if status == 409 and _kind(response) == "conflict":
            raise ConflictError(detail)
        if status == 409 and _kind(response) == "in-progress":
            raise BusyError(detail, _retry_after(response, 1.0))
        if status == 422:
            raise RefusedError(f"{archive_id}: {detail}")
        if status == 503:
            raise BusyError(f"{self.server} is busy: {detail}", _retry_after(response, 5.0))
        raise TransferError(f"{archive_id}: {self.server} answered {status}: {detail}")


def _read_from(path: Path, offset: int) -> Iterator[bytes]:
    with path.open("rb") as src:
        src.seek(offset)
        while chunk := src.read(CHUNK):
            yield chunk


def _kind(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    kind = body.get("type", "") if isinstance(body, dict) else ""
    return str(kind).rsplit("/", 1)[-1]


def _detail(response: httpx.Response) -> str:
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

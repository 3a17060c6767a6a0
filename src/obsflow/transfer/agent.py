"""The agent's side of the transfer: each frame to the archive server, exactly once.

At the observatory, ``obsflow run --role agent`` receives frames as any site does
(triggers → receipt → its own cache and catalog, with an ingest request in the same
transaction). Its ingest queue is its **outbox**: durable, leased, retried with
exponential back-off and jitter, and it survives restarts. A :class:`Transferer` is an
ingestor whose archive is the server (:mod:`obsflow.api.transfer` has the protocol):
for each leased frame it asks the server what it has (nothing is sent twice), streams
what is missing from where an interrupted upload stopped, and marks the frame archived
only when the server says it has archived those very bytes. So a frame leaves the agent
(``transfer.keep_seconds``) only after the server confirmed it.

What goes wrong, and what the agent does::

    cannot connect, reset, cut, timeout, 5xx   → again after a back-off, without end
    503 busy (Retry-After)                     → again after what the server asked
    cached, not archived yet                   → ask again soon
    401/403 (a bad token)                      → again after a back-off (logged as an error)
    422 refused (checksum, a file it refuses)  → again; after transfer.max_refusals, the
                                                 frame is quarantined here with the reason
    409 conflict (other bytes under its ID)    → quarantined here at once
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import httpx
from sqlalchemy import func, select

from obsflow.archive.cache import Cache
from obsflow.archive.ingest import Ingestor, IngestReport
from obsflow.archive.storage import Storage
from obsflow.catalog import Catalog, schema
from obsflow.catalog.queue import Lease
from obsflow.errors import StorageError
from obsflow.receipt.receiver import Clock, utcnow
from obsflow.settings import Ingest as IngestSettings
from obsflow.settings import Transfer as TransferSettings
from obsflow.states import LedgerEvent, RequestState

log = logging.getLogger(__name__)
CHUNK: Final = 1 << 20
FOREVER: Final = 2**31 - 1  # attempts: a network that fails is waited for, never given up


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


class Transferer(Ingestor):
    """An ingestor of the agent's outbox whose archive is the server."""

    def __init__(
        self,
        catalog: Catalog,
        storage: Storage,
        cache: Cache,
        settings: IngestSettings,
        transfer: TransferSettings,
        client: Client,
        quarantine: Path,
        *,
        clock: Clock = utcnow,
    ) -> None:
        super().__init__(catalog, storage, cache, settings, clock=clock)
        self.catalog = catalog
        self.transfer = transfer
        self.client = client
        self.quarantine = quarantine

    def run_once(self, limit: int | None = None) -> IngestReport:
        """One frame at a time (not a batch, as into local storage): each is confirmed
        the moment the server has it, and the transfer workers share the outbox."""
        return super().run_once(limit or 1)

    def _archive(self, lease: Lease) -> str:
        ledger = {entry.event: entry.at for entry in self.catalog.ledger(lease.file_id)}
        record = self.catalog.get_by_id(lease.file_id)
        name = record.original_name if record is not None else lease.archive_id
        self.client.send(
            Outgoing(
                archive_id=lease.archive_id,
                path=self.cache.path(lease.cache_path),
                name=name,
                sha256=lease.sha256,
                size=lease.size,
                acquired=ledger.get(LedgerEvent.ACQUIRED),
                received=ledger.get(LedgerEvent.RECEIVED),
            )
        )
        return Cache.key(lease.instrument, lease.night, lease.archive_id)

    def _flush(self) -> None:
        """Nothing: the server made the frame durable before it said so."""

    def _failed(self, lease: Lease, exc: Exception, report: IngestReport) -> None:
        error = str(exc)
        backoff, most, attempts = self.settings.backoff_seconds, None, FOREVER
        if isinstance(exc, BusyError):
            backoff = most = exc.retry_after
        elif isinstance(exc, PendingError):
            backoff = most = 1.0
        elif isinstance(exc, RefusedError):
            attempts = self.transfer.max_refusals
        elif isinstance(exc, ConflictError):
            attempts = 1
        elif isinstance(exc, DeniedError):
            log.error("%s", exc)
        state = self.queue.fail(
            lease,
            error,
            self.clock(),
            max_attempts=attempts,
            backoff_seconds=backoff,
            backoff_max_seconds=most if most is not None else self.settings.backoff_max_seconds,
        )
        level = logging.INFO if isinstance(exc, PendingError | BusyError) else logging.WARNING
        log.log(level, "transfer of %s: %s (now %s)", lease.archive_id, error, state)
        report.errors.append((lease.archive_id, error))
        if state is RequestState.FAILED:
            self._quarantine(lease, error)

    def _quarantine(self, lease: Lease, reason: str) -> None:
        """Keep a copy of a frame the server will not take, with the reason beside it."""
        folder = self.quarantine / self.clock().strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / lease.archive_id
        try:
            shutil.copyfile(self.cache.path(lease.cache_path), target)
        except OSError as exc:
            log.error("cannot quarantine %s: %s", lease.archive_id, exc)
            return
        note: dict[str, object] = {"archive_id": lease.archive_id, "reason": "transfer"}
        note |= {"detail": reason, "sha256": lease.sha256, "size": lease.size}
        note["at"] = self.clock().isoformat()
        target.with_name(target.name + ".reason.json").write_text(json.dumps(note, indent=2))
        log.error("quarantined %s: the server will not take it: %s", lease.archive_id, reason)


@dataclass(frozen=True)
class Outbox:
    """The state of an agent's outbox, for ``obsflow status``."""

    depth: int  # frames not yet archived at the server
    oldest: datetime | None  # when the oldest of them was queued
    oldest_name: str | None
    last_success: datetime | None  # when the server last confirmed a frame
    bytes_per_second: float  # confirmed in the last ``window`` seconds
    window: float

    def to_json(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "oldest": self.oldest.isoformat() if self.oldest else None,
            "oldest_name": self.oldest_name,
            "last_success": self.last_success.isoformat() if self.last_success else None,
            "bytes_per_second": round(self.bytes_per_second, 1),
            "window_seconds": self.window,
        }


def outbox(catalog: Catalog, now: datetime, window: float = 300.0) -> Outbox:
    """Depth, oldest waiting frame, last confirmation and throughput of the outbox."""
    requests, files, ledger = schema.ingest_requests, schema.files, schema.ledger
    waiting = requests.c.state.in_([RequestState.PENDING.value, RequestState.LEASED.value])
    archived = ledger.c.event == LedgerEvent.ARCHIVED.value
    since = now - timedelta(seconds=window)
    with catalog.read() as conn:
        depth = conn.execute(select(func.count()).select_from(requests).where(waiting)).scalar()
        oldest = conn.execute(
            select(requests.c.created_at, files.c.original_name)
            .join(files, files.c.id == requests.c.file_id)
            .where(waiting)
            .order_by(requests.c.created_at)
            .limit(1)
        ).first()
        last = conn.execute(select(func.max(ledger.c.at)).where(archived)).scalar()
        sent = conn.execute(
            select(func.coalesce(func.sum(files.c.size), 0))
            .join(ledger, ledger.c.file_id == files.c.id)
            .where(archived, ledger.c.at >= since)
        ).scalar()
    return Outbox(
        depth=int(depth or 0),
        oldest=oldest.created_at if oldest else None,
        oldest_name=oldest.original_name if oldest else None,
        last_success=last,
        bytes_per_second=float(sent or 0) / window,
        window=window,
    )


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

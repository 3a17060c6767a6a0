"""The agent's side of the transfer: each frame to the archive server, exactly once.

At the observatory, ``obsflow run --role agent`` receives frames as any site does
(triggers → receipt → its own cache and catalog, with an ingest request in the same
transaction). Its ingest queue is its **outbox**: durable, leased, retried with
exponential back-off and jitter, and it survives restarts. A :class:`Transferer` is an
ingestor whose archive is the server (:mod:`obsflow.api.transfer` has the protocol,
:mod:`obsflow.transfer.client` its client): for each leased frame it asks the server
what it has (nothing is sent twice), streams what is missing from where an interrupted
upload stopped, and marks the frame archived only when the server says it has archived
those very bytes. So a frame leaves the agent (``transfer.keep_seconds``) only after the
server confirmed it.

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
from pathlib import Path
from typing import Final

from obsflow.archive.cache import Cache
from obsflow.archive.ingest import Ingestor, IngestReport
from obsflow.archive.storage import Storage
from obsflow.catalog import Catalog
from obsflow.catalog.queue import Lease
from obsflow.receipt.receiver import Clock, utcnow
from obsflow.settings import Ingest as IngestSettings
from obsflow.settings import Transfer as TransferSettings
from obsflow.states import LedgerEvent, RequestState
from obsflow.transfer.client import (
    BusyError,
    Client,
    ConflictError,
    DeniedError,
    Outgoing,
    PendingError,
    RefusedError,
    TransferError,
)

__all__ = [
    "BusyError",
    "Client",
    "ConflictError",
    "DeniedError",
    "Outgoing",
    "PendingError",
    "RefusedError",
    "TransferError",
    "Transferer",
]

log = logging.getLogger(__name__)
FOREVER: Final = 2**31 - 1  # attempts: a network that fails is waited for, never given up


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
        self.client.send(
            Outgoing(
                archive_id=lease.archive_id,
                path=self.cache.path(lease.cache_path),
                name=lease.original_name,
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

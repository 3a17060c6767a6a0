"""The ingestor: takes requests from the durable queue and moves files into the archive.

For each leased request: copy the cached file into archive storage
(``{instrument}/{night}/{archive_id}``; atomic and fsynced by the storage), read the
stored copy back and compare its sha256, and only then mark the file ``archived``
(with its ledger stamp) in the catalog. A failure is recorded on the request and
retried after a back-off; the file stays in the cache and its request in the queue.

The files of a batch are archived a few at once (:data:`AT_ONCE`): their copies,
fsyncs and read-backs wait on the disk, not on Python, so while one waits another
copies or hashes, and the file system commits fsyncs that come together at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

from obsflow.archive.cache import Cache
from obsflow.archive.notice import ArchivedNotice
from obsflow.archive.storage import Storage
from obsflow.catalog import Catalog
from obsflow.catalog.queue import IngestQueue, Lease
from obsflow.errors import StorageError
from obsflow.receipt.receiver import Clock, utcnow
from obsflow.settings import Ingest as IngestSettings

log = logging.getLogger(__name__)
AT_ONCE: Final = 4
"""Files of a batch archived at once by one ingestor (each a copy, fsync and read-back)."""


@dataclass
class IngestReport:
    archived: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(archive ID, error) of each attempt that failed."""

    def add(self, other: IngestReport) -> None:
        self.archived += other.archived
        self.errors += other.errors


class Ingestor:
    def __init__(
        self,
        catalog: Catalog,
        storage: Storage,
        cache: Cache,
        settings: IngestSettings,
        *,
        clock: Clock = utcnow,
        owner: str | None = None,
        notice: ArchivedNotice | None = None,
    ) -> None:
        """``notice``: told which files each batch archived (in this process, those who
        wait for them wake at once)."""
        self.queue = IngestQueue(catalog)
        self.storage = storage
        self.cache = cache
        self.settings = settings
        self.clock = clock
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.notice = notice

    def run_once(self, limit: int | None = None) -> IngestReport:
        """Lease one batch of due requests and carry each out; report what happened."""
        report = IngestReport()
        leases = self.queue.lease(
            self.owner, self.clock(), self.settings.lease_seconds, limit or self.settings.batch
        )
        done: list[tuple[Lease, str]] = []
        for lease, outcome in zip(leases, self._archive_all(leases), strict=True):
            if isinstance(outcome, str):
                done.append((lease, outcome))
            else:
                self._failed(lease, outcome, report)
        if done:
            try:
                self._flush()
            except StorageError as exc:
                for lease, _ in done:
                    self._fail(lease, str(exc), report)
                done = []
        self.queue.complete(done, self.clock())
        if self.notice is not None and done:
            self.notice.tell(lease.archive_id for lease, _ in done)
        for lease, _ in done:
            log.info("archived %s", lease.archive_id, extra={"archive_id": lease.archive_id})
            report.archived.append(lease.archive_id)
        return report

    def _archive_all(self, leases: list[Lease]) -> list[str | StorageError | OSError]:
        """:meth:`_archive` of each lease, up to :data:`AT_ONCE` at a time: its key, or
        what it raised."""

        def attempt(lease: Lease) -> str | StorageError | OSError:
            try:
                return self._archive(lease)
            except (StorageError, OSError) as exc:
                return exc

        if len(leases) < 2:
            return [attempt(lease) for lease in leases]
        with ThreadPoolExecutor(min(AT_ONCE, len(leases)), "archive") as pool:
            return list(pool.map(attempt, leases))

    def _flush(self) -> None:
        self.storage.flush()

    def _failed(self, lease: Lease, exc: Exception, report: IngestReport) -> None:
        """An attempt at ``lease`` raised ``exc``."""
        self._fail(lease, str(exc), report)

    def _fail(self, lease: Lease, error: str, report: IngestReport) -> None:
        state = self.queue.fail(
            lease,
            error,
            self.clock(),
            max_attempts=self.settings.max_attempts,
            backoff_seconds=self.settings.backoff_seconds,
            backoff_max_seconds=self.settings.backoff_max_seconds,
        )
        log.warning(
            "ingest of %s failed (attempt %d, now %s): %s",
            lease.archive_id,
            lease.attempts,
            state,
            error,
            extra={"archive_id": lease.archive_id},
        )
        report.errors.append((lease.archive_id, error))

    def _archive(self, lease: Lease) -> str:
        key = Cache.key(lease.instrument, lease.night, lease.archive_id)
        retry = lease.attempts > 1  # only an earlier attempt can have stored it already
        if retry and self.storage.exists(key) and self.storage.sha256(key) == lease.sha256:
            return key  # an earlier attempt stored it and died before recording it
        source = self.cache.path(lease.cache_path)
        try:
            self.storage.put(source, key)
        except (StorageError, OSError):
            if not source.is_file():
                raise StorageError(
                    f"{lease.archive_id}: its cached copy {source} is missing"
                ) from None
            raise
        stored = self.storage.sha256(key)
        if stored != lease.sha256:
            self.storage.delete(key)
            raise StorageError(
                f"{lease.archive_id}: the archived copy at {self.storage.describe(key)} has "
                f"sha256 {stored[:12]}…, expected {lease.sha256[:12]}…; removed it"
            )
        return key

    def run(
        self,
        stop: threading.Event,
        idle: Callable[[], bool] | None = None,
        poll_seconds: float = 0.2,
        wake: threading.Event | None = None,
    ) -> IngestReport:
        """Work until ``stop`` is set (or, with ``idle``, until a pass finds nothing and
        ``idle()`` says there will be nothing more). When the queue is empty, wait for
        ``wake`` (set when new requests are committed in this process) or the poll."""
        total = IngestReport()
        while not stop.is_set():
            report = self.run_once()
            total.add(report)
            if not report.archived and not report.errors:
                if idle is not None and idle():
                    break
                if wake is None:
                    stop.wait(poll_seconds)
                elif wake.wait(poll_seconds):
                    wake.clear()
        return total

    def retry_failed(self) -> int:
        return self.queue.retry_failed(self.clock())

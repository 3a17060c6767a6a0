"""Where a site's parts are assembled: settings → registry, catalog, cache, storage,
receiver, ingestor. Every command and test builds its site here, so the wiring is
in one readable place and every dependency is passed in, never global.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from obsflow.cache import Cache
from obsflow.catalog import Catalog
from obsflow.catalog.queue import IngestQueue
from obsflow.errors import CatalogUnavailableError
from obsflow.ingest import Ingestor, IngestReport
from obsflow.intake import Intake
from obsflow.receipt import Clock, Outcome, Received, Receiver, utcnow
from obsflow.registry import Registry, load_registry
from obsflow.retrieval import Retriever
from obsflow.settings import Settings
from obsflow.states import RequestState
from obsflow.storage import LocalStorage, Storage

log = logging.getLogger(__name__)


@dataclass
class Site:
    settings: Settings
    registry: Registry
    catalog: Catalog
    cache: Cache
    storage: Storage
    receiver: Receiver
    clock: Clock

    def ingestor(self, owner: str | None = None) -> Ingestor:
        return Ingestor(
            self.catalog,
            self.storage,
            self.cache,
            self.settings.ingest,
            clock=self.clock,
            owner=owner,
        )

    def retriever(self) -> Retriever:
        """Fetch, trim, pin and tag over this site's catalog, cache and archive."""
        return Retriever(
            self.catalog, self.cache, self.storage, self.settings.cache_policy, self.clock
        )

    @property
    def queue(self) -> IngestQueue:
        return IngestQueue(self.catalog)

    def close(self) -> None:
        self.catalog.close()


def open_site(
    settings: Settings,
    *,
    storage: Storage | None = None,
    clock: Clock = utcnow,
    registry: Registry | None = None,
    retry_seconds: float = 0.0,
) -> Site:
    """Assemble a site from its settings; ``storage`` may be swapped (it is a seam).

    ``retry_seconds``: a catalog that cannot be reached now (its server still starting)
    is tried again for this long, with a log line each time, before giving up; the
    daemon and workers ask for this at start-up, a command does not.
    """
    registry = registry or load_registry(settings.registry)
    catalog = open_catalog(settings.catalog_url, retry_seconds)
    cache = Cache(settings.cache)
    cache.clean_temp()
    storage = storage or LocalStorage(settings.archive)
    storage.recover()
    receiver = Receiver(settings, registry, catalog, cache, clock=clock)
    return Site(settings, registry, catalog, cache, storage, receiver, clock)


def open_catalog(url: str, retry_seconds: float = 0.0) -> Catalog:
    """Open the catalog at ``url``, trying again for ``retry_seconds`` while it is
    unavailable (a connection refused, a lock held too long)."""
    deadline = time.monotonic() + retry_seconds
    pause = 0.5
    while True:
        try:
            return Catalog.open(url)
        except CatalogUnavailableError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.warning("%s; trying again for up to %.0f s", exc, left)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 5.0)


@dataclass
class IngestSummary:
    received: list[Received] = field(default_factory=list)
    ingest: IngestReport = field(default_factory=IngestReport)

    def of(self, outcome: Outcome) -> list[Received]:
        return [r for r in self.received if r.outcome is outcome]


def ingest_paths(
    site: Site,
    paths: Iterable[Path],
    *,
    wait: bool = True,
    on_received: Callable[[Received], None] = lambda r: None,
) -> IngestSummary:
    """Receive ``paths`` with the receipt workers and, with ``wait``, run ingestors until
    every file received here is archived or has failed an attempt (it stays queued)."""
    summary = IngestSummary()
    receipt_done = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def settled() -> bool:
        if not receipt_done.is_set():
            return False
        ids = [r.file_id for r in summary.of(Outcome.CACHED) if r.file_id is not None]
        return all(
            q.state in (RequestState.DONE, RequestState.FAILED) or q.last_error is not None
            for q in site.queue.requests_for(ids)
        )

    committed = threading.Event()  # set by the intake: new files are queued

    def ingest_worker() -> IngestReport:
        return site.ingestor().run(stop, idle=settled, poll_seconds=0.05, wake=committed)

    def received(result: Received) -> None:
        with lock:
            summary.received.append(result)
        on_received(result)

    workers = site.settings.workers
    with ThreadPoolExecutor(workers.ingest, thread_name_prefix="ingest") as ingest_pool:
        futures = [ingest_pool.submit(ingest_worker) for _ in range(workers.ingest)] if wait else []
        try:
            intake = Intake(
                site.receiver, workers=workers.receipt, on_result=received, committed=committed
            )
            for path in paths:
                intake.offer(path)
            intake.close()
        finally:
            receipt_done.set()
            if not wait:
                stop.set()
        for future in futures:
            summary.ingest.add(future.result())
    return summary

"""A site, and the one place where its parts are assembled.

A site is one directory holding settings, registry, cache, archive, quarantine and
catalog; ``obsflow init DIR`` (:func:`init_site`) lays one out::

    DIR/
      obsflow.yaml      settings (paths, catalog URL, workers, receipt, ingest)
      registry/         instruments, products, pipelines, profiles (YAML)
      incoming/         where instruments write (watched by triggers)
      cache/            files between receipt and the archive
      archive/          permanent storage: {instrument}/{night}/{archive_id}
      quarantine/       refused files, each with a .reason.json
      catalog.db        the SQLite catalog (unless catalog.url says otherwise), made at
                        once, at the newest schema

:func:`open_site` assembles an opened site from its settings: registry, catalog,
cache, storage, receiver, ingestor. Every command and test builds its site here, so
the wiring is in one readable place and every dependency is passed in, never global.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from obsflow.archive.cache import Cache
from obsflow.archive.fixity import Auditor
from obsflow.archive.ingest import Ingestor, IngestReport
from obsflow.archive.notice import ArchivedNotice
from obsflow.archive.retrieval import Retriever
from obsflow.archive.storage import LocalStorage, Storage
from obsflow.catalog import Catalog
from obsflow.catalog.queue import IngestQueue
from obsflow.errors import CatalogError, CatalogUnavailableError, SiteError
from obsflow.receipt.intake import Intake
from obsflow.receipt.receiver import Clock, Outcome, Received, Receiver, utcnow
from obsflow.registry import Registry, load_registry
from obsflow.settings import SETTINGS_FILE, Settings, load_settings
from obsflow.states import RequestState

log = logging.getLogger(__name__)


DEFAULT_CATALOG_URL = "sqlite:///catalog.db"
SETTINGS_TEMPLATE = """\
# obsflow site settings. Relative paths are relative to this directory.
paths:
  incoming: incoming      # where instruments write new frames
  cache: cache            # fast local storage between receipt and the archive
  archive: archive        # permanent storage: {instrument}/{night}/{archive_id}
  quarantine: quarantine  # refused files, each with a .reason.json beside it
  registry: registry      # instruments, products, pipelines, profiles (YAML)
  work: work              # pipeline runs' work directories
  logs: logs              # run logs

catalog:
  # SQLite in this directory by default; for PostgreSQL e.g.
  # postgresql+psycopg://obsflow@dbhost/obsflow
  url: sqlite:///catalog.db

workers:
  receipt: 2              # files received at once
  ingest: 2               # files moved into the archive at once
  runs: 2                 # pipeline runs executed at once

receipt:
  settle_seconds: 1.0     # a file is complete when unchanged for this long
  max_wait_seconds: 300
  unmatched: ignore       # a name matching no product: ignore | quarantine
  remove_source: false    # delete the source once it is safely cached
  follow_symlinks: false   # true: take symlinks pointing inside the offered directories
  max_header_bytes: 4194304  # a FITS header longer than this (no END card) is refused

ingest:
  max_attempts: 5         # then the file is marked failed (obsflow retry puts it back)
  lease_seconds: 120      # work of a crashed ingestor is retried after this
  backoff_seconds: 2      # first retry delay; doubles each attempt
  backoff_max_seconds: 600
  batch: 16
  link_cache: false       # true: the archive entry is a read-only hard link to the cached file
                          #   (cache and archive on one file system; else a copy)

daemon:
  reconcile_seconds: 60   # scan watched directories for files no trigger offered
  status_seconds: 2       # how often `obsflow run` records its health for `obsflow status`
  start_seconds: 120      # at start-up, keep trying this long to open an unreachable catalog

processing:
  executor: local         # local: a pool of `workers.runs` runs at once | inline: one by one
                          # | celery: on `obsflow worker`s, through the broker
  broker: null            # celery: redis://HOST:6379/0 or amqp://USER:PW@HOST// (or OBSFLOW_BROKER)
  queue: obsflow          # celery: the queue of runs whose pipeline and profile name none
  parallel_steps: 2       # independent steps of one run at once
  max_attempts: 3         # a run whose executor died this often is marked failed
  lease_seconds: 60       # a run is retried this long after its executor died
  keep_work: false        # keep a successful run's work directory (failed ones are kept)
  warm: true              # Python tool steps ({python} -m MODULE) forked from a warm process
                          #   that imported processing.warm_modules once (false: fresh interpreters)

containers:               # steps with `image:` run through a Docker Engine API (Docker or Podman)
  host: null              # e.g. unix:///run/podman/podman.sock (or OBSFLOW_CONTAINER_HOST; else
                          #   DOCKER_HOST, then the standard sockets)
  user: null              # UID[:GID] steps run as (default: obsflow's user; nobody if that is root)
  stop_seconds: 5         # after a step's timeout, SIGTERM then SIGKILL this much later

cache_policy:
  budget_bytes: null      # e.g. 500000000000; over it, least recently used archived files
  low_water_bytes: null   #   are evicted down to this (default 90 % of the budget): they
  trim_seconds: 60        #   become virtual, and come back from the archive when read

api:
  listen: null            # e.g. 127.0.0.1:8080: `obsflow run` serves the REST API there
  page_limit: 1000        # the most files or runs in one page of a listing

transfer:
  role: all               # all: one machine | agent: observatory, uploads to `server` | server
  server: null            # agent: the archive server, e.g. https://archive.example.org
  token: null             # agent: a write token of the server's (better: OBSFLOW_TOKEN)
  workers: 4              # agent: frames uploaded at once
  confirm_seconds: 10     # an upload waits this long for the server to archive the frame
  keep_seconds: null      # agent: delete frames this long after the server archived them
  max_queue: 1000         # server: more files than this waiting to be archived: 503, retry later
  max_bytes: 1099511627776  # server: a larger Upload-Length is refused (413)
  reserve_bytes: 1073741824  # server: cache space never given to uploads (else 507)
  partial_seconds: 86400  # server: partial uploads untouched this long are removed
  idle_seconds: 60        # server: an upload sending nothing this long is cut (408)
"""


def example_registry() -> Path:
    """The example registry shipped with obsflow (an imaging camera, OFCAM)."""
    return Path(str(resources.files("obsflow") / "examples" / "registry"))


def init_site(
    directory: Path, *, registry: Path | None = None, catalog_url: str | None = None
) -> Path:
    """Create a site in ``directory`` (empty or new), with its catalog (``catalog_url``,
    else SQLite in the site) at the newest schema, so that the site is complete before
    the daemon, a command or a worker opens it; return its absolute path."""
    directory = directory.resolve()
    if (directory / SETTINGS_FILE).exists():
        raise SiteError(f"{directory}: already an obsflow site ({SETTINGS_FILE} exists)")
    directory.mkdir(parents=True, exist_ok=True)
    text = SETTINGS_TEMPLATE
    if catalog_url is not None:
        text = text.replace(f"url: {DEFAULT_CATALOG_URL}", f"url: {json.dumps(catalog_url)}")
    (directory / SETTINGS_FILE).write_text(text)
    shutil.copytree(registry or example_registry(), directory / "registry", dirs_exist_ok=True)
    settings = load_settings(directory)
    for path in (settings.incoming, settings.cache, settings.archive, settings.quarantine):
        path.mkdir(parents=True, exist_ok=True)
    try:
        Catalog.open(settings.catalog_url).close()
    except CatalogError:
        (directory / SETTINGS_FILE).unlink()  # not a site yet: `obsflow init` may be run again
        raise
    return directory


@dataclass
class Site:
    settings: Settings
    registry: Registry
    catalog: Catalog
    cache: Cache
    storage: Storage
    receiver: Receiver
    clock: Clock
    archived: ArchivedNotice = field(default_factory=ArchivedNotice)
    """Told by this process's ingestors which files they archived (uploads wait on it)."""

    def ingestor(self, owner: str | None = None) -> Ingestor:
        return Ingestor(
            self.catalog,
            self.storage,
            self.cache,
            self.settings.ingest,
            clock=self.clock,
            owner=owner,
            notice=self.archived,
        )

    def auditor(self) -> Auditor:
        """Fixity audits of this site's archive (``obsflow verify``, the daemon)."""
        return Auditor(self.catalog, self.storage, self.cache, clock=self.clock)

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
    storage = storage or LocalStorage(settings.archive, link=settings.ingest.link_cache)
    storage.recover()
    watched = [
        settings.site / trigger.directory
        for instrument in registry.instruments.values()
        for trigger in instrument.triggers
    ]
    receiver = Receiver(settings, registry, catalog, cache, clock=clock, roots=watched)
    return Site(settings, registry, catalog, cache, storage, receiver, clock)


def open_catalog(url: str, retry_seconds: float = 0.0) -> Catalog:
    """Open the catalog at ``url``, trying again for ``retry_seconds`` while it is
    unavailable (a connection refused, a lock held too long)."""
    deadline = time.monotonic() + retry_seconds
    pause = 0.5
    while True:
        try:
            return Catalog.open(url, upgrade=False)  # an upgrade is explicit: obsflow migrate
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
    roots: Sequence[Path] = (),
) -> IngestSummary:
    """Receive ``paths`` with the receipt workers and, with ``wait``, run ingestors until
    every file received here is archived or has failed an attempt (it stays queued).
    ``roots``: the directories the paths were found in (a symbolic link may point inside
    them when ``receipt.follow_symlinks`` is on)."""
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
                site.receiver.within(roots),
                workers=workers.receipt,
                on_result=received,
                committed=committed,
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

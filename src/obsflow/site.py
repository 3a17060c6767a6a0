"""A site: one directory holding settings, registry, cache, archive, quarantine, catalog.

``obsflow init DIR`` lays one out::

    DIR/
      obsflow.yaml      settings (paths, catalog URL, workers, receipt, ingest)
      registry/         instruments, products, pipelines, profiles (YAML)
      incoming/         where instruments write (watched by triggers)
      cache/            files between receipt and the archive
      archive/          permanent storage: {instrument}/{night}/{archive_id}
      quarantine/       refused files, each with a .reason.json
      catalog.db        the SQLite catalog (unless catalog.url says otherwise), made at
                        once, at the newest schema
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from obsflow.catalog import Catalog
from obsflow.errors import CatalogError, SiteError
from obsflow.settings import SETTINGS_FILE, load_settings

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

ingest:
  max_attempts: 5         # then the file is marked failed (obsflow retry puts it back)
  lease_seconds: 120      # work of a crashed ingestor is retried after this
  backoff_seconds: 2      # first retry delay; doubles each attempt
  backoff_max_seconds: 600
  batch: 16

daemon:
  reconcile_seconds: 60   # scan watched directories for files no trigger offered
  status_seconds: 2       # how often `obsflow run` records its health for `obsflow status`
  start_seconds: 120      # at start-up, keep trying this long to open an unreachable catalog

processing:
  executor: local         # local: a pool of `workers.runs` runs at once | inline: one by one
  parallel_steps: 2       # independent steps of one run at once
  max_attempts: 3         # a run whose executor died this often is marked failed
  lease_seconds: 60       # a run is retried this long after its executor died
  keep_work: false        # keep a successful run's work directory (failed ones are kept)

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
  workers: 2              # agent: frames uploaded at once
  confirm_seconds: 10     # an upload waits this long for the server to archive the frame
  keep_seconds: null      # agent: delete frames this long after the server archived them
  max_queue: 1000         # server: more files than this waiting to be archived: 503, retry later
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

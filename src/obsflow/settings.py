"""The site's settings: read once from ``SITE/obsflow.yaml`` into one frozen object.

Nothing else in obsflow reads the environment or a settings file; the CLI resolves
the site directory (``--site``, else ``$OBSFLOW_SITE``, else the current directory),
calls :func:`load_settings` and passes the result down.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.engine import make_url

from obsflow.errors import Problem, SettingsError, SiteError
from obsflow.registry import yamlfile

SETTINGS_FILE = "obsflow.yaml"


class _Section(BaseModel):
    # the docstring under each field is its meaning: the settings reference
    # (``obsflow settings``, :func:`reference`) is made from them
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Paths(_Section):
    """Where the site keeps its files; relative paths are relative to the site."""

    incoming: Path = Path("incoming")
    """Where frames arrive (the directory watch and the reconcile scan look here)."""
    cache: Path = Path("cache")
    """The cache: received files, and what pipelines read and write."""
    archive: Path = Path("archive")
    """Permanent storage: archived files, by instrument and night."""
    quarantine: Path = Path("quarantine")
    """Refused files, each beside a note of the reason."""
    registry: Path = Path("registry")
    """The registry's YAML files (instruments, products, pipelines, profiles)."""
    work: Path = Path("work")
    """Pipeline runs' work directories (one per run; kept when a run fails)."""
    logs: Path = Path("logs")
    """Run logs (``logs/runs/RUN.log``)."""


class Catalog(_Section):
    url: str = "sqlite:///catalog.db"
    """SQLAlchemy URL; a relative SQLite path is relative to the site."""


class Workers(_Section):
    receipt: int = Field(default=2, ge=1, le=256)
    """Files received (read, checked, checksummed) at once."""
    ingest: int = Field(default=2, ge=1, le=256)
    """Files copied into the archive at once."""
    runs: int = Field(default=2, ge=1, le=256)
    """Pipeline runs executed at once by the local executor."""


class Receipt(_Section):
    settle_seconds: float = Field(default=1.0, ge=0)
    """A file counts as complete when its size and mtime have not changed for this long."""
    max_wait_seconds: float = Field(default=300.0, gt=0)
    """Give up on a file that is still changing after this long (it is tried again later)."""
    unmatched: Literal["ignore", "quarantine"] = "ignore"
    """What to do with a file whose name matches no product."""
    remove_source: bool = False
    """Delete the source once it is safely in the cache or quarantine."""
    follow_symlinks: bool = False
    """Receive a symbolic link whose target lies inside the directories files are offered
    from (incoming, watched, named to ``obsflow ingest``); off: refuse every link."""
    max_header_bytes: int = Field(default=4 << 20, ge=2880, le=1 << 30)
    """The most bytes one FITS header may take before its END card; a file whose header
    runs on past it is refused (``invalid-fits``) without being read further."""


class Ingest(_Section):
    max_attempts: int = Field(default=5, ge=1)
    """An ingest request that failed this many times is failed for good (``obsflow
    retry`` queues it again)."""
    lease_seconds: float = Field(default=120.0, gt=0)
    """An ingestor holds a request this long; a request whose ingestor died is taken
    again after it."""
    backoff_seconds: float = Field(default=2.0, ge=0)
    """The wait before a failed request is tried again, doubled at each attempt..."""
    backoff_max_seconds: float = Field(default=600.0, ge=0)
    """...up to this."""
    batch: int = Field(default=16, ge=1, le=1000)
    """Requests an ingestor takes at a time."""
    link_cache: bool = False
    """When the cache and the archive share a file system: the archive's entry is a hard
    link to the cached file, made read-only (0444), instead of a copy (no bytes written
    twice; one copy on the medium under two names). Elsewhere a copy, as when off."""


class Daemon(_Section):
    reconcile_seconds: float = Field(default=60.0, gt=0)
    """How often ``obsflow run`` scans the watched directories for files no trigger offered."""
    status_seconds: float = Field(default=2.0, gt=0)
    """How often the daemon (and a worker) records its status, the health of its triggers
    and workers, for ``obsflow status``: its heartbeat, in ``daemon.json`` and in the
    catalog (a process silent for 3 of these is shown lost)."""
    forget_processes_seconds: float = Field(default=86400.0, gt=0)
    """A process (daemon, worker) stopped or lost this long ago is forgotten: its row in
    the catalog's ``processes`` is deleted when a process starts or stops."""
    start_seconds: float = Field(default=120.0, ge=0)
    """At start-up the daemon (and a worker) tries this long to open a catalog it cannot
    reach yet (the database server still starting, a migration by another process)."""


class Processing(_Section):
    executor: Literal["local", "inline", "celery"] = "local"
    """``local``: runs execute on a pool of worker processes of the daemon; ``inline``: one
    at a time, in line; ``celery``: on Celery workers (``obsflow worker``) through
    ``broker``."""
    broker: str | None = Field(default=None, pattern=r"^(redis|rediss|amqp|amqps|pyamqp)://\S*$")
    """The Celery broker's URL for ``executor: celery`` (``redis://HOST:6379/0`` or
    ``amqp://USER:PASSWORD@HOST:5672//``); ``$OBSFLOW_BROKER`` overrides it."""
    queue: str = Field(default="obsflow", pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
    """The Celery queue of runs whose pipeline and profile name none."""
    dispatch_seconds: float = Field(default=3600.0, gt=0)
    """A run handed to the broker this long ago and still queued is handed to it again
    (a broker that lost it); the claim makes a second delivery harmless."""
    parallel_steps: int = Field(default=2, ge=1, le=64)
    """Independent steps of one run executed at once."""
    max_attempts: int = Field(default=3, ge=1)
    """A run whose executor died this many times is marked failed."""
    lease_seconds: float = Field(default=60.0, gt=0)
    """A run's executor renews its lease this often (its heartbeat); a run whose lease
    has expired (its executor died) is queued again or failed."""
    keep_work: bool = False
    """Keep a successful run's work directory (a failed run's is always kept)."""
    nice: int = Field(default=10, ge=0, le=19)
    """The CPU niceness of the processes that execute runs (the local pool's, a Celery
    worker's) and so of their steps: the frames arriving meanwhile go first. 0: as the
    daemon."""
    ionice: Literal["idle", "low", "normal"] = "low"
    """Their I/O priority: ``low`` (best effort, its lowest level), ``idle`` (only when
    no other process reads or writes the disk), ``normal`` (as the daemon)."""
    warm: bool = True
    """Run the steps that are Python tool commands (``{python} -m MODULE ...``) in a child
    forked from a warm process of each run worker that has imported ``warm_modules`` once,
    instead of a fresh interpreter (~1 s of imports per step saved); the child behaves as
    the subprocess would (argv, cwd, env, logs, exit status, its own process group).
    false: every step is a fresh subprocess."""
    warm_modules: tuple[str, ...] = (
        "numpy",
        "scipy.ndimage",
        "astropy.io.fits",
        "astropy.table",
        "astropy.wcs",
        "obsflow.tools.ccd",
        "obsflow.tools.sources",
    )
    """The modules the warm process imports once, at start (a module that fails to import
    is left out, with a warning); a step of any other module runs warm too, importing it
    in its own child."""


class Containers(_Section):
    """Where container steps (a step with ``image:``) run: a Docker Engine API."""

    host: str | None = None
    """The API's URL (``unix:///run/podman/podman.sock``, ``tcp://HOST:2375``);
    ``$OBSFLOW_CONTAINER_HOST`` overrides it; None: ``$DOCKER_HOST``, else the standard
    sockets (Docker's, then Podman's)."""
    user: str | None = Field(default=None, pattern=r"^[0-9]+(:[0-9]+)?$")
    """``UID[:GID]`` steps run as; None: the user obsflow runs as, or ``nobody``
    (65534) when that is root."""
    stop_seconds: float = Field(default=5.0, ge=0)
    """After a timeout, seconds between SIGTERM and SIGKILL to the container."""


class CachePolicy(_Section):
    budget_bytes: int | None = Field(default=None, ge=0)
    """The cache's size budget; over it, the least recently used archived files are
    evicted (they become virtual). None: no budget."""
    low_water_bytes: int | None = Field(default=None, ge=0)
    """Evict down to this (default: 90 % of the budget)."""
    trim_seconds: float = Field(default=60.0, gt=0)
    """How often the daemon checks the budget."""

    @property
    def low_water(self) -> int | None:
        if self.budget_bytes is None:
            return None
        if self.low_water_bytes is not None:
            return min(self.low_water_bytes, self.budget_bytes)
        return self.budget_bytes * 9 // 10


DEFAULT_CACHE_BYTES: Final = 10 * 1024**3
"""A worker without shared storage (``obsflow worker --server``) keeps up to this many
bytes of fetched inputs."""
DEFAULT_LISTEN: Final = "127.0.0.1:8000"
"""Where ``obsflow serve`` listens when neither ``--listen`` nor ``api.listen`` says."""


class Api(_Section):
    listen: str | None = Field(default=None, pattern=r"^[\w.\-:\[\]]+:\d{1,5}$")
    """HOST:PORT where ``obsflow run`` serves the REST API; None: it serves none
    (``obsflow serve`` and ``--listen`` still can)."""
    page_limit: int = Field(default=1000, ge=1, le=100_000)
    """The most files or runs one page of a listing holds."""


class Role(StrEnum):
    """What ``obsflow run`` does at a site (see :mod:`obsflow.transfer.agent`)."""

    AGENT = "agent"  # observatory: triggers → receipt → the outbox to the server
    SERVER = "server"  # archive: uploads → cache → ingest → tracker → pipelines → API
    ALL = "all"  # one machine: both, without HTTP between them


class Fixity(_Section):
    """Fixity audits: archived files re-read from the medium and their sha256 checked
    (``obsflow verify``; the daemon too, when ``rate_mb_s`` is above 0)."""

    rate_mb_s: float = Field(default=0.0, ge=0)
    """The daemon audits the archive continuously at most this fast (MB/s; 0: it does
    not, and audits are run by ``obsflow verify``, e.g. from cron)."""
    cycle_days: float = Field(default=30.0, gt=0)
    """The daemon audits a file again once its last audit is this old."""
    batch: int = Field(default=100, ge=1, le=10000)
    """Files the daemon picks per turn (never audited first, then the least recently)."""
    look_seconds: float = Field(default=60.0, gt=0)
    """When no file is due, the daemon looks again after this long."""


class Reductions(_Section):
    """On-demand reductions (``POST /api/v1/reductions``): how long their results are
    kept and how much one user may ask for at once."""

    keep_days: float = Field(default=7.0, gt=0)
    """A completed reduction's results are deleted this long after it completed (a
    request made again later re-makes them)."""
    max_active: int = Field(default=4, ge=1, le=10000)
    """Reductions one user may have queued or executing at once (more: 429)."""
    max_inputs: int = Field(default=500, ge=1)
    """Input files one request may name."""
    max_input_bytes: int = Field(default=20 * 1024**3, ge=1)
    """The inputs' total size one request may ask to reduce."""
    fair_share: int = Field(default=2, ge=1, le=1024)
    """Runs of one user's reductions handed to the executor at once: the users take
    turns (a reduction asked with ``priority: high`` by an admin goes first)."""


class Transfer(_Section):
    role: Role = Role.ALL
    """What ``obsflow run`` does (``--role`` overrides)."""
    server: str | None = Field(default=None, pattern=r"^https?://\S+$")
    """Agent: the archive server's base URL (``--server``, ``OBSFLOW_SERVER_URL``)."""
    token: str | None = None
    """Agent: a token of the server's with write scope (``--token``, ``OBSFLOW_TOKEN``)."""
    workers: int = Field(default=4, ge=1, le=64)
    """Agent: frames uploaded at once (4: while one frame waits for the server to archive
    it, others stream; benchmarks/transfer.py moved 10-30 % more than with 2)."""
    timeout_seconds: float = Field(default=30.0, gt=0)
    """Agent: a connection silent this long is given up (and the frame retried)."""
    confirm_seconds: float = Field(default=10.0, ge=0)
    """How long an upload waits for the server to archive the frame before it answers
    ``cached`` (the agent then asks again later)."""
    max_refusals: int = Field(default=3, ge=1)
    """Agent: a frame the server refuses (a wrong checksum) this often is quarantined."""
    keep_seconds: float | None = Field(default=None, ge=0)
    """Agent: delete a frame's copy this long after the server archived it (None: keep)."""
    max_queue: int = Field(default=1000, ge=1)
    """Server: with more files than this waiting for the archive, uploads are answered
    503 with Retry-After until it drains."""
    max_bytes: int = Field(default=1 << 40, ge=1)
    """Server: an upload declaring a larger ``Upload-Length`` is refused (413) before
    any byte is written."""
    reserve_bytes: int = Field(default=1 << 30, ge=0)
    """Server: free space kept on the cache's file system; an upload that would eat
    into it is refused (507) before any byte is written."""
    partial_seconds: float = Field(default=86400.0, gt=0)
    """Server: a partial upload untouched this long is removed (at start-up, then
    periodically): an agent that never comes back leaves nothing for ever."""
    idle_seconds: float = Field(default=60.0, gt=0)
    """Server: an upload that sends nothing for this long is cut (408) and its ID freed;
    the agent resumes it from what was received."""


class Ivoa(_Section):
    """The Virtual Observatory services (TAP with ObsCore: :mod:`obsflow.ivoa`)."""

    authority: str = Field(
        default="ivo://obsflow.invalid/archive", pattern=r"^ivo://[\w.~-]+(/[\w.~-]+)*$"
    )
    """The IVOA identifier this archive's datasets are published under:
    ``obs_publisher_did`` is ``<authority>?<archive ID>``."""
    maxrec: int = Field(default=10_000, ge=1)
    """Rows a TAP query returns when it names no ``MAXREC`` (more: overflow)."""
    max_maxrec: int = Field(default=1_000_000, ge=1)
    """The most rows a TAP query may ask for (a larger ``MAXREC`` is cut to it)."""
    query_seconds: float = Field(default=30.0, gt=0, le=3600)
    """A TAP query running longer is stopped, and answered with an error."""
    queries_per_user: int = Field(default=4, ge=1, le=1000)
    """The TAP queries one reader (a token; all readers without one together) may run
    at once; one more is answered 429 with a VOTable error, until one ends."""


class _SettingsFile(_Section):
    paths: Paths = Paths()
    catalog: Catalog = Catalog()
    workers: Workers = Workers()
    receipt: Receipt = Receipt()
    ingest: Ingest = Ingest()
    daemon: Daemon = Daemon()
    processing: Processing = Processing()
    containers: Containers = Containers()
    cache_policy: CachePolicy = CachePolicy()
    api: Api = Api()
    transfer: Transfer = Transfer()
    fixity: Fixity = Fixity()
    ivoa: Ivoa = Ivoa()
    reductions: Reductions = Reductions()

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section_means_defaults(cls, value: object) -> object:
        return {} if value is None else value


class Settings(_Section):
    """Everything a site is configured with, paths resolved to absolute ones."""

    site: Path
    incoming: Path
    cache: Path
    archive: Path
    quarantine: Path
    registry: Path
    catalog_url: str
    workers: Workers
    receipt: Receipt
    ingest: Ingest
    daemon: Daemon
    work: Path
    logs: Path
    processing: Processing
    containers: Containers
    cache_policy: CachePolicy
    api: Api
    transfer: Transfer
    fixity: Fixity = Fixity()
    ivoa: Ivoa = Ivoa()
    reductions: Reductions = Reductions()


def load_settings(site: Path) -> Settings:
    """Read ``site/obsflow.yaml`` once; raise :class:`SettingsError` with ``file:line``."""
    site = site.resolve()
    path = site / SETTINGS_FILE
    if not path.is_file():
        raise SiteError(
            f"{site}: not an obsflow site (no {SETTINGS_FILE}); run 'obsflow init {site}'"
        )
    doc, problems = yamlfile.read(path)
    if doc is not None and not problems:
        if doc.data is None or doc.data == {}:
            return from_file(site, _SettingsFile())
        if not isinstance(doc.data, dict):
            problems.append(Problem(path, 1, "expected a mapping of settings sections"))
        else:
            parsed, problems = yamlfile.validate(_SettingsFile, doc)
            if parsed is not None:
                return from_file(site, parsed)
    raise SettingsError(problems)


def from_file(site: Path, parsed: _SettingsFile) -> Settings:
    paths = parsed.paths
    return Settings(
        site=site,
        incoming=site / paths.incoming,
        cache=site / paths.cache,
        archive=site / paths.archive,
        quarantine=site / paths.quarantine,
        registry=site / paths.registry,
        catalog_url=_resolve_sqlite(parsed.catalog.url, site),
        workers=parsed.workers,
        receipt=parsed.receipt,
        ingest=parsed.ingest,
        daemon=parsed.daemon,
        work=site / paths.work,
        logs=site / paths.logs,
        processing=parsed.processing,
        containers=parsed.containers,
        cache_policy=parsed.cache_policy,
        api=parsed.api,
        transfer=parsed.transfer,
        fixity=parsed.fixity,
        ivoa=parsed.ivoa,
        reductions=parsed.reductions,
    )


def defaults(site: Path) -> Settings:
    """The settings of a site whose ``obsflow.yaml`` says nothing."""
    return from_file(site.resolve(), _SettingsFile())


def _resolve_sqlite(url: str, site: Path) -> str:
    """A relative SQLite database path (any driver) is relative to the site."""
    parsed = make_url(url)
    database = parsed.database or ""
    relative = database not in ("", ":memory:") and not Path(database).is_absolute()
    if parsed.get_backend_name() == "sqlite" and relative:
        return parsed.set(database=str(site / database)).render_as_string(hide_password=False)
    return url


ENVIRONMENT: Final = {
    "OBSFLOW_BROKER": "processing.broker",
    "OBSFLOW_CONTAINER_HOST": "containers.host",
}
"""The environment variables that override a setting (the CLI applies them, once)."""


def with_environment(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """``settings`` with the overrides of :data:`ENVIRONMENT` that ``environ`` sets (an
    empty value sets nothing); the CLI calls it with ``os.environ``, nothing else does."""
    broker = environ.get("OBSFLOW_BROKER") or None
    host = environ.get("OBSFLOW_CONTAINER_HOST") or None
    if broker is not None:
        try:
            processing = Processing.model_validate(
                {**settings.processing.model_dump(), "broker": broker}
            )
        except ValidationError as exc:
            raise SiteError(f"$OBSFLOW_BROKER: {exc.errors()[0]['msg']}: {broker!r}") from None
        settings = settings.model_copy(update={"processing": processing})
    if host is not None:
        containers = settings.containers.model_copy(update={"host": host})
        settings = settings.model_copy(update={"containers": containers})
    return settings


def reference() -> str:
    """The settings reference, in Markdown: every key of ``obsflow.yaml``, section by
    section, with its default and its meaning, made from the settings model itself (so
    it cannot drift from what obsflow reads)."""
    lines = [
        "# obsflow.yaml: every setting",
        "",
        "Made by `obsflow settings` from the settings model. A key left out takes its",
        "default; a relative path is relative to the site.",
    ]
    for name, section in _SettingsFile.model_fields.items():
        kind = section.annotation
        assert isinstance(kind, type) and issubclass(kind, _Section)
        lines += ["", f"## {name}", ""]
        if kind.__doc__ and kind.__doc__ is not _Section.__doc__:
            lines += [" ".join(kind.__doc__.split()), ""]
        lines += ["| key | default | meaning |", "| --- | --- | --- |"]
        for key, field in kind.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "none" if default is None else str(getattr(default, "value", default))
            meaning = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{name}.{key}` | `{shown}` | {meaning} |")
    return "\n".join(lines) + "\n"

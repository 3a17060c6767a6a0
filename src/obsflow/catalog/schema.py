"""The catalog's tables (SQLAlchemy Core). Alembic migrations create them; keep both in step."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    literal_column,
    text,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, stored naive UTC on every engine."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the catalog; expected UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


# The predicates of the partial indexes, as literal SQL: a query that must use one of
# them says the same words (a bound parameter would hide them from PostgreSQL's planner).
LIVE = "state <> 'rejected'"
REJECTED = "state = 'rejected'"
UNTRACKED = "tracked = false"


def is_untracked() -> ColumnElement[bool]:
    """The files the tracker has not read yet (the partial index ``ix_files_untracked``)."""
    return files.c.tracked == literal_column("false")


def is_live() -> ColumnElement[bool]:
    return files.c.state != literal_column("'rejected'")


def is_rejected() -> ColumnElement[bool]:
    return files.c.state == literal_column("'rejected'")


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("archive_id", String(96), unique=True),
    Column("product", String(64), index=True),
    Column("instrument", String(64), index=True),
    Column("level", Integer),
    Column("original_name", String(255), nullable=False, index=True),
    # the named regex groups of the name that recognised ``product``, written once at
    # receipt (JSON); NULL for rows recorded before schema 0007 (see processing.inputs)
    Column("name_groups", JSON(none_as_null=True)),
    Column("source_path", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("reason", Text),
    Column("start_utc", UTCDateTime),
    Column("stop_utc", UTCDateTime),
    Column("start_mjd", Float),
    Column("stop_mjd", Float),
    Column("night", Date, index=True),
    Column("exptime", Float),
    Column("ra", Float),
    Column("dec", Float),
    Column("object", String(128), index=True),
    Column("frame_type", String(32)),
    Column("filter", String(32)),
    Column("program", String(64), index=True),
    Column("observer", String(128)),
    Column("telescope", String(64)),
    Column("proprietary_until", UTCDateTime),
    Column("cache_path", Text),
    Column("archive_path", Text),
    Column("quarantine_path", Text),
    Column("version", Integer, nullable=False, server_default=text("1")),
    Column("superseded_by", Integer, ForeignKey("files.id")),
    Column("made_by_run", Integer, index=True),  # provenance: the run (its inputs: run_inputs)
    # the cache: a virtual file's bytes are only in the archive (its metadata stay here)
    Column("virtual", Boolean, nullable=False, server_default=false()),
    Column("last_access", UTCDateTime),
    # the tracker's inbox: a row is recorded untracked and marked once the tracker has
    # read it (committed rows only, whatever order concurrent writers commit in)
    Column("tracked", Boolean, nullable=False, server_default=false()),
    Index("ix_files_product_start", "product", "start_utc"),
    Index("ix_files_product_night", "product", "night"),  # the tracker's candidates
    Index("ix_files_virtual_last_access", "virtual", "last_access"),  # eviction order
    Index("ix_files_start_stop", "start_utc", "stop_utc"),
    Index("ix_files_dec_ra", "dec", "ra"),  # a cone search's box (catalog/search.py)
    Index("ix_files_start_mjd", "start_mjd"),  # ObsCore's t_min (TAP time ranges)
    Index(
        "ix_files_untracked", "id", sqlite_where=text(UNTRACKED), postgresql_where=text(UNTRACKED)
    ),
    # one live row per content: the same bytes received twice make no second row
    Index(
        "uq_files_sha256_live",
        "sha256",
        unique=True,
        sqlite_where=text(LIVE),
        postgresql_where=text(LIVE),
    ),
    # a refused file is recorded once, however many workers refuse it at once
    Index(
        "uq_files_rejected",
        "sha256",
        "original_name",
        unique=True,
        sqlite_where=text(REJECTED),
        postgresql_where=text(REJECTED),
    ),
)

keywords = Table(
    "keywords",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(72), primary_key=True),
    Column("kind", String(1), nullable=False),  # s(tring) i(nt) f(loat) b(ool) n(one)
    Column("value_text", Text),
    Column("value_num", Float),
    Index("ix_keywords_name_text", "name", "value_text"),
    Index("ix_keywords_name_num", "name", "value_num"),
)

# The longest a file of each product lasts (stop - start): the lower bound of the
# time-range lookups (see obsflow.catalog.spans).
spans = Table(
    "spans",
    metadata,
    Column("product", String(64), primary_key=True),
    Column("longest_seconds", Float, nullable=False),
)

tags = Table(
    "tags",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("tag", String(64), primary_key=True),
    # the file's start, copied (it never changes): a tag's files in start order straight
    # from an index, however many files carry the tag
    Column("start_utc", UTCDateTime),
    Index("ix_tags_tag_start_utc_file_id", "tag", "start_utc", "file_id"),
    Index("ix_tags_tag_file_id", "tag", "file_id"),  # ... and in the order they came
)

ledger = Table(
    "ledger",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("event", String(16), primary_key=True),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_ledger_event_at", "event", "at"),
)

ingest_requests = Table(
    "ingest_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("file_id", Integer, ForeignKey("files.id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("lease_owner", String(64)),
    Column("lease_expires", UTCDateTime),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("file_id"),
    Index("ix_ingest_requests_state_next", "state", "next_attempt_at"),
)

# The reconcile scan's memory: a path whose size and mtime are unchanged since receipt
# dealt with it is not offered again (nor re-read, nor re-hashed).
seen = Table(
    "seen",
    metadata,
    Column("path", Text, primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("at", UTCDateTime, nullable=False),
)

# ------------------------------------------------------------------ processing

# One execution of a pipeline on one group of inputs. The unique constraint is what makes
# a duplicate event, a second tracker or a second daemon unable to start a second run of
# the same (pipeline, group, input set); ``request`` is empty, or names a reprocessing
# request, which may run the same inputs again on purpose.
runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pipeline", String(64), nullable=False),
    Column("group_key", Text, nullable=False),
    Column("night", Date, index=True),
    Column("input_hash", String(64), nullable=False),
    Column("request", String(64), nullable=False, server_default=text("''")),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("degraded", Boolean, nullable=False, server_default=false()),
    Column("reason", Text, nullable=False),
    Column("overrides", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("lease_owner", String(64)),
    Column("lease_expires", UTCDateTime),
    Column("dispatched_at", UTCDateTime),  # handed to the executor (cleared when requeued)
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("work_dir", Text),
    Column("log_path", Text),
    Column("profile", Text),
    Column("error", Text),
    UniqueConstraint("pipeline", "group_key", "input_hash", "request"),
    Index("ix_runs_pipeline_group", "pipeline", "group_key"),
)

run_inputs = Table(
    "run_inputs",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("input", String(64), primary_key=True),
    Column("file_id", Integer, ForeignKey("files.id"), primary_key=True),
    Index("ix_run_inputs_file_id", "file_id"),
)

run_steps = Table(
    "run_steps",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("argv", Text, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("exit_status", Integer),
    Column("stdout_tail", Text),
    Column("stderr_tail", Text),
    Column("reason", Text),
)

# The tracker's open groups: one row per (pipeline, group) it has seen an input for; a
# deadline kickoff is found by ``due_at`` without scanning pipelines or files.
tracker_groups = Table(
    "tracker_groups",
    metadata,
    Column("pipeline", String(64), primary_key=True),
    Column("group_key", Text, primary_key=True),
    Column("night", Date, nullable=False, index=True),
    Column("primary_file_id", Integer, nullable=False),
    Column("due_at", UTCDateTime, index=True),
    Column("updated_at", UTCDateTime, nullable=False),
)


# ------------------------------------------------------------------ archive service

# Files the cache must keep: pinned by a run while it reads them, or by an operator.
pins = Table(
    "pins",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("holder", String(64), primary_key=True),  # "run:12", "operator"
    Column("at", UTCDateTime, nullable=False),
)

# Fixity audits: each re-read of an archived file from the medium and what it found.
fixity_checks = Table(
    "fixity_checks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), nullable=False),
    Column("checked_at", UTCDateTime, nullable=False, index=True),
    Column("outcome", String(16), nullable=False),  # states.FixityOutcome
    Column("found_sha256", String(64)),  # what the stored bytes hash to (None: unread)
    Column("bytes_read", BigInteger, nullable=False, server_default=text("0")),
    Column("detail", Text),
    Index("ix_fixity_checks_file", "file_id", "checked_at"),
)

# On-demand reductions: what a user asked for, its plan, and the runs that serve it. A
# reduction's runs are shared by every identical request (``key``); the runs' results
# are not files of the archive: they live under the site's ``reductions/`` directory,
# one row each in ``reduction_results``, until they expire.
reductions = Table(
    "reductions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("owner", String(64), nullable=False, index=True),  # the token's user
    Column("pipeline", String(64), nullable=False),
    Column("key", String(64), nullable=False, index=True),  # pipeline+profile+params+inputs
    Column("runs_request", String(64), nullable=False),  # the request label of its runs
    Column("parameters", Text, nullable=False),  # JSON: the effective parameters
    Column("inputs", Text, nullable=False),  # JSON: the archive IDs asked for
    Column("plan", Text, nullable=False),  # JSON: the plan's actions
    Column("phase", String(16), nullable=False, index=True),  # states.ReductionPhase
    Column("priority", String(8), nullable=False, server_default=text("'normal'")),
    Column("input_bytes", BigInteger, nullable=False, server_default=text("0")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("expires_at", UTCDateTime),
    Column("expired_at", UTCDateTime),  # its results deleted (asked again: made again)
    Column("error", Text),
)

reduction_runs = Table(
    "reduction_runs",
    metadata,
    Column(
        "reduction_id",
        Integer,
        ForeignKey("reductions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("final", Boolean, nullable=False),  # makes results (else: an archive product)
    Index("ix_reduction_runs_run", "run_id"),
)

reduction_results = Table(
    "reduction_results",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("product", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# The processes that write to the catalog (daemons, Celery workers): one row per process
# instance, written by the process itself at start, at every heartbeat (one UPSERT) and
# when it stops cleanly; ``lost`` is computed at read time from ``heartbeat`` and
# ``interval_seconds`` (see obsflow.catalog.processes). Old rows are pruned.
processes = Table(
    "processes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # catalog.processes.ProcessKind
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("role", String(16)),  # a daemon's role (settings.Role); None for a worker
    Column("version", String(32), nullable=False),
    Column("started", UTCDateTime, nullable=False),
    Column("heartbeat", UTCDateTime, nullable=False, index=True),
    Column("interval_seconds", Float, nullable=False),  # how often it beats
    Column("state", String(16), nullable=False),  # states.ProcessState (never lost)
    Column("health", Text, nullable=False),  # JSON: triggers, EPICS, workers, outbox
)

# API tokens, stored hashed (sha256 of the secret); the secret is shown once.
tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user", String(64), nullable=False),
    Column("scope", String(8), nullable=False),
    Column("programs", Text, nullable=False),  # JSON list
    # JSON list: the instruments whose frames it may transfer; [] any
    Column("instruments", Text, nullable=False, server_default=text("'[]'")),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
)

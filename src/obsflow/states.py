"""The closed sets of states of a file, an ingest request, a pipeline run and a step,
and the moves each state may make.

Nothing compares bare strings: the catalog stores ``.value`` and reads back the Enum.
The ``_*_MOVES`` tables below are the map of the moves allowed. Where they are enforced:

* **runs** — :meth:`obsflow.catalog.runs.RunStore.finish` checks
  ``RunState.RUNNING.can_move_to`` before it writes (running → succeeded or failed). Every
  other move of a run is an ``UPDATE`` in :mod:`obsflow.catalog.runs` whose ``WHERE``
  names the state it leaves: ``claim`` (queued → running), ``release`` and ``recover``
  (running → queued), ``recover`` (running → failed), ``retry`` (failed → queued).
  No code moves a run queued → failed, although the table allows it.
* **files and ingest requests** — :meth:`FileState.can_move_to` and
  :meth:`RequestState.can_move_to` are called by no code: the moves are made in SQL in
  :mod:`obsflow.catalog.queue`, each selecting its rows by the state they leave, in the
  same write transaction: ``lease`` (pending, or leased with an expired lease → leased),
  ``fail`` (leased → pending or failed; the file cached → failed on the last attempt),
  ``retry_failed`` (failed → pending; the file failed → cached). ``complete`` sets the
  request done and the file archived by ID with no state guard, on purpose: completing
  is idempotent (the bytes are archived and verified, whoever held the lease last). A
  file is born ``cached`` with its request ``pending`` (:mod:`obsflow.catalog.batch`),
  or ``rejected`` (:meth:`obsflow.catalog.Catalog.record_rejected`), which never moves.

The guard is in the SQL, not in a Python call, because these moves are made on many rows
at once by concurrent writers: the check and the move must be one atomic statement, and a
call to ``can_move_to`` beside it could only compare two constants.
"""

from __future__ import annotations

from enum import StrEnum


class FileState(StrEnum):
    """Where one received file stands.

    ``cached`` → ``archived`` is the normal way; ``cached`` → ``failed`` when
    ingestion keeps failing (a retry moves it back to ``cached``); ``rejected``
    files are in quarantine and never move again.
    """

    CACHED = "cached"
    ARCHIVED = "archived"
    FAILED = "failed"
    REJECTED = "rejected"

    def can_move_to(self, new: FileState) -> bool:
        return new in _FILE_MOVES[self]


_FILE_MOVES: dict[FileState, frozenset[FileState]] = {
    FileState.CACHED: frozenset({FileState.ARCHIVED, FileState.FAILED}),
    FileState.FAILED: frozenset({FileState.CACHED, FileState.ARCHIVED}),
    FileState.ARCHIVED: frozenset(),
    FileState.REJECTED: frozenset(),
}


class RequestState(StrEnum):
    """Where one ingest request stands in the durable queue.

    ``pending`` requests are leased by an ingestor (``leased``, with an expiry);
    a lease that expires is as good as ``pending`` again. A request ends ``done``,
    or ``failed`` once it has used up its attempts (still visible, never blocking).
    """

    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"

    def can_move_to(self, new: RequestState) -> bool:
        return new in _REQUEST_MOVES[self]


_REQUEST_MOVES: dict[RequestState, frozenset[RequestState]] = {
    RequestState.PENDING: frozenset({RequestState.LEASED}),
    RequestState.LEASED: frozenset(
        {RequestState.LEASED, RequestState.PENDING, RequestState.DONE, RequestState.FAILED}
    ),
    RequestState.FAILED: frozenset({RequestState.PENDING}),
    RequestState.DONE: frozenset(),
}


class LedgerEvent(StrEnum):
    """The moments of one file's way that the latency ledger records, in order."""

    ACQUIRED = "acquired"  # the file was closed by the instrument (its mtime)
    RECEIVED = "received"  # receipt started on it
    VALIDATED = "validated"  # recognised, complete, valid FITS, metadata mapped
    CACHED = "cached"  # in the cache with its catalog row and ingest request
    ARCHIVED = "archived"  # in archive storage, checksum verified: queryable
    REJECTED = "rejected"  # refused and quarantined
    PROCESSED = "processed"  # the first pipeline run that took it as input succeeded
    SUPERSEDED = "superseded"  # a new version of the product (same name) replaced it


class RunState(StrEnum):
    """Where one pipeline run stands.

    The tracker creates a run ``queued``; an executor claims it (``running``, with a
    lease it renews); it ends ``succeeded`` (its outputs published) or ``failed``. A
    ``running`` run whose lease expired (its daemon died) goes back to ``queued`` while it
    has attempts left, else to ``failed``; ``obsflow runs retry`` queues a failed run again.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def can_move_to(self, new: RunState) -> bool:
        return new in _RUN_MOVES[self]

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED)


_RUN_MOVES: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.RUNNING, RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.QUEUED}),
    RunState.FAILED: frozenset({RunState.QUEUED}),
    RunState.SUCCEEDED: frozenset(),
}


class ReductionPhase(StrEnum):
    """Where an on-demand reduction stands, in IVOA UWS's phase names.

    ``queued`` from its request until one of its runs executes; ``executing`` while
    one does; then ``completed`` (its results ready), ``error`` (a run failed, or it
    could not be planned) or ``aborted`` (its owner stopped it). ``pending`` is a plan
    not submitted (``?dry_run=true``).
    """

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    ABORTED = "ABORTED"

    @property
    def finished(self) -> bool:
        return self in (ReductionPhase.COMPLETED, ReductionPhase.ERROR, ReductionPhase.ABORTED)


class StepState(StrEnum):
    """How one step of a run ended (a step being run is ``running``)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a non-zero exit, could not start, or timed out (the reason says)
    SKIPPED = "skipped"  # ``when`` was false, or a step it needs failed (the reason says)


class FixityOutcome(StrEnum):
    """What one fixity audit of one archived file found (``obsflow verify``)."""

    OK = "ok"  # the stored bytes, read from the medium, have the catalog's sha256
    MISMATCH = "mismatch"  # they do not, and no good copy could restore them
    MISSING = "missing"  # no stored object under the file's key
    UNREADABLE = "unreadable"  # the storage could not be read (the reason says)
    RESTORED = "restored"  # a mismatch or a loss, repaired from a good copy (the cache)

    @property
    def bad(self) -> bool:
        """The archive does not hold the file's bytes (an operator must act)."""
        return self in (FixityOutcome.MISMATCH, FixityOutcome.MISSING, FixityOutcome.UNREADABLE)


class ProcessState(StrEnum):
    """The state of a process that writes to the catalog (a daemon, a worker), as
    ``obsflow status`` shows it (:mod:`obsflow.catalog.processes`).

    A process records itself ``running`` at start and at every heartbeat, ``stopping``
    once told to stop (it finishes what it holds), and ``stopped`` when it ends cleanly:
    those three are stored, each by the process itself, never by another. ``lost`` is never
    stored: it is computed when the row is read, for a running or stopping process whose
    last heartbeat is older than a few of its heartbeat intervals (it was killed, its
    machine died, or it cannot reach the catalog).
    """

    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    LOST = "lost"

    @property
    def alive(self) -> bool:
        """Running or stopping (its heartbeat is fresh)."""
        return self in (ProcessState.RUNNING, ProcessState.STOPPING)

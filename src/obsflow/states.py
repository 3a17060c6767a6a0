"""The closed sets of states a file and an ingest request can be in, and their moves.

Every state change goes through :func:`FileState.can_move_to` /
:func:`RequestState.can_move_to`; nothing compares bare strings.
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


class StepState(StrEnum):
    """How one step of a run ended (a step being run is ``running``)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a non-zero exit, could not start, or timed out (the reason says)
    SKIPPED = "skipped"  # ``when`` was false, or a step it needs failed (the reason says)

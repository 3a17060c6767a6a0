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

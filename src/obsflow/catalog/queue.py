"""The durable ingest queue, kept in the catalog next to the files it moves.

A request is *leased* by one ingestor for ``lease_seconds``; a lease that expires
(its ingestor crashed) makes the request available again, so nothing is lost.
Each lease counts as an attempt; a request that has used ``max_attempts`` ends
``failed`` (the file too, with the error), visible and retryable, and never
blocks the requests behind it.

The queue's **depth** is the number of requests pending or leased (:data:`WAITING`):
work not done yet and not failed for good. :func:`depth_of` is that rule, used by
:meth:`IngestQueue.depth`, the site's status (:mod:`obsflow.catalog.status`) and so
by ``obsflow status``, ``/api/v1/status``, ``/metrics`` and an agent's outbox.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Final

from sqlalchemy import ColumnElement, Connection, and_, bindparam, func, or_, select, update

from obsflow.catalog import Catalog, schema
from obsflow.catalog.records import RequestRecord
from obsflow.states import FileState, LedgerEvent, RequestState

requests = schema.ingest_requests
files = schema.files

WAITING: Final = (RequestState.PENDING, RequestState.LEASED)
"""The states of the requests that make the queue's depth."""


def depth_of(counts: Mapping[RequestState, int]) -> int:
    """The queue's depth from its requests counted by state: those pending or leased."""
    return sum(counts.get(state, 0) for state in WAITING)


def is_waiting() -> ColumnElement[bool]:
    """The requests that count in the depth (pending or leased), as a WHERE clause."""
    return requests.c.state.in_([state.value for state in WAITING])


def count_by_state(conn: Connection) -> dict[RequestState, int]:
    """The requests by state (the states nothing is in are absent), on ``conn``."""
    rows = conn.execute(select(requests.c.state, func.count()).group_by(requests.c.state)).all()
    return {RequestState(s): n for s, n in rows}


_DONE = (
    update(requests)
    .where(requests.c.id == bindparam("b_id"))
    .values(
        state=RequestState.DONE.value,
        lease_owner=None,
        lease_expires=None,
        last_error=None,
        updated_at=bindparam("b_now"),
    )
)
_ARCHIVED = (
    update(files)
    .where(files.c.id == bindparam("b_id"))
    .values(state=FileState.ARCHIVED.value, archive_path=bindparam("b_path"), reason=None)
)
# The lease's statements, built once (SQLAlchemy caches their compiled SQL by the
# construct: a statement built anew per lease is compiled anew too, ~1 ms each).
_DUE = or_(
    and_(
        requests.c.state == RequestState.PENDING.value,
        requests.c.next_attempt_at <= bindparam("b_now"),
    ),
    and_(
        requests.c.state == RequestState.LEASED.value,
        requests.c.lease_expires < bindparam("b_now"),
    ),
)
_PICK = (
    select(requests.c.id)
    .where(_DUE)
    .order_by(requests.c.next_attempt_at, requests.c.id)
    .limit(bindparam("b_limit"))
)
_PICK_LOCKED = _PICK.with_for_update(skip_locked=True)
"""PostgreSQL: two ingestors never pick the same request (SQLite has one writer)."""
_LEASE = (
    update(requests)
    .where(requests.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        state=RequestState.LEASED.value,
        lease_owner=bindparam("b_owner"),
        lease_expires=bindparam("b_expires"),
        attempts=requests.c.attempts + 1,
        updated_at=bindparam("b_now"),
    )
)
_LEASED = (
    select(
        requests.c.id,
        requests.c.file_id,
        requests.c.attempts,
        files.c.archive_id,
        files.c.instrument,
        files.c.night,
        files.c.sha256,
        files.c.size,
        files.c.cache_path,
        files.c.original_name,
    )
    .join(files, files.c.id == requests.c.file_id)
    .where(requests.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(requests.c.id)
)
_STAMPED = select(schema.ledger.c.file_id).where(
    schema.ledger.c.file_id.in_(bindparam("ids", expanding=True)),
    schema.ledger.c.event == LedgerEvent.ARCHIVED.value,
)


@dataclass(frozen=True)
class Lease:
    """One leased request and what the ingestor needs to carry it out."""

    request_id: int
    file_id: int
    attempts: int
    owner: str
    archive_id: str
    instrument: str
    night: date
    sha256: str
    size: int
    cache_path: str
    original_name: str
    """The file's name as received (an agent sends it along)."""


class IngestQueue:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def lease(self, owner: str, now: datetime, lease_seconds: float, limit: int) -> list[Lease]:
        """Lease up to ``limit`` due requests (pending, or whose lease has expired)."""
        pick = _PICK if self.catalog.is_sqlite else _PICK_LOCKED
        with self.catalog.write() as conn:
            ids = list(conn.execute(pick, {"b_now": now, "b_limit": limit}).scalars())
            if not ids:
                return []
            conn.execute(
                _LEASE,
                {
                    "ids": ids,
                    "b_owner": owner,
                    "b_expires": now + timedelta(seconds=lease_seconds),
                    "b_now": now,
                },
            )
            rows = conn.execute(_LEASED, {"ids": ids}).all()
        return [
            Lease(
                r.id,
                r.file_id,
                r.attempts,
                owner,
                r.archive_id,
                r.instrument,
                r.night,
                r.sha256,
                r.size,
                r.cache_path,
                r.original_name,
            )
            for r in rows
        ]

    def complete(self, leases: list[tuple[Lease, str]], now: datetime) -> None:
        """Mark each (lease, archive path) archived, with its ledger stamp, in one transaction.

        Completing is idempotent: a request whose lease expired and was completed by
        another ingestor stays done (the archived bytes are the same, by checksum).
        """
        if not leases:
            return
        with self.catalog.write() as conn:
            conn.execute(_DONE, [{"b_id": lease.request_id, "b_now": now} for lease, _ in leases])
            conn.execute(
                _ARCHIVED, [{"b_id": lease.file_id, "b_path": path} for lease, path in leases]
            )
            ids = [lease.file_id for lease, _ in leases]
            stamped = set(conn.execute(_STAMPED, {"ids": ids}).scalars())
            stamps = [
                {"file_id": file_id, "event": LedgerEvent.ARCHIVED.value, "at": now}
                for file_id in dict.fromkeys(ids)
                if file_id not in stamped
            ]
            if stamps:
                conn.execute(schema.ledger.insert(), stamps)

    def fail(
        self,
        lease: Lease,
        error: str,
        now: datetime,
        *,
        max_attempts: int,
        backoff_seconds: float,
        backoff_max_seconds: float,
    ) -> RequestState:
        """Record a failed attempt: back to pending after a back-off, or failed for good."""
        final = lease.attempts >= max_attempts
        delay = min(backoff_max_seconds, backoff_seconds * 2 ** (lease.attempts - 1))
        delay *= random.uniform(0.8, 1.2)  # jitter keeps retries of many files apart
        state = RequestState.FAILED if final else RequestState.PENDING
        with self.catalog.write() as conn:
            still_ours = conn.execute(
                update(requests)
                .where(
                    requests.c.id == lease.request_id,
                    requests.c.state == RequestState.LEASED,
                    requests.c.lease_owner == lease.owner,
                )
                .values(
                    state=state.value,
                    lease_owner=None,
                    lease_expires=None,
                    last_error=error,
                    next_attempt_at=now + timedelta(seconds=delay),
                    updated_at=now,
                )
            ).rowcount
            if not still_ours:  # our lease expired and another ingestor holds the request
                return RequestState.LEASED
            if final:
                conn.execute(
                    update(files)
                    .where(files.c.id == lease.file_id, files.c.state == FileState.CACHED)
                    .values(state=FileState.FAILED.value, reason=error)
                )
        return state

    def retry_failed(self, now: datetime) -> int:
        """Put every failed request back in the queue with fresh attempts; return how many."""
        with self.catalog.write() as conn:
            failed = list(
                conn.execute(
                    select(requests.c.file_id).where(requests.c.state == RequestState.FAILED)
                ).scalars()
            )
            if not failed:
                return 0
            conn.execute(
                update(requests)
                .where(requests.c.state == RequestState.FAILED)
                .values(
                    state=RequestState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )
            conn.execute(
                update(files)
                .where(files.c.id.in_(failed), files.c.state == FileState.FAILED)
                .values(state=FileState.CACHED.value)
            )
        return len(failed)

    def counts(self) -> dict[RequestState, int]:
        """The requests by state (the states nothing is in are absent)."""
        with self.catalog.read() as conn:
            return count_by_state(conn)

    def depth(self) -> int:
        """The queue's depth: requests pending or leased (see :func:`depth_of`)."""
        return depth_of(self.counts())

    def requests_for(self, file_ids: list[int]) -> list[RequestRecord]:
        out: list[RequestRecord] = []
        with self.catalog.read() as conn:
            for start in range(0, len(file_ids), 500):
                chunk = file_ids[start : start + 500]
                for r in conn.execute(select(requests).where(requests.c.file_id.in_(chunk))):
                    out.append(
                        RequestRecord(
                            r.id,
                            r.file_id,
                            RequestState(r.state),
                            r.attempts,
                            r.next_attempt_at,
                            r.last_error,
                        )
                    )
        return out

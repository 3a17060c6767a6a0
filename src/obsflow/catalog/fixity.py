"""Fixity audits in the catalog: which archived files to audit, and what each audit found.

Each re-read of an archived file is one ``fixity_checks`` row (when, what it found, how
many bytes were read): the audit trail OAIS asks of an archive. A file's standing is its
latest check; :meth:`FixityStore.figures` says how the archive stands as a whole.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select

from obsflow.catalog import Catalog, schema
from obsflow.states import FileState, FixityOutcome

files, checks = schema.files, schema.fixity_checks

_LAST_CHECK = (
    select(checks.c.file_id, func.max(checks.c.checked_at).label("last"))
    .group_by(checks.c.file_id)
    .subquery("last_check")
)


@dataclass(frozen=True)
class Audited:
    """An archived file as an audit needs it."""

    file_id: int
    archive_id: str
    key: str
    """Its key in archive storage."""
    sha256: str
    size: int
    cache_path: str | None
    """Its copy in the cache (None: virtual, only in the archive)."""
    last_checked: datetime | None


@dataclass(frozen=True)
class FixityCheck:
    """What one audit of one file found."""

    file_id: int
    archive_id: str
    checked_at: datetime
    outcome: FixityOutcome
    found_sha256: str | None
    bytes_read: int
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "archive_id": self.archive_id,
            "checked_at": self.checked_at.isoformat(),
            "outcome": self.outcome.value,
            "found_sha256": self.found_sha256,
            "bytes_read": self.bytes_read,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class FixityFigures:
    """The archive's standing: files archived, audited, never audited, and the files
    whose latest audit found them bad (their archive IDs, the first few)."""

    archived: int
    audited: int
    never: int
    last_check: datetime | None
    bad: int
    bad_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "archived": self.archived,
            "audited": self.audited,
            "never_audited": self.never,
            "last_check": None if self.last_check is None else self.last_check.isoformat(),
            "bad": self.bad,
            "bad_ids": list(self.bad_ids),
        }


class FixityStore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def select(
        self,
        *,
        since: datetime | None = None,
        archive_ids: Sequence[str] = (),
        sample: float | None = None,
        not_since: datetime | None = None,
        limit: int | None = None,
        rng: random.Random | None = None,
    ) -> list[Audited]:
        """The archived files to audit, the least recently audited first (never audited
        before all): those that started at ``since`` or later, those named, those not
        audited since ``not_since``; then a random ``sample`` (a fraction, 0 < f <= 1) of
        them, then at most ``limit``."""
        last = _LAST_CHECK.c.last
        query = (
            select(
                files.c.id,
                files.c.archive_id,
                files.c.archive_path,
                files.c.sha256,
                files.c.size,
                files.c.cache_path,
                files.c.virtual,
                last,
            )
            .select_from(files.outerjoin(_LAST_CHECK, _LAST_CHECK.c.file_id == files.c.id))
            .where(files.c.state == FileState.ARCHIVED.value, files.c.archive_path.is_not(None))
            .order_by(last.is_not(None), last, files.c.id)
        )
        if since is not None:
            query = query.where(or_(files.c.start_utc >= since, files.c.start_utc.is_(None)))
        if archive_ids:
            query = query.where(files.c.archive_id.in_(list(archive_ids)))
        if not_since is not None:
            query = query.where(or_(last.is_(None), last < not_since))
        if limit is not None and sample is None:
            query = query.limit(limit)
        with self.catalog.read() as conn:
            rows = conn.execute(query).all()
        if sample is not None:
            if not 0 < sample <= 1:
                raise ValueError(f"sample {sample}: expected a fraction above 0, at most 1")
            count = max(1, round(len(rows) * sample)) if rows else 0
            chosen = set((rng or random.Random()).sample(range(len(rows)), count))
            rows = [row for n, row in enumerate(rows) if n in chosen]
            if limit is not None:
                rows = rows[:limit]
        return [
            Audited(
                file_id=r.id,
                archive_id=r.archive_id,
                key=r.archive_path,
                sha256=r.sha256,
                size=r.size,
                cache_path=None if r.virtual else r.cache_path,
                last_checked=r.last,
            )
            for r in rows
        ]

    def record(self, found: Sequence[FixityCheck]) -> None:
        """Keep what audits found, in one transaction."""
        if not found:
            return
        with self.catalog.write() as conn:
            conn.execute(
                insert(checks),
                [
                    {
                        "file_id": c.file_id,
                        "checked_at": c.checked_at,
                        "outcome": c.outcome.value,
                        "found_sha256": c.found_sha256,
                        "bytes_read": c.bytes_read,
                        "detail": c.detail,
                    }
                    for c in found
                ],
            )

    def history(self, archive_id: str) -> list[FixityCheck]:
        """Every audit of one file, the oldest first."""
        query = (
            select(checks, files.c.archive_id)
            .join(files, files.c.id == checks.c.file_id)
            .where(files.c.archive_id == archive_id)
            .order_by(checks.c.checked_at, checks.c.id)
        )
        with self.catalog.read() as conn:
            return [_check(r) for r in conn.execute(query)]

    def figures(self, conn: Connection | None = None, shown: int = 10) -> FixityFigures:
        """How the archive stands (``obsflow status``, ``/metrics``)."""
        if conn is None:
            with self.catalog.read() as own:
                return self.figures(own, shown)
        archived = and_(
            files.c.state == FileState.ARCHIVED.value, files.c.archive_path.is_not(None)
        )
        total = conn.execute(select(func.count()).where(archived)).scalar_one()
        audited, last = conn.execute(
            select(func.count(func.distinct(checks.c.file_id)), func.max(checks.c.checked_at))
        ).one()
        latest = (
            select(checks.c.file_id, checks.c.outcome)
            .join(
                _LAST_CHECK,
                and_(
                    _LAST_CHECK.c.file_id == checks.c.file_id,
                    _LAST_CHECK.c.last == checks.c.checked_at,
                ),
            )
            .subquery("latest")
        )
        bad_outcomes = [o.value for o in FixityOutcome if o.bad]
        bad_query = (
            select(func.distinct(files.c.archive_id))
            .join(latest, latest.c.file_id == files.c.id)
            .where(latest.c.outcome.in_(bad_outcomes), archived)
            .order_by(files.c.archive_id)
        )
        bad_ids = list(conn.execute(bad_query).scalars())
        return FixityFigures(
            archived=int(total),
            audited=int(audited or 0),
            never=max(0, int(total) - int(audited or 0)),
            last_check=last,
            bad=len(bad_ids),
            bad_ids=tuple(bad_ids[:shown]),
        )


def _check(row: Any) -> FixityCheck:
    return FixityCheck(
        file_id=row.file_id,
        archive_id=row.archive_id,
        checked_at=row.checked_at,
        outcome=FixityOutcome(row.outcome),
        found_sha256=row.found_sha256,
        bytes_read=row.bytes_read,
        detail=row.detail,
    )

"""The tracker's groups in the catalog: which groups of inputs each pipeline has, the
file that made each, and the deadline a group waits for.

A row of ``tracker_groups`` is a group the tracker has seen: its key (the text of a
:class:`~obsflow.catalog.groupkey.GroupKey`), its night, the row ID of its primary
file, and ``due_at`` while it waits for a deadline of its pipeline's kickoff rule.
:class:`TrackerGroups` holds the statements :mod:`obsflow.processing.tracker` runs,
each named for what it answers; the tracker keeps the deciding. Each method is one
transaction of its own, as the tracker needs them: a group is opened, or a deadline
set or cleared, whatever else the tracker does around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    Insert,
    Row,
    Select,
    and_,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from obsflow.catalog import Catalog, schema
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.records import FileRecord
from obsflow.states import LedgerEvent

groups = schema.tracker_groups
ledger = schema.ledger

ID_CHUNK: Final = 500
"""File IDs looked up per statement."""


@dataclass(frozen=True)
class Due:
    """A group whose deadline has come."""

    key: GroupKey
    due_at: datetime
    """The deadline as read (clearing it checks it is still this one)."""


def groups_waiting(conn: Connection) -> int:
    """How many groups wait for a deadline (more runs will start), on ``conn`` (the
    site's status reads it in its snapshot)."""
    stmt = select(func.count()).select_from(groups).where(groups.c.due_at.is_not(None))
    return int(conn.execute(stmt).scalar_one())


class TrackerGroups:
    """The tracker's groups in one catalog, and when their files arrived."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # ------------------------------------------------------------ deadlines

    def due(self, now: datetime) -> list[Due]:
        """The groups whose deadline is at or before ``now``."""
        stmt = select(groups.c.pipeline, groups.c.group_key, groups.c.due_at).where(
            groups.c.due_at <= now
        )
        with self.catalog.read() as conn:
            rows = conn.execute(stmt).all()
        return [Due(GroupKey.parse(row.pipeline, row.group_key), row.due_at) for row in rows]

    def clear_due(self, due: Due, now: datetime) -> None:
        """Clear the group's deadline, unless it was set to another since ``due`` was read."""
        with self.catalog.write() as conn:
            conn.execute(
                update(groups)
                .where(_is(due.key), groups.c.due_at == due.due_at)
                .values(due_at=None, updated_at=now)
            )

    def set_due(self, key: GroupKey, when: datetime, now: datetime) -> None:
        """The group waits until ``when`` (its deadline)."""
        with self.catalog.write() as conn:
            conn.execute(update(groups).where(_is(key)).values(due_at=when, updated_at=now))

    def waiting(self) -> list[Due]:
        """Every group that waits for a deadline, the soonest first."""
        stmt = (
            select(groups.c.pipeline, groups.c.group_key, groups.c.due_at)
            .where(groups.c.due_at.is_not(None))
            .order_by(groups.c.due_at, groups.c.pipeline, groups.c.group_key)
        )
        with self.catalog.read() as conn:
            rows = conn.execute(stmt).all()
        return [Due(GroupKey.parse(row.pipeline, row.group_key), row.due_at) for row in rows]

    def next_deadline(self) -> datetime | None:
        """The earliest deadline a group waits for, if any."""
        stmt = select(func.min(groups.c.due_at)).where(groups.c.due_at.is_not(None))
        with self.catalog.read() as conn:
            due: datetime | None = conn.execute(stmt).scalar()
        return due

    # ------------------------------------------------------------ groups

    def open(self, key: GroupKey, night: date | None, primary_file_id: int, now: datetime) -> None:
        """Record the group with the file that made it, unless it is known already (a
        second tracker recording it at the same moment is as good)."""
        with self.catalog.write() as conn:
            known = conn.execute(select(groups.c.primary_file_id).where(_is(key))).first()
            if known is None:
                row = {
                    "pipeline": key.pipeline,
                    "group_key": key.text(),
                    "night": night or date.min,
                    "primary_file_id": primary_file_id,
                    "due_at": None,
                    "updated_at": now,
                }
                _insert_once(conn, insert(groups).values(**row))

    def primary(self, key: GroupKey) -> FileRecord | None:
        """The file that made the group (None: no such group, or its file is gone)."""
        with self.catalog.read() as conn:
            file_id = conn.execute(select(groups.c.primary_file_id).where(_is(key))).scalar()
        if file_id is None:
            return None
        found = self.catalog.records([int(file_id)])
        return found[0] if found else None

    def of_pipeline(
        self, pipeline: str, night: date | None = None
    ) -> list[tuple[GroupKey, FileRecord]]:
        """Every group of ``pipeline`` (of one night), by key, with the file that made it."""
        query = _of(pipeline)
        if night is not None:
            query = query.where(groups.c.night == night)
        return self._with_primaries(pipeline, query.order_by(groups.c.group_key))

    def of_night(self, pipeline: str, night: date) -> list[tuple[GroupKey, FileRecord]]:
        """The groups of ``pipeline`` and ``night`` with the file that made each, in no
        order (a lookup of the night index)."""
        return self._with_primaries(pipeline, _of(pipeline).where(groups.c.night == night))

    def _with_primaries(
        self, pipeline: str, query: Select[Any]
    ) -> list[tuple[GroupKey, FileRecord]]:
        """The groups ``query`` reads, with their primary files (a group whose file is
        gone is left out)."""
        with self.catalog.read() as conn:
            rows: Sequence[Row[Any]] = conn.execute(query).all()
        primaries = {r.id: r for r in self.catalog.records([row.primary_file_id for row in rows])}
        return [
            (GroupKey.parse(pipeline, row.group_key), primaries[row.primary_file_id])
            for row in rows
            if row.primary_file_id in primaries
        ]

    # ------------------------------------------------------------ arrivals

    def cached_at(self, file_ids: Sequence[int]) -> dict[int, datetime]:
        """When each file was cached (its ledger's ``cached`` stamp): its arrival, from
        which a ``last_input`` deadline counts. Files with no such stamp are absent."""
        found: dict[int, datetime] = {}
        with self.catalog.read() as conn:
            for start in range(0, len(file_ids), ID_CHUNK):
                rows = conn.execute(
                    select(ledger.c.file_id, ledger.c.at).where(
                        ledger.c.event == LedgerEvent.CACHED.value,
                        ledger.c.file_id.in_(file_ids[start : start + ID_CHUNK]),
                    )
                )
                found.update({int(r.file_id): r.at for r in rows})
        return found


def _is(key: GroupKey) -> ColumnElement[bool]:
    """The row of the group ``key``, as a WHERE clause."""
    return and_(groups.c.pipeline == key.pipeline, groups.c.group_key == key.text())


def _of(pipeline: str) -> Select[Any]:
    return select(groups.c.group_key, groups.c.primary_file_id).where(groups.c.pipeline == pipeline)


def _insert_once(conn: Connection, statement: Insert) -> None:
    """Insert a row another tracker may be inserting at the same moment: whoever is
    second finds the row there, which is as good (a savepoint keeps the transaction)."""
    try:
        with conn.begin_nested():
            conn.execute(statement)
    except IntegrityError:
        pass

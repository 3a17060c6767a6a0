"""Recording a batch of cached files in one transaction (receipt's group commit).

Every file of a batch gets its row, tags, keywords, ledger stamps, its ingest
request and its move into the cache inside ONE transaction, as a single file
would; a batch only shares the transaction and the statements. Queries are
set-based (one ``IN`` per batch) and inserts are executemany, so the cost per
file is a few parameter rows rather than a dozen statements.

A batch is cut into *rounds* in which no two files share bytes or a name, so
that a duplicate or a new version inside one batch sees the earlier file as if
it had been received first.

Receipt hands each file over as plain values (:meth:`CacheEntry.of`): its facts, the
archive IDs it may take (:class:`ArchiveIdScheme`, or the one :class:`GivenArchiveId`
of a delivered file), the temp file holding its bytes, and the cache to move them into
(anything with :class:`Placement`'s methods); nothing here calls back into receipt.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection, bindparam, insert, select, text, update

from obsflow.catalog import schema
from obsflow.errors import CatalogError
from obsflow.states import FileState, LedgerEvent, RequestState

if TYPE_CHECKING:
    from obsflow.catalog import NewFile

files = schema.files
PLACEMENT_LOCK = 0x0B5F_1A11
"""PostgreSQL advisory lock: recorders (which move files into the cache inside their
transaction) hold it shared; the orphan sweep holds it exclusively."""


@dataclass(frozen=True)
class ArchiveIdScheme:
    """The archive IDs a frame may take: an ``archive_id`` template (the instrument's, or
    its product's) over the moment of its DATE-OBS and its file name's groups. A template
    with ``{hundredths}`` moves that moment on by hundredths of a second past IDs already
    taken; one without (a product's) gets ``.2``, ``.3`` ... before its extension. Called
    with a bump, it gives that candidate."""

    template: str
    """Fields: ``prefix instrument yyyymmdd yyyy mm dd hh mi ss seconds_of_day hundredths
    night`` and the name groups."""
    prefix: str
    instrument: str
    date_obs: datetime
    night: date
    groups: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, bump: int) -> str:
        moves = "{hundredths" in self.template
        moment = self.date_obs + timedelta(milliseconds=10 * bump if moves else 0)
        seconds = moment.hour * 3600 + moment.minute * 60 + moment.second
        fields: dict[str, object] = {
            "prefix": self.prefix,
            "instrument": self.instrument,
            "yyyymmdd": moment.strftime("%Y%m%d"),
            "yyyy": moment.year,
            "mm": moment.month,
            "dd": moment.day,
            "hh": moment.hour,
            "mi": moment.minute,
            "ss": moment.second,
            "seconds_of_day": seconds,
            "hundredths": moment.microsecond // 10000,
            "night": self.night.strftime("%Y%m%d"),
        }
        made = self.template.format(**{**self.groups, **fields})  # a group never hides a field
        if moves or bump == 0:
            return made
        match = _EXTENSION.match(made)
        assert match is not None  # every text matches
        return f"{match.group(1)}.{bump + 1}{match.group(2)}"


_EXTENSION = re.compile(r"^(.*?)((?:\.fits|\.fit|\.fts)?(?:\.gz|\.fz|\.bz2)?)$", re.IGNORECASE)


@dataclass(frozen=True)
class GivenArchiveId:
    """The one archive ID a delivered file keeps (the site that received it first gave
    it): never another, so a bump means it is taken by other bytes."""

    archive_id: str

    def __call__(self, bump: int) -> str:
        if bump:
            raise CatalogError(f"archive ID {self.archive_id} is taken by a file with other bytes")
        return self.archive_id


class Placement(Protocol):
    """The cache as recording needs it (:class:`obsflow.archive.cache.Cache` is one)."""

    def key(self, instrument: str, night: date, archive_id: str) -> str:
        """The file's relative path in the cache."""

    def place(self, temp: Path, key: str) -> object:
        """Move a finished temp file to ``key``."""

    def unplace(self, key: str, temp: Path) -> object:
        """Undo :meth:`place`."""


@dataclass(frozen=True)
class CacheEntry:
    """One file to record: its facts, and how to name it and move it into the cache.

    Receipt makes one with :meth:`of` from plain values; :meth:`Catalog.record_cached
    <obsflow.catalog.Catalog.record_cached>` takes the callables themselves."""

    new: NewFile
    make_archive_id: Callable[[int], str]
    """Candidate archive IDs: bump 0, 1, 2, ... past IDs already taken."""
    cache_path: Callable[[str], str]
    place: Callable[[str], object]
    """Move the bytes into the cache under this archive ID (inside the transaction)."""
    unplace: Callable[[str], object]
    """Undo ``place`` when the transaction fails after it."""
    ledger: Mapping[LedgerEvent, datetime]
    versions_by_name: bool = True
    """A live file of the same instrument and name (other bytes) is this file's older
    version, which it supersedes; False: the two are different files (another exposure
    whose name happens to be the same), both current."""

    @classmethod
    def of(
        cls,
        new: NewFile,
        archive_ids: ArchiveIdScheme | GivenArchiveId,
        temp: Path,
        cache: Placement,
        ledger: Mapping[LedgerEvent, datetime],
        *,
        versions_by_name: bool = True,
    ) -> CacheEntry:
        """The entry of a file whose bytes wait in ``temp``, to be moved into ``cache``
        under ``cache.key(instrument, night, archive ID)`` (``new`` has both)."""
        if new.instrument is None or new.night is None:
            raise CatalogError(f"{new.original_name}: a cached file needs an instrument and night")
        key = partial(cache.key, new.instrument, new.night)
        return cls(
            new=new,
            make_archive_id=archive_ids,
            cache_path=key,
            place=lambda archive_id: cache.place(temp, key(archive_id)),
            unplace=lambda archive_id: cache.unplace(key(archive_id), temp),
            ledger=ledger,
            versions_by_name=versions_by_name,
        )


@dataclass(frozen=True)
class Recorded:
    """What recording did: a new row, or found the same bytes already."""

    file_id: int
    archive_id: str
    duplicate: bool
    superseded: str | None = None
    """The archive ID of the older version this file replaces, if any."""
    same_name_as: str | None = None
    """The archive ID of another, current file with this file's name that it does not
    replace (its product is not versioned by name: another exposure)."""


_LIVE = select(files.c.sha256, files.c.id, files.c.archive_id).where(
    files.c.sha256.in_(bindparam("shas", expanding=True)), schema.is_live()
)
_LATEST = select(
    files.c.id, files.c.archive_id, files.c.version, files.c.instrument, files.c.original_name
).where(
    files.c.original_name.in_(bindparam("names", expanding=True)),
    files.c.state != FileState.REJECTED,
    files.c.superseded_by.is_(None),
)
_TAKEN = select(files.c.archive_id).where(files.c.archive_id.in_(bindparam("ids", expanding=True)))
_INSERT_FILES = insert(files).returning(files.c.id, sort_by_parameter_order=True)
_SUPERSEDE = (
    update(files).where(files.c.id == bindparam("b_old")).values(superseded_by=bindparam("b_new"))
)


def record(
    conn: Connection,
    entries: Sequence[CacheEntry],
    now: datetime,
    placed: list[tuple[CacheEntry, str]],
) -> list[Recorded]:
    """Record ``entries`` on ``conn`` (inside the caller's transaction), in order.

    Each placement is appended to ``placed`` so the caller can undo them if the
    transaction does not commit.
    """
    if conn.dialect.name == "postgresql":
        # shared with other recorders, exclusive for the orphan sweep (see Catalog.sweep)
        conn.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": PLACEMENT_LOCK})
    out: list[Recorded] = []
    for round_ in _rounds(entries):
        out += _record_round(conn, round_, now, placed)
    return out


def _rounds(entries: Sequence[CacheEntry]) -> Iterator[list[CacheEntry]]:
    current: list[CacheEntry] = []
    seen: set[object] = set()
    for entry in entries:
        keys = {entry.new.sha256, (entry.new.instrument, entry.new.original_name)}
        if seen & keys:
            yield current
            current, seen = [], set()
        current.append(entry)
        seen |= keys
    if current:
        yield current


def _record_round(
    conn: Connection,
    entries: list[CacheEntry],
    now: datetime,
    placed: list[tuple[CacheEntry, str]],
) -> list[Recorded]:
    live = {r.sha256: r for r in conn.execute(_LIVE, {"shas": [e.new.sha256 for e in entries]})}
    latest = {
        (r.instrument, r.original_name): r
        for r in conn.execute(_LATEST, {"names": [e.new.original_name for e in entries]})
    }
    first_choice = [e.make_archive_id(0) for e in entries]
    taken = set(conn.execute(_TAKEN, {"ids": first_choice}).scalars())
    checked = set(first_choice)

    fresh: list[tuple[CacheEntry, str, Any]] = []  # (entry, archive ID, older row or None)
    namesakes: dict[int, str] = {}  # index → a current file of the same name, kept apart
    results: dict[int, Recorded] = {}
    for index, entry in enumerate(entries):
        same = live.get(entry.new.sha256)
        if same is not None:
            results[index] = Recorded(same.id, same.archive_id, duplicate=True)
            continue
        archive_id = _free_id(conn, entry.make_archive_id, taken, checked)
        taken.add(archive_id)
        older = latest.get((entry.new.instrument, entry.new.original_name))
        if older is not None and not entry.versions_by_name:
            namesakes[index] = older.archive_id
            older = None
        fresh.append((entry, archive_id, older))
    if fresh:
        rows = [
            {
                **file_values(entry.new),
                "archive_id": archive_id,
                "state": FileState.CACHED.value,
                "cache_path": entry.cache_path(archive_id),
                "version": older.version + 1 if older is not None else 1,
            }
            for entry, archive_id, older in fresh
        ]
        ids = [row.id for row in conn.execute(_INSERT_FILES, rows)]
        _insert_details(
            conn, [(entry, file_id) for (entry, _, _), file_id in zip(fresh, ids, strict=True)], now
        )
        superseding = [
            {"b_old": older.id, "b_new": file_id}
            for (_, _, older), file_id in zip(fresh, ids, strict=True)
            if older is not None
        ]
        if superseding:
            conn.execute(_SUPERSEDE, superseding)
            conn.execute(  # the older version's ledger says when it stopped being current
                insert(schema.ledger),
                [
                    {"file_id": s["b_old"], "event": LedgerEvent.SUPERSEDED.value, "at": now}
                    for s in superseding
                ],
            )
        for entry, archive_id, _ in fresh:
            entry.place(archive_id)
            placed.append((entry, archive_id))
        it = iter(zip(fresh, ids, strict=True))
        for index in range(len(entries)):
            if index not in results:
                (_, archive_id, older), file_id = next(it)
                results[index] = Recorded(
                    file_id,
                    archive_id,
                    duplicate=False,
                    superseded=older.archive_id if older is not None else None,
                    same_name_as=namesakes.get(index),
                )
    return [results[i] for i in range(len(entries))]


def _free_id(
    conn: Connection, make: Callable[[int], str], taken: set[str], checked: set[str]
) -> str:
    for bump in range(10_000):
        candidate = make(bump)
        if candidate in taken:
            continue
        if candidate not in checked:
            checked.add(candidate)
            if conn.execute(_TAKEN, {"ids": [candidate]}).first() is not None:
                taken.add(candidate)
                continue
        return candidate
    raise CatalogError(f"no free archive ID near {make(0)}")


def _insert_details(conn: Connection, rows: list[tuple[CacheEntry, int]], now: datetime) -> None:
    tags = [
        {"file_id": file_id, "tag": tag, "start_utc": entry.new.start}
        for entry, file_id in rows
        for tag in dict.fromkeys(entry.new.tags)
    ]
    words = [
        {"file_id": file_id, "name": name, **keyword_value(value)}
        for entry, file_id in rows
        for name, value in (entry.new.keywords or {}).items()
    ]
    ledger = [
        {"file_id": file_id, "event": event.value, "at": at}
        for entry, file_id in rows
        for event, at in entry.ledger.items()
    ]
    requests = [
        {
            "file_id": file_id,
            "state": RequestState.PENDING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for _, file_id in rows
    ]
    for table, params in (
        (schema.tags, tags),
        (schema.keywords, words),
        (schema.ledger, ledger),
        (schema.ingest_requests, requests),
    ):
        if params:
            conn.execute(insert(table), params)


def file_values(new: NewFile) -> dict[str, Any]:
    values = {k: v for k, v in new.__dict__.items() if k not in ("tags", "keywords")}
    values["start_utc"] = values.pop("start")
    values["stop_utc"] = values.pop("stop")
    return values


def keyword_value(value: Any) -> dict[str, Any]:
    """Keyword values keep their FITS type; numbers are also stored as floats for ranges."""
    if isinstance(value, bool):
        return {"kind": "b", "value_text": "T" if value else "F", "value_num": float(value)}
    if isinstance(value, int):
        return {"kind": "i", "value_text": str(value), "value_num": float(value)}
    if isinstance(value, float):
        return {"kind": "f", "value_text": repr(value), "value_num": value}
    if value is None:
        return {"kind": "n", "value_text": None, "value_num": None}
    return {"kind": "s", "value_text": str(value), "value_num": None}

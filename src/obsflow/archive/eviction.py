"""Eviction: the cache kept within its budget, least recently read archived files first.

:meth:`Evictor.trim` evicts the least recently accessed archived files until the cache
holds at most its low-water mark (or a size given); :meth:`Evictor.expire` evicts
those archived before a moment (an agent's retention). An evicted file becomes
*virtual*: its row, tags and keywords stay, ``find`` still finds it, and
:meth:`obsflow.archive.fetch.Fetcher.fetch` brings it back.

The catalog, not memory, is the cache's index (:mod:`obsflow.catalog.cachestate`): the
cache's size is a ``SUM`` query and eviction walks the files in ``last_access`` order in
chunks (index ``ix_files_virtual_last_access``), so a cache of a million files costs no
memory here.

Rules of the cache:

- Only ``archived`` files are evicted (the archive holds their bytes); a file still
  ``cached`` or ``failed`` is never touched, nor one pinned by anyone
  (:mod:`obsflow.archive.pins`).
- A file never read has no ``last_access``; for the eviction order it counts as read
  when it was cached (its ledger's ``cached`` stamp, else ``archived``, else the trim's
  own time): :meth:`Evictor.trim` writes that time into the rows first, so that the
  order is one index walk. A fresh frame is therefore not the first to go, whatever
  older files have been read since.
- Every eviction moves the cached file to a temp file inside the catalog transaction
  that marks the row virtual, and moves it back if that transaction does not commit.
  A crash in between leaves either a row not virtual whose cached file is missing
  (``fetch`` restores it from the archive) or a virtual row whose file is present (the
  next ``fetch`` restores it over itself); never a row whose bytes are lost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from obsflow.archive.cache import Cache
from obsflow.catalog import Catalog
from obsflow.catalog.cachestate import CacheFigures, CacheState, Candidate
from obsflow.settings import CachePolicy
from obsflow.states import FileState

log = logging.getLogger(__name__)

WALK_CHUNK: Final = 500
"""Rows read per step of the eviction walk (and evicted per transaction, at most)."""


@dataclass(frozen=True)
class CacheStatus(CacheFigures):
    """The cache's figures at one moment (:class:`~obsflow.catalog.cachestate.CacheFigures`,
    the same the site's status shows), against the site's budget."""

    budget: int | None
    low_water: int | None

    @property
    def over_budget(self) -> bool:
        return self.budget is not None and self.bytes > self.budget

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "budget": self.budget,
            "low_water": self.low_water,
            "over_budget": self.over_budget,
        }


@dataclass(frozen=True)
class TrimReport:
    evicted: int
    freed_bytes: int
    remaining_bytes: int
    skipped_pinned: int
    """Archived files the walk passed over, still over the target, because pinned."""
    skipped_unarchived: int = 0
    """Files the walk passed over, still over the target, because not archived yet."""
    target: int | None = None
    """The size trimmed to (None: no budget and none given, nothing done)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Evictor:
    """The cache's budget kept over one catalog and cache."""

    def __init__(
        self,
        catalog: Catalog,
        cache: Cache,
        policy: CachePolicy,
        clock: Callable[[], datetime],
    ) -> None:
        self.state = CacheState(catalog)
        self.cache = cache
        self.policy = policy
        self.clock = clock

    # ------------------------------------------------------------ size and status

    def cached_bytes(self) -> int:
        """The bytes of every file in the cache (one SUM over the catalog)."""
        return self.state.cached_bytes()

    def over_budget(self) -> bool:
        budget = self.policy.budget_bytes
        return budget is not None and self.cached_bytes() > budget

    def status(self) -> CacheStatus:
        return CacheStatus(
            **asdict(self.state.figures()),
            budget=self.policy.budget_bytes,
            low_water=self.policy.low_water,
        )

    # ------------------------------------------------------------ trim and expire

    def trim(self, to_bytes: int | None = None) -> TrimReport:
        """Evict the least recently accessed archived, unpinned files until the cache
        holds at most ``to_bytes`` (default: the policy's low-water mark; with neither,
        nothing is done)."""
        if to_bytes is not None and to_bytes < 0:
            raise ValueError(f"cannot trim the cache to {to_bytes} bytes")
        target = to_bytes if to_bytes is not None else self.policy.low_water
        total = self.cached_bytes()
        if target is None or total <= target:
            return TrimReport(0, 0, total, 0, target=target)
        started = self.clock()
        self.state.stamp_never_read(started)
        evicted = freed = skipped_pinned = skipped_unarchived = 0
        victims: list[Candidate] = []
        projected = total  # what the cache will hold once ``victims`` are evicted

        def evict() -> None:
            nonlocal evicted, freed, total, projected
            for row in self._evict(victims):
                evicted += 1
                freed += row.size
                total -= row.size
            victims.clear()
            projected = total  # a victim read or pinned meanwhile was not evicted

        for row in self.state.least_recently_read(started, WALK_CHUNK):
            if row.state is not FileState.ARCHIVED:
                skipped_unarchived += 1
            elif row.pinned:
                skipped_pinned += 1
            else:
                victims.append(row)
                projected -= row.size
            if projected <= target or len(victims) >= WALK_CHUNK:
                evict()
                if total <= target:
                    break
        evict()
        remaining = self.cached_bytes()
        log.info(
            "trimmed the cache to %d bytes (target %d): evicted %d file(s), %d bytes; "
            "passed over %d pinned and %d unarchived",
            remaining,
            target,
            evicted,
            freed,
            skipped_pinned,
            skipped_unarchived,
        )
        return TrimReport(
            evicted, freed, remaining, skipped_pinned, skipped_unarchived, target=target
        )

    def expire(self, archived_before: datetime) -> int:
        """Evict the cached files archived at or before ``archived_before``, pinned ones
        excepted (an agent's retention: its copies go once the archive server has
        confirmed them); returns how many."""
        total = 0
        while True:
            rows = self.state.archived_before(archived_before, WALK_CHUNK)
            evicted = self._evict(rows)
            total += len(evicted)
            if len(rows) < WALK_CHUNK or not evicted:
                return total

    def _evict(self, victims: Sequence[Candidate]) -> list[Candidate]:
        """Make ``victims`` virtual; return those evicted (a file read, pinned or evicted
        since the walk saw it is left alone).

        Order: in one transaction, mark the row virtual, then move its cached file to a
        temp file; commit; then delete the temp file. A crash before the commit leaves
        the row not virtual and its file in ``cache/.tmp`` (``fetch`` restores it from
        the archive; the temp file is cleaned); after, a virtual row and a temp file.
        The archive holds the bytes throughout: only archived files get here.
        """
        if not victims:
            return []
        moved: list[tuple[Candidate, Path | None]] = []
        try:
            with self.state.evicting() as evicting:
                for row in victims:
                    if not evicting.mark_virtual(row):
                        continue
                    temp = self.cache.temp_file()
                    try:
                        os.replace(self.cache.path(row.cache_path), temp)
                    except FileNotFoundError:  # gone already (by hand): virtual all the same
                        moved.append((row, None))
                    else:
                        moved.append((row, temp))
        except BaseException:
            for row, aside in reversed(moved):
                if aside is not None:
                    self.cache.place(aside, row.cache_path)
            raise
        for row, aside in moved:
            if aside is not None:
                aside.unlink(missing_ok=True)
            log.debug("evicted %s", row.archive_id, extra={"archive_id": row.archive_id})
        return [row for row, _ in moved]

"""Retrieval: the one place runs, the API, the CLI and the daemon reach the cache policy.

:class:`Retriever` gathers the archive's ways back to a file's bytes and its cache
policy over one catalog, cache and archive storage, each done by its own module:

* :mod:`~obsflow.archive.fetch`: a file's bytes, restored from the archive when evicted;
* :mod:`~obsflow.archive.eviction`: the cache kept within its budget (trim, expire);
* :mod:`~obsflow.archive.pins`: files kept in the cache for a run or an operator;
* :mod:`~obsflow.catalog.tags`: tags on files (``obsflow tag add|rm``).

The names callers use (:class:`NotFoundError`, :class:`InvalidTagError`,
:func:`check_tag`, :class:`CacheStatus`, :class:`TrimReport`) are importable here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from obsflow.archive.cache import Cache
from obsflow.archive.eviction import CacheStatus, Evictor, TrimReport
from obsflow.archive.fetch import Fetcher
from obsflow.archive.pins import Pins
from obsflow.archive.storage import Storage
from obsflow.catalog import Catalog
from obsflow.catalog.tags import InvalidTagError, Tags, check_tag
from obsflow.errors import NotFoundError
from obsflow.settings import CachePolicy

__all__ = [
    "CacheStatus",
    "InvalidTagError",
    "NotFoundError",
    "Retriever",
    "TrimReport",
    "check_tag",
]


class Retriever:
    """Fetch, trim, pin, tag: the cache policy over one catalog, cache and archive storage."""

    def __init__(
        self,
        catalog: Catalog,
        cache: Cache,
        storage: Storage,
        policy: CachePolicy,
        clock: Callable[[], datetime],
    ) -> None:
        self.catalog = catalog
        self.cache = cache
        self.storage = storage
        self.policy = policy
        self.clock = clock
        self.fetcher = Fetcher(catalog, cache, storage, clock)
        self.evictor = Evictor(catalog, cache, policy, clock)
        self.pins = Pins(catalog, clock)
        self.tags = Tags(catalog)

    # fetch
    def fetch(self, archive_id: str) -> Path:
        """See :meth:`obsflow.archive.fetch.Fetcher.fetch`."""
        return self.fetcher.fetch(archive_id)

    # eviction
    def cached_bytes(self) -> int:
        """The bytes of every file in the cache (one SUM over the catalog)."""
        return self.evictor.cached_bytes()

    def over_budget(self) -> bool:
        return self.evictor.over_budget()

    def status(self) -> CacheStatus:
        return self.evictor.status()

    def trim(self, to_bytes: int | None = None) -> TrimReport:
        """See :meth:`obsflow.archive.eviction.Evictor.trim`."""
        return self.evictor.trim(to_bytes)

    def expire(self, archived_before: datetime) -> int:
        """See :meth:`obsflow.archive.eviction.Evictor.expire`."""
        return self.evictor.expire(archived_before)

    # pins
    def pin(self, archive_id: str, holder: str) -> None:
        """Keep the file in the cache for ``holder`` until unpinned (idempotent)."""
        self.pins.pin(archive_id, holder)

    def unpin(self, archive_id: str, holder: str | None = None) -> int:
        """Drop ``holder``'s pin of the file (None: every holder's); return how many."""
        return self.pins.unpin(archive_id, holder)

    def pin_ids(self, file_ids: Sequence[int], holder: str) -> None:
        """Pin files by row ID for ``holder``; IDs no file has are ignored."""
        self.pins.pin_ids(file_ids, holder)

    def unpin_holder(self, holder: str) -> int:
        """Drop every pin of ``holder`` (a finished run's); return how many."""
        return self.pins.unpin_holder(holder)

    # tags
    def add_tag(self, archive_id: str, tag: str) -> bool:
        """Tag the file; False if it had the tag already."""
        return self.tags.add(archive_id, tag)

    def remove_tag(self, archive_id: str, tag: str) -> bool:
        """Remove the tag from the file; False if it did not have it."""
        return self.tags.remove(archive_id, tag)

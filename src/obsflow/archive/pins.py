"""Pins: files kept in the cache for someone, whatever the budget says.

A pin is a ``(file, holder)`` row: a run pins its inputs while it reads them
(``run:12``), an operator pins by hand (``operator``). :mod:`obsflow.archive.eviction`
never evicts a file with a pin, whoever holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final

from obsflow.catalog import Catalog
from obsflow.catalog.cachestate import CacheState
from obsflow.errors import NotFoundError

HOLDER_MAX: Final = 64


class Pins:
    """The pins of the files of one catalog."""

    def __init__(self, catalog: Catalog, clock: Callable[[], datetime]) -> None:
        self.state = CacheState(catalog)
        self.clock = clock

    def pin(self, archive_id: str, holder: str) -> None:
        """Keep the file in the cache for ``holder`` until unpinned (idempotent)."""
        self.pin_ids([self._file_id(archive_id)], holder)

    def unpin(self, archive_id: str, holder: str | None = None) -> int:
        """Drop ``holder``'s pin of the file (None: every holder's); return how many."""
        return self.state.unpin(self._file_id(archive_id), holder)

    def pin_ids(self, file_ids: Sequence[int], holder: str) -> None:
        """Pin files by row ID for ``holder`` (a run pins its inputs as ``run:ID``);
        IDs no file has are ignored."""
        _check_holder(holder)
        self.state.pin(file_ids, holder, self.clock())

    def unpin_holder(self, holder: str) -> int:
        """Drop every pin of ``holder`` (a finished run's); return how many."""
        return self.state.unpin_holder(holder)

    def _file_id(self, archive_id: str) -> int:
        found = self.state.catalog.file_id(archive_id)
        if found is None:
            raise NotFoundError(archive_id)
        return found


def _check_holder(holder: str) -> None:
    if not 0 < len(holder) <= HOLDER_MAX or not holder.isprintable():
        raise ValueError(
            f"invalid pin holder {holder!r}: expected 1 to {HOLDER_MAX} printable characters"
        )

"""Archived notices: the ingestors of a process say which files they have just archived,
and whoever waits for one of them (an upload that answers once its frame is archived,
:mod:`obsflow.api.transfer`) wakes at once instead of asking the catalog again and again.

A notice is a hint, never the fact: the catalog says what is archived. A waiter asks the
catalog after it wakes, and still asks now and then without a notice (an ingestor in
another process sends none to this one).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class ArchivedNotice:
    """Thread-safe: the ingestors' threads :meth:`tell`; event loops wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    @contextmanager
    def waiting(self, archive_id: str) -> Iterator[asyncio.Event]:
        """An event set (on the running loop) when ``archive_id`` is told archived; ask the
        catalog once after entering, so that a notice sent just before is not missed."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiting.setdefault(archive_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                left = [e for e in self._waiting.get(archive_id, []) if e is not entry]
                if left:
                    self._waiting[archive_id] = left
                else:
                    self._waiting.pop(archive_id, None)

    def tell(self, archive_ids: Iterable[str]) -> None:
        """These files are archived (their transaction has committed)."""
        with self._lock:
            if not self._waiting:
                return
            woken = [e for a in archive_ids for e in self._waiting.pop(a, [])]
        for loop, event in woken:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: nobody waits there any more
                continue

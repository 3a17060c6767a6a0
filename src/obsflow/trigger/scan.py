"""The reconcile scan: at start-up and every N seconds, offer every file in the watched
directories that receipt has not dealt with at its present size and mtime.

It is what makes a missed broadcast, an event the kernel never sent, or a file
written while the daemon was down harmless. The seen-ledger keeps a scan from
re-reading or re-hashing what it has seen: one ``stat`` per file, one indexed
query per 500 files.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from obsflow.catalog.seen import SeenLedger, Stat
from obsflow.trigger import Health, Offer, Trigger

log = logging.getLogger(__name__)


class ReconcileScan(Trigger):
    kind = "scan"

    def __init__(
        self,
        directories: Sequence[tuple[Path, bool]],
        seen: SeenLedger,
        *,
        interval_seconds: float,
    ) -> None:
        """``directories``: (directory, recursive) pairs."""
        self.directories = tuple(directories)
        self.seen = seen
        self.interval = interval_seconds
        self.name = "reconcile-scan"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None

    def start(self, offer: Offer) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(offer,), name="reconcile", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def health(self) -> Health:
        if self._last_error:
            return Health(ok=False, detail=self._last_error)
        return Health(ok=True)

    def _loop(self, offer: Offer) -> None:
        while not self._stop.is_set():
            try:
                found = self.scan_once(offer)
                self._last_error = None
                if found:
                    log.info("reconcile scan offered %d file(s) no trigger reported", found)
            except Exception as exc:  # a scan that fails is retried next time; say why
                self._last_error = f"scan failed: {exc}"
                log.exception("reconcile scan failed")
            self._stop.wait(self.interval)

    def scan_once(self, offer: Offer) -> int:
        """Offer every file not dealt with at its present size and mtime; return how many."""
        stats = [s for d, recursive in self.directories for s in _files(d, recursive)]
        done = self.seen.unchanged(stats)
        fresh = [s for s in stats if s.path not in done]
        for stat in fresh:
            if self._stop.is_set():
                break
            offer(Path(stat.path))
        return len(fresh)


def _files(directory: Path, recursive: bool) -> Iterator[Stat]:
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    yield from _files(Path(entry.path), recursive)
            else:  # a FIFO, a device, a link too: receipt refuses them with a reason
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    st = entry.stat(follow_symlinks=False)  # a link to nothing
                yield Stat(entry.path, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            continue  # gone between listing and stat

"""Intake: receipt for a stream of offered paths (the daemon's, and ``obsflow ingest``'s).

Offered paths are prepared by ``workers`` threads (recognise, wait until complete,
validate, copy to a cache temp file) and recorded by one committer thread, a
batch per transaction (group commit: whatever is ready, after lingering briefly
for more). A path offered again while it is in flight is not prepared twice at
once: it is looked at once more when the first pass ends (a trigger may report
a file as created and again as closed). Each final outcome is remembered in the
seen-ledger by size and mtime, so the reconcile scan does not offer it again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from obsflow.catalog.seen import SeenLedger, Stat
from obsflow.receipt.receiver import Outcome, Prepared, Received, Receiver

log = logging.getLogger(__name__)

FINAL = frozenset(
    {Outcome.CACHED, Outcome.DUPLICATE, Outcome.REJECTED, Outcome.IGNORED, Outcome.REFUSED}
)
"""Outcomes that settle a path at its present size and mtime (the others are retried)."""

_Ready = tuple[Path, Prepared | Received]


class Wakeable(Protocol):
    """Something to set when new files are committed: a :class:`threading.Event`, or
    :class:`Wake`, which sets several."""

    def set(self) -> None: ...


class Wake:
    """Sets every one of several events at once (the ingestors', the tracker's)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def set(self) -> None:
        for event in self.events:
            event.set()


class Intake:
    def __init__(
        self,
        receiver: Receiver,
        *,
        workers: int,
        on_result: Callable[[Received], None] = lambda r: None,
        seen: SeenLedger | None = None,
        batch: int = 128,
        linger: float = 0.02,
        committed: Wakeable | None = None,
    ) -> None:
        """``committed``, if given, is set after each transaction that queued new files."""
        self.receiver = receiver
        self.on_result = on_result
        self.committed = committed
        self.seen = seen
        self.batch = batch
        self.linger = linger
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="receipt")
        self._ready: queue.SimpleQueue[_Ready | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._inflight: set[Path] = set()
        self._again: set[Path] = set()
        self._closed = False
        self._committer = threading.Thread(target=self._commit_loop, name="committer", daemon=True)
        self._committer.start()

    def offer(self, path: Path) -> None:
        """Take ``path`` in (from any thread); a path already in flight is looked at again
        once its current pass ends."""
        with self._lock:
            if self._closed:
                return
            if path in self._inflight:
                self._again.add(path)
                return
            self._inflight.add(path)
        self._pool.submit(self._prepare, path)

    def join(self) -> None:
        """Wait until every path offered so far has its result."""
        with self._lock:
            self._lock.wait_for(lambda: not self._inflight)

    def close(self) -> None:
        """Finish what is in flight, then stop (offers after this are dropped)."""
        self.join()
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
        self._ready.put(None)
        self._committer.join()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def _prepare(self, path: Path) -> None:
        try:
            result: Prepared | Received = self.receiver.prepare(path)
        except Exception as exc:  # a bug must not stop the other files: it is this file's error
            log.exception("receipt of %s failed unexpectedly", path)
            result = Received(path, Outcome.ERROR, reason=f"unexpected error: {exc!r}")
        self._ready.put((path, result))

    def _commit_loop(self) -> None:
        while True:
            first = self._ready.get()
            if first is None:
                return
            done = [first]
            until = time.monotonic() + self.linger
            while len(done) < self.batch:
                try:
                    item = self._ready.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._ready.put(None)  # stop after this batch
                    break
                done.append(item)
            self._record_batch(done)

    def _record_batch(self, done: list[_Ready]) -> None:
        """Commit the prepared files of one batch in one transaction, report every
        result, and remember the final ones as seen."""
        prepared = [r for _, r in done if isinstance(r, Prepared)]
        results: list[Received] = [r for _, r in done if isinstance(r, Received)]
        if prepared:
            try:
                results += self.receiver.commit(prepared)
            except Exception as exc:  # commit reports site errors itself; this is a bug
                log.exception("recording %d file(s) failed unexpectedly", len(prepared))
                results += [
                    Received(p.path, Outcome.ERROR, product=p.product.id, reason=repr(exc))
                    for p in prepared
                ]
        if self.committed is not None and any(r.outcome is Outcome.CACHED for r in results):
            self.committed.set()  # wake the ingestors at once
        settled = self._remember(results)
        for result in results:
            try:
                self.on_result(result)
            except Exception:
                log.exception("on_result failed for %s", result.path)
        for path, _ in done:
            self._finish(path, settled.get(path))

    def _remember(self, results: list[Received]) -> dict[Path, Stat]:
        """Stat each path with a final outcome, record it as seen; return the stats."""
        stats: dict[Path, Stat] = {}
        for result in results:
            if result.outcome in FINAL:
                try:
                    st = result.path.stat()
                except OSError:
                    continue  # removed (remove_source): nothing left to look at
                stats[result.path] = Stat(str(result.path), st.st_size, st.st_mtime_ns)
        if self.seen is not None:
            try:
                self.seen.mark(stats.values(), self.receiver.clock())
            except Exception:  # the scan will merely look at these files once more
                log.exception("could not record %d file(s) as seen", len(stats))
        return stats

    def _finish(self, path: Path, settled: Stat | None) -> None:
        with self._lock:
            again = path in self._again and not self._closed
        if again and settled is not None and _unchanged(path, settled):
            again = False  # offered again meanwhile (created, then closed): nothing new
        with self._lock:
            if again:
                self._again.discard(path)
                resubmit = True
            else:
                self._again.discard(path)
                self._inflight.discard(path)
                resubmit = False
                self._lock.notify_all()
        if resubmit:
            self._pool.submit(self._prepare, path)


def _unchanged(path: Path, stat: Stat) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (stat.size, stat.mtime_ns)

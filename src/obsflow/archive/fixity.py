"""Fixity audits: archived files re-read from the medium, their sha256 checked.

An archive is judged on whether what it holds is still what it received (OAIS calls it
fixity). :class:`Auditor` reads each selected file back from archive storage (from the
disk, not the page cache: :meth:`obsflow.archive.storage.Storage.sha256`), at a rate that
leaves the night its I/O, and compares it with the sha256 receipt recorded::

    the stored bytes hash to the catalog's sha256   → ok
    they do not, or the object is gone               → a good copy in the cache (its own
                                                       sha256 checked first) is stored
                                                       again and read back → restored
                                                     → else mismatch | missing, logged
                                                       as an error (the alert)
    the storage cannot be read                       → unreadable (the reason)

Every check is a row in the catalog (:mod:`obsflow.catalog.fixity`), whatever it found.
``obsflow verify`` runs one audit; the daemon audits continuously when
``fixity.rate_mb_s`` is set (:meth:`Auditor.run`): the least recently audited files
first, each again once ``fixity.cycle_days`` have passed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from obsflow.archive.cache import Cache
from obsflow.archive.storage import Storage, Throttle
from obsflow.catalog import Catalog
from obsflow.catalog.fixity import Audited, FixityCheck, FixityStore
from obsflow.errors import StorageError
from obsflow.settings import Fixity
from obsflow.states import FixityOutcome

log = logging.getLogger(__name__)

MB = 1_000_000
RECORD_EVERY = 50
"""Checks are written to the catalog in batches of this many (and at the end)."""


@dataclass
class AuditReport:
    """What one audit found, file by file."""

    checks: list[FixityCheck] = field(default_factory=list)

    def count(self, outcome: FixityOutcome) -> int:
        return sum(c.outcome is outcome for c in self.checks)

    @property
    def bad(self) -> list[FixityCheck]:
        """The files the archive does not hold as received (not restored)."""
        return [c for c in self.checks if c.outcome.bad]

    @property
    def bytes_read(self) -> int:
        return sum(c.bytes_read for c in self.checks)


class Auditor:
    def __init__(
        self,
        catalog: Catalog,
        storage: Storage,
        cache: Cache,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = FixityStore(catalog)
        self.storage = storage
        self.cache = cache
        self.clock = clock

    def audit(
        self,
        files: Sequence[Audited],
        *,
        rate_mb_s: float | None = None,
        restore: bool = True,
        stop: threading.Event | None = None,
        on_check: Callable[[FixityCheck], object] | None = None,
    ) -> AuditReport:
        """Check each of ``files`` (at most ``rate_mb_s`` MB/s of reading), record every
        check, and restore what can be restored (unless ``restore`` is False); stops
        between two files once ``stop`` is set."""
        throttle = Throttle(rate_mb_s * MB, stop=stop) if rate_mb_s else None
        report = AuditReport()
        unrecorded: list[FixityCheck] = []
        try:
            for audited in files:
                if stop is not None and stop.is_set():
                    break
                check = self._check(audited, throttle, restore)
                report.checks.append(check)
                unrecorded.append(check)
                if check.outcome.bad:
                    log.error(
                        "fixity: %s %s: %s",
                        audited.archive_id,
                        check.outcome.value,
                        check.detail,
                        extra={"archive_id": audited.archive_id},
                    )
                elif check.outcome is FixityOutcome.RESTORED:
                    log.warning(
                        "fixity: %s restored: %s",
                        audited.archive_id,
                        check.detail,
                        extra={"archive_id": audited.archive_id},
                    )
                if on_check is not None:
                    on_check(check)
                if len(unrecorded) >= RECORD_EVERY:
                    self.store.record(unrecorded)
                    unrecorded = []
        finally:
            self.store.record(unrecorded)
        return report

    def run(self, settings: Fixity, stop: threading.Event) -> None:
        """Audit continuously until ``stop`` (the daemon's thread): a batch at a time,
        files never audited first, then each file again after ``cycle_days``; when none
        is due, look again after ``look_seconds``."""
        while not stop.is_set():
            try:
                due_before = self.clock() - timedelta(days=settings.cycle_days)
                batch = self.store.select(not_since=due_before, limit=settings.batch)
                if batch:
                    self.audit(batch, rate_mb_s=settings.rate_mb_s, stop=stop)
                    continue
            except Exception:  # the catalog briefly unreachable: try again later
                log.exception("fixity audit failed; trying again later")
            stop.wait(settings.look_seconds)

    def _check(self, audited: Audited, throttle: Throttle | None, restore: bool) -> FixityCheck:
        key = audited.key
        found: str | None = None
        try:
            if not self.storage.exists(key):
                outcome, detail = (
                    FixityOutcome.MISSING,
                    f"no object at {self.storage.describe(key)}",
                )
            else:
                found = self.storage.sha256(key, throttle=throttle)
                if found == audited.sha256:
                    return self._found(audited, FixityOutcome.OK, found, None)
                outcome = FixityOutcome.MISMATCH
                detail = (
                    f"{self.storage.describe(key)} has sha256 {found[:12]}…, "
                    f"expected {audited.sha256[:12]}…"
                )
        except StorageError as exc:
            return self._found(audited, FixityOutcome.UNREADABLE, None, str(exc))
        if restore:
            restored = self._restore(audited)
            if restored is not None:
                return self._found(
                    audited, FixityOutcome.RESTORED, found, f"{detail}; {restored}", reread=True
                )
            detail += "; no good copy to restore it from (the cache has none)"
        return self._found(audited, outcome, found, detail)

    def _restore(self, audited: Audited) -> str | None:
        """Store the cache's copy again if it is good; how, or None if it cannot."""
        if audited.cache_path is None:
            return None
        source = self.cache.path(audited.cache_path)
        try:
            with source.open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != audited.sha256:
                    return None  # the cache's copy is no better
            self.storage.put(source, audited.key)
            self.storage.flush()
            if self.storage.sha256(audited.key) != audited.sha256:
                return None
        except (OSError, StorageError) as exc:
            log.warning("fixity: cannot restore %s from the cache: %s", audited.archive_id, exc)
            return None
        return f"stored again from the cache's copy {source}, and read back"

    def _found(
        self,
        audited: Audited,
        outcome: FixityOutcome,
        found: str | None,
        detail: str | None,
        reread: bool = False,
    ) -> FixityCheck:
        read = audited.size * (2 if reread else 1) if found is not None else 0
        return FixityCheck(
            file_id=audited.file_id,
            archive_id=audited.archive_id,
            checked_at=self.clock(),
            outcome=outcome,
            found_sha256=found,
            bytes_read=read,
            detail=detail,
        )

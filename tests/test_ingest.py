"""The ingestor: from the cache into archive storage, on real catalogs (SQLite, PostgreSQL).

Failures are injected only at the documented seam, archive storage: subclasses of
:class:`obsflow.storage.LocalStorage` passed to ``open_site(settings, storage=...)``.
Time is a clock the test moves (``open_site(clock=...)``), so back-offs and leases expire
exactly when a test says so.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from obsflow.archive.ingest import IngestReport
from obsflow.archive.storage import LocalStorage, Storage
from obsflow.catalog import FileQuery, FileRecord
from obsflow.catalog.records import RequestRecord
from obsflow.errors import StorageError
from obsflow.receipt.receiver import Outcome
from obsflow.settings import Settings
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import FileState, LedgerEvent, RequestState

SiteFactory = Callable[..., Settings]


class ManualClock:
    """A clock that stands still until the test advances it."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FlakyStorage(LocalStorage):
    """Local storage whose ``put`` of the keys in ``broken`` goes wrong (all keys if None)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.broken: set[str] | None = None
        self.puts: list[str] = []

    def fails(self, key: str) -> bool:
        return self.broken is None or key in self.broken

    def put(self, source: Path, key: str) -> None:
        self.puts.append(key)
        if self.fails(key):
            self.bad_put(source, key)
        else:
            super().put(source, key)

    def bad_put(self, source: Path, key: str) -> None:
        raise NotImplementedError


class HalfWriteStorage(FlakyStorage):
    """Writes half the bytes to the final path, then fails (a non-atomic backend dying)."""

    error: type[Exception] = StorageError

    def bad_put(self, source: Path, key: str) -> None:
        data = source.read_bytes()
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[: len(data) // 2])
        if self.error is OSError:
            raise OSError(errno.ENOSPC, "simulated: no space left on device", str(target))
        raise StorageError(f"simulated: the connection dropped while storing {key}")


class CorruptingStorage(FlakyStorage):
    """Stores the bytes with one bit flipped (atomically, as a backend would), and says nothing."""

    def bad_put(self, source: Path, key: str) -> None:
        data = bytearray(source.read_bytes())
        data[len(data) // 2] ^= 0x01
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.part")
        temp.write_bytes(bytes(data))
        os.replace(temp, target)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@contextmanager
def opened(
    settings: Settings, clock: ManualClock, storage: Storage | None = None
) -> Iterator[Site]:
    site = open_site(settings, storage=storage, clock=clock)
    try:
        yield site
    finally:
        site.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def receive(site: Site, *paths: Path) -> list[FileRecord]:
    records = []
    for path in paths:
        result = site.receiver.receive(path)
        assert result.outcome is Outcome.CACHED, result
        assert result.archive_id is not None
        record = site.catalog.get(result.archive_id)
        assert record is not None
        records.append(record)
    return records


def reload(site: Site, record: FileRecord) -> FileRecord:
    fresh = site.catalog.get_by_id(record.id)
    assert fresh is not None
    return fresh


def request_of(site: Site, record: FileRecord) -> RequestRecord:
    [request] = site.queue.requests_for([record.id])
    return request


def archived_stamps(site: Site, record: FileRecord) -> int:
    return sum(e.event is LedgerEvent.ARCHIVED for e in site.catalog.ledger(record.id))


def assert_archived(site: Site, record: FileRecord) -> None:
    """Archived in the catalog, once in the ledger, and the right bytes in storage."""
    fresh = reload(site, record)
    assert fresh.state is FileState.ARCHIVED and fresh.reason is None
    assert fresh.archive_path == record.cache_path
    assert fresh.archive_path is not None
    assert site.storage.sha256(fresh.archive_path) == record.sha256
    request = request_of(site, record)
    assert request.state is RequestState.DONE and request.last_error is None
    assert archived_stamps(site, record) == 1


def assert_not_archived(site: Site, record: FileRecord, state: FileState) -> FileRecord:
    """Still in the cache (bytes intact), not archived, no archived stamp."""
    fresh = reload(site, record)
    assert fresh.state is state and fresh.archive_path is None
    assert record.cache_path is not None
    assert sha256(site.cache.path(record.cache_path)) == record.sha256
    assert archived_stamps(site, record) == 0
    return fresh


def empty(report: IngestReport) -> bool:
    return not report.archived and not report.errors


# ---------------------------------------------------------------- queue


def test_run_once_on_an_empty_queue_does_nothing(site: Site, frames: list[Path]) -> None:
    ingestor = site.ingestor()
    assert empty(ingestor.run_once())
    assert site.queue.counts() == {}
    [record] = receive(site, frames[0])
    assert ingestor.run_once().archived == [record.archive_id]
    report = ingestor.run_once()  # only a done request is left
    assert empty(report)
    assert site.queue.counts() == {RequestState.DONE: 1}
    assert_archived(site, record)


def test_an_unwritable_archive_keeps_the_file_cached_and_queued(
    make_site: SiteFactory, frames: list[Path], clock: ManualClock
) -> None:
    settings = make_site(ingest={"backoff_seconds": 60.0})
    obstacle = settings.archive / "OFCAM"  # a file where the instrument directory must go
    obstacle.write_text("not a directory")
    with opened(settings, clock) as site:
        summary = ingest_paths(site, [frames[0]])
        [received] = summary.received
        assert received.outcome is Outcome.CACHED and received.archive_id is not None
        assert summary.ingest.archived == []
        [(archive_id, error)] = summary.ingest.errors
        assert archive_id == received.archive_id
        assert str(obstacle) in error
        record = site.catalog.get(archive_id)
        assert record is not None
        assert_not_archived(site, record, FileState.CACHED)
        request = request_of(site, record)
        assert request.state is RequestState.PENDING and request.attempts == 1
        assert request.last_error is not None and str(obstacle) in request.last_error
        assert obstacle.read_text() == "not a directory"

        assert empty(site.ingestor().run_once())  # backing off: not due yet
        obstacle.unlink()
        clock.advance(120)
        report = site.ingestor().run_once()
        assert report.archived == [archive_id] and report.errors == []
        assert_archived(site, record)
        assert request_of(site, record).attempts == 2


@pytest.mark.parametrize("error", [StorageError, OSError])
def test_a_put_that_fails_midway_does_not_archive(
    make_site: SiteFactory, frames: list[Path], clock: ManualClock, error: type[Exception]
) -> None:
    settings = make_site()
    storage = HalfWriteStorage(settings.archive)
    storage.error = error
    with opened(settings, clock, storage) as site:
        [record] = receive(site, frames[0])
        report = site.ingestor().run_once()
        assert report.archived == []
        [(archive_id, message)] = report.errors
        assert archive_id == record.archive_id and "simulated" in message
        assert_not_archived(site, record, FileState.CACHED)
        request = request_of(site, record)
        assert request.state is RequestState.PENDING and request.attempts == 1
        assert request.last_error is not None and "simulated" in request.last_error

        storage.broken = set()  # the backend is healthy again
        report = site.ingestor().run_once()
        assert report.archived == [record.archive_id] and report.errors == []
        assert_archived(site, record)
        assert record.cache_path is not None
        assert storage.path(record.cache_path).read_bytes() == frames[0].read_bytes()


def test_a_put_that_silently_corrupts_is_caught_by_the_checksum(
    make_site: SiteFactory, frames: list[Path], clock: ManualClock
) -> None:
    settings = make_site()
    storage = CorruptingStorage(settings.archive)
    with opened(settings, clock, storage) as site:
        [record] = receive(site, frames[0])
        assert record.cache_path is not None and record.archive_id is not None
        report = site.ingestor().run_once()
        assert report.archived == []
        [(archive_id, message)] = report.errors
        assert archive_id == record.archive_id
        assert "sha256" in message and record.archive_id in message
        assert storage.puts == [record.cache_path]  # it was stored, then dropped
        assert not storage.exists(record.cache_path)
        assert not storage.path(record.cache_path).exists()
        assert_not_archived(site, record, FileState.CACHED)
        request = request_of(site, record)
        assert request.last_error == message and request.attempts == 1


def test_a_file_that_keeps_failing_ends_failed_without_blocking_the_queue(
    make_site: SiteFactory, frames: list[Path], clock: ManualClock
) -> None:
    settings = make_site(ingest={"max_attempts": 2, "backoff_seconds": 0, "batch": 1})
    storage = CorruptingStorage(settings.archive)
    with opened(settings, clock, storage) as site:
        bad, *others = receive(site, *frames[:4])  # the bad file is at the head of the queue
        assert bad.cache_path is not None
        storage.broken = {bad.cache_path}
        ingestor = site.ingestor()
        reports = []
        for _ in range(10):
            report = ingestor.run_once()
            if empty(report):
                break
            reports.append(report)
        assert [len(r.errors) for r in reports] == [1, 1, 0, 0, 0]
        assert [a for r in reports for a in r.archived] == [o.archive_id for o in others]
        for other in others:
            assert_archived(site, other)

        failed = assert_not_archived(site, bad, FileState.FAILED)
        assert failed.reason is not None and "sha256" in failed.reason
        assert site.catalog.find(FileQuery(state=FileState.FAILED)) == [failed]
        request = request_of(site, bad)
        assert request.state is RequestState.FAILED and request.attempts == 2
        assert request.last_error == failed.reason
        assert not storage.exists(bad.cache_path)

        assert ingestor.retry_failed() == 1
        assert reload(site, bad).state is FileState.CACHED
        request = request_of(site, bad)
        assert request.state is RequestState.PENDING and request.attempts == 0
        storage.broken = set()
        report = ingestor.run_once()
        assert report.archived == [bad.archive_id] and report.errors == []
        assert_archived(site, bad)
        assert ingestor.retry_failed() == 0


def test_a_missing_cache_copy_is_an_error_not_an_archive(site: Site, frames: list[Path]) -> None:
    [record] = receive(site, frames[0])
    assert record.cache_path is not None
    cached = site.cache.path(record.cache_path)
    cached.unlink()
    report = site.ingestor().run_once()
    [(_, message)] = report.errors
    assert str(cached) in message
    assert reload(site, record).state is FileState.CACHED
    assert not site.storage.exists(record.cache_path)


# ---------------------------------------------------------------- leases


def test_a_dead_ingestors_lease_expires_and_another_archives_the_file(
    make_site: SiteFactory, frames: list[Path], clock: ManualClock
) -> None:
    settings = make_site(ingest={"lease_seconds": 30})
    with opened(settings, clock) as site:
        [record] = receive(site, frames[0])
        [dead] = site.queue.lease("dead-ingestor", clock(), 30, 16)  # and never heard of again
        assert dead.file_id == record.id and dead.attempts == 1
        survivor = site.ingestor("survivor")

        assert empty(survivor.run_once())
        assert site.queue.lease("third", clock(), 30, 16) == []
        clock.advance(29)
        assert empty(survivor.run_once())  # still within the lease
        request = request_of(site, record)
        assert request.state is RequestState.LEASED and request.attempts == 1
        assert_not_archived(site, record, FileState.CACHED)

        clock.advance(2)  # the lease has expired
        report = survivor.run_once()
        assert report.archived == [record.archive_id] and report.errors == []
        assert_archived(site, record)
        assert request_of(site, record).attempts == 2


def test_ingestors_leasing_at_once_never_share_a_request(
    make_site: SiteFactory, frames: list[Path], clock: ManualClock
) -> None:
    with opened(make_site(), clock) as site:
        records = receive(site, *frames[:8])
        with ThreadPoolExecutor(4) as pool:
            leased = list(
                pool.map(lambda n: site.queue.lease(f"ingestor-{n}", clock(), 60, 3), range(4))
            )
        ids = [lease.request_id for batch in leased for lease in batch]
        assert len(ids) == len(set(ids)) == len(records)
        assert site.queue.lease("late", clock(), 60, 16) == []


def test_a_crash_between_put_and_the_catalog_update_is_completed_on_retry(
    make_site: SiteFactory, frames: list[Path], clock: ManualClock
) -> None:
    settings = make_site(ingest={"lease_seconds": 30})
    storage = FlakyStorage(settings.archive)
    storage.broken = set()
    with opened(settings, clock, storage) as site:
        [record] = receive(site, frames[0])
        assert record.cache_path is not None
        # the first ingestor leases, stores the bytes... and dies before telling the catalog
        [crashed] = site.queue.lease("crashed", clock(), 30, 16)
        key = record.cache_path
        storage.put(site.cache.path(crashed.cache_path), key)
        assert storage.sha256(key) == record.sha256
        assert request_of(site, record).state is RequestState.LEASED

        clock.advance(31)
        report = site.ingestor("next").run_once()
        assert report.archived == [record.archive_id] and report.errors == []
        assert storage.puts == [key]  # the stored copy was checked, not written again
        assert_archived(site, record)

        # the crashed ingestor comes back and completes its stale lease: nothing changes
        site.queue.complete([(crashed, key)], clock())
        assert_archived(site, record)


def test_a_stale_ingestor_cannot_fail_a_request_leased_by_another(
    make_site: SiteFactory, frames: list[Path], clock: ManualClock
) -> None:
    settings = make_site(ingest={"lease_seconds": 30})
    with opened(settings, clock) as site:
        [record] = receive(site, frames[0])
        [stale] = site.queue.lease("slow-ingestor", clock(), 30, 16)
        clock.advance(31)
        [live] = site.queue.lease("live-ingestor", clock(), 30, 16)
        assert live.request_id == stale.request_id
        # the slow ingestor's put finally fails, long after its lease expired
        site.queue.fail(
            stale, "too late", clock(), max_attempts=5, backoff_seconds=0, backoff_max_seconds=0
        )
        request = request_of(site, record)
        assert site.queue.lease("third-ingestor", clock(), 30, 16) == []  # not leased twice
        assert request.state is RequestState.LEASED
        assert request.last_error is None

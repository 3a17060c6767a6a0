"""The cache policy and the one retrieval path, on a real site (SQLite and PostgreSQL),
real archive storage and real files: eviction makes files virtual, fetch brings them
back with their checksum checked, pins and unarchived files stay, LRU order holds."""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update

from obsflow.archive.cache import TMP
from obsflow.archive.retrieval import InvalidTagError, NotFoundError, Retriever, check_tag
from obsflow.catalog import schema
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.errors import StorageError
from obsflow.settings import CachePolicy
from obsflow.site import Site, ingest_paths
from obsflow.states import FileState

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


class Clock:
    """A clock the test moves; it starts a little after the real now (receipt's time)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC) + timedelta(minutes=5)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 120.0) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def make_retriever(site: Site, clock: Clock | None = None, **policy: int | None) -> Retriever:
    return Retriever(
        site.catalog, site.cache, site.storage, CachePolicy(**policy), clock or Clock()
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def on_disk(site: Site) -> dict[str, int]:
    """Every file really in the cache (temp files aside): relative path → size."""
    root = site.cache.root
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != TMP
    }


def temp_files(site: Site) -> list[Path]:
    return list(site.cache.tmp.glob("*")) if site.cache.tmp.is_dir() else []


@pytest.fixture
def archived(site: Site, frames: list[Path]) -> list[FileRecord]:
    """The small night, archived, in the order received (file ID order)."""
    summary = ingest_paths(site, frames)
    assert len(summary.ingest.archived) == len(frames)
    found = sorted(site.catalog.find(FileQuery()), key=lambda r: r.id)
    assert all(r.state is FileState.ARCHIVED and not r.virtual for r in found)
    return found


def get(site: Site, archive_id: str) -> FileRecord:
    record = site.catalog.get(archive_id)
    assert record is not None
    return record


def aid(record: FileRecord) -> str:
    assert record.archive_id is not None
    return record.archive_id


# ------------------------------------------------------------------ evict and restore


def test_evicted_files_turn_virtual_and_fetch_restores_them(
    site: Site, archived: list[FileRecord]
) -> None:
    retriever = make_retriever(site)
    total = sum(r.size for r in archived)
    assert retriever.status().bytes == total == sum(on_disk(site).values())

    report = retriever.trim(0)
    assert (report.evicted, report.freed_bytes, report.remaining_bytes) == (
        len(archived),
        total,
        0,
    )
    assert report.skipped_pinned == 0 and report.target == 0
    assert on_disk(site) == {} and temp_files(site) == []
    found = site.catalog.find(FileQuery())
    assert len(found) == len(archived) and all(r.virtual for r in found)
    assert [r.archive_id for r in site.catalog.find(FileQuery(tag="raw"))]  # still findable
    status = retriever.status()
    assert (status.files, status.bytes, status.virtual) == (0, 0, len(archived))

    first = archived[0]
    path = retriever.fetch(aid(first))
    assert path == site.cache.path(first.cache_path or "")
    assert path.is_file() and sha256(path) == first.sha256
    restored = get(site, aid(first))
    assert not restored.virtual and restored.last_access is not None
    assert retriever.status().bytes == first.size == sum(on_disk(site).values())
    assert retriever.fetch(aid(first)) == path  # now a hit
    assert temp_files(site) == []


def test_a_corrupted_archive_copy_is_refused_and_nothing_is_placed(
    site: Site, archived: list[FileRecord]
) -> None:
    retriever = make_retriever(site)
    victim = archived[3]
    retriever.trim(0)
    stored = site.settings.archive / (victim.archive_path or "")
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    bad = hashlib.sha256(data).hexdigest()

    with pytest.raises(StorageError) as caught:
        retriever.fetch(aid(victim))
    message = str(caught.value)
    assert aid(victim) in message and victim.sha256 in message and bad in message
    assert not site.cache.path(victim.cache_path or "").exists()
    assert temp_files(site) == [] and on_disk(site) == {}
    assert get(site, aid(victim)).virtual


def test_the_archive_missing_its_copy_is_a_storage_error(
    site: Site, archived: list[FileRecord]
) -> None:
    retriever = make_retriever(site)
    victim = archived[0]
    retriever.trim(0)
    (site.settings.archive / (victim.archive_path or "")).unlink()
    with pytest.raises(StorageError, match=aid(victim)):
        retriever.fetch(aid(victim))
    assert temp_files(site) == [] and on_disk(site) == {}


# ------------------------------------------------------------------ LRU order


def test_trim_evicts_the_least_recently_accessed_first(
    site: Site, archived: list[FileRecord]
) -> None:
    clock = Clock()
    retriever = make_retriever(site, clock)
    order = [archived[i] for i in (5, 2, 9, 0, 11, 7, 1, 10, 3, 8, 4, 6)]
    for record in order:
        clock.advance()
        retriever.fetch(aid(record))
    keep = order[-4:]
    report = retriever.trim(sum(r.size for r in keep))
    assert report.evicted == len(order) - len(keep)
    virtual = {r.archive_id for r in site.catalog.find(FileQuery()) if r.virtual}
    assert virtual == {r.archive_id for r in order[:-4]}
    assert set(on_disk(site)) == {r.cache_path for r in keep}

    # reading a file makes it the most recent: the oldest of the kept goes next
    clock.advance()
    retriever.fetch(aid(keep[0]))
    retriever.trim(sum(r.size for r in keep) - 1)
    assert get(site, aid(keep[1])).virtual and not get(site, aid(keep[0])).virtual


def test_a_file_never_read_counts_as_read_when_it_was_cached(
    site: Site, archived: list[FileRecord]
) -> None:
    clock = Clock()
    retriever = make_retriever(site, clock)
    assert all(r.last_access is None for r in archived)
    read = [archived[0], archived[1]]  # received first, but read since
    for record in read:
        clock.advance()
        retriever.fetch(aid(record))
    keep = [*read, archived[-1]]  # and the newest cached file, never read
    retriever.trim(sum(r.size for r in keep))
    kept = {r.archive_id for r in site.catalog.find(FileQuery()) if not r.virtual}
    assert kept == {r.archive_id for r in keep}
    cached_at = {
        r.archive_id: next(e.at for e in site.catalog.ledger(r.id) if e.event.value == "cached")
        for r in archived
    }
    for record in site.catalog.find(FileQuery()):
        if record.archive_id not in {r.archive_id for r in read}:
            assert record.last_access == cached_at[record.archive_id]


def test_a_hit_records_its_access_at_most_once_a_minute(
    site: Site, archived: list[FileRecord]
) -> None:
    clock = Clock()
    retriever = make_retriever(site, clock)
    first = aid(archived[0])
    retriever.fetch(first)
    stamped = get(site, first).last_access
    assert stamped == clock.now
    clock.advance(30)
    retriever.fetch(first)
    assert get(site, first).last_access == stamped
    clock.advance(31)
    retriever.fetch(first)
    assert get(site, first).last_access == clock.now


# ------------------------------------------------------------------ what is never evicted


def test_pinned_and_unarchived_files_are_never_evicted(site: Site, frames: list[Path]) -> None:
    ingest_paths(site, frames[:8])
    ingest_paths(site, frames[8:], wait=False)  # cached, not archived
    records = sorted(site.catalog.find(FileQuery()), key=lambda r: r.id)
    archived = [r for r in records if r.state is FileState.ARCHIVED]
    unarchived = [r for r in records if r.state is FileState.CACHED]
    assert (len(archived), len(unarchived)) == (8, 4)
    retriever = make_retriever(site, budget_bytes=0)
    pinned = archived[:2]
    retriever.pin(aid(pinned[0]), "operator")
    retriever.pin(aid(pinned[0]), "operator")  # idempotent
    retriever.pin_ids([pinned[1].id, 10**9], "run:12")  # an ID no file has is ignored
    status = retriever.status()
    assert status.pinned == 2 and status.over_budget
    assert status.unarchived_bytes == sum(r.size for r in unarchived)

    report = retriever.trim()  # to the low-water mark: 0
    assert report.evicted == 6
    assert (report.skipped_pinned, report.skipped_unarchived) == (2, 4)
    kept = pinned + unarchived
    assert report.remaining_bytes == sum(r.size for r in kept) == sum(on_disk(site).values())
    assert {r.archive_id for r in site.catalog.find(FileQuery()) if not r.virtual} == {
        r.archive_id for r in kept
    }
    assert retriever.over_budget()

    assert retriever.unpin_holder("run:12") == 1
    assert retriever.unpin(aid(pinned[0]), "somebody") == 0
    assert retriever.unpin(aid(pinned[0])) == 1  # every holder
    assert retriever.status().pinned == 0
    report = retriever.trim()
    assert (report.evicted, report.skipped_pinned, report.skipped_unarchived) == (2, 0, 4)
    assert report.remaining_bytes == sum(r.size for r in unarchived)


def test_trim_without_a_budget_or_a_target_does_nothing(
    site: Site, archived: list[FileRecord]
) -> None:
    retriever = make_retriever(site)
    total = sum(r.size for r in archived)
    report = retriever.trim()
    assert (report.evicted, report.remaining_bytes, report.target) == (0, total, None)
    assert not retriever.over_budget()
    assert len(on_disk(site)) == len(archived)


def test_trim_to_the_low_water_mark_of_the_budget(site: Site, archived: list[FileRecord]) -> None:
    total = sum(r.size for r in archived)
    retriever = make_retriever(site, budget_bytes=total - 1)
    assert retriever.over_budget()
    low_water = retriever.status().low_water
    assert low_water == (total - 1) * 9 // 10
    report = retriever.trim()
    assert report.remaining_bytes <= low_water < report.remaining_bytes + archived[0].size * 2
    assert not retriever.over_budget()
    assert retriever.status().bytes == sum(on_disk(site).values())
    assert retriever.trim().evicted == 0  # under the mark already
    with pytest.raises(ValueError, match="-1"):
        retriever.trim(-1)


def test_status_matches_the_disk(site: Site, archived: list[FileRecord]) -> None:
    clock = Clock()
    retriever = make_retriever(site, clock)
    retriever.trim(sum(r.size for r in archived) // 2)
    clock.advance()
    retriever.fetch(aid(next(r for r in site.catalog.find(FileQuery()) if r.virtual)))
    disk = on_disk(site)
    status = retriever.status()
    assert (status.files, status.bytes) == (len(disk), sum(disk.values()))
    assert status.virtual == len(archived) - len(disk)
    assert status.unarchived_bytes == 0 and status.pinned == 0


# ------------------------------------------------------------------ unknown IDs


@pytest.mark.parametrize(
    "archive_id", ["OFC.20991231.00000.00.fits", "../../etc/passwd", "/etc/passwd", ""]
)
def test_fetch_of_an_unknown_id_is_not_found(site: Site, archive_id: str) -> None:
    retriever = make_retriever(site)
    with pytest.raises(NotFoundError) as caught:
        retriever.fetch(archive_id)
    assert repr(archive_id) in str(caught.value)
    for act in (
        lambda: retriever.pin(archive_id, "operator"),
        lambda: retriever.unpin(archive_id),
        lambda: retriever.add_tag(archive_id, "x"),
    ):
        with pytest.raises(NotFoundError):
            act()


def test_a_refused_file_is_not_found(site: Site, frames: list[Path]) -> None:
    broken = frames[0].with_name("ofc_20261122_0099.fits")
    broken.write_bytes(b"not FITS at all" * 100)
    ingest_paths(site, [broken])
    [rejected] = site.catalog.find(FileQuery(state=FileState.REJECTED))
    assert rejected.archive_id is None  # a refused file has no archive ID to fetch by
    with pytest.raises(NotFoundError):
        make_retriever(site).fetch(broken.name)


def test_a_catalog_path_outside_the_archive_is_never_read(
    site: Site, archived: list[FileRecord], tmp_path: Path
) -> None:
    retriever = make_retriever(site)
    victim = archived[0]
    retriever.trim(0)
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    with site.catalog.write() as conn:
        conn.execute(
            update(schema.files)
            .where(schema.files.c.id == victim.id)
            .values(archive_path="../secret", cache_path="../../secret")
        )
    with pytest.raises(StorageError, match="invalid storage key"):
        retriever.fetch(aid(victim))
    assert outside.read_bytes() == b"secret" and on_disk(site) == {}


# ------------------------------------------------------------------ crash safety


def test_a_cached_file_deleted_behind_our_back_is_restored(
    site: Site, archived: list[FileRecord]
) -> None:
    retriever = make_retriever(site)
    victim = archived[4]
    path = site.cache.path(victim.cache_path or "")
    path.unlink()  # as a crash between moving it out and committing "virtual" leaves it
    assert not get(site, aid(victim)).virtual
    assert retriever.fetch(aid(victim)) == path
    assert sha256(path) == victim.sha256 and not get(site, aid(victim)).virtual

    # and trim takes a missing file in its stride: the row becomes virtual all the same
    path.unlink()
    report = retriever.trim(0)
    assert report.evicted == len(archived) and on_disk(site) == {}


def test_an_unarchived_file_missing_from_the_cache_cannot_be_restored(
    site: Site, frames: list[Path]
) -> None:
    ingest_paths(site, frames[:1], wait=False)
    [record] = site.catalog.find(FileQuery())
    assert record.state is FileState.CACHED
    site.cache.path(record.cache_path or "").unlink()
    with pytest.raises(StorageError, match="not archived yet"):
        make_retriever(site).fetch(aid(record))
    assert temp_files(site) == []


def test_a_pin_holder_must_be_a_short_printable_name(
    site: Site, archived: list[FileRecord]
) -> None:
    retriever = make_retriever(site)
    for holder in ("", "x" * 65, "run\n12"):
        with pytest.raises(ValueError, match="holder"):
            retriever.pin(aid(archived[0]), holder)
    assert retriever.status().pinned == 0


def test_a_virtual_row_whose_file_is_present_is_restored_over_it(
    site: Site, archived: list[FileRecord]
) -> None:
    """A crash after a restore placed the file but before it committed leaves this."""
    retriever = make_retriever(site)
    victim = archived[2]
    path = site.cache.path(victim.cache_path or "")
    with site.catalog.write() as conn:
        conn.execute(
            update(schema.files).where(schema.files.c.id == victim.id).values(virtual=True)
        )
    assert retriever.status().bytes == sum(r.size for r in archived) - victim.size
    assert retriever.fetch(aid(victim)) == path
    assert sha256(path) == victim.sha256
    assert retriever.status().bytes == sum(r.size for r in archived)


@SQLITE_ONLY
def test_an_eviction_that_does_not_commit_puts_the_files_back(
    site: Site, archived: list[FileRecord]
) -> None:
    """The second row of a batch fails to update (a trigger): the first file, moved out
    already, goes back to its place and no row turns virtual."""
    retriever = make_retriever(site)
    with site.catalog.write() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE UPDATE OF virtual ON files "
                f"WHEN NEW.id = {archived[1].id} BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        )
    before = on_disk(site)
    with pytest.raises(Exception, match="refused"):
        retriever.trim(0)
    assert on_disk(site) == before and temp_files(site) == []
    assert not any(r.virtual for r in site.catalog.find(FileQuery()))


def test_concurrent_fetches_of_one_virtual_file(site: Site, archived: list[FileRecord]) -> None:
    retriever = make_retriever(site)
    victim = archived[6]
    retriever.trim(0)
    paths: list[Path] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def fetch() -> None:
        try:
            start.wait()
            paths.append(retriever.fetch(aid(victim)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(paths)) == 1 and sha256(paths[0]) == victim.sha256
    assert temp_files(site) == [] and list(on_disk(site)) == [victim.cache_path]
    assert not get(site, aid(victim)).virtual


def test_fetches_and_trims_at_once_keep_the_catalog_and_the_disk_in_step(
    site: Site, archived: list[FileRecord], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="obsflow.archive.fetch")
    retriever = make_retriever(site)
    stop = threading.Event()
    errors: list[BaseException] = []

    def fetcher(offset: int) -> None:
        try:
            i = offset
            while not stop.is_set():
                record = archived[i % len(archived)]
                path = retriever.fetch(aid(record))
                assert path == site.cache.path(record.cache_path or "")
                i += 3
        except BaseException as exc:
            errors.append(exc)

    def trimmer() -> None:
        try:
            while not stop.is_set():
                retriever.trim(sum(r.size for r in archived) // 3)
                retriever.trim(0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetcher, args=(k,)) for k in range(3)]
    threads.append(threading.Thread(target=trimmer))
    for t in threads:
        t.start()
    stop.wait(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    disk = on_disk(site)
    for record in site.catalog.find(FileQuery()):
        assert record.virtual is (record.cache_path not in disk), record.archive_id
        if not record.virtual:
            assert sha256(site.cache.path(record.cache_path or "")) == record.sha256
    assert retriever.status().bytes == sum(disk.values())
    assert temp_files(site) == []
    restores = [r for r in caplog.records if r.getMessage().startswith("restored")]
    assert len(restores) > len(archived), len(restores)  # the race was run, not just fetches


# ------------------------------------------------------------------ tags


def test_tags_are_added_and_removed(site: Site, archived: list[FileRecord]) -> None:
    retriever = make_retriever(site)
    first, second = aid(archived[0]), aid(archived[1])
    assert retriever.add_tag(first, "best:seeing")
    assert not retriever.add_tag(first, "best:seeing")  # had it already
    assert retriever.add_tag(second, "best:seeing")
    tagged = site.catalog.find(FileQuery(tag="best:seeing"))
    assert sorted(aid(r) for r in tagged) == sorted([first, second])
    assert "best:seeing" in get(site, first).tags

    retriever.trim(0)  # a virtual file keeps its tags
    assert len(site.catalog.find(FileQuery(tag="best:seeing"))) == 2

    assert retriever.remove_tag(first, "best:seeing")
    assert not retriever.remove_tag(first, "best:seeing")
    assert [aid(r) for r in site.catalog.find(FileQuery(tag="best:seeing"))] == [second]
    assert "raw" in get(site, first).tags  # the product's own tags stay


@pytest.mark.parametrize("tag", ["", "two words", "a/b", "x" * 65, "semi;colon", "new\nline"])
def test_a_bad_tag_is_refused_by_name(tag: str) -> None:
    with pytest.raises(InvalidTagError) as caught:
        check_tag(tag)
    assert repr(tag) in str(caught.value)


def test_good_tags() -> None:
    for tag in ("raw", "night:2026-11-21", "v1.2", "x" * 64, "été"):
        assert check_tag(tag) == tag

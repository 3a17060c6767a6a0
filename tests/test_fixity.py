"""Fixity audits: archived files re-read from storage and their sha256 checked; what each
audit found is in the catalog; a bad copy is restored from a good one, or reported.

On SQLite and PostgreSQL, on a real site's archive directory (the damage is done to the
stored files themselves, as a failing disk or a careless operator would).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from obsflow.archive.storage import Throttle
from obsflow.catalog.fixity import FixityStore
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import FileState, FixityOutcome
from tests.conftest import SiteFactory
from tests.test_cli import obsflow
from tests.test_daemon import DAEMON_SETTINGS, daemon, running, wait_for

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


@pytest.fixture
def site(make_site: SiteFactory, frames: list[Path]) -> Iterator[Site]:
    opened = open_site(make_site())
    summary = ingest_paths(opened, frames)
    assert len(summary.ingest.archived) == len(frames)
    yield opened
    opened.close()


def archived(site: Site) -> list[FileRecord]:
    return sorted(site.catalog.find(FileQuery(state=FileState.ARCHIVED)), key=lambda r: r.id)


def stored(site: Site, record: FileRecord) -> Path:
    assert record.archive_path is not None
    return site.settings.archive / record.archive_path


def flip_a_byte(path: Path, at: int = 4000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_audit_reads_every_archived_file_and_records_what_it_found(site: Site) -> None:
    records = archived(site)
    auditor = site.auditor()
    report = auditor.audit(auditor.store.select())
    assert [c.archive_id for c in report.checks] == [r.archive_id for r in records]
    assert {c.outcome for c in report.checks} == {FixityOutcome.OK}
    assert report.bytes_read == sum(r.size for r in records)
    assert all(c.found_sha256 == r.sha256 for c, r in zip(report.checks, records, strict=True))
    history = auditor.store.history(records[0].archive_id or "")
    assert [(c.outcome, c.found_sha256) for c in history] == [(FixityOutcome.OK, records[0].sha256)]
    figures = auditor.store.figures()
    assert (figures.archived, figures.audited, figures.never, figures.bad) == (
        len(records),
        len(records),
        0,
        0,
    )


def test_a_changed_copy_is_stored_again_from_the_cache_and_read_back(site: Site) -> None:
    record = archived(site)[1]
    path = stored(site, record)
    flip_a_byte(path)
    auditor = site.auditor()
    report = auditor.audit(auditor.store.select(archive_ids=[record.archive_id or ""]))
    (check,) = report.checks
    assert check.outcome is FixityOutcome.RESTORED and not report.bad
    assert check.found_sha256 is not None and check.found_sha256 != record.sha256
    assert "stored again from the cache" in (check.detail or "")
    assert digest(path) == record.sha256  # the archive holds the frame as received again
    again = auditor.audit(auditor.store.select(archive_ids=[record.archive_id or ""]))
    assert [c.outcome for c in again.checks] == [FixityOutcome.OK]
    assert auditor.store.figures().bad == 0


def test_a_changed_or_lost_copy_with_no_good_copy_is_reported_until_it_is_fixed(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.retriever().trim(0)  # every file virtual: the archive holds the only copy
    changed, lost, *_ = archived(site)
    changed_id, lost_id = changed.archive_id or "", lost.archive_id or ""
    flip_a_byte(stored(site, changed))
    good_bytes = stored(site, lost).read_bytes()
    stored(site, lost).unlink()
    auditor = site.auditor()
    with caplog.at_level(logging.ERROR, logger="obsflow.archive.fixity"):
        report = auditor.audit(auditor.store.select())
    outcomes = {c.archive_id: c.outcome for c in report.checks}
    assert outcomes.pop(changed_id) is FixityOutcome.MISMATCH
    assert outcomes.pop(lost_id) is FixityOutcome.MISSING
    assert set(outcomes.values()) == {FixityOutcome.OK}
    assert sorted(c.archive_id for c in report.bad) == sorted([changed_id, lost_id])
    alerts = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(changed_id in m and "mismatch" in m for m in alerts)
    assert any(lost_id in m and "missing" in m for m in alerts)
    figures = auditor.store.figures()
    assert figures.bad == 2 and set(figures.bad_ids) == {changed.archive_id, lost.archive_id}
    # the operator puts the lost file back from a backup: the next audit clears it
    stored(site, lost).write_bytes(good_bytes)
    auditor.audit(auditor.store.select(archive_ids=[lost.archive_id or ""]))
    assert auditor.store.figures().bad_ids == (changed.archive_id,)


def test_a_bad_cache_copy_never_replaces_the_archived_one(site: Site) -> None:
    record = archived(site)[0]
    assert record.cache_path is not None
    flip_a_byte(stored(site, record), at=3000)
    flip_a_byte(site.cache.path(record.cache_path), at=5000)
    damaged = stored(site, record).read_bytes()
    auditor = site.auditor()
    (check,) = auditor.audit(auditor.store.select(archive_ids=[record.archive_id or ""])).checks
    assert check.outcome is FixityOutcome.MISMATCH
    assert "no good copy" in (check.detail or "")
    assert stored(site, record).read_bytes() == damaged  # left as it was found


def test_selection_least_recently_audited_first_a_sample_and_since(site: Site) -> None:
    records = archived(site)
    store = FixityStore(site.catalog)
    auditor = site.auditor()
    first = auditor.audit(store.select(limit=2))
    audited = [c.archive_id for c in first.checks]
    assert audited == [r.archive_id for r in records[:2]]
    # the never-audited come first, the just-audited last
    order = [f.archive_id for f in store.select()]
    assert order[-2:] == audited and set(order[:-2]) == {r.archive_id for r in records[2:]}
    due = store.select(not_since=site.clock() - timedelta(days=1))
    assert {f.archive_id for f in due} == {r.archive_id for r in records[2:]}
    half = store.select(sample=0.5, rng=random.Random(7))
    assert len(half) == round(len(records) * 0.5)
    assert {f.archive_id for f in half} <= {r.archive_id for r in records}
    starts = sorted(r.start for r in records if r.start is not None)
    late = store.select(since=starts[-1])
    assert {f.archive_id for f in late} == {r.archive_id for r in records if r.start == starts[-1]}
    with pytest.raises(ValueError, match="fraction"):
        store.select(sample=1.5)


def test_a_throttle_keeps_reading_under_its_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    throttle = Throttle(1000.0, clock=lambda: now[0], sleep=sleep)
    throttle.spend(500)
    assert slept == [0.5]
    now[0] += 2.0  # a slow disk: the rate is not made up for later by reading faster
    throttle.spend(500)
    assert slept == [0.5]
    throttle.spend(3000)
    assert sum(slept) == pytest.approx(0.5 + 1.5)
    with pytest.raises(ValueError):
        Throttle(0)


@SQLITE_ONLY
def test_verify_as_a_user_runs_it(make_site: SiteFactory, frames: list[Path]) -> None:
    settings = make_site()
    root = settings.site
    site = open_site(settings)
    try:
        ingest_paths(site, frames)
        records = archived(site)
        site.retriever().trim(0)
    finally:
        site.close()
    clean = obsflow("verify", "--rate", "50", "--site", root)
    assert clean.returncode == 0, clean.stderr
    assert (
        f"{len(records)} file(s) audited" in clean.stdout and f"{len(records)} ok" in clean.stdout
    )
    flip_a_byte(root / "archive" / (records[0].archive_path or ""))
    bad = obsflow("verify", "--json", "--site", root)
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["checked"] == len(records) and report["outcomes"]["mismatch"] == 1
    (mismatch,) = [c for c in report["checks"] if c["outcome"] == "mismatch"]
    assert mismatch["archive_id"] == records[0].archive_id
    sampled = json.loads(obsflow("verify", "--sample", "50%", "--json", "--site", root).stdout)
    assert sampled["checked"] == round(len(records) / 2)
    status = obsflow("status", "--site", root)
    assert "fixity: bad" in status.stdout and (records[0].archive_id or "") in status.stdout
    for option, value in (("--sample", "0%"), ("--sample", "lots"), ("--since", "yesterday")):
        refused = obsflow("verify", option, value, "--site", root)
        assert refused.returncode == 2 and option in refused.stderr
    unknown = obsflow("verify", "NOT-A-FILE", "--site", root)
    assert unknown.returncode == 2 and "NOT-A-FILE" in unknown.stderr


@SQLITE_ONLY
@pytest.mark.slow
def test_the_daemon_audits_the_archive_by_itself_at_its_rate(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = make_site(
        **DAEMON_SETTINGS, fixity={"rate_mb_s": 20.0, "batch": 3, "look_seconds": 0.2}
    )
    for frame in frames:
        frame.rename(settings.incoming / frame.name)
    watched = open_site(settings)
    try:
        store = FixityStore(watched.catalog)

        def all_audited() -> bool:
            figures = store.figures()
            return figures.archived == len(frames) and figures.audited == len(frames)

        with daemon(settings) as proc:
            wait_for(lambda: running(settings, proc), 30, "start-up")
            wait_for(all_audited, 60, "every archived frame audited by the daemon")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0  # its auditor stopped with it
        assert store.figures().bad == 0
    finally:
        watched.close()


def test_a_linked_archive_copy_that_changes_is_caught_by_verify_and_never_restored_from_itself(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    """ingest.link_cache: the archive entry is the cached file (one inode, read-only);
    a change to it (root's write, a failing disk) is a mismatch for verify, and the cache
    is no good copy to restore it from: it is the same bytes."""
    settings = make_site(ingest={"link_cache": True})
    site = open_site(settings)
    try:
        ingest_paths(site, frames)
        records = archived(site)
        assert len(records) == len(frames)
        record = records[0]
        assert record.cache_path is not None
        cached = site.cache.path(record.cache_path)
        assert stored(site, record).stat().st_ino == cached.stat().st_ino
        assert stored(site, record).stat().st_mode & 0o777 == 0o444
    finally:
        site.close()
    flip_a_byte(stored(site, record))
    assert digest(cached) != record.sha256  # its twin: one file
    bad = obsflow("verify", "--json", "--site", settings.site)
    assert bad.returncode == 1, bad.stderr
    (check,) = [c for c in json.loads(bad.stdout)["checks"] if c["outcome"] != "ok"]
    assert check["archive_id"] == record.archive_id and check["outcome"] == "mismatch"
    assert "no good copy" in check["detail"]

"""The way of one file, end to end, on each catalog engine."""

from __future__ import annotations

from pathlib import Path

from obsflow.catalog import FileQuery
from obsflow.receipt.receiver import Outcome
from obsflow.site import Site, ingest_paths
from obsflow.states import FileState, LedgerEvent


def test_frames_are_archived_with_verified_checksums(site: Site, frames: list[Path]) -> None:
    summary = ingest_paths(site, frames)
    assert [r.outcome for r in summary.received] == [Outcome.CACHED] * len(frames)
    records = site.catalog.find(FileQuery())
    assert {r.original_name for r in records} == {p.name for p in frames}
    for record in records:
        assert record.state is FileState.ARCHIVED
        assert record.archive_path is not None
        assert site.storage.sha256(record.archive_path) == record.sha256
        events = [e.event for e in site.catalog.ledger(record.id)]
        assert events[-1] is LedgerEvent.ARCHIVED
        assert set(events) >= {LedgerEvent.ACQUIRED, LedgerEvent.RECEIVED, LedgerEvent.CACHED}

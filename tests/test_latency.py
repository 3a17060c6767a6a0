"""The latency ledger on both engines: exact percentiles, windows, the stuck list, the CLI."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from obsflow.catalog import Catalog, NewFile
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.latency import (
    Percentiles,
    StuckList,
    latencies,
    latency_report,
    science_latencies,
    stage_name,
    stuck_files,
)
from obsflow.catalog.queue import IngestQueue
from obsflow.catalog.runs import NewRun, RunStore
from obsflow.states import FileState, LedgerEvent, RequestState
from tests.conftest import SiteFactory
from tests.test_cli import as_json, obsflow

T0 = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
MS = timedelta(milliseconds=1)
SEC = timedelta(seconds=1)
STAGE_NAMES = [
    "acquired_to_received",
    "received_to_validated",
    "validated_to_cached",
    "cached_to_archived",
]


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    opened = Catalog.open(catalog_url)
    yield opened
    opened.close()


def _new(n: int) -> NewFile:
    return NewFile(
        product="ofcam_raw",
        instrument="OFCAM",
        level=0,
        original_name=f"ofc_20261122_{n:04d}.fits",
        source_path=f"/in/ofc_20261122_{n:04d}.fits",
        size=1000 + n,
        sha256=f"{n:064x}",
        night=date(2026, 11, 21),
    )


def _cache(
    catalog: Catalog, n: int, stamps: dict[LedgerEvent, datetime], new: NewFile | None = None
) -> int:
    """Record file ``n`` (``new``, else a raw frame) as cached with these ledger stamps (but
    ``archived``); return its ID."""
    at = stamps[LedgerEvent.CACHED]
    return catalog.record_cached(
        _new(n) if new is None else new,
        make_archive_id=lambda bump: f"OF.{n:04d}.{bump:02d}.fits",
        cache_path=lambda aid: f"OFCAM/2026-11-21/{aid}",
        place=lambda aid: None,
        ledger={e: at for e, at in stamps.items() if e is not LedgerEvent.ARCHIVED},
        now=at,
    ).file_id


def _archive_all(catalog: Catalog, archived_at: dict[int, datetime]) -> None:
    """Lease every due request and complete each at its own time (the ``archived`` stamp)."""
    queue = IngestQueue(catalog)
    leases = queue.lease("test", max(archived_at.values()), 60, limit=1000)
    assert {lease.file_id for lease in leases} == set(archived_at)
    for lease in leases:
        queue.complete([(lease, f"archive/{lease.archive_id}")], archived_at[lease.file_id])


def _way(n: int) -> dict[LedgerEvent, datetime]:
    """File n: acquired at T0 + n minutes, then stages of 100n, 200n, 300n and 400n µs:
    n ms from acquired to archived."""
    acquired = T0 + timedelta(minutes=n)
    return {
        LedgerEvent.ACQUIRED: acquired,
        LedgerEvent.RECEIVED: acquired + 100 * n * US,
        LedgerEvent.VALIDATED: acquired + 300 * n * US,
        LedgerEvent.CACHED: acquired + 600 * n * US,
        LedgerEvent.ARCHIVED: acquired + 1000 * n * US,
    }


def _hundred_files(catalog: Catalog) -> None:
    order = list(range(1, 101))
    random.Random(5).shuffle(order)  # the catalog's order must not matter
    archived = {}
    for n in order:
        way = _way(n)
        file_id = _cache(catalog, n, way)
        archived[file_id] = way[LedgerEvent.ARCHIVED]
    _archive_all(catalog, archived)


def test_percentiles_are_nearest_rank() -> None:
    assert Percentiles.of([]) == Percentiles(0, None, None, None, None)
    assert Percentiles.of([7.5]) == Percentiles(1, 7.5, 7.5, 7.5, 7.5)
    assert Percentiles.of([3.0, 1.0, 2.0]) == Percentiles(3, 2.0, 3.0, 3.0, 3.0)
    assert Percentiles.of(float(v) for v in range(10, 0, -1)) == Percentiles(
        10, 5.0, 9.0, 10.0, 10.0
    )
    thousand = Percentiles.of(float(v) for v in range(1, 1001))
    assert (thousand.p50_ms, thousand.p90_ms, thousand.p99_ms) == (500.0, 900.0, 990.0)


def test_total_and_stage_percentiles_of_a_known_distribution(catalog: Catalog) -> None:
    _hundred_files(catalog)
    total, stages = latencies(catalog, T0)
    assert total == Percentiles(100, 50.0, 90.0, 99.0, 100.0)
    assert list(stages) == STAGE_NAMES
    assert stages["acquired_to_received"] == Percentiles(100, 5.0, 9.0, 9.9, 10.0)
    assert stages["received_to_validated"] == Percentiles(100, 10.0, 18.0, 19.8, 20.0)
    assert stages["validated_to_cached"] == Percentiles(100, 15.0, 27.0, 29.7, 30.0)
    assert stages["cached_to_archived"] == Percentiles(100, 20.0, 36.0, 39.6, 40.0)
    assert stage_name(LedgerEvent.ACQUIRED, LedgerEvent.ARCHIVED) == "acquired_to_archived"


def test_the_window_is_on_each_stages_end(catalog: Catalog) -> None:
    _hundred_files(catalog)
    # file 60: received +6 ms, validated +18 ms, cached +36 ms, archived +60 ms
    since = T0 + timedelta(minutes=60, milliseconds=30)
    total, stages = latencies(catalog, since)
    assert total == Percentiles(41, 80.0, 96.0, 100.0, 100.0)  # files 60..100
    assert {name: p.count for name, p in stages.items()} == {
        "acquired_to_received": 40,  # file 60 was received before `since`
        "received_to_validated": 40,
        "validated_to_cached": 41,
        "cached_to_archived": 41,
    }
    assert stages["acquired_to_received"].p50_ms == 8.0  # files 61..100: 6.1 .. 10.0 ms
    assert latencies(catalog, T0 + timedelta(days=1)) == (
        Percentiles(0, None, None, None, None),
        dict.fromkeys(STAGE_NAMES, Percentiles(0, None, None, None, None)),
    )


def test_default_window_is_the_last_24_hours(catalog: Catalog) -> None:
    _hundred_files(catalog)
    # 24 h before `now` falls just after file 50's archived stamp (T0 + 50 min + 50 ms)
    now = T0 + timedelta(days=1, minutes=50, milliseconds=51)
    report = latency_report(catalog, now)
    assert report.since == now - timedelta(hours=24)
    assert report.total.count == 50
    assert report.total.max_ms == 100.0
    assert report.stuck == () and report.stuck_total == 0


def test_files_not_yet_archived_count_in_their_stages_only(catalog: Catalog) -> None:
    way = _way(4)
    _cache(catalog, 4, way)
    _cache(catalog, 5, {LedgerEvent.CACHED: T0 + timedelta(minutes=5)})  # no earlier stamps
    total, stages = latencies(catalog, T0)
    assert total.count == 0 and total.p50_ms is None
    assert stages["acquired_to_received"] == Percentiles(1, 0.4, 0.4, 0.4, 0.4)
    assert stages["validated_to_cached"] == Percentiles(1, 1.2, 1.2, 1.2, 1.2)
    assert stages["cached_to_archived"].count == 0


def test_stuck_files_cached_too_long_failed_and_expired_leases(catalog: Catalog) -> None:
    now = T0 + timedelta(hours=1)
    queue = IngestQueue(catalog)

    def ago(seconds: float) -> datetime:
        return now - timedelta(seconds=seconds)

    # archived long ago: never stuck
    done = _cache(catalog, 1, {LedgerEvent.CACHED: ago(3000)})
    _archive_all(catalog, {done: ago(2990)})
    # failed for good 100 s ago
    _cache(catalog, 2, {LedgerEvent.CACHED: ago(2000)})
    (lease,) = queue.lease("ingestor-a", ago(100), 60, limit=10)
    state = queue.fail(
        lease, "disk on fire", ago(100), max_attempts=1, backoff_seconds=0, backoff_max_seconds=0
    )
    assert state is RequestState.FAILED
    # leased 30 s ago, lease still running, cached 40 s ago: fine
    _cache(catalog, 6, {LedgerEvent.CACHED: ago(40)})
    (lease,) = queue.lease("ingestor-c", ago(30), 120, limit=10)
    # leased 200 s ago for 120 s: its ingestor died (cached long ago too: listed once)
    _cache(catalog, 3, {LedgerEvent.CACHED: ago(1000)})
    (lease,) = queue.lease("ingestor-b", ago(200), 120, limit=10)
    # cached 600 s ago and never leased: stuck; cached 10 s ago: fresh
    _cache(catalog, 4, {LedgerEvent.CACHED: ago(600)})
    _cache(catalog, 5, {LedgerEvent.CACHED: ago(10)})
    # a rejected file is never stuck
    catalog.record_rejected(_new(7), "not FITS", "q/7", {LedgerEvent.RECEIVED: ago(5000)})

    stuck = stuck_files(catalog, now, stuck_after=300)
    assert stuck.total == 3
    assert [(f.original_name[-9:-5], f.state, f.since, f.seconds) for f in stuck.files] == [
        ("0004", FileState.CACHED.value, ago(600), 600.0),
        ("0003", RequestState.LEASED.value, ago(200), 200.0),
        ("0002", FileState.FAILED.value, ago(100), 100.0),
    ]
    cached, leased, failed = stuck.files
    assert cached.archive_id == "OF.0004.00.fits"
    assert cached.detail == "ingest request pending, 0 attempt(s)"
    assert leased.detail is not None
    assert "ingestor-b" in leased.detail and "expired" in leased.detail
    assert failed.detail == "disk on fire"

    capped = stuck_files(catalog, now, stuck_after=300, limit=2)
    assert capped.total == 3 and capped.files == stuck.files[:2]
    eager = stuck_files(catalog, now, stuck_after=5)
    assert eager.total == 5  # files 5 (10 s) and 6 (40 s) now count too
    assert [f.original_name[-9:-5] for f in eager.files] == ["0004", "0003", "0002", "0006", "0005"]
    assert stuck_files(catalog, now, stuck_after=300, limit=0) == StuckList((), 3)

    report = latency_report(catalog, now, stuck_after=300, stuck_limit=2)
    assert report.stuck == stuck.files[:2] and report.stuck_total == 3
    data = report.to_json()
    assert data["stuck_total"] == 3
    assert data["stuck"][0] == {
        "archive_id": "OF.0004.00.fits",
        "original_name": "ofc_20261122_0004.fits",
        "state": "cached",
        "since": ago(600).isoformat(),
        "seconds": 600.0,
        "detail": "ingest request pending, 0 attempt(s)",
    }


def test_an_empty_catalog_reports_zero_and_nulls(catalog: Catalog) -> None:
    report = latency_report(catalog, T0)
    data = report.to_json()
    assert {k: data[k] for k in ("count", "p50_ms", "p90_ms", "p99_ms", "max_ms", "stuck")} == {
        "count": 0,
        "p50_ms": None,
        "p90_ms": None,
        "p99_ms": None,
        "max_ms": None,
        "stuck": [],
    }
    assert data["since"] == (T0 - timedelta(hours=24)).isoformat()
    assert list(data["stages"]) == STAGE_NAMES


def test_science_latency_runs_from_the_latest_raw_ancestor(catalog: Catalog) -> None:
    """Per level, from the acquisition of the latest raw frame a product descends from
    (through its run's inputs, recursively) to the product archived; a product's own
    'acquired' (when its run wrote it) does not count, nor do older raw ancestors."""
    store, archived = RunStore(catalog), {}
    night = date(2026, 11, 21)

    def raw(n: int, acquired: datetime) -> int:
        stamps = {LedgerEvent.ACQUIRED: acquired, LedgerEvent.CACHED: acquired + 50 * MS}
        file_id = _cache(catalog, n, stamps)
        archived[file_id] = acquired + 100 * MS  # 100 ms each
        return file_id

    def made(n: int, level: int, inputs: tuple[int, ...], done: datetime) -> int:
        key = GroupKey.of(f"p{level}", {"night": night.isoformat(), "file": str(n)})
        run = store.create(NewRun(f"p{level}", key, night, {"in": inputs}, "ready"), T0)
        assert run is not None
        new = replace(_new(n), product=f"l{level}", level=level, made_by_run=run)
        written = done - 500 * MS  # its own 'acquired': when its run wrote it
        stamps = {LedgerEvent.ACQUIRED: written, LedgerEvent.CACHED: written}
        file_id = _cache(catalog, n, stamps, new)
        archived[file_id] = done
        return file_id

    m = timedelta(minutes=1)
    biases = (raw(1, T0), raw(2, T0 + m))
    master = made(10, 1, biases, T0 + 5 * m)  # 4 min after the latest bias
    first, second = raw(3, T0 + 10 * m), raw(4, T0 + 20 * m)
    cal1 = made(11, 1, (first, master), T0 + 10 * m + 3 * SEC)
    cal2 = made(12, 1, (second, master), T0 + 20 * m + 4 * SEC)
    src1 = made(21, 2, (cal1,), T0 + 10 * m + 7 * SEC)
    src2 = made(22, 2, (cal2,), T0 + 20 * m + 9 * SEC)
    made(31, 3, (src1,), T0 + 10 * m + 12 * SEC)
    made(32, 3, (src1, src2), T0 + 20 * m + 15 * SEC)  # the night's catalog made again
    _archive_all(catalog, archived)

    levels = science_latencies(catalog, T0)
    assert list(levels) == [0, 1, 2, 3]
    assert levels[0] == Percentiles(4, 100.0, 100.0, 100.0, 100.0)
    assert levels[1] == Percentiles(3, 4000.0, 240_000.0, 240_000.0, 240_000.0)
    assert levels[2] == Percentiles(2, 7000.0, 9000.0, 9000.0, 9000.0)
    assert levels[3] == Percentiles(2, 12_000.0, 15_000.0, 15_000.0, 15_000.0)
    assert science_latencies(catalog, T0, level=2) == {2: levels[2]}
    # windowed on the archived stamp: only the second frame's products and itself
    late = science_latencies(catalog, T0 + 15 * m)
    assert {n: p.count for n, p in late.items()} == {0: 1, 1: 1, 2: 1, 3: 1}
    assert late[3].p50_ms == 15_000.0

    report = latency_report(catalog, T0 + 21 * m)
    assert report.levels == levels
    assert report.to_json()["levels"]["L2"] == {
        "count": 2,
        "p50_ms": 7000.0,
        "p90_ms": 9000.0,
        "p99_ms": 9000.0,
        "max_ms": 9000.0,
    }


# ---------------------------------------------------------------- the command


def test_status_latency_after_a_real_ingest(make_site: SiteFactory, frames: list[Path]) -> None:
    site = make_site().site
    done = obsflow("ingest", "--site", site, frames[0].parent)
    assert done.returncode == 0, done.stderr

    data = as_json(obsflow("status", "--site", site, "--latency", "--json"))
    assert data["count"] == len(frames)
    numbers = [data[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
    assert all(v >= 0 for v in numbers)
    assert numbers == sorted(numbers)
    assert list(data["stages"]) == STAGE_NAMES
    for stage in data["stages"].values():
        assert stage["count"] == len(frames)
        assert stage["p50_ms"] <= stage["p90_ms"] <= stage["p99_ms"] <= stage["max_ms"]
    assert data["stuck"] == [] and data["stuck_total"] == 0
    assert datetime.fromisoformat(data["since"]) < datetime.now(UTC)
    assert list(data["levels"]) == ["L0"]  # raw frames only: their own acquired → archived
    assert data["levels"]["L0"]["count"] == len(frames)
    assert data["levels"]["L0"]["max_ms"] == data["max_ms"]

    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    future = as_json(obsflow("status", "--site", site, "--latency", "--json", "--since", later))
    assert future["count"] == 0 and future["p50_ms"] is None and future["max_ms"] is None
    assert all(s["count"] == 0 for s in future["stages"].values())

    table = obsflow("status", "--site", site, "--latency")
    assert table.returncode == 0, table.stderr
    assert "acquired → archived" in table.stdout and "cached → archived" in table.stdout
    assert "stuck: 0 file(s)" in table.stdout
    assert "science latency" in table.stdout and "L0" in table.stdout

    plain = as_json(obsflow("status", "--site", site, "--json"))
    assert set(plain) == {"files", "queue", "queue_depth", "daemon", "processes"}
    assert plain["processes"] == []  # no daemon or worker has recorded itself
    assert plain["daemon"] is None  # no daemon has run on this site


def test_status_latency_lists_queued_files_as_stuck(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    site = make_site().site
    queued = obsflow("ingest", "--no-wait", "--site", site, *frames[:3])
    assert queued.returncode == 0, queued.stderr
    args = ("status", "--site", site, "--latency", "--json")
    assert as_json(obsflow(*args))["stuck"] == []  # cached just now: not stuck yet
    data = as_json(obsflow(*args, "--stuck-after", "0"))
    assert data["count"] == 0  # nothing archived
    assert data["stages"]["validated_to_cached"]["count"] == 3
    assert data["stuck_total"] == 3
    assert sorted(f["original_name"] for f in data["stuck"]) == sorted(p.name for p in frames[:3])
    assert {f["state"] for f in data["stuck"]} == {"cached"}
    table = obsflow("status", "--site", site, "--latency", "--stuck-after", "0")
    assert table.returncode == 0, table.stderr
    assert "stuck: 3 file(s)" in table.stdout and frames[0].name in table.stdout


def test_status_latency_refuses_bad_options_clearly(make_site: SiteFactory) -> None:
    site = make_site().site
    bad = obsflow("status", "--site", site, "--latency", "--since", "last tuesday")
    assert bad.returncode == 2
    assert "--since" in bad.stderr and "ISO" in bad.stderr
    alone = obsflow("status", "--site", site, "--since", "2026-11-22T00:00")
    assert alone.returncode == 2 and "--latency" in alone.stderr
    negative = obsflow("status", "--site", site, "--latency", "--stuck-after", "-1")
    assert negative.returncode == 2 and "--stuck-after" in negative.stderr

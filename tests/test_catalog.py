"""The catalog on both engines: migrations, lookups, keyword types, one-transaction records."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect

from obsflow.catalog import Catalog, FileOrder, FileQuery, KeywordIs, NewFile
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.queue import IngestQueue
from obsflow.catalog.runs import NewRun, RunStore
from obsflow.catalog.tags import Tags
from obsflow.catalog.tracking import TrackerGroups
from obsflow.errors import NotFoundError
from obsflow.site import Site, ingest_paths
from obsflow.states import FileState, LedgerEvent, RequestState, RunState

T0 = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)


def _new(n: int, **changes: object) -> NewFile:
    values: dict[str, object] = {
        "product": "ofcam_raw",
        "instrument": "OFCAM",
        "level": 0,
        "original_name": f"ofc_20261122_{n:04d}.fits",
        "source_path": f"/in/ofc_20261122_{n:04d}.fits",
        "size": 1000 + n,
        "sha256": f"{n:064x}",
        "start": T0 + timedelta(minutes=n),
        "stop": T0 + timedelta(minutes=n, seconds=30),
        "night": date(2026, 11, 21),
        "object": "bias" if n % 2 else "NGC 1234 field",
        "tags": ("raw",) if n % 3 else ("raw", "special"),
        "keywords": {"AIRMASS": 1.25, "FRAMENUM": n, "SIMPLE": True, "OBSMODE": "img"},
    }
    values.update(changes)
    return NewFile(**values)  # type: ignore[arg-type]


def _record(catalog: Catalog, new: NewFile, placed: list[str] | None = None) -> str:
    recorded = catalog.record_cached(
        new,
        make_archive_id=lambda bump: f"OF.{new.original_name}.{bump:02d}",
        cache_path=lambda aid: f"OFCAM/2026-11-21/{aid}",
        place=(placed.append if placed is not None else lambda aid: None),
        ledger={LedgerEvent.CACHED: T0},
        now=T0,
    )
    return recorded.archive_id


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    opened = Catalog.open(catalog_url)
    yield opened
    opened.close()


def test_migrations_create_every_table_and_are_idempotent(catalog_url: str) -> None:
    first = Catalog.open(catalog_url)
    first.close()
    second = Catalog.open(catalog_url)  # a second upgrade to head changes nothing
    tables = set(inspect(second.engine).get_table_names())
    second.close()
    assert {"files", "keywords", "tags", "ledger", "ingest_requests", "alembic_version"} <= tables


def test_lookups_by_every_filter(catalog: Catalog) -> None:
    ids = [_record(catalog, _new(n)) for n in range(1, 7)]
    assert len(set(ids)) == 6
    assert len(catalog.find(FileQuery(product="ofcam_raw"))) == 6
    assert catalog.find(FileQuery(product="other")) == []
    assert len(catalog.find(FileQuery(instrument="OFCAM", night=date(2026, 11, 21)))) == 6
    bias = catalog.find(FileQuery(object="bias"))
    assert [r.original_name for r in bias] == [f"ofc_20261122_{n:04d}.fits" for n in (1, 3, 5)]
    special = catalog.find(FileQuery(tag="special"))
    assert [r.original_name for r in special] == [
        "ofc_20261122_0003.fits",
        "ofc_20261122_0006.fits",
    ]
    # time range: files whose [start, stop] overlaps [since, until]
    window = catalog.find(
        FileQuery(since=T0 + timedelta(minutes=2, seconds=15), until=T0 + timedelta(minutes=4))
    )
    assert [r.original_name[-9:-5] for r in window] == ["0002", "0003", "0004"]
    assert catalog.find(FileQuery(state=FileState.ARCHIVED)) == []
    assert len(catalog.find(FileQuery(state=FileState.CACHED, limit=2))) == 2


def test_the_listing_order_cursor_keywords_and_live_files(catalog: Catalog) -> None:
    """What the REST listing asks of find: ID order (recorded), a cursor, program, level,
    header keywords (numbers as numbers), only live files with an archive ID."""
    for n in range(1, 7):  # recorded in one order, started in the reverse one
        start = T0 + timedelta(minutes=10 - n)
        changes = {"start": start, "stop": start + timedelta(seconds=30)}
        _record(catalog, _new(n, program="A" if n % 2 else "B", level=n % 3, **changes))
    catalog.record_rejected(_new(7, sha256="f" * 64), "not FITS", None, {})
    live, ids = FileQuery(live_only=True), [r.id for r in catalog.find(FileQuery())]
    assert len(ids) == 7 and len(catalog.find(live)) == 6

    def names(**asked: object) -> list[str]:
        query = FileQuery(live_only=True, order=FileOrder.RECORDED, **asked)  # type: ignore[arg-type]
        return [r.original_name[-9:-5] for r in catalog.find(query)]

    assert names() == ["0001", "0002", "0003", "0004", "0005", "0006"]
    started = [r.original_name[-9:-5] for r in catalog.find(live)]
    assert started == ["0006", "0005", "0004", "0003", "0002", "0001"]
    first = min(ids)
    assert names(after=first + 1, limit=2) == ["0003", "0004"]
    assert names(tag="special", after=first + 2) == ["0006"]
    assert names(tag="special") == ["0003", "0006"]
    window = {"since": T0 + timedelta(minutes=5), "until": T0 + timedelta(minutes=6)}
    assert names(**window) == ["0004", "0005"]  # (4: 0:06–0:06:30, 5: 0:05–0:05:30)
    assert names(**window, after=first + 3) == ["0005"]
    assert names(program="B") == ["0002", "0004", "0006"]
    assert names(level=0) == ["0003", "0006"]
    assert names(program="B", level=0) == ["0006"]
    assert names(keywords=(KeywordIs("FRAMENUM", "4"),)) == ["0004"]
    assert names(keywords=(KeywordIs("FRAMENUM", "4.0e0"),)) == ["0004"]  # as a number
    assert names(keywords=(KeywordIs("AIRMASS", "1.250"),)) == names()
    assert names(keywords=(KeywordIs("OBSMODE", "img"), KeywordIs("FRAMENUM", "x"))) == []
    assert names(keywords=(KeywordIs("OBSMODE", "img"), KeywordIs("FRAMENUM", "2"))) == ["0002"]
    assert names(keywords=(KeywordIs("FRAMENUM", "inf"),)) == []
    with pytest.raises(ValueError, match="RECORDED"):
        FileQuery(after=3)  # a cursor over IDs means nothing in start order
    assert catalog.tag_counts() == [("raw", 6), ("special", 2)]


def test_a_long_file_overlaps_a_window_long_after_it_started(catalog_url: str) -> None:
    """The lookup bounds its scan by each product's longest span: a file that started
    hours before the window (a night's catalog) is still found, by a second process too."""
    catalog = Catalog.open(catalog_url)
    _record(catalog, _new(1))  # 30 s
    night = _new(2, product="ofcam_nightcat", start=T0, stop=T0 + timedelta(hours=10))
    _record(catalog, night)
    for n in range(3, 40):
        _record(catalog, _new(n, product="ofcam_nightcat"))  # 30 s each, later
    since, until = T0 + timedelta(hours=9), T0 + timedelta(hours=9, minutes=1)

    def window(product: str | None = None) -> FileQuery:
        return FileQuery(product=product, since=since, until=until)

    found = catalog.find(window("ofcam_nightcat"))
    assert [r.original_name for r in found] == [night.original_name]
    assert [r.original_name for r in catalog.find(window())] == [night.original_name]
    assert catalog.find(window("ofcam_raw")) == []
    catalog.close()
    other = Catalog.open(catalog_url)  # the spans are in the catalog, not in a process
    found = other.find(window("ofcam_nightcat"))
    assert [r.original_name for r in found] == [night.original_name]
    other.close()


def test_keywords_keep_their_types_and_tags_come_back(catalog: Catalog) -> None:
    archive_id = _record(catalog, _new(3))
    record = catalog.get(archive_id)
    assert record is not None
    assert record.keywords == {"AIRMASS": 1.25, "FRAMENUM": 3, "SIMPLE": True, "OBSMODE": "img"}
    assert isinstance(record.keywords["FRAMENUM"], int)
    assert record.tags == ("raw", "special")
    assert record.start == T0 + timedelta(minutes=3)
    assert record.start is not None and record.start.tzinfo is not None


def test_record_cached_is_one_transaction_with_its_request(catalog: Catalog) -> None:
    placed: list[str] = []
    archive_id = _record(catalog, _new(1), placed)
    assert placed == [archive_id]
    record = catalog.get(archive_id)
    assert record is not None
    requests = IngestQueue(catalog).requests_for([record.id])
    assert [(q.state, q.attempts) for q in requests] == [(RequestState.PENDING, 0)]

    def fail(_aid: str) -> None:
        raise OSError("disk full while placing in the cache")

    with pytest.raises(OSError, match="disk full"):
        catalog.record_cached(
            _new(2),
            make_archive_id=lambda bump: f"OF.two.{bump}",
            cache_path=lambda aid: aid,
            place=fail,
            ledger={},
            now=T0,
        )
    # nothing of file 2 was kept: no row, no request
    assert catalog.find(FileQuery(original_name="ofc_20261122_0002.fits")) == []
    assert sum(IngestQueue(catalog).counts().values()) == 1


def test_same_bytes_are_a_duplicate_and_a_taken_archive_id_is_bumped(catalog: Catalog) -> None:
    first = _record(catalog, _new(1))
    again = catalog.record_cached(
        _new(1, original_name="renamed.fits"),
        make_archive_id=lambda bump: "never-used",
        cache_path=lambda aid: aid,
        place=lambda aid: None,
        ledger={},
        now=T0,
    )
    assert again.duplicate and again.archive_id == first
    # a different file whose natural archive ID is taken gets the next one
    second = catalog.record_cached(
        _new(2),
        make_archive_id=lambda bump: f"OF.ofc_20261122_0001.fits.{bump:02d}",
        cache_path=lambda aid: aid,
        place=lambda aid: None,
        ledger={},
        now=T0,
    )
    assert not second.duplicate
    assert second.archive_id == "OF.ofc_20261122_0001.fits.01"


def test_a_live_files_row_id_by_its_archive_id(catalog: Catalog) -> None:
    archive_id = _record(catalog, _new(1))
    record = catalog.get(archive_id)
    assert record is not None and catalog.file_id(archive_id) == record.id
    assert catalog.file_id("no-such-id") is None
    # tags and pins name files by archive ID through this one lookup
    assert Tags(catalog).add(archive_id, "checked")
    with pytest.raises(NotFoundError, match="no-such-id"):
        Tags(catalog).add("no-such-id", "checked")


def test_a_page_of_runs_after_a_cursor_narrowed_by_state_pipeline_and_night(
    catalog: Catalog,
) -> None:
    store = RunStore(catalog)
    files = [catalog.get(_record(catalog, _new(n))) for n in range(5)]
    ids = []
    for n, file in enumerate(files):
        assert file is not None
        night = date(2026, 11, 21 + n % 2)
        pipeline = "bias" if n < 4 else "flat"
        key = GroupKey.of(pipeline, {"night": night.isoformat(), "file": str(n)})
        new = NewRun(pipeline, key, night, {"raw": (file.id,)}, "inputs ready")
        run_id = store.create(new, T0)
        assert run_id is not None
        ids.append(run_id)
    assert store.page(0, 2) == ids[:2]
    assert store.page(ids[1], 2) == ids[2:4]  # after the cursor: nothing repeated or skipped
    assert store.page(ids[-1], 2) == []
    assert store.page(0, 10, pipeline="flat") == [ids[4]]
    assert store.page(0, 10, night=date(2026, 11, 22)) == [ids[1], ids[3]]
    assert store.page(0, 10, state=RunState.QUEUED, pipeline="bias") == ids[:4]
    assert store.page(0, 10, state=RunState.RUNNING) == []


def test_a_groups_deadline_is_cleared_only_if_nobody_set_another(catalog: Catalog) -> None:
    groups = TrackerGroups(catalog)
    first = catalog.get(_record(catalog, _new(1)))
    second = catalog.get(_record(catalog, _new(2)))
    assert first is not None and second is not None
    night = date(2026, 11, 21)
    key = GroupKey.of("bias", {"night": night.isoformat()})
    groups.open(key, night, first.id, T0)
    groups.open(key, night, second.id, T0)  # known already: the file that made it stays
    assert groups.primary(key) == first
    assert groups.of_night("bias", night) == [(key, first)]
    assert groups.of_pipeline("bias", date(2026, 11, 22)) == []
    assert groups.next_deadline() is None

    groups.set_due(key, T0 + timedelta(minutes=5), T0)
    assert groups.due(T0) == []
    [due] = groups.due(T0 + timedelta(minutes=5))
    assert due.key == key and groups.next_deadline() == T0 + timedelta(minutes=5)
    groups.set_due(key, T0 + timedelta(hours=1), T0)  # its evaluation waits longer
    groups.clear_due(due, T0)
    assert groups.next_deadline() == T0 + timedelta(hours=1)  # the later deadline holds
    groups.clear_due(groups.due(T0 + timedelta(hours=1))[0], T0)
    assert groups.next_deadline() is None
    assert groups.cached_at([first.id, second.id, 424242]) == {first.id: T0, second.id: T0}


def test_sqlite_catalog_is_in_wal_mode(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    with catalog.read() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    catalog.close()
    assert mode == "wal"


def test_two_processes_worth_of_sites_share_one_catalog(site: Site, frames: list[Path]) -> None:
    """Receipt from two Site objects (as two processes would) never doubles a file."""
    from obsflow.site import open_site

    other = open_site(site.settings)
    try:
        first = ingest_paths(site, frames[:8], wait=False)
        second = ingest_paths(other, frames[4:], wait=True)
    finally:
        other.close()
    assert len(first.received) == 8
    names = [r.original_name for r in site.catalog.find(FileQuery())]
    assert sorted(names) == sorted(p.name for p in frames)
    assert all(r.state is FileState.ARCHIVED for r in site.catalog.find(FileQuery()))
    assert len(second.ingest.archived) == len(frames)


def test_schema_revision_is_alembics_head(catalog: Catalog) -> None:
    """Opening a catalog skips Alembic when at SCHEMA_REVISION, so it must be the head."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from obsflow.catalog import MIGRATIONS, SCHEMA_REVISION

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_REVISION
    assert catalog.revision() == SCHEMA_REVISION


def test_the_migrations_make_exactly_the_tables_schema_py_declares(catalog: Catalog) -> None:
    """schema.py (what the code queries) and the migrations (what databases get) agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from obsflow.catalog import schema
    from obsflow.catalog.sky import is_sky_name

    opts = {
        "compare_server_default": False,
        "include_name": lambda name, _type, _parents: not is_sky_name(name),
    }  # the sky index (catalog/sky.py) is made by its migration alone
    with catalog.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=opts)
        differences = compare_metadata(context, schema.metadata)
    assert differences == []

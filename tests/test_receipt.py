"""Receipt: every way a file can arrive, on real files and real catalogs (SQLite, PostgreSQL).

A refused file must end up in ``quarantine/<date>/`` with a ``.reason.json`` beside it and a
``rejected`` row that says why, leave nothing in the cache, the archive or the ingest queue,
and keep its source (``remove_source`` is off by default). A good file must be cached once,
with metadata that matches its header.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from astropy.io import fits

from obsflow.catalog import FileQuery, FileRecord
from obsflow.receipt.receiver import Outcome, Received
from obsflow.settings import Settings
from obsflow.sim.simulate import write_frame
from obsflow.site import Site, open_site
from obsflow.states import FileState, LedgerEvent

SiteFactory = Callable[..., Settings]
BAD_NAME = "ofc_20261122_0099.fits"  # a raw-frame name: recognised as ofcam_raw
STRUCTURAL = frozenset({"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND"})
STRUCTURAL |= {"BZERO", "BSCALE"}
HST = timezone(timedelta(hours=-10))


# ------------------------------------------------------------------ helpers


@contextmanager
def opened(settings: Settings) -> Iterator[Site]:
    site = open_site(settings)
    try:
        yield site
    finally:
        site.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def rewrite(
    src: Path, dst: Path, changes: Mapping[str, Any], *, remove: tuple[str, ...] = ()
) -> Path:
    """Write ``src``'s data and header to ``dst`` with astropy, each keyword in ``changes``
    set to its value and each in ``remove`` removed."""
    with fits.open(src) as hdul:
        header = hdul[0].header
        data = hdul[0].data.copy()
        cards = fits.Header([c for c in header.cards if c.keyword not in STRUCTURAL])
    for key in remove:
        del cards[key]
    for key, value in changes.items():
        cards[key] = value
    write_frame(dst, data, cards)
    return dst


def header_block(cards: list[str], *, end: bool) -> bytes:
    text = "".join(card.ljust(80) for card in [*cards, *(["END"] if end else [])])
    return text.ljust((len(text) + 2879) // 2880 * 2880).encode("ascii")


def nothing_stored(site: Site) -> None:
    """Nothing in the cache (temp files included), the archive or the ingest queue."""
    assert files_under(site.settings.cache) == []
    assert files_under(site.settings.archive) == []
    assert site.queue.counts() == {}


def one_row(site: Site, name: str) -> FileRecord:
    rows = site.catalog.find(FileQuery(original_name=name))
    assert len(rows) == 1, rows
    return rows[0]


def check_rejected(
    site: Site, source: Path, content: bytes, result: Received, reason: str, *details: str
) -> FileRecord:
    """Everything a rejection must leave behind, and nothing else."""
    assert result.outcome is Outcome.REJECTED, result
    assert result.archive_id is None
    assert result.reason is not None and result.reason.startswith(f"{reason}: "), result.reason
    # the catalog: one rejected row, with the reason
    rejected = site.catalog.find(FileQuery(state=FileState.REJECTED))
    assert [r.original_name for r in rejected] == [source.name]
    row = rejected[0]
    assert row.reason == result.reason
    for detail in details:
        assert detail in row.reason
    assert row.sha256 == sha256(content) and row.size == len(content)
    assert row.archive_id is None and row.cache_path is None and row.archive_path is None
    assert row.source_path == str(source)
    assert site.catalog.find(FileQuery()) == [row]  # no other row of any state
    ledger = site.catalog.ledger(row.id)
    assert [e.event for e in ledger] == [LedgerEvent.RECEIVED, LedgerEvent.REJECTED]
    # the quarantine: quarantine/<date received>/<name> and its reason beside it
    assert row.quarantine_path is not None
    copy = site.settings.quarantine / row.quarantine_path
    assert copy.parent.parent == site.settings.quarantine
    assert copy.parent.name == ledger[0].at.astimezone(UTC).date().isoformat()
    assert copy.name == source.name
    assert copy.read_bytes() == content
    note_path = copy.with_name(copy.name + ".reason.json")
    assert files_under(site.settings.quarantine) == sorted([copy, note_path])
    note = json.loads(note_path.read_text())
    assert note["reason"] == reason
    for detail in details:
        assert detail in note["detail"]
    assert note["file"] == str(source)
    assert note["sha256"] == row.sha256 and note["size"] == len(content)
    # nowhere else, and the source untouched
    nothing_stored(site)
    assert source.read_bytes() == content
    return row


# ------------------------------------------------------------ bad files


def not_fits(good: Path, dst: Path) -> None:
    dst.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)


def text_file(good: Path, dst: Path) -> None:
    dst.write_text("frame 99 was not written: shutter fault\n")


def truncated_data(good: Path, dst: Path) -> None:
    data = good.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def truncated_header(good: Path, dst: Path) -> None:
    dst.write_bytes(good.read_bytes()[:1000])


def empty(good: Path, dst: Path) -> None:
    dst.write_bytes(b"")


def no_end(good: Path, dst: Path) -> None:
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    0",
        "DATE-OBS= '2026-11-22T05:00:00.00'",
        "EXPTIME =                 30.0",
        "IMAGETYP= 'OBJECT'",
        "INSTRUME= 'OFCAM'",
    ]
    dst.write_bytes(header_block(cards, end=False))


def stray_bytes(good: Path, dst: Path) -> None:
    dst.write_bytes(good.read_bytes() + b"trailing garbage")


def missing_imagetyp(good: Path, dst: Path) -> None:
    rewrite(good, dst, {}, remove=("IMAGETYP",))


def unparseable_date_obs(good: Path, dst: Path) -> None:
    rewrite(good, dst, {"DATE-OBS": "yesterday"})


def text_exptime(good: Path, dst: Path) -> None:
    rewrite(good, dst, {"EXPTIME": "long"})


BAD_FILES = [
    pytest.param(not_fits, "invalid-fits", ["not a FITS file"], id="png-bytes"),
    pytest.param(text_file, "invalid-fits", ["not a FITS file"], id="text"),
    pytest.param(truncated_data, "invalid-fits", ["truncated"], id="truncated-data"),
    pytest.param(truncated_header, "invalid-fits", ["no END card"], id="truncated-header"),
    pytest.param(empty, "invalid-fits", ["empty"], id="zero-length"),
    pytest.param(no_end, "invalid-fits", ["no END card"], id="header-without-end"),
    pytest.param(stray_bytes, "invalid-fits", ["stray bytes"], id="stray-trailing-bytes"),
    pytest.param(missing_imagetyp, "bad-metadata", ["IMAGETYP", "missing"], id="no-imagetyp"),
    pytest.param(unparseable_date_obs, "bad-metadata", ["DATE-OBS", "'yesterday'"], id="date"),
    pytest.param(text_exptime, "bad-metadata", ["EXPTIME", "'long'"], id="text-exptime"),
]


@pytest.mark.parametrize(("make_bad", "reason", "details"), BAD_FILES)
def test_a_bad_file_is_quarantined_with_its_reason_and_its_source_kept(
    site: Site,
    frames: list[Path],
    make_bad: Callable[[Path, Path], None],
    reason: str,
    details: list[str],
) -> None:
    source = site.settings.incoming / BAD_NAME
    make_bad(frames[4], source)
    content = source.read_bytes()

    result = site.receiver.receive(source)

    row = check_rejected(site, source, content, result, reason, *details)
    assert row.product == "ofcam_raw" and row.instrument == "OFCAM" and row.level == 0
    assert result.product == "ofcam_raw"


def test_the_same_bad_file_twice_makes_one_quarantine_copy_and_one_row(
    site: Site, frames: list[Path]
) -> None:
    source = site.settings.incoming / BAD_NAME
    truncated_data(frames[4], source)
    content = source.read_bytes()
    first = site.receiver.receive(source)
    second = site.receiver.receive(source)
    assert second.outcome is Outcome.REJECTED and second.reason == first.reason
    check_rejected(site, source, content, first, "invalid-fits", "truncated")


def test_a_different_bad_file_of_the_same_name_gets_its_own_copy(
    site: Site, frames: list[Path]
) -> None:
    source = site.settings.incoming / BAD_NAME
    truncated_data(frames[4], source)
    first_bytes = source.read_bytes()
    assert site.receiver.receive(source).outcome is Outcome.REJECTED
    empty(frames[4], source)
    assert site.receiver.receive(source).outcome is Outcome.REJECTED
    rows = site.catalog.find(FileQuery(state=FileState.REJECTED))
    assert len(rows) == 2
    copies = {r.sha256: site.settings.quarantine / str(r.quarantine_path) for r in rows}
    assert copies[sha256(first_bytes)].read_bytes() == first_bytes
    assert copies[sha256(b"")].read_bytes() == b""
    assert len(set(copies.values())) == 2
    for copy in copies.values():
        assert copy.with_name(copy.name + ".reason.json").is_file()
    nothing_stored(site)


def test_the_same_bad_file_received_by_several_workers_at_once_is_quarantined_once(
    site: Site,
) -> None:
    for round_ in range(4):  # a few rounds, each with its own file: the race is a race
        source = site.settings.incoming / f"ofc_20261122_{round_:02d}99.fits"
        source.write_bytes(
            bytes([round_]) + b"not FITS" * (1 << 18)
        )  # 2 MiB: copying takes a while
        with ThreadPoolExecutor(8) as pool:  # e.g. a trigger and a scan at the same moment
            futures = [pool.submit(site.receiver.receive, source) for _ in range(8)]
        results = [f.result() for f in futures]  # "never raises for a bad file"
        assert [r.outcome for r in results] == [Outcome.REJECTED] * 8
        assert len(site.catalog.find(FileQuery(original_name=source.name))) == 1
        assert len(list(site.settings.quarantine.rglob(f"{source.name}*"))) == 2  # + reason


def test_bad_files_of_one_name_quarantined_at_once_each_keep_their_own_copy(
    site: Site, tmp_path: Path
) -> None:
    for round_ in range(4):
        name = f"ofc_20261122_{round_:02d}99.fits"
        sources = []
        for camera in range(8):  # eight cameras, one file name
            folder = tmp_path / f"camera{camera}"
            folder.mkdir(exist_ok=True)
            sources.append(folder / name)
            sources[-1].write_bytes(bytes([65 + camera, round_]) * (1 << 20))
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(site.receiver.receive, p) for p in sources]
        results = [f.result() for f in futures]
        assert [r.outcome for r in results] == [Outcome.REJECTED] * 8
        rows = site.catalog.find(FileQuery(original_name=name))
        assert sorted(r.source_path for r in rows) == sorted(str(p) for p in sources)
        assert len({r.quarantine_path for r in rows}) == 8
        for row in rows:
            copy = site.settings.quarantine / str(row.quarantine_path)
            assert sha256(copy.read_bytes()) == row.sha256, f"{copy} holds another file's bytes"


# ------------------------------------------------------------------ names


def test_a_name_matching_no_product_is_ignored_by_default(site: Site, frames: list[Path]) -> None:
    source = site.settings.incoming / "ofc_20261122.fits"  # valid FITS, but no frame number
    source.write_bytes(frames[4].read_bytes())
    result = site.receiver.receive(source)
    assert result.outcome is Outcome.IGNORED
    assert result.archive_id is None and result.product is None
    assert site.catalog.find(FileQuery()) == []
    assert files_under(site.settings.quarantine) == []
    nothing_stored(site)
    assert source.read_bytes() == frames[4].read_bytes()


def test_a_name_matching_no_product_is_quarantined_when_the_site_says_so(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    with opened(make_site(receipt={"unmatched": "quarantine"})) as site:
        source = site.settings.incoming / "ofc_20261122.fits"
        source.write_bytes(frames[4].read_bytes())
        result = site.receiver.receive(source)
        row = check_rejected(
            site, source, source.read_bytes(), result, "unrecognised", "matches no registered"
        )
        assert row.product is None and row.instrument is None


ANY_OFCAM_FILE = r"""
products:
  - id: ofcam_anything
    level: 0
    instrument: OFCAM
    description: a careless rule that also matches every raw frame
    filename: 'ofc_.*\.fits'
    time: {from: exposure}
"""


def test_an_ambiguous_name_is_rejected_naming_both_products(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = make_site()
    (settings.registry / "zz_anything.yaml").write_text(ANY_OFCAM_FILE)
    with opened(settings) as site:
        source = site.settings.incoming / frames[4].name
        source.write_bytes(frames[4].read_bytes())
        result = site.receiver.receive(source)
        row = check_rejected(
            site, source, source.read_bytes(), result, "ambiguous", "ofcam_raw", "ofcam_anything"
        )
        assert row.product is None


# ------------------------------------------------------- files in motion


def test_a_file_that_vanishes_while_settling_is_vanished_and_leaves_no_trace(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    with opened(make_site(receipt={"settle_seconds": 1.0})) as site:
        source = site.settings.incoming / frames[4].name
        half = frames[4].read_bytes()[: 2880 * 2]  # being written: fresh and incomplete,
        source.write_bytes(half)  # so receipt must wait ~1 s for it to settle
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(site.receiver.receive, source)
            time.sleep(0.3)
            assert not future.done(), "receipt did not wait for the file to settle"
            source.unlink()
            result = future.result(timeout=30)
        assert result.outcome is Outcome.VANISHED
        assert result.archive_id is None and result.file_id is None
        assert site.catalog.find(FileQuery()) == []
        assert files_under(site.settings.quarantine) == []
        nothing_stored(site)


def test_a_fresh_complete_frame_is_taken_without_waiting_the_settle_time(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    """Real time: a whole FITS file is complete the moment its last byte lands."""
    with opened(make_site(receipt={"settle_seconds": 30.0})) as site:
        source = site.settings.incoming / frames[4].name
        source.write_bytes(frames[4].read_bytes())  # mtime: now
        started = time.monotonic()
        result = site.receiver.receive(source)
        assert result.outcome is Outcome.CACHED, result
        assert time.monotonic() - started < 10  # far less than the 30 s settle time


def test_a_frame_being_written_is_looked_at_every_few_ms_and_taken_at_the_first_look_once_whole(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    """Real time: receipt's wait for a frame's last byte costs at most a few ms."""
    content = frames[4].read_bytes()
    with opened(make_site(receipt={"settle_seconds": 30.0})) as site:
        source = site.settings.incoming / frames[4].name
        source.write_bytes(content[: 2880 * 2])  # fresh and incomplete
        naps: list[float] = []
        after_whole: list[float] = []

        def sleep(seconds: float) -> None:  # the receiver's clock seam
            (after_whole if len(naps) >= 5 else naps).append(seconds)
            if len(naps) == 5 and not after_whole:
                source.write_bytes(content)  # the last byte lands during the 5th nap
            time.sleep(seconds)

        site.receiver.sleep = sleep
        result = site.receiver.receive(source)
        assert result.outcome is Outcome.CACHED, result
        assert result.size == len(content)
        assert naps and max(naps) <= 0.005, naps
        assert after_whole == [], "the whole frame was not taken at the first look"


def test_a_file_still_being_written_is_taken_only_once_complete(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    content = frames[4].read_bytes()
    pieces = [content[i : i + 960] for i in range(0, len(content), 960)]  # 15 pieces
    with opened(make_site(receipt={"settle_seconds": 1.0})) as site:
        source = site.settings.incoming / frames[4].name
        source.write_bytes(pieces[0])
        finished: list[float] = []

        def append() -> None:
            with source.open("ab") as f:
                for piece in pieces[1:]:
                    time.sleep(0.1)
                    f.write(piece)
                    f.flush()
            finished.append(time.monotonic())

        writer = threading.Thread(target=append)
        with ThreadPoolExecutor(1) as pool:
            writer.start()
            future = pool.submit(site.receiver.receive, source)
            result = future.result(timeout=60)
            done = time.monotonic()
        writer.join()
        assert finished and finished[0] < done
        assert result.outcome is Outcome.CACHED, result
        assert result.size == len(content)
        row = one_row(site, source.name)
        assert row.state is FileState.CACHED
        assert row.size == len(content) and row.sha256 == sha256(content)
        assert row.cache_path is not None
        assert site.cache.path(row.cache_path).read_bytes() == content


def test_a_settled_file_with_an_mtime_in_the_future_is_received(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = make_site(receipt={"settle_seconds": 0.2, "max_wait_seconds": 1.0})
    with opened(settings) as site:
        ahead = time.time() + 3600  # the instrument's clock is an hour fast
        os.utime(frames[4], (ahead, ahead))
        result = site.receiver.receive(frames[4])
        assert result.outcome is Outcome.CACHED, result


# ----------------------------------------------------------- good files


def test_the_same_bytes_twice_are_a_duplicate_with_one_row(site: Site, frames: list[Path]) -> None:
    first = site.receiver.receive(frames[4])
    again = site.receiver.receive(frames[4])
    other_name = frames[4].with_name("ofc_20261122_0999.fits")
    other_name.write_bytes(frames[4].read_bytes())
    renamed = site.receiver.receive(other_name)
    assert first.outcome is Outcome.CACHED
    for dup in (again, renamed):
        assert dup.outcome is Outcome.DUPLICATE
        assert (dup.archive_id, dup.file_id) == (first.archive_id, first.file_id)
    row = one_row(site, frames[4].name)
    assert site.catalog.find(FileQuery()) == [row]
    assert sum(site.queue.counts().values()) == 1
    assert len(files_under(site.settings.cache)) == 1
    assert files_under(site.settings.quarantine) == []


def test_a_raw_frame_with_an_earlier_frames_name_is_another_exposure_never_a_version(
    site: Site, frames: list[Path]
) -> None:
    """Frame counters restart and names carry the UT date: two raw frames of one name
    are two exposures. Neither supersedes the other; the newcomer says whose name it has."""
    source = frames[4]
    first = site.receiver.receive(source)
    old_bytes = source.read_bytes()
    rewrite(source, source, {"OBJECT": "another target", "DATE-OBS": "2026-11-23T05:01:36.37"})
    new_bytes = source.read_bytes()
    second = site.receiver.receive(source)

    assert first.outcome is Outcome.CACHED and second.outcome is Outcome.CACHED
    assert first.archive_id is not None and second.archive_id is not None
    assert second.archive_id != first.archive_id
    assert second.superseded is None and second.same_name_as == first.archive_id
    old, new = site.catalog.get(first.archive_id), site.catalog.get(second.archive_id)
    assert old is not None and new is not None
    assert (old.version, new.version) == (1, 1)
    assert old.superseded_by is None and new.superseded_by is None
    current = site.catalog.find(FileQuery(include_superseded=False))
    assert {r.archive_id for r in current} == {first.archive_id, second.archive_id}
    assert LedgerEvent.SUPERSEDED not in {e.event for e in site.catalog.ledger(old.id)}
    assert old.cache_path is not None and new.cache_path is not None
    assert site.cache.path(old.cache_path).read_bytes() == old_bytes
    assert site.cache.path(new.cache_path).read_bytes() == new_bytes


def test_the_ingest_summary_says_a_frame_has_an_earlier_frames_name(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    from tests.test_cli import obsflow

    site = make_site().site
    first = obsflow("ingest", "--site", site, frames[4])
    assert first.returncode == 0, first.stderr
    rewrite(frames[4], frames[4], {"DATE-OBS": "2026-11-23T05:01:36.37"})
    second = obsflow("ingest", "--site", site, frames[4])
    assert second.returncode == 0, second.stderr
    assert "same name, other exposure" in second.stdout
    assert f"same name {frames[4]}" in second.stderr and "both kept" in second.stderr


def test_a_pipeline_product_of_the_same_name_is_a_new_version_superseding_the_old(
    site: Site, frames: list[Path]
) -> None:
    """A master bias re-made for its night (level 1: versioned by name by default)
    supersedes the older one, and the older one's ledger says when."""
    source = site.settings.incoming / "ofc_20261121_mbias.fits"
    rewrite(frames[0], source, {"DATE-END": "2026-11-22T06:00:00"})
    first = site.receiver.receive(source)
    old_bytes = source.read_bytes()
    rewrite(frames[0], source, {"DATE-END": "2026-11-22T06:00:00", "NCOMBINE": 7})
    new_bytes = source.read_bytes()
    assert new_bytes != old_bytes
    second = site.receiver.receive(source)

    assert first.outcome is Outcome.CACHED and second.outcome is Outcome.CACHED
    assert first.archive_id is not None and second.archive_id is not None
    assert second.superseded == first.archive_id and second.same_name_as is None
    old, new = site.catalog.get(first.archive_id), site.catalog.get(second.archive_id)
    assert old is not None and new is not None
    assert (old.version, new.version) == (1, 2)
    assert old.superseded_by == new.id and new.superseded_by is None
    assert site.catalog.find(FileQuery(include_superseded=False)) == [new]
    ledger = {e.event: e.at for e in site.catalog.ledger(old.id)}
    assert ledger[LedgerEvent.SUPERSEDED] >= ledger[LedgerEvent.CACHED]
    assert old.cache_path is not None and new.cache_path is not None
    assert site.cache.path(old.cache_path).read_bytes() == old_bytes
    assert site.cache.path(new.cache_path).read_bytes() == new_bytes
    assert sum(site.queue.counts().values()) == 2


def test_a_product_may_say_how_a_file_of_an_earlier_name_is_taken(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    """``same_name: version`` on a raw product (an instrument that re-delivers a
    corrected frame under its name) makes the newcomer supersede the older."""
    settings = make_site()
    registry = settings.registry / "ofcam.yaml"
    text = registry.read_text()
    versioned = "    tags: [raw]\n    same_name: version\n"
    registry.write_text(text.replace("    tags: [raw]\n", versioned, 1))
    with opened(settings) as site:
        source = frames[4]
        first = site.receiver.receive(source)
        rewrite(source, source, {"OBJECT": "corrected"})
        second = site.receiver.receive(source)
    assert first.archive_id is not None
    assert second.superseded == first.archive_id and second.same_name_as is None


def test_frames_of_the_same_hundredth_of_a_second_get_distinct_archive_ids(
    site: Site, frames: list[Path]
) -> None:
    original = frames[4]  # DATE-OBS = 2026-11-22T05:01:36.37
    assert fits.getheader(original)["DATE-OBS"] == "2026-11-22T05:01:36.37"
    twins = [
        rewrite(original, site.settings.incoming / f"ofc_20261122_{n:04d}.fits", {"FRAMENUM": n})
        for n in (901, 902, 903)
    ]
    results = [site.receiver.receive(p) for p in [original, *twins]]
    assert [r.outcome for r in results] == [Outcome.CACHED] * 4
    assert [r.archive_id for r in results] == [
        f"OF.20261122.18096.{h}.fits" for h in (37, 38, 39, 40)
    ]
    for result in results:
        assert result.archive_id is not None
        record = site.catalog.get(result.archive_id)
        assert record is not None and record.start == datetime(2026, 11, 22, 5, 1, 36, 370000, UTC)


def test_frames_of_the_same_hundredth_received_at_once_get_distinct_archive_ids(
    site: Site, frames: list[Path]
) -> None:
    twins = [
        rewrite(frames[4], site.settings.incoming / f"ofc_20261122_{n:04d}.fits", {"FRAMENUM": n})
        for n in range(901, 907)
    ]
    with ThreadPoolExecutor(len(twins)) as pool:
        results = list(pool.map(site.receiver.receive, twins))
    assert [r.outcome for r in results] == [Outcome.CACHED] * len(twins)
    ids = {r.archive_id for r in results}
    assert len(ids) == len(twins)
    assert {r.archive_id for r in site.catalog.find(FileQuery())} == ids
    assert len(files_under(site.settings.cache)) == len(twins)


def test_metadata_in_the_row_matches_the_header(site: Site, frames: list[Path]) -> None:
    source = frames[4]  # an OBJECT frame
    header = fits.getheader(source)
    content = source.read_bytes()
    result = site.receiver.receive(source)
    assert result.outcome is Outcome.CACHED and result.archive_id is not None
    record = site.catalog.get(result.archive_id)
    assert record is not None

    start = datetime.fromisoformat(header["DATE-OBS"]).replace(tzinfo=UTC)
    assert start == datetime(2026, 11, 22, 5, 1, 36, 370000, UTC)
    assert record.start == start
    assert record.stop == start + timedelta(seconds=header["EXPTIME"])
    assert record.exptime == header["EXPTIME"] == 120.0
    # local evening of 2026-11-21 at UTC-10: the night began on the 21st
    assert (
        record.night == date(2026, 11, 21) == (start.astimezone(HST) - timedelta(hours=12)).date()
    )
    assert record.start_mjd == pytest.approx(header["MJD-OBS"], abs=1e-8)
    assert record.stop_mjd == pytest.approx(header["MJD-OBS"] + 120.0 / 86400, abs=1e-8)
    assert record.program == header["PROGID"] == "2026B-U017"
    assert record.filter == header["FILTER"] == "B"
    assert record.ra == header["RA"] and record.dec == header["DEC"]
    assert record.object == header["OBJECT"]
    assert record.frame_type == "OBJECT"
    assert record.observer == header["OBSERVER"]
    assert record.telescope == header["TELESCOP"]
    assert record.proprietary_until == start.replace(year=2028, month=5)  # 18 months
    assert (record.product, record.instrument, record.level) == ("ofcam_raw", "OFCAM", 0)
    assert record.archive_id == "OF.20261122.18096.37.fits"
    assert record.state is FileState.CACHED and record.version == 1
    assert record.size == len(content) and record.sha256 == sha256(content)
    assert record.original_name == source.name and record.source_path == str(source)
    assert record.cache_path == f"OFCAM/2026-11-21/{record.archive_id}"
    assert site.cache.path(record.cache_path).read_bytes() == content
    assert record.archive_path is None and record.quarantine_path is None
    assert source.read_bytes() == content  # remove_source is off by default
    assert files_under(site.settings.quarantine) == []


@pytest.mark.parametrize(
    ("date_obs", "night"),
    [
        ("2026-11-22T21:59:59", date(2026, 11, 21)),  # 11:59:59 local: still last night
        ("2026-11-22T22:00:00.00", date(2026, 11, 22)),  # local noon: the next night
        ("2026-11-23T09:59:59.99Z", date(2026, 11, 22)),  # 23:59:59 local
    ],
)
def test_the_night_turns_at_local_noon(
    site: Site, frames: list[Path], date_obs: str, night: date
) -> None:
    source = rewrite(frames[0], site.settings.incoming / BAD_NAME, {"DATE-OBS": date_obs})
    result = site.receiver.receive(source)
    assert result.outcome is Outcome.CACHED and result.archive_id is not None
    record = site.catalog.get(result.archive_id)
    assert record is not None
    assert record.night == night
    assert record.cache_path == f"OFCAM/{night.isoformat()}/{record.archive_id}"
    start = datetime.fromisoformat(date_obs.removesuffix("Z")).replace(tzinfo=UTC)
    seconds = start.hour * 3600 + start.minute * 60 + start.second
    expected = f"OF.{start:%Y%m%d}.{seconds:05d}.{start.microsecond // 10000:02d}.fits"
    assert record.archive_id == expected


def test_product_keywords_round_trip_with_their_types(site: Site, frames: list[Path]) -> None:
    science, bias = frames[4], frames[0]
    header = fits.getheader(science)
    records = []
    for source in (science, bias):
        result = site.receiver.receive(source)
        assert result.archive_id is not None
        record = site.catalog.get(result.archive_id)
        assert record is not None
        records.append(record)
    assert dict(records[0].keywords) == {
        "AIRMASS": header["AIRMASS"],
        "GAIN": 1.5,
        "RDNOISE": 5.0,
        "FRAMENUM": 5,
    }
    assert {k: type(v) for k, v in records[0].keywords.items()} == {
        "AIRMASS": float,
        "GAIN": float,
        "RDNOISE": float,
        "FRAMENUM": int,
    }
    # a bias has no AIRMASS: the keyword is simply absent, not null
    assert dict(records[1].keywords) == {"GAIN": 1.5, "RDNOISE": 5.0, "FRAMENUM": 1}
    # the other header cards are not archived as keywords
    assert "SATURATE" not in records[0].keywords


def with_product_keywords(settings: Settings, keywords: str) -> None:
    registry = settings.registry / "ofcam.yaml"
    text = registry.read_text()
    old = "keywords: [AIRMASS, GAIN, RDNOISE, FRAMENUM]"
    assert text.count(old) == 1
    registry.write_text(text.replace(old, f"keywords: [{keywords}]"))


def test_keywords_of_every_fits_type_round_trip(make_site: SiteFactory, frames: list[Path]) -> None:
    settings = make_site()
    with_product_keywords(settings, "GAIN, FRAMENUM, FLAG, NOFLAG, NOTE, EMPTYK, BIGINT, TINY")
    values: dict[str, Any] = {
        "FLAG": True,
        "NOFLAG": False,
        "NOTE": "it's 'quoted'",
        "EMPTYK": None,
        "BIGINT": 2**62 + 1,  # not exact as a float: must come back from the text
        "TINY": -1.25e-300,
    }
    with opened(settings) as site:
        source = rewrite(frames[4], site.settings.incoming / BAD_NAME, values)
        result = site.receiver.receive(source)
        assert result.archive_id is not None
        record = site.catalog.get(result.archive_id)
        assert record is not None
    assert dict(record.keywords) == {"GAIN": 1.5, "FRAMENUM": 5, **values}
    for key, value in values.items():
        assert type(record.keywords[key]) is type(value), key


def test_a_hierarch_product_keyword_is_archived(make_site: SiteFactory, frames: list[Path]) -> None:
    settings = make_site()
    with_product_keywords(settings, "GAIN, HIERARCH OBS TEMP")  # allowed by the registry schema
    with opened(settings) as site:
        source = rewrite(frames[4], site.settings.incoming / BAD_NAME, {"HIERARCH OBS TEMP": 21.5})
        assert "HIERARCH OBS TEMP =" in source.read_bytes()[:5760].decode("ascii")
        result = site.receiver.receive(source)
        assert result.archive_id is not None
        record = site.catalog.get(result.archive_id)
        assert record is not None
    assert record.keywords.get("HIERARCH OBS TEMP", record.keywords.get("OBS TEMP")) == 21.5


def test_tags_and_product_come_from_the_registry(site: Site, frames: list[Path]) -> None:
    raw = site.receiver.receive(frames[4])
    header = fits.getheader(frames[0])
    start = datetime.fromisoformat(header["DATE-OBS"]).replace(tzinfo=UTC)
    end = start + timedelta(hours=1, seconds=0.5)
    bias = rewrite(
        frames[0],
        site.settings.incoming / "ofc_20261121_mbias.fits",
        {"DATE-END": end.isoformat(timespec="milliseconds").removesuffix("+00:00")},
    )
    master = site.receiver.receive(bias)
    assert (raw.product, master.product) == ("ofcam_raw", "ofcam_masterbias")
    assert raw.archive_id is not None and master.archive_id is not None
    raw_row, master_row = site.catalog.get(raw.archive_id), site.catalog.get(master.archive_id)
    assert raw_row is not None and master_row is not None
    assert raw_row.tags == ("raw",)
    assert master_row.tags == ("calibration",) and master_row.level == 1
    # the master bias takes its time span from DATE-OBS .. DATE-END (time: from header)
    assert (master_row.start, master_row.stop) == (start, end)
    assert [r.id for r in site.catalog.find(FileQuery(tag="raw"))] == [raw_row.id]
    assert [r.id for r in site.catalog.find(FileQuery(tag="calibration"))] == [master_row.id]


def test_the_ledger_is_in_order_from_acquired_to_cached(site: Site, frames: list[Path]) -> None:
    source = frames[4]
    written = datetime.now(UTC) - timedelta(minutes=7)  # when the instrument closed it
    os.utime(source, (written.timestamp(), written.timestamp()))
    before = datetime.now(UTC)
    result = site.receiver.receive(source)
    after = datetime.now(UTC)
    assert result.file_id is not None
    ledger = site.catalog.ledger(result.file_id)
    events = {e.event: e.at for e in ledger}
    assert list(events) == [
        LedgerEvent.ACQUIRED,
        LedgerEvent.RECEIVED,
        LedgerEvent.VALIDATED,
        LedgerEvent.CACHED,
    ]
    assert abs(events[LedgerEvent.ACQUIRED] - written) < timedelta(milliseconds=1)
    assert (
        events[LedgerEvent.ACQUIRED]
        <= events[LedgerEvent.RECEIVED]
        <= events[LedgerEvent.VALIDATED]
        <= events[LedgerEvent.CACHED]
    )
    assert before <= events[LedgerEvent.RECEIVED] and events[LedgerEvent.CACHED] <= after
    assert all(e.at.tzinfo is not None for e in ledger)


def test_remove_source_removes_it_once_cached(make_site: SiteFactory, frames: list[Path]) -> None:
    with opened(make_site(receipt={"remove_source": True})) as site:
        content = frames[4].read_bytes()
        result = site.receiver.receive(frames[4])
        assert result.outcome is Outcome.CACHED
        assert not frames[4].exists()
        record = one_row(site, frames[4].name)
        assert record.cache_path is not None
        assert site.cache.path(record.cache_path).read_bytes() == content


def test_remove_source_keeps_it_when_it_cannot_be_cached(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    with opened(make_site(receipt={"remove_source": True})) as site:
        source, content = frames[4], frames[4].read_bytes()
        obstacle = site.settings.cache / "OFCAM"  # a file where the instrument dir must go
        obstacle.write_text("in the way")
        result = site.receiver.receive(source)  # the site's fault, not the file's: no raise
        assert result.outcome is Outcome.ERROR
        assert result.reason is not None and "OFCAM" in result.reason
        assert source.read_bytes() == content
        assert site.catalog.find(FileQuery()) == []
        assert site.queue.counts() == {}
        assert files_under(site.settings.cache) == [obstacle]  # no temp file left
        obstacle.unlink()
        assert site.receiver.receive(source).outcome is Outcome.CACHED
        assert not source.exists()


def test_remove_source_removes_a_rejected_file_once_quarantined(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    with opened(make_site(receipt={"remove_source": True})) as site:
        source = site.settings.incoming / BAD_NAME
        truncated_data(frames[4], source)
        content = source.read_bytes()
        result = site.receiver.receive(source)
        assert result.outcome is Outcome.REJECTED
        assert not source.exists()
        row = one_row(site, BAD_NAME)
        assert (site.settings.quarantine / str(row.quarantine_path)).read_bytes() == content


def test_what_receipt_recognised_is_kept_on_the_row(site: Site, frames: list[Path]) -> None:
    """The product and the name's groups are recorded once, at receipt, for every stage
    after it to read (they never recognise the name again)."""
    source = frames[4]
    assert site.receiver.receive(source).outcome is Outcome.CACHED
    record = one_row(site, source.name)
    _, date_part, frame = source.name.removesuffix(".fits").split("_")
    assert record.product == "ofcam_raw"
    assert record.name_groups == {"date": date_part, "frame": frame}
    assert record.to_json()["name_groups"] == {"date": date_part, "frame": frame}

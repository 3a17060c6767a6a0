"""Whole answers: listings that never cut an archive ID, formats for scripts, and
``fetch`` of many files by ID or original name (real subprocesses, both engines)."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from tests.conftest import SiteFactory
from tests.test_cli import as_json, obsflow


def test_a_narrow_table_keeps_archive_ids_whole_and_says_what_it_hid(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    site = make_site().site
    assert obsflow("ingest", "--site", site, frames[0].parent).returncode == 0
    found = as_json(obsflow("find", "--site", site, "--json"))
    narrow = obsflow("find", "--site", site, COLUMNS="60")
    assert narrow.returncode == 0, narrow.stderr
    assert "…" not in narrow.stdout
    for row in found:  # each ID on one line, as it is
        assert any(row["archive_id"] in line for line in narrow.stdout.splitlines())
    drawn = [line for line in narrow.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert drawn and max(len(line) for line in drawn) <= 60  # it fits the terminal
    assert "not shown, for the terminal's width:" in " ".join(narrow.stdout.split())
    wide = obsflow("find", "--site", site, COLUMNS="250")
    assert "not shown" not in wide.stdout
    assert all(row["original_name"] in wide.stdout for row in found)


def test_ids_tsv_and_csv_are_for_scripts(make_site: SiteFactory, frames: list[Path]) -> None:
    site = make_site().site
    assert obsflow("ingest", "--site", site, frames[0].parent).returncode == 0
    found = as_json(obsflow("find", "--site", site, "--json"))
    ids = obsflow("find", "--site", site, "--ids", COLUMNS="20")
    assert ids.stdout.split("\n")[:-1] == [r["archive_id"] for r in found]
    tsv = obsflow("find", "--site", site, "--format", "tsv", "--object", "domeflat", COLUMNS="20")
    lines = tsv.stdout.splitlines()
    header = lines[0].split("\t")
    assert header[0] == "archive_id" and "original_name" in header and "filter" in header
    flats = [r for r in found if r["object"] == "domeflat"]
    assert len(lines) == 1 + len(flats)
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    assert [r["archive_id"] for r in rows] == [r["archive_id"] for r in flats]
    assert [r["original_name"] for r in rows] == [r["original_name"] for r in flats]
    as_csv = list(
        csv.DictReader(io.StringIO(obsflow("find", "--site", site, "--format", "csv").stdout))
    )
    assert [r["archive_id"] for r in as_csv] == [r["archive_id"] for r in found]
    as_format_json = as_json(obsflow("find", "--site", site, "--format", "json"))
    assert as_format_json == found
    bad = obsflow("find", "--site", site, "--format", "xml")
    assert bad.returncode == 2 and "--format" in bad.stderr


def test_fetch_many_files_by_id_or_name_into_a_directory(
    make_site: SiteFactory, frames: list[Path], tmp_path: Path
) -> None:
    site = make_site().site
    assert obsflow("ingest", "--site", site, frames[0].parent).returncode == 0
    found = as_json(obsflow("find", "--site", site, "--json"))
    first, second = found[0], found[1]
    to = tmp_path / "wanted" / "here"
    done = obsflow(
        "fetch", first["archive_id"], second["original_name"], "--to", to, "--site", site
    )
    assert done.returncode == 0, done.stderr
    for row in (first, second):
        copy = to / row["archive_id"]
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == row["sha256"]
        assert str(copy) in done.stdout
    assert sorted(p.name for p in to.iterdir()) == sorted(
        [first["archive_id"], second["archive_id"]]
    )
    # one unknown name: nothing is fetched, and the error names it
    again = tmp_path / "again"
    typo = obsflow("fetch", first["archive_id"], "OF.nothing.fits", "--to", again, "--site", site)
    assert typo.returncode == 1 and "'OF.nothing.fits'" in typo.stderr
    assert not again.exists()
    paths = obsflow("fetch", first["original_name"], "--print-path", "--site", site)
    assert Path(paths.stdout.strip()).read_bytes() == (to / first["archive_id"]).read_bytes()


def test_find_by_filter_type_exposure_and_cone(make_site: SiteFactory, frames: list[Path]) -> None:
    site = make_site().site
    assert obsflow("ingest", "--site", site, frames[0].parent).returncode == 0
    every = as_json(obsflow("find", "--site", site, "--json"))

    def ids(*args: str) -> list[str]:
        return [r["archive_id"] for r in as_json(obsflow("find", "--site", site, "--json", *args))]

    flats = [r for r in every if r["frame_type"] == "FLAT"]
    assert flats and ids("--type", "FLAT") == [r["archive_id"] for r in flats]
    band = flats[0]["filter"]
    assert ids("--filter", band) == [r["archive_id"] for r in every if r["filter"] == band]
    times = sorted({r["exptime"] for r in every})
    assert len(times) > 1
    low = times[1]
    assert ids("--exptime", f"{low}..") == [r["archive_id"] for r in every if r["exptime"] >= low]
    assert ids("--exptime", f"..{low}") == [r["archive_id"] for r in every if r["exptime"] <= low]
    assert ids("--exptime", str(low)) == [r["archive_id"] for r in every if r["exptime"] == low]
    # a cone: in degrees, or sexagesimal (RA in hours)
    centre = next(r for r in every if r["ra"] is not None)
    near = ids("--ra", str(centre["ra"]), "--dec", str(centre["dec"]), "--radius", "1arcsec")
    assert centre["archive_id"] in near
    hours = centre["ra"] / 15
    sexagesimal = f"{int(hours)}:{(hours % 1) * 60:.6f}"
    assert centre["archive_id"] in ids("--ra", sexagesimal, "--dec", str(centre["dec"]),
                                       "--radius", "0.01")  # fmt: skip
    far = (centre["ra"] + 180) % 360
    assert ids("--ra", str(far), "--dec", str(-centre["dec"]), "--radius", "10") == []
    for args, says in (
        (("--ra", "10", "--dec", "5"), "missing --radius"),
        (("--ra", "10", "--dec", "95", "--radius", "1"), "dec 95.0"),
        (("--ra", "ten", "--dec", "5", "--radius", "1"), "'ten' is not an angle"),
        (("--exptime", "60..30"), "the minimum is above the maximum"),
    ):
        refused = obsflow("find", "--site", site, *args)
        assert refused.returncode == 2 and says in " ".join(refused.stderr.split()), args

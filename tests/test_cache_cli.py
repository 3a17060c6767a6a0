"""The cache commands as a user runs them, each a real ``python -m obsflow`` subprocess:
``cache status|trim|pin|unpin``, ``fetch`` and ``tag add|rm`` (with ``find --tag``).

The catalog is only read and written through :mod:`obsflow.archive.retrieval`, whose tests run
on both engines; here SQLite is enough.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.cli.cache import parse_size
from obsflow.settings import load_settings
from obsflow.site import ingest_paths, open_site
from tests.conftest import SiteFactory
from tests.test_cli import as_json, obsflow

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


def archive(settings_site: Path, frames: list[Path]) -> list[FileRecord]:
    """Ingest the frames in this process (quicker than the command) and list them."""
    site = open_site(load_settings(settings_site))
    try:
        ingest_paths(site, frames)
        return sorted(site.catalog.find(FileQuery()), key=lambda r: r.id)
    finally:
        site.close()


def cached(root: Path) -> int:
    """Bytes really in the site's cache (temp files aside)."""
    cache = root / "cache"
    return sum(
        p.stat().st_size
        for p in cache.rglob("*")
        if p.is_file() and p.relative_to(cache).parts[0] != ".tmp"
    )


@SQLITE_ONLY
def test_cache_status_trim_fetch(make_site: SiteFactory, frames: list[Path]) -> None:
    root = make_site().site
    records = archive(root, frames)
    total = sum(r.size for r in records)

    status = as_json(obsflow("cache", "status", "--json", "--site", root))
    assert status["files"] == len(records) and status["bytes"] == total == cached(root)
    assert status["budget"] is None and status["over_budget"] is False

    nothing = obsflow("cache", "trim", "--site", root)
    assert nothing.returncode == 0, nothing.stderr
    assert "no cache budget" in nothing.stdout and "nothing to do" in nothing.stdout
    assert cached(root) == total

    pinned = records[0].archive_id or ""
    done = obsflow("cache", "pin", pinned, "--site", root)
    assert done.returncode == 0 and pinned in done.stdout, done.stderr
    report = as_json(obsflow("cache", "trim", "--to", "0", "--json", "--site", root))
    assert report["evicted"] == len(records) - 1 and report["skipped_pinned"] == 1
    assert report["remaining_bytes"] == records[0].size == cached(root)
    status = as_json(obsflow("cache", "status", "--json", "--site", root))
    assert (status["files"], status["virtual"], status["pinned"]) == (1, len(records) - 1, 1)

    done = obsflow("cache", "unpin", pinned, "--site", root)
    assert done.returncode == 0 and "unpinned" in done.stdout, done.stderr
    done = obsflow("cache", "trim", "--to", "0", "--site", root)
    assert done.returncode == 0 and "evicted 1 file(s)" in done.stdout, done.stderr
    assert cached(root) == 0

    # fetch restores a virtual file (checksum checked) and prints where it is
    wanted = records[5]
    fetched = obsflow("fetch", wanted.archive_id or "", "--print-path", "--site", root)
    assert fetched.returncode == 0, fetched.stderr
    path = Path(fetched.stdout.strip())
    assert path.is_file() and path.is_relative_to(root / "cache")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == wanted.sha256
    found = as_json(obsflow("find", "--json", "--site", root))
    assert sum(not r["virtual"] for r in found) == 1 and len(found) == len(records)


@SQLITE_ONLY
def test_cache_trim_to_the_sites_budget(make_site: SiteFactory, frames: list[Path]) -> None:
    budget = 5 * 14400
    root = make_site(cache_policy={"budget_bytes": budget, "low_water_bytes": 3 * 14400}).site
    archive(root, frames)
    status = as_json(obsflow("cache", "status", "--json", "--site", root))
    assert status["over_budget"] and status["low_water"] == 3 * 14400
    done = obsflow("cache", "trim", "--site", root)
    assert done.returncode == 0, done.stderr
    assert "evicted" in done.stdout
    assert cached(root) <= 3 * 14400
    status = as_json(obsflow("cache", "status", "--site", root, "--json"))
    assert not status["over_budget"] and status["bytes"] == cached(root)
    table = obsflow("cache", "status", "--site", root)
    assert table.returncode == 0 and "budget" in table.stdout, table.stderr


@SQLITE_ONLY
def test_cache_errors_name_the_culprit(make_site: SiteFactory, frames: list[Path]) -> None:
    root = make_site().site
    records = archive(root, frames[:1])
    known = records[0].archive_id or ""

    for args in (
        ("fetch", "../../etc/passwd"),
        ("cache", "pin", "OFC.nothing.fits"),
        ("tag", "add", "OFC.nothing.fits", "good"),
    ):
        done = obsflow(*args, "--site", root)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert f"no file with archive ID {args[-2 if args[0] == 'tag' else -1]!r}" in done.stderr

    bad_size = obsflow("cache", "trim", "--to", "10X", "--site", root)
    assert bad_size.returncode == 2 and "'10X'" in bad_size.stderr
    negative = obsflow("cache", "trim", "--to", "-5", "--site", root)
    assert negative.returncode == 2
    bad_tag = obsflow("tag", "add", known, "no spaces", "--site", root)
    assert bad_tag.returncode == 2 and "'no spaces'" in bad_tag.stderr
    assert cached(root) == records[0].size  # nothing was evicted by any of it


@SQLITE_ONLY
def test_tag_add_and_rm(make_site: SiteFactory, frames: list[Path]) -> None:
    root = make_site().site
    records = archive(root, frames[:3])
    first, second = (r.archive_id or "" for r in records[:2])
    for archive_id in (first, second):
        done = obsflow("tag", "add", archive_id, "night:best", "--site", root)
        assert done.returncode == 0 and "tagged" in done.stdout, done.stderr
    again = obsflow("tag", "add", first, "night:best", "--site", root)
    assert again.returncode == 0 and "already" in again.stdout
    found = as_json(obsflow("find", "--json", "--tag", "night:best", "--site", root))
    assert sorted(r["archive_id"] for r in found) == sorted([first, second])

    done = obsflow("tag", "rm", first, "night:best", "--site", root)
    assert done.returncode == 0 and "removed" in done.stdout, done.stderr
    found = as_json(obsflow("find", "--json", "--tag", "night:best", "--site", root))
    assert [r["archive_id"] for r in found] == [second]
    missing = obsflow("tag", "rm", first, "night:best", "--site", root)
    assert missing.returncode == 1 and f"{first} has no tag night:best" in missing.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("123", 123),
        ("500M", 500 << 20),
        ("10G", 10 << 30),
        ("10g", 10 << 30),
        ("1.5K", 1536),
        ("2GiB", 2 << 30),
        ("1TB", 1 << 40),
        (" 7 M ", 7 << 20),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-5", "10X", "G", "1e3", "5 MB extra", "1..5G"])
def test_parse_size_refuses_by_name(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse_size(text)

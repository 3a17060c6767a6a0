"""The REST API under load: ``obsflow serve`` as a real subprocess on 127.0.0.1, and 50
concurrent clients (httpx, asyncio) for 20 seconds mixing listings, metadata, whole
files and byte ranges, anonymous and with a program's token. Every answer must be the
one the access rules say (200, 206, or 401 for another program's proprietary bytes);
no error of any kind is allowed. The throughput achieved is printed.

SQLite only: the site's embedded default, where every reader shares one database file
with the writer (a file's first read in a minute records its last access).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from obsflow.access import Scope, TokenStore
from obsflow.catalog import schema
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.site import ingest_paths, open_site
from tests.conftest import SiteFactory
from tests.test_api import SERVE

CLIENTS = 50
SECONDS = 20.0
SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Served:
    url: str
    files: list[FileRecord]
    released: frozenset[str]
    """The archive IDs of the files anyone may read (the others are A's)."""
    token: str
    """A reader of program A."""


@pytest.fixture
def served(make_site: SiteFactory, frames: list[Path]) -> Iterator[Served]:
    site = open_site(make_site())
    try:
        ingest_paths(site, frames)
        records = sorted(site.catalog.find(FileQuery()), key=lambda r: r.id)
        now = site.clock()
        with site.catalog.write() as conn:  # setup: half proprietary to A, half released
            later, earlier = now + timedelta(days=365), now - timedelta(days=1)
            for chosen, until in ((records[:6], later), (records[6:], earlier)):
                conn.execute(
                    update(schema.files)
                    .where(schema.files.c.id.in_([r.id for r in chosen]))
                    .values(program="A", proprietary_until=until)
                )
        token, _ = TokenStore(site.catalog).create("alice", Scope.READ, ["A"], now)
        files = site.catalog.records([r.id for r in records])
        released = frozenset(r.archive_id or "" for r in records[6:])
        root = site.settings.site
    finally:
        site.close()
    with subprocess.Popen(
        [*SERVE, "--site", str(root), "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stderr is not None
            line = server.stderr.readline()
            assert "the API on " in line, line + server.stderr.read()
            url = line.split("the API on ")[1].split("/api/v1")[0]
            yield Served(url, files, released, token)
        finally:
            server.terminate()
            server.wait(timeout=30)


async def client(served: Served, number: int, until: float, tally: Tally) -> None:
    """One client: its own connection, a request after the other until ``until``."""
    mine = number % 2 == 1
    headers = {"Authorization": f"Bearer {served.token}"} if mine else {}
    rng = random.Random(number)
    async with httpx.AsyncClient(base_url=served.url, headers=headers, timeout=30) as http:
        while time.monotonic() < until:
            record = rng.choice(served.files)
            readable = mine or record.archive_id in served.released
            kind = rng.choice(("list", "list", "meta", "meta", "meta", "data", "range"))
            path, want, extra = f"/api/v1/files/{record.archive_id}", {200}, {}  # meta
            if kind == "list":
                cursor = rng.randrange(0, len(served.files))
                path = f"/api/v1/files?limit={rng.randint(1, 12)}&cursor={cursor}"
            elif kind == "data":
                path, want = path + "/data", {200} if readable else {401}
            elif kind == "range":
                extra = {"Range": f"bytes={rng.randrange(record.size)}-"}
                path, want = path + "/data", {206} if readable else {401}
            try:
                response = await http.get(path, headers=extra)
                body = response.content
            except httpx.HTTPError as exc:
                tally.errors.append(f"{kind} {path}: {exc!r}")
                continue
            tally.requests[kind] += 1
            if response.status_code not in want:
                tally.errors.append(f"{kind} {path}: {response.status_code} {body[:200]!r}")
            elif kind == "data" and readable and len(body) != record.size:
                tally.errors.append(f"{kind} {path}: {len(body)} bytes, not {record.size}")


async def load(served: Served, tally: Tally) -> float:
    started = time.monotonic()
    until = started + SECONDS
    await asyncio.gather(*(client(served, n, until, tally) for n in range(CLIENTS)))
    return time.monotonic() - started


@pytest.mark.slow
@SQLITE_ONLY
def test_fifty_clients_for_twenty_seconds_see_no_error(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = Tally()
    took = asyncio.run(load(served, tally))
    total = sum(tally.requests.values())
    with capsys.disabled():
        print(
            f"\nAPI load: {CLIENTS} clients, {took:.1f} s, {total} requests, "
            f"{total / took:.0f} requests/s ({dict(tally.requests)}), "
            f"{len(tally.errors)} errors"
        )
    assert tally.errors == [], tally.errors[:10]
    assert total > CLIENTS * 10  # every client got through many requests
    assert set(tally.requests) == {"list", "meta", "data", "range"}

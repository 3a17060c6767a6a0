"""The world the IVOA tests share (tests/test_tap.py, tests/test_datalink.py): a real
uvicorn server on a real site (SQLite and PostgreSQL) holding the small night's 12
frames. The frames are placed on the sky (the catalog's ``ra``/``dec``, as receipt
would have recorded them) around (150°, +2°) at known distances, and given programs
and release dates: 0-3 of program A still proprietary, 4-7 of program A released
yesterday, 8-11 of program B proprietary. Tokens: "own" (reads A), "other" (reads
B), "admin".
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from astropy import units as u
from astropy.coordinates import SkyCoord
from sqlalchemy import update

from obsflow.access import Scope, TokenStore
from obsflow.api import ApiServer
from obsflow.catalog import schema
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.site import Site, ingest_paths, open_site
from tests.conftest import SiteFactory

CENTER = (150.0, 2.0)
# (position angle step, distance from the centre in degrees) of each of the 12 files:
# some inside 0.1°, some just outside, a few far away
DISTANCES = (0.0, 0.03, 0.07, 0.0999, 0.1001, 0.12, 0.5, 0.05, 0.09, 2.0, 0.02, 0.11)
VOTABLE_NS = "{http://www.ivoa.net/xml/VOTable/v1.3}"
UWS_NS = "{http://www.ivoa.net/xml/UWS/v1.0}"


@dataclass
class World:
    site: Site
    url: str
    records: list[FileRecord]
    positions: dict[str, tuple[float, float]]
    """archive ID → (ra, dec)."""
    tokens: dict[str, str]

    @property
    def ids(self) -> list[str]:
        """The archive IDs of :attr:`records`, in order."""
        return [r.archive_id or "" for r in self.records]

    def client(self, role: str = "anonymous") -> httpx.Client:
        token = self.tokens.get(role)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def sync(
        self, query: str, role: str = "admin", fmt: str = "csv", **params: str
    ) -> httpx.Response:
        with self.client(role) as client:
            return client.post(
                "/tap/sync", data={"LANG": "ADQL", "QUERY": query, "FORMAT": fmt, **params}
            )

    def rows(self, query: str, role: str = "admin") -> list[dict[str, str]]:
        response = self.sync(query, role)
        assert response.status_code == 200, response.text
        return list(csv.DictReader(io.StringIO(response.text)))


def _place(i: int, distance: float) -> tuple[float, float]:
    centre = SkyCoord(*CENTER, unit="deg")
    moved = centre.directional_offset_by(i * 30 * u.deg, distance * u.deg)
    return float(moved.ra.deg), float(moved.dec.deg)


def make_world(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    """The world of these tests (see the module's docstring); a generator for a fixture."""
    site = open_site(make_site(ivoa={"query_seconds": 3, "maxrec": 100, "queries_per_user": 1}))
    ingest_paths(site, frames)
    records = sorted(site.catalog.find(FileQuery()), key=lambda r: r.id)
    assert len(records) == 12
    now = site.clock()
    positions = {}
    with site.catalog.write() as conn:  # setup: where each frame points, whose it is
        for i, record in enumerate(records):
            ra, dec = _place(i, DISTANCES[i])
            positions[record.archive_id or ""] = (ra, dec)
            program, until = (
                ("A", now + timedelta(days=365))
                if i < 4
                else ("A", now - timedelta(days=1))
                if i < 8
                else ("B", now + timedelta(days=365))
            )
            conn.execute(
                update(schema.files)
                .where(schema.files.c.id == record.id)
                .values(ra=ra, dec=dec, object=f"target-{i}", program=program,
                        proprietary_until=until)
            )  # fmt: skip
    store = TokenStore(site.catalog)
    tokens = {
        role: store.create(user, scope, programs, now)[0]
        for role, user, scope, programs in (
            ("own", "alice", Scope.READ, ["A"]),
            ("other", "bob", Scope.READ, ["B"]),
            ("admin", "root", Scope.ADMIN, []),
        )
    }
    server = ApiServer(site).start()
    try:
        yield World(site, server.url, records, positions, tokens)
    finally:
        server.stop()
        site.close()


def cone(ra: float, dec: float, radius: float) -> str:
    return (
        "SELECT obs_id FROM ivoa.obscore WHERE 1 = CONTAINS("
        f"POINT('ICRS', s_ra, s_dec), CIRCLE('ICRS', {ra}, {dec}, {radius}))"
    )


def exact(world: World, ra: float, dec: float, radius: float, ids: list[str]) -> set[str]:
    centre = SkyCoord(ra, dec, unit="deg")
    return {
        a for a in ids if centre.separation(SkyCoord(*world.positions[a], unit="deg")).deg <= radius
    }

"""The search of files as astronomers ask (catalog/search.py), on both engines: by
filter, frame type, exposure range, and a cone on the sky checked against an exact
computation (astropy), across RA 0/360 and around the poles."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from sqlalchemy import text

from obsflow.catalog import Catalog, FileQuery
from obsflow.catalog.records import Cone
from obsflow.catalog.search import statement
from tests.test_catalog import _new, _record


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    opened = Catalog.open(catalog_url)
    yield opened
    opened.close()


def _positions() -> list[tuple[float, float]]:
    rng = random.Random(18)
    spots = [(0.0, 0.0), (359.9, 0.0), (0.1, 0.0), (180.0, 89.9), (0.0, 89.95), (270.0, -89.9)]
    spots += [(rng.uniform(0, 360), rng.uniform(-90, 90)) for _ in range(150)]
    # clusters where a cone's box is hardest: at RA 0/360, and near each pole
    for ra0, dec0 in ((0.0, 10.0), (0.0, -60.0), (90.0, 88.0), (200.0, -87.0), (45.0, 30.0)):
        for _ in range(30):
            ra = (ra0 + rng.uniform(-6, 6)) % 360.0
            spots.append((ra, max(-90.0, min(90.0, dec0 + rng.uniform(-3, 3)))))
    return spots


CONES = [
    Cone(0.0, 10.0, 2.0),  # crosses RA 0 from below
    Cone(359.5, 10.0, 2.0),  # crosses 360 from above
    Cone(1.0, -60.0, 3.0),  # wide in RA at high declination
    Cone(90.0, 88.0, 3.0),  # holds the north pole
    Cone(200.0, -87.0, 2.5),  # near the south pole, not holding it
    Cone(200.0, -87.0, 4.0),  # holding the south pole
    Cone(45.0, 30.0, 0.5),
    Cone(123.0, 0.0, 60.0),
    Cone(10.0, 5.0, 180.0),  # the whole sky
    Cone(10.0, 5.0, 0.0),
]


def test_a_cone_finds_exactly_the_files_within_its_radius(catalog: Catalog) -> None:
    spots = _positions()
    for n, (ra, dec) in enumerate(spots):
        _record(catalog, _new(n, ra=ra, dec=dec))
    _record(catalog, _new(len(spots), ra=None, dec=None))  # no position: never in a cone
    by_name = {f"ofc_20261122_{n:04d}.fits": spot for n, spot in enumerate(spots)}
    points = SkyCoord([s[0] for s in spots] * u.deg, [s[1] for s in spots] * u.deg)
    names = list(by_name)
    for cone in CONES:
        distance = points.separation(SkyCoord(cone.ra * u.deg, cone.dec * u.deg)).deg
        # positions within a hair of the rim are a matter of rounding: not judged
        rim = {names[i] for i, d in enumerate(distance) if abs(d - cone.radius) < 1e-9}
        inside = {names[i] for i, d in enumerate(distance) if d <= cone.radius} - rim
        found = {r.original_name for r in catalog.find(FileQuery(cone=cone))} - rim
        assert found == inside, (cone, sorted(found ^ inside))
        assert cone.radius < 1 or inside  # the cases are not empty by accident


def test_a_cone_reads_the_position_index(tmp_path: Path) -> None:
    """On SQLite (PostgreSQL chooses its plan by its statistics)."""
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    with catalog.read() as conn:
        sql = statement(conn, FileQuery(cone=Cone(10.0, 20.0, 1.0))).compile(
            conn, compile_kwargs={"literal_binds": True}
        )
        plan = " ".join(str(row) for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
    catalog.close()
    assert "ix_files_dec_ra" in plan


def test_bad_cones_are_refused_with_the_culprit() -> None:
    for args, culprit in (
        ((400.0, 0.0, 1.0), "ra 400.0"),
        ((10.0, -95.0, 1.0), "dec -95.0"),
        ((10.0, 0.0, -1.0), "radius -1.0"),
        ((10.0, float("nan"), 1.0), "dec nan"),
    ):
        with pytest.raises(ValueError, match=culprit):
            Cone(*args)


def test_filter_frame_type_and_exposure_range(catalog: Catalog) -> None:
    for n in range(1, 9):
        _record(
            catalog,
            _new(
                n,
                filter="R" if n % 2 else "V",
                frame_type="FLAT" if n <= 4 else "OBJECT",
                exptime=float(n * 10),
            ),
        )

    def frames(**query: object) -> list[int]:
        found = catalog.find(FileQuery(**query))  # type: ignore[arg-type]
        return [int(r.original_name[-9:-5]) for r in found]

    assert frames(filter="R") == [1, 3, 5, 7]
    assert frames(frame_type="FLAT") == [1, 2, 3, 4]
    assert frames(filter="V", frame_type="OBJECT") == [6, 8]
    assert frames(exptime_min=30, exptime_max=60) == [3, 4, 5, 6]
    assert frames(exptime_min=75) == [8]
    assert frames(filter="B") == []

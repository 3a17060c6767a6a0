"""The sky index (:mod:`obsflow.catalog.sky`) and TAP's use of it: its boxes, kept in
step with ``files`` by the catalog itself, read by cone searches (the plan says so),
and never changing an answer: at RA 0/360 and at the poles, for every reader, under
``NOT`` and ``OR``. The world is :mod:`tests.ivoaworld`'s (SQLite and PostgreSQL).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, text, update

from obsflow.access import ANONYMOUS, ReadRule
from obsflow.catalog import schema
from obsflow.catalog.obscore import ObsCoreView, run_query
from obsflow.catalog.sky import Box, SkyIndex, boxes
from obsflow.ivoa import tap
from obsflow.ivoa.adql import translate
from obsflow.ivoa.obscore import facts_of
from tests.conftest import SiteFactory
from tests.ivoaworld import World, cone, exact, make_world

# where the world's 12 frames are moved: about RA 0/360, and about both poles
EDGES = (
    (0.02, 10.0), (359.97, 10.01), (0.08, 9.95), (359.9, 10.0),
    (180.0, 89.97), (0.0, 89.99), (270.0, 89.9), (90.0, -89.96),
    (270.0, -89.93), (10.0, -89.8), (359.999, -0.05), (0.001, 0.05),
)  # fmt: skip
CENTRES = (
    (0.0, 10.0), (359.95, 10.0), (0.05, 10.0), (0.0, 0.0), (359.99, 0.0),
    (0.0, 90.0), (123.0, 89.9), (0.0, 89.95), (0.0, -90.0), (200.0, -89.9), (90.0, -89.95),
)  # fmt: skip


@pytest.fixture
def world(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    yield from make_world(make_site, frames)


def move(world: World, positions: tuple[tuple[float, float], ...]) -> None:
    """Point the world's frames elsewhere (an UPDATE of files, as a fix of a header
    would be): the sky index follows by itself."""
    with world.site.catalog.write() as conn:
        for record, (ra, dec) in zip(world.records, positions, strict=True):
            conn.execute(
                update(schema.files).where(schema.files.c.id == record.id).values(ra=ra, dec=dec)
            )
            world.positions[record.archive_id or ""] = (ra, dec)


# ------------------------------------------------------------------ boxes


@pytest.mark.parametrize(
    ("ra", "dec", "radius", "expected"),
    [
        (10.0, 0.0, 1.0, [Box(9.0, 11.0, -1.0, 1.0)]),
        (0.5, 0.0, 1.0, [Box(359.5, 360.0, -1.0, 1.0), Box(0.0, 1.5, -1.0, 1.0)]),
        (359.5, 0.0, 1.0, [Box(358.5, 360.0, -1.0, 1.0), Box(0.0, 0.5, -1.0, 1.0)]),
        (-0.5, 0.0, 1.0, [Box(358.5, 360.0, -1.0, 1.0), Box(0.0, 0.5, -1.0, 1.0)]),
        (10.0, 89.5, 1.0, [Box(0.0, 360.0, 88.5, 90.0)]),
        (10.0, -89.5, 1.0, [Box(0.0, 360.0, -90.0, -88.5)]),
        (10.0, 0.0, 120.0, [Box(0.0, 360.0, -90.0, 90.0)]),
    ],
)
def test_boxes_hold_the_circle_wrapping_at_0_360_and_at_the_poles(
    ra: float, dec: float, radius: float, expected: list[Box]
) -> None:
    found = boxes(ra, dec, radius)
    assert len(found) == len(expected)
    for got, want in zip(found, expected, strict=True):
        for a, b in zip(
            (got.ra_min, got.ra_max, got.dec_min, got.dec_max),
            (want.ra_min, want.ra_max, want.dec_min, want.dec_max),
            strict=True,
        ):
            assert a == pytest.approx(b, abs=1e-6)


def test_boxes_widen_in_ra_away_from_the_equator() -> None:
    (box,) = boxes(100.0, 60.0, 1.0)
    half = math.degrees(math.asin(math.sin(math.radians(1.0)) / math.cos(math.radians(60.0))))
    assert (box.ra_max - box.ra_min) / 2 == pytest.approx(half, abs=1e-6)
    assert half > 2.0  # twice as wide as at the equator, near enough


# ------------------------------------------------------------------ the index itself


def test_the_index_follows_inserts_updates_and_deletes(world: World) -> None:
    catalog = world.site.catalog
    if catalog.is_sqlite:
        assert catalog.sky_index is SkyIndex.RTREE
    else:  # q3c where the server has it (the CI's has: .ci/run installs it)
        assert catalog.sky_index in (SkyIndex.Q3C, SkyIndex.NONE)
        return

    def indexed() -> dict[int, tuple[float, float]]:
        with catalog.read() as conn:
            rows = conn.execute(text("SELECT id, ra_min, dec_min FROM files_sky")).all()
        return {int(r[0]): (float(r[1]), float(r[2])) for r in rows}

    first, second = world.records[0].id, world.records[1].id
    assert set(indexed()) == {r.id for r in world.records}  # the world's UPDATEs
    move(world, EDGES)
    assert indexed()[first] == pytest.approx(EDGES[0], abs=1e-4)  # 32-bit floats
    with catalog.write() as conn:
        conn.execute(update(schema.files).where(schema.files.c.id == first).values(ra=None))
        conn.execute(delete(schema.ledger).where(schema.ledger.c.file_id == second))
        conn.execute(delete(schema.tags).where(schema.tags.c.file_id == second))
        conn.execute(delete(schema.keywords).where(schema.keywords.c.file_id == second))
        conn.execute(
            delete(schema.ingest_requests).where(schema.ingest_requests.c.file_id == second)
        )
        conn.execute(delete(schema.files).where(schema.files.c.id == second))
    assert first not in indexed() and second not in indexed()
    assert len(indexed()) == 10


def test_a_cone_search_reads_the_index_and_no_proprietary_rows(world: World) -> None:
    """The plan of an anonymous reader's cone search: the sky index, then rows by key;
    no scan of files (the proprietary rows' branch of ObsCore is left out)."""
    catalog = world.site.catalog
    dialect = catalog.engine.dialect
    if not catalog.is_sqlite:  # a survey's stripe along dec 10: its band is no filter
        rows = [
            {"original_name": f"x{i}", "source_path": "/x", "size": 1, "sha256": f"{i:064x}",
             "state": "archived", "ra": (i * 0.0179) % 360, "dec": 9.9 + (i % 200) * 0.001}
            for i in range(20_000)
        ]  # fmt: skip
        with catalog.write() as conn:
            conn.execute(insert(schema.files), rows)
            conn.execute(text("ANALYZE files"))
    adql = cone(0.0, 10.0, 0.1)
    translated = translate(adql, tap.RUN_NAMES, dialect.name, limit=10, sky=catalog.sky_index)
    assert not translated.hidden
    view = ObsCoreView(facts_of(world.site.registry, "ivo://x", "http://x/"))
    statement = view.statement(ReadRule.of(ANONYMOUS, datetime.now(UTC)), dialect, hidden=False)
    tables = {"ivoa_obscore": statement}
    plan = run_query(catalog, translated.sql, tables, seconds=10, explain=True)
    lines = [" ".join(str(v) for v in row) for row in plan.rows]
    text_of_plan = "\n".join(lines)
    if catalog.is_sqlite:
        assert "files_sky VIRTUAL TABLE" in text_of_plan, text_of_plan
        assert not any("SCAN files " in line or line.endswith("SCAN files") for line in lines), (
            text_of_plan
        )
    elif catalog.sky_index is SkyIndex.Q3C:
        assert "ix_files_q3c" in text_of_plan, text_of_plan
    if not catalog.is_sqlite:
        assert text_of_plan.count(" on files") == 1, text_of_plan  # one branch, not two


# ------------------------------------------------------------------ answers


def test_cones_at_ra_0_360_and_the_poles_find_exactly_what_is_within(world: World) -> None:
    move(world, EDGES)
    ids = world.ids
    readable = set(ids[4:8])  # released; the others are proprietary
    for ra, dec in CENTRES:
        for radius in (0.1, 0.25):
            want = exact(world, ra, dec, radius, ids)
            assert {r["obs_id"] for r in world.rows(cone(ra, dec, radius))} == want, (ra, dec)
            anonymous = {r["obs_id"] for r in world.rows(cone(ra, dec, radius), "anonymous")}
            assert anonymous == want & readable, (ra, dec, radius)
    assert any(exact(world, ra, dec, 0.1, ids) for ra, dec in CENTRES)


def test_the_index_changes_no_answer(world: World) -> None:
    """Every query the same with the sky index as without, for every reader: boxes
    and polygons across RA 0, cones under NOT and OR (where no prefilter may go; a
    proprietary row must stay out of NOT CONTAINS), INTERSECTS, joins."""
    move(world, EDGES)
    catalog = world.site.catalog
    dialect = catalog.engine.dialect
    view = ObsCoreView(facts_of(world.site.registry, "ivo://x", "http://x/"))
    point = "POINT('ICRS', s_ra, s_dec)"
    queries = [
        cone(359.95, 10.0, 0.2),
        "SELECT obs_id FROM ivoa.obscore WHERE "
        f"CONTAINS({point}, BOX('ICRS', 0, 10, 0.3, 0.3)) = 1",
        "SELECT obs_id FROM ivoa.obscore WHERE 1 = CONTAINS("
        f"{point}, POLYGON(359.8, 9.8, 0.2, 9.8, 0.2, 10.2, 359.8, 10.2))",
        f"SELECT obs_id FROM ivoa.obscore WHERE 1 = INTERSECTS(CIRCLE(0, 90, 0.2), {point})",
        f"SELECT obs_id FROM ivoa.obscore WHERE NOT (1 = CONTAINS({point}, CIRCLE(0, 10, 0.1)))",
        f"SELECT obs_id FROM ivoa.obscore WHERE 1 = CONTAINS({point}, CIRCLE(0, 10, 0.1)) "
        "OR t_min < 0",
        "SELECT a.obs_id FROM ivoa.obscore AS a JOIN ivoa.obscore AS b ON a.obs_id = b.obs_id "
        "WHERE 1 = CONTAINS(POINT(a.s_ra, a.s_dec), CIRCLE(0, -90, 0.3))",
        f"SELECT COUNT(*) AS n FROM ivoa.obscore WHERE 1 = CONTAINS({point}, CIRCLE(0, -90, 0.3))",
        "WITH near AS (SELECT obs_id, s_ra, s_dec FROM ivoa.obscore) SELECT obs_id FROM near "
        f"WHERE 1 = CONTAINS({point}, CIRCLE(0, 10, 0.1))",
    ]
    now = datetime.now(UTC)
    rules = {
        "admin": ReadRule(frozenset(), True, now),
        "own": ReadRule(frozenset({"A"}), False, now),
        "anonymous": ReadRule.of(ANONYMOUS, now),
    }
    for adql in queries:
        plain = translate(adql, tap.RUN_NAMES, dialect.name, limit=100)
        indexed = translate(adql, tap.RUN_NAMES, dialect.name, limit=100, sky=catalog.sky_index)
        for who, rule in rules.items():
            answers = []
            for translated in (plain, indexed):
                statement = view.statement(rule, dialect, hidden=translated.hidden)
                found = run_query(catalog, translated.sql, {"ivoa_obscore": statement}, seconds=10)
                answers.append(sorted(map(str, found.rows)))
            assert answers[0] == answers[1], (who, adql)
            if who == "anonymous" and "NOT" in adql:
                assert all(r.strip("(',)") in world.ids[4:8] for r in answers[1]), answers[1]

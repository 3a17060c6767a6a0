"""TAP with ObsCore (:mod:`obsflow.ivoa`) as VO clients meet it: a real uvicorn
server on a real site (SQLite and PostgreSQL), httpx, pyvo and STILTS taplint as
clients; the world is :mod:`tests.ivoaworld`'s.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import re
import shutil
import subprocess
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from astropy.coordinates import SkyCoord
from astropy.io.votable import parse_single_table

from obsflow.errors import RegistryError
from obsflow.ivoa.adql import AdqlError, translate
from obsflow.ivoa.tap import RUN_NAMES
from obsflow.registry import load_registry
from obsflow.site import example_registry
from tests.conftest import SiteFactory, service_missing
from tests.ivoaworld import (
    CENTER,
    UWS_NS,
    VOTABLE_NS,
    World,
    cone,
    exact,
    make_world,
)


@pytest.fixture
def world(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    yield from make_world(make_site, frames)


# ------------------------------------------------------------------ ObsCore


def test_obscore_fills_the_mandatory_columns_from_catalog_and_registry(world: World) -> None:
    rows = {r["obs_id"]: r for r in world.rows("SELECT * FROM ivoa.obscore")}
    assert set(rows) == set(world.ids)
    for record, archive_id in zip(world.records, world.ids, strict=True):
        row = rows[archive_id]
        assert row["dataproduct_type"] == "image"
        assert row["calib_level"] == "1"  # a raw frame (level 0) in FITS
        assert row["obs_collection"] == row["instrument_name"] == "OFCAM"
        assert row["obs_publisher_did"] == f"ivo://obsflow.invalid/archive?{archive_id}"
        assert row["access_url"] == f"{world.url}/api/v1/files/{archive_id}/data"
        assert row["access_format"] == "application/fits"
        assert int(row["access_estsize"]) == math.ceil(record.size / 1024)
        assert float(row["s_ra"]) == pytest.approx(world.positions[archive_id][0])
        assert row["target_name"] == f"target-{world.records.index(record)}"
        assert float(row["s_fov"]) == 0.25
        assert row["s_region"].startswith("CIRCLE ICRS ")
        assert float(row["t_min"]) == pytest.approx(record.start_mjd)
        assert float(row["t_max"]) == pytest.approx(record.stop_mjd)
        assert float(row["t_exptime"]) == pytest.approx(record.exptime)
        band = {"B": (390e-9, 490e-9), "V": (500e-9, 590e-9), "R": (570e-9, 720e-9)}
        if record.filter in band:
            low, high = band[record.filter]
            assert (float(row["em_min"]), float(row["em_max"])) == pytest.approx((low, high))
        assert row["o_ucd"] == "phot.count"
        assert row["facility_name"] == "OBSFLOW 1.0m"
        assert row["proposal_id"] == ("A" if world.ids.index(archive_id) < 8 else "B")
    # the file's data are where access_url says
    with world.client() as client:
        data = client.get(rows[world.ids[5]]["access_url"])
    assert data.status_code == 200
    assert data.content[:6] == b"SIMPLE"


def test_obscore_declarations_are_checked_by_the_registry(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    text = (example_registry() / "ofcam.yaml").read_text()
    (root / "ofcam.yaml").write_text(text.replace("B: [390, 490]", "B: [490, 390]"))
    with pytest.raises(RegistryError) as caught:
        load_registry(root)
    message = str(caught.value)
    assert "ofcam.yaml" in message
    assert "'B'" in message and "490" in message


# ------------------------------------------------------------------ geometry


@pytest.mark.parametrize("radius", [0.1, 0.06, 1.0])
def test_a_cone_search_finds_exactly_the_frames_within_the_radius(
    world: World, radius: float
) -> None:
    ids = world.ids
    found = {r["obs_id"] for r in world.rows(cone(*CENTER, radius))}
    assert found == exact(world, *CENTER, radius, ids)
    assert 0 < len(found) < len(ids)


def test_distance_agrees_with_astropy(world: World) -> None:
    rows = world.rows(
        "SELECT obs_id, DISTANCE(POINT('ICRS', s_ra, s_dec), "
        f"POINT('ICRS', {CENTER[0]}, {CENTER[1]})) AS d FROM ivoa.obscore ORDER BY d"
    )
    centre = SkyCoord(*CENTER, unit="deg")
    for row in rows:
        want = centre.separation(SkyCoord(*world.positions[row["obs_id"]], unit="deg")).deg
        assert float(row["d"]) == pytest.approx(want, abs=1e-9)
    assert [float(r["d"]) for r in rows] == sorted(float(r["d"]) for r in rows)


def test_polygon_box_and_intersects(world: World) -> None:
    ids = world.ids
    ra, dec = CENTER
    # a square 0.3° on a side around the centre: the same as the box
    square = world.rows(
        "SELECT obs_id FROM ivoa.obscore WHERE 1 = CONTAINS(POINT(s_ra, s_dec), POLYGON("
        f"{ra - 0.15}, {dec - 0.15}, {ra + 0.15}, {dec - 0.15}, {ra + 0.15}, {dec + 0.15}, "
        f"{ra - 0.15}, {dec + 0.15}))"
    )
    box = world.rows(
        "SELECT obs_id FROM ivoa.obscore WHERE "
        f"CONTAINS(POINT(s_ra, s_dec), BOX('ICRS', {ra}, {dec}, 0.3, 0.3)) = 1"
    )
    inside = {
        a for a in ids if abs(world.positions[a][0] - ra) < 0.149
        and abs(world.positions[a][1] - dec) < 0.149
    }  # fmt: skip
    assert {r["obs_id"] for r in square} == {r["obs_id"] for r in box} == inside
    circle = world.rows(
        "SELECT obs_id FROM ivoa.obscore WHERE "
        f"INTERSECTS(CIRCLE({ra}, {dec}, 0.1), POINT(s_ra, s_dec)) = 1"
    )
    assert {r["obs_id"] for r in circle} == exact(world, ra, dec, 0.1, ids)


def test_joins_order_and_aggregates(world: World) -> None:
    rows = world.rows(
        "SELECT TOP 3 a.obs_id, b.obs_id AS twin FROM ivoa.obscore AS a "
        "JOIN ivoa.obscore AS b ON a.obs_id = b.obs_id ORDER BY a.t_min DESC"
    )
    assert len(rows) == 3
    assert all(r["obs_id"] == r["twin"] for r in rows)
    latest = sorted(world.records, key=lambda r: r.start_mjd or 0, reverse=True)[:3]
    assert [r["obs_id"] for r in rows] == [r.archive_id for r in latest]  # fmt: skip
    counts = world.rows(
        "SELECT em_filter, COUNT(*) AS n FROM ivoa.obscore GROUP BY em_filter ORDER BY em_filter"
    )
    assert sum(int(r["n"]) for r in counts) == 12


# ------------------------------------------------------------------ access


def test_the_access_matrix_through_tap(world: World) -> None:
    """Proprietary frames show no target, position or region but to their program (and
    admin); a cone search never finds them for anyone else."""
    ids = world.ids
    everything_near = exact(world, *CENTER, 0.1, ids)
    mine = {"anonymous": set(), "other": set(ids[8:]), "own": set(ids[:4]), "admin": set(ids)}
    for role, own in mine.items():
        readable = set(ids[4:8]) | own
        rows = {r["obs_id"]: r for r in world.rows("SELECT * FROM ivoa.obscore", role)}
        assert set(rows) == set(ids), role  # every frame is listed: its times are public
        for archive_id, row in rows.items():
            shown = archive_id in readable
            for column in ("target_name", "s_ra", "s_dec", "s_region"):
                assert (row[column] != "") == shown, (role, archive_id, column)
        found = {r["obs_id"] for r in world.rows(cone(*CENTER, 0.1), role)}
        assert found == everything_near & readable, role
        by_name = world.rows("SELECT obs_id FROM ivoa.obscore WHERE target_name = 'target-0'", role)
        assert bool(by_name) == (ids[0] in readable), role


# ------------------------------------------------------------------ protocol


def test_maxrec_top_and_overflow(world: World) -> None:
    response = world.sync("SELECT obs_id FROM ivoa.obscore", fmt="votable", MAXREC="5")
    assert response.status_code == 200
    table = parse_single_table(io.BytesIO(response.content))
    assert len(table.array) == 5
    infos = ET.fromstring(response.content).iter(f"{VOTABLE_NS}INFO")
    statuses = [i.get("value") for i in infos if i.get("name") == "QUERY_STATUS"]
    assert statuses == ["OK", "OVERFLOW"]
    response = world.sync("SELECT TOP 4 obs_id FROM ivoa.obscore", fmt="votable", MAXREC="5")
    infos = ET.fromstring(response.content).iter(f"{VOTABLE_NS}INFO")
    assert [i.get("value") for i in infos if i.get("name") == "QUERY_STATUS"] == ["OK"]
    assert len(parse_single_table(io.BytesIO(response.content)).array) == 4
    # no MAXREC: the site's default (100 here), and all 12 rows without overflow
    response = world.sync("SELECT obs_id FROM ivoa.obscore", fmt="votable")
    assert len(parse_single_table(io.BytesIO(response.content)).array) == 12
    assert b"OVERFLOW" not in response.content
    empty = world.sync("SELECT obs_id FROM ivoa.obscore", fmt="votable", MAXREC="0")
    assert len(parse_single_table(io.BytesIO(empty.content)).array) == 0


def test_votable_fields_carry_units_and_ucds(world: World) -> None:
    response = world.sync("SELECT obs_id, s_ra, t_min, em_min FROM ivoa.obscore", fmt="votable")
    assert response.headers["content-type"].startswith("application/x-votable+xml")
    table = parse_single_table(io.BytesIO(response.content))
    fields = {f.name: f for f in table.fields}
    assert (str(fields["s_ra"].unit), fields["s_ra"].ucd) == ("deg", "pos.eq.ra")
    assert str(fields["em_min"].unit) == "m"
    assert fields["obs_id"].datatype == "char"


def test_json_and_csv(world: World) -> None:
    response = world.sync("SELECT TOP 2 obs_id, s_ra FROM ivoa.obscore ORDER BY obs_id", fmt="json")
    body = json.loads(response.text)
    assert [m["name"] for m in body["metadata"]] == ["obs_id", "s_ra"]
    assert len(body["data"]) == 2 and body["overflow"] is False
    first = sorted(world.ids)[0]
    assert body["data"][0][0] == first
    text = world.sync("SELECT TOP 2 obs_id FROM ivoa.obscore ORDER BY obs_id").text
    assert text.splitlines()[:2] == ["obs_id", first]


@pytest.mark.parametrize(
    ("params", "culprit"),
    [
        ({"QUERY": "SELECT * FROM files"}, "unknown table 'files'"),
        ({"QUERY": "DROP TABLE files"}, "only SELECT"),
        ({"QUERY": "SELECT * FROM ivoa.obscore; DELETE FROM files"}, "one SELECT"),
        ({"QUERY": "SELECT pg_sleep(5) FROM ivoa.obscore"}, "PG_SLEEP"),
        ({"QUERY": "SELECT load_extension('x') FROM ivoa.obscore"}, "LOAD_EXTENSION"),
        ({"QUERY": "SELECT nosuch FROM ivoa.obscore"}, "nosuch"),
        ({"QUERY": "SELECT FROM WHERE"}, "syntax error"),
        ({"QUERY": "SELECT * FROM ivoa.obscore", "FORMAT": "fits"}, "unknown FORMAT 'fits'"),
        ({"QUERY": "SELECT * FROM ivoa.obscore", "MAXREC": "many"}, "MAXREC 'many'"),
        ({"QUERY": "SELECT * FROM ivoa.obscore", "LANG": "SQL"}, "unknown LANG 'SQL'"),
        ({}, "QUERY is missing"),
        ({"QUERY": "SELECT " + "(" * 3000 + "1" + ")" * 3000 + " FROM ivoa.obscore"}, "nested"),
        ({"QUERY": "SELECT 'unterminated FROM ivoa.obscore"}, "syntax error"),
        (
            {
                "QUERY": "SELECT * FROM ivoa.obscore WHERE 1 = CONTAINS(POINT(s_ra, s_dec), "
                "CIRCLE(1, 2))"
            },
            "CIRCLE: expected",
        ),
        ({"QUERY": "SELECT 1 AS x FROM ivoa.obscore -- " + "x" * 100_001}, "at most 100000"),
        ({"QUERY": "SELECT * FROM ivoa.obscore", "LANG": ""}, "LANG"),
    ],
)
def test_errors_are_votable_error_documents_naming_the_culprit(
    world: World, params: dict[str, str], culprit: str
) -> None:
    data = {"LANG": "ADQL", **params}
    with world.client() as client:
        response = client.post("/tap/sync", data=data)
    assert response.status_code == 400
    root = ET.fromstring(response.content)
    info = next(i for i in root.iter(f"{VOTABLE_NS}INFO") if i.get("name") == "QUERY_STATUS")
    assert info.get("value") == "ERROR"
    assert culprit.lower() in (info.text or "").lower()
    # nothing was harmed: the files are all there
    assert len(world.rows("SELECT obs_id FROM ivoa.obscore")) == 12


def test_a_query_running_too_long_is_stopped_and_the_service_lives(world: World) -> None:
    tables = ", ".join(f"ivoa.obscore AS t{i}" for i in range(8))
    response = world.sync(f"SELECT COUNT(*) AS n FROM {tables}", fmt="votable")
    assert response.status_code == 400
    assert b"ran longer than 3 s" in response.content
    assert len(world.rows("SELECT obs_id FROM ivoa.obscore")) == 12


def test_one_reader_runs_only_so_many_queries_at_once(world: World) -> None:
    """``ivoa.queries_per_user`` (1 here): while a reader's slow query runs, their next
    one is refused with 429; other readers are not held up."""
    tables = ", ".join(f"ivoa.obscore AS t{i}" for i in range(8))
    slow = threading.Thread(target=world.sync, args=(f"SELECT COUNT(*) AS n FROM {tables}",))
    slow.start()
    try:
        time.sleep(0.5)
        refused = world.sync("SELECT TOP 1 obs_id FROM ivoa.obscore", fmt="votable")
        other = world.sync("SELECT TOP 1 obs_id FROM ivoa.obscore", role="own")
    finally:
        slow.join()
    assert refused.status_code == 429
    assert b"queries_per_user" in refused.content and b"QUERY_STATUS" in refused.content
    assert other.status_code == 200
    assert world.sync("SELECT TOP 1 obs_id FROM ivoa.obscore").status_code == 200


def test_user_text_reaches_the_database_only_as_values(world: World) -> None:
    rows = world.rows(
        "SELECT obs_id FROM ivoa.obscore WHERE target_name = 'x'' OR ''1''=''1' "
        "OR obs_id LIKE 'zz:%' OR obs_id = '%(x)s'"
    )
    assert rows == []
    like = world.rows("SELECT obs_id FROM ivoa.obscore WHERE obs_id LIKE 'OF.%'")
    assert len(like) == 12


# ------------------------------------------------------------------ VOSI, TAP_SCHEMA


def test_tap_schema_describes_every_obscore_column(world: World) -> None:
    rows = world.rows(
        "SELECT column_name, unit, ucd, datatype FROM tap_schema.columns "
        "WHERE table_name = 'ivoa.obscore'"
    )
    columns = {r["column_name"]: r for r in rows}
    mandatory = [
        "dataproduct_type",
        "calib_level",
        "obs_collection",
        "obs_id",
        "obs_publisher_did",
        "access_url",
        "access_format",
        "access_estsize",
        "target_name",
        "s_ra",
        "s_dec",
        "s_fov",
        "s_region",
        "s_resolution",
        "s_xel1",
        "s_xel2",
        "t_min",
        "t_max",
        "t_exptime",
        "t_resolution",
        "t_xel",
        "em_min",
        "em_max",
        "em_res_power",
        "em_xel",
        "o_ucd",
        "pol_states",
        "pol_xel",
        "facility_name",
        "instrument_name",
    ]
    assert set(mandatory) <= set(columns)
    assert columns["s_ra"]["unit"] == "deg" and columns["s_ra"]["ucd"] == "pos.eq.ra"
    # every column TAP_SCHEMA names is one the table has
    star = world.sync("SELECT TOP 1 * FROM ivoa.obscore").text.splitlines()[0].split(",")
    assert star == list(columns)
    tables = {r["table_name"] for r in world.rows("SELECT table_name FROM tap_schema.tables")}
    assert tables == set(RUN_NAMES)


def test_vosi_resources(world: World) -> None:
    with world.client() as client:
        capabilities = ET.fromstring(client.get("/tap/capabilities").content)
        availability = client.get("/tap/availability").text
        tableset = ET.fromstring(client.get("/tap/tables").content)
    ids = {c.get("standardID") for c in capabilities.iter("capability")}
    assert "ivo://ivoa.net/std/TAP" in ids
    assert "<vosi:available>true</vosi:available>" in availability
    names = {t.findtext("name") for t in tableset.iter("table")}
    assert names == set(RUN_NAMES)


def test_pyvo_queries_the_service(world: World) -> None:
    pyvo = pytest.importorskip("pyvo")
    requests = pytest.importorskip("requests")
    with warnings.catch_warnings():  # see test_pyvo_runs_async_jobs
        warnings.simplefilter("ignore", ResourceWarning)
        with requests.Session() as session:
            service = pyvo.dal.TAPService(f"{world.url}/tap", session=session)
            result = service.run_sync(cone(*CENTER, 0.1), maxrec=50)
            tables = [t.name for t in service.tables]
        del service
        gc.collect()
    assert set(result.to_table()["obs_id"]) == exact(world, *CENTER, 0.1, world.ids[4:8])
    assert "ivoa.obscore" in tables


# ------------------------------------------------------------------ translation


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_translation_never_passes_user_text(dialect: str) -> None:
    sql = translate(
        "select top 3 S_RA from IVOA.ObsCore where obs_id = 'a\"; drop table files; --'",
        RUN_NAMES,
        dialect,
        limit=10,
    ).sql
    assert '"ivoa_obscore"' in sql and "LIMIT 3" in sql
    assert "'a\"; drop table files; --'" in sql  # a string literal, nothing more
    for bad in ("WITH x AS (DELETE FROM files) SELECT 1", "SELECT * INTO t FROM ivoa.obscore"):
        with pytest.raises(AdqlError):
            translate(bad, RUN_NAMES, dialect, limit=10)


# ------------------------------------------------------------------ async (UWS)


def _phase(client: httpx.Client, job: str) -> str:
    return client.get(f"/tap/async/{job}/phase").text


def test_an_async_job_runs_and_keeps_its_result(world: World) -> None:
    with world.client("own") as client:
        made = client.post(
            "/tap/async",
            data={"LANG": "ADQL", "QUERY": cone(*CENTER, 0.1), "FORMAT": "csv"},
        )
        assert made.status_code == 303
        job = made.headers["location"].rsplit("/", 1)[1]
        assert _phase(client, job) == "PENDING"
        listed = ET.fromstring(client.get("/tap/async").content)
        assert [r.get("id") for r in listed.iter(f"{UWS_NS}jobref")] == [job]
        assert client.post(f"/tap/async/{job}/phase", data={"PHASE": "RUN"}).status_code == 303
        document = client.get(f"/tap/async/{job}", params={"WAIT": "30"}).content
        root = ET.fromstring(document)
        assert root.findtext(f"{UWS_NS}phase") == "COMPLETED"
        result = client.get(f"/tap/async/{job}/results/result")
        assert result.headers["content-type"].startswith("text/csv")
        found = {r["obs_id"] for r in csv.DictReader(io.StringIO(result.text))}
        assert found == exact(world, *CENTER, 0.1, world.ids[:8])  # own program: A
        # nobody else sees the job
        with world.client("other") as other:
            assert other.get(f"/tap/async/{job}").status_code == 404
            assert other.get(f"/tap/async/{job}/results/result").status_code == 404
        assert client.delete(f"/tap/async/{job}").status_code == 303
        assert client.get(f"/tap/async/{job}").status_code == 404


def test_an_async_job_with_a_bad_query_ends_in_error_with_a_document(world: World) -> None:
    with world.client() as client:
        made = client.post(
            "/tap/async",
            data={"LANG": "ADQL", "QUERY": "SELECT * FROM files", "PHASE": "RUN"},
        )
        job = made.headers["location"].rsplit("/", 1)[1]
        root = ET.fromstring(client.get(f"/tap/async/{job}", params={"WAIT": "30"}).content)
        assert root.findtext(f"{UWS_NS}phase") == "ERROR"
        assert "unknown table 'files'" in (root.findtext(f".//{UWS_NS}message") or "")
        error = ET.fromstring(client.get(f"/tap/async/{job}/error").content)
        info = next(i for i in error.iter(f"{VOTABLE_NS}INFO"))
        assert info.get("value") == "ERROR" and "files" in (info.text or "")
        # a job aborted before it runs never runs
        made = client.post("/tap/async", data={"LANG": "ADQL", "QUERY": "SELECT 1 AS x"})
        job = made.headers["location"].rsplit("/", 1)[1]
        client.post(f"/tap/async/{job}/phase", data={"PHASE": "ABORT"})
        client.post(f"/tap/async/{job}/phase", data={"PHASE": "RUN"})
        time.sleep(0.5)
        assert _phase(client, job) == "ABORTED"
        bad = client.post(f"/tap/async/{job}/destruction", data={"DESTRUCTION": "tomorrow"})
        assert bad.status_code == 400 and b"DESTRUCTION 'tomorrow'" in bad.content


def test_pyvo_runs_async_jobs(world: World) -> None:
    pyvo = pytest.importorskip("pyvo")
    requests = pytest.importorskip("requests")
    latest = sorted(world.records, key=lambda r: r.start_mjd or 0)[:5]
    # pyvo leaves one of its responses to the garbage collector: collect it here, where
    # its ResourceWarning is pyvo's, not some later test's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with requests.Session() as session:
            service = pyvo.dal.TAPService(f"{world.url}/tap", session=session)
            query = "SELECT TOP 5 obs_id, t_min FROM ivoa.obscore ORDER BY t_min"
            found = list(service.run_async(query).to_table()["obs_id"])
        del service
        gc.collect()
    assert found == [r.archive_id for r in latest]


# ------------------------------------------------------------------ taplint


def test_taplint_finds_no_errors(world: World) -> None:
    """STILTS taplint, the IVOA's validator, against the live service (it exits 0
    even when it reports errors: its Totals line is what counts)."""
    stilts = shutil.which("stilts")
    if stilts is None:
        service_missing("STILTS is not installed (Debian: apt-get install stilts)")
    assert stilts is not None
    done = subprocess.run(
        [stilts, "taplint", f"tapurl={world.url}/tap", "report=EWF"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    totals = re.search(r"Totals: Errors: (\d+); Warnings: (\d+)", done.stdout)
    assert totals is not None, done.stdout[-2000:] + done.stderr[-2000:]
    problems = [line for line in done.stdout.splitlines() if line.startswith("E-")]
    assert int(totals.group(1)) == 0, "\n".join(problems)

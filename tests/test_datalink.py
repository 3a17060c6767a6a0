"""DataLink and SODA (:mod:`obsflow.ivoa.datalink`, :mod:`obsflow.ivoa.soda`) as
clients meet them: httpx and pyvo against a real server on a real site (SQLite and
PostgreSQL); the world is :mod:`tests.ivoaworld`'s.
"""

from __future__ import annotations

import gc
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.io.votable import parse_single_table
from astropy.visualization import ZScaleInterval
from PIL import Image
from sqlalchemy import update

from obsflow.catalog import schema
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.runs import NewRun, RunStore
from obsflow.ivoa.datalink import preview
from tests.conftest import SiteFactory
from tests.ivoaworld import (
    World,
    make_world,
)


@pytest.fixture
def world(make_site: SiteFactory, frames: list[Path]) -> Iterator[World]:
    yield from make_world(make_site, frames)


# ------------------------------------------------------------------ DataLink, SODA

DATALINK = "application/x-votable+xml;content=datalink"


def _provenance(world: World) -> tuple[str, str, str]:
    """A run over a raw frame and a master bias (files 4, 5: released) that made file
    6: setup written as the controller would leave it. Returns their archive IDs."""
    raw, bias, made = world.records[4], world.records[5], world.records[6]
    store = RunStore(world.site.catalog)
    run_id = store.create(
        NewRun(
            pipeline="ofcam_calibrate",
            group_key=GroupKey.of(
                "ofcam_calibrate", {"night": str(raw.night), "file": str(raw.id)}
            ),
            night=raw.night,
            inputs={"frame": (raw.id,), "bias": (bias.id,)},
            reason="test",
        ),
        world.site.clock(),
    )
    with world.site.catalog.write() as conn:
        files = schema.files
        conn.execute(update(files).where(files.c.id == bias.id).values(product="ofcam_masterbias"))
        conn.execute(update(files).where(files.c.id == made.id).values(made_by_run=run_id))
    return world.ids[4], world.ids[5], world.ids[6]


def _links(world: World, archive_id: str, role: str = "anonymous") -> list[dict[str, str]]:
    with world.client(role) as client:
        response = client.get("/datalink/links", params={"ID": archive_id})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(DATALINK)
    table = parse_single_table(io.BytesIO(response.content))
    names = [field.name for field in table.fields]
    return [
        {name: ("" if masked else str(value)) for name, value, masked in zip(
            names, row.data.tolist(), row.mask.tolist(), strict=True)}
        for row in table.array
    ]  # fmt: skip


def test_datalink_links_data_preview_cutout_and_provenance(world: World) -> None:
    raw, bias, made = _provenance(world)
    did = f"ivo://obsflow.invalid/archive?{made}"
    links = _links(world, did)
    by = {link["semantics"]: link for link in links}
    assert by["#this"]["access_url"] == f"{world.url}/api/v1/files/{made}/data"
    assert by["#this"]["content_type"] == "application/fits"
    assert by["#preview"]["access_url"].endswith(f"/datalink/preview?ID={made}")
    assert by["#cutout"]["service_def"] == "soda"
    assert by["#progenitor"]["access_url"].endswith(f"ID={raw}")
    assert by["#calibration"]["access_url"].endswith(f"ID={bias}")
    assert all(link["ID"] == did for link in links)
    derived = {link["semantics"]: link for link in _links(world, raw)}
    assert derived["#derivation"]["access_url"].endswith(f"ID={made}")
    with world.client() as client:
        png = client.get(by["#preview"]["access_url"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        again = client.get(by["#preview"]["access_url"])
    assert again.content == png.content
    assert list((world.site.settings.work / "previews").glob("*.png"))  # made once, kept


def test_datalink_withholds_proprietary_data(world: World) -> None:
    secret = world.ids[0]
    anonymous = {link["semantics"]: link for link in _links(world, secret)}
    assert set(anonymous) == {"#this"}
    assert anonymous["#this"]["access_url"] == ""
    assert anonymous["#this"]["error_message"].startswith("NotAuthorizedFault")
    own = {link["semantics"] for link in _links(world, secret, "own")}
    assert {"#this", "#preview", "#cutout"} <= own
    with world.client() as client:
        assert client.get("/datalink/preview", params={"ID": secret}).status_code == 403
        missing = _links(world, "OF.nosuch.fits")
    assert missing[0]["error_message"].startswith("NotFoundFault")


def _science(world: World, proprietary: bool | None = None) -> tuple[str, bytes]:
    """A science frame (it has a WCS), proprietary or not if asked, and its bytes."""
    with world.client("admin") as client:
        for i, (archive_id, record) in enumerate(zip(world.ids, world.records, strict=True)):
            if proprietary is not None and (not 4 <= i < 8) != proprietary:
                continue
            if record.frame_type == "OBJECT":
                return archive_id, client.get(f"/api/v1/files/{archive_id}/data").content
    raise AssertionError("the small night has no science frame")


def test_a_soda_cutout_keeps_the_sky_where_it_was(world: World) -> None:
    from astropy.io import fits
    from astropy.wcs import WCS

    archive_id, original = _science(world)
    with fits.open(io.BytesIO(original)) as hdus:
        data, wcs = hdus[0].data.astype(float), WCS(hdus[0].header)
    ra, dec = (float(v) for v in wcs.pixel_to_world_values(30, 25))
    scale = abs(float(wcs.pixel_scale_matrix[0, 0]))
    with world.client("admin") as client:
        response = client.get(
            "/soda/sync", params={"ID": archive_id, "CIRCLE": f"{ra} {dec} {10 * scale}"}
        )
    assert response.status_code == 200, response.text
    with fits.open(io.BytesIO(response.content)) as hdus:
        cut, cut_wcs = hdus[0].data.astype(float), WCS(hdus[0].header)
    assert 18 <= cut.shape[0] <= 22 and 18 <= cut.shape[1] <= 22
    for x, y in ((30, 25), (25, 20), (34, 29)):  # the same sky, the same pixel value
        sky = wcs.pixel_to_world_values(x, y)
        cx, cy = (round(float(v)) for v in cut_wcs.world_to_pixel_values(*sky))
        assert cut[cy, cx] == data[y, x]
    # a polygon, and POS=RANGE, cut the same kind of piece
    with world.client("admin") as client:
        box = f"{ra - 5 * scale} {dec - 5 * scale} {ra + 5 * scale} {dec - 5 * scale} "
        box += f"{ra + 5 * scale} {dec + 5 * scale} {ra - 5 * scale} {dec + 5 * scale}"
        polygon = client.get("/soda/sync", params={"ID": archive_id, "POLYGON": box})
    assert polygon.status_code == 200
    with fits.open(io.BytesIO(polygon.content)) as hdus:
        assert 9 <= hdus[0].data.shape[0] <= 13


@pytest.mark.parametrize(
    ("params", "status", "fault"),
    [
        ({"CIRCLE": "1 2 0.1"}, 400, "UsageFault: ID is missing"),
        ({"ID": "@", "CIRCLE": "1 2 0.1", "POS": "CIRCLE 1 2 0.1"}, 400, "exactly one"),
        ({"ID": "@", "CIRCLE": "1 two 0.1"}, 400, "CIRCLE '1 two 0.1'"),
        ({"ID": "@", "CIRCLE": "1 2 -1"}, 400, "CIRCLE '1 2 -1'"),
        ({"ID": "@", "POLYGON": "1 2 3 4"}, 400, "POLYGON '1 2 3 4'"),
        ({"ID": "@", "POS": "ELLIPSE 1 2 3"}, 400, "POS 'ELLIPSE 1 2 3'"),
        ({"ID": "OF.nosuch.fits", "CIRCLE": "1 2 0.1"}, 404, "NotFoundFault"),
        ({"ID": "@", "CIRCLE": "300 -80 0.01"}, 400, "NoOverlap"),
    ],
)
def test_soda_faults_name_the_culprit(
    world: World, params: dict[str, str], status: int, fault: str
) -> None:
    archive_id, _ = _science(world)
    wanted = {k: (archive_id if v == "@" else v) for k, v in params.items()}
    with world.client("admin") as client:
        response = client.get("/soda/sync", params=wanted)
    assert response.status_code == status, response.text
    assert fault in response.text


def test_soda_keeps_the_proprietary_rule(world: World) -> None:
    archive_id, _ = _science(world, proprietary=True)
    index = world.ids.index(archive_id)
    readable = {"anonymous": 4 <= index < 8, "own": index < 8, "other": index >= 4}
    for role, may in readable.items():
        with world.client(role) as client:
            response = client.get("/soda/sync", params={"ID": archive_id, "POS": "RANGE 0 1 0 1"})
        if may:
            assert response.status_code in (200, 400), response.text  # NoOverlap is fine
        else:
            assert response.status_code in (401, 403), role
            assert "proprietary" in response.text


def test_pyvo_follows_datalink_to_a_soda_cutout(world: World) -> None:
    from astropy.io import fits

    pyvo = pytest.importorskip("pyvo")
    requests = pytest.importorskip("requests")
    archive_id, _ = _science(world)
    with warnings.catch_warnings():  # see test_pyvo_runs_async_jobs
        warnings.simplefilter("ignore", ResourceWarning)
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {world.tokens['admin']}"
            links = pyvo.dal.adhoc.DatalinkResults.from_result_url(
                f"{world.url}/datalink/links?ID={archive_id}", session=session
            )
            this = next(row for row in links if row.semantics == "#this")
            data = session.get(this.access_url).content
            soda = pyvo.dal.adhoc.SodaQuery.from_resource(
                this, links.get_adhocservice_by_id("soda"), session=session
            )
            with fits.open(io.BytesIO(data)) as hdus:
                ra, dec = (float(hdus[0].header[k]) for k in ("CRVAL1", "CRVAL2"))
            soda.circle = (ra, dec, 0.002)
            cut = soda.execute_stream().read()
        del links, soda
        gc.collect()
    assert data[:6] == b"SIMPLE"
    with fits.open(io.BytesIO(cut)) as hdus:
        assert 0 < hdus[0].data.shape[0] < 64


def test_a_preview_is_zscaled_so_a_hot_pixel_does_not_black_out_the_sky(tmp_path: Path) -> None:
    sky = np.random.default_rng(7).normal(1000.0, 10.0, (64, 64))
    sky[10, 10] = 60000.0  # a saturated star, or a cosmic ray
    path = tmp_path / "frame.fits"
    fits.PrimaryHDU(sky.astype(np.float32)).writeto(path)
    png = Image.open(io.BytesIO(preview(path, tmp_path / "frame.png")))
    pixels = np.asarray(png, dtype=float)[::-1]  # back to FITS order (y up)
    low, high = ZScaleInterval().get_limits(sky.astype(np.float32))
    expected = np.clip((sky - low) / (high - low), 0, 1) * 255
    assert png.mode == "L" and png.size == (64, 64)
    assert np.abs(pixels - expected).max() <= 1.0  # linear between the zscale limits
    assert pixels.std() > 40  # the sky's noise is visible, not crushed to black by the star

"""Archive IDs per product: a product's own template over the file name's groups, the
same ID for the same output on every run, and ``.2``, ``.3`` ... for a taken one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from astropy.io import fits

from obsflow.catalog.batch import ArchiveIdScheme
from obsflow.errors import RegistryError
from obsflow.processing.plan import name_parts
from obsflow.receipt.receiver import Outcome
from obsflow.registry import load_registry
from obsflow.settings import Settings
from obsflow.sim.simulate import write_frame
from obsflow.site import open_site

SiteFactory = Callable[..., Settings]
MOMENT = datetime(2026, 11, 22, 5, 1, 36, 370000, tzinfo=UTC)


def scheme(template: str, **groups: str) -> ArchiveIdScheme:
    return ArchiveIdScheme(template, "OF", "OFCAM", MOMENT, date(2026, 11, 21), groups)


def test_an_instrument_template_moves_on_by_hundredths() -> None:
    ids = scheme("{prefix}.{yyyymmdd}.{seconds_of_day:05d}.{hundredths:02d}.fits")
    assert [ids(0), ids(1)] == ["OF.20261122.18096.37.fits", "OF.20261122.18096.38.fits"]


@pytest.mark.parametrize(
    ("template", "groups", "first", "third"),
    [
        ("{prefix}.{night}.mbias.fits", {}, "OF.20261121.mbias.fits", "OF.20261121.mbias.3.fits"),
        (
            "{prefix}.{date}.{frame}_cal.fits.gz",
            {"date": "20261122", "frame": "0042"},
            "OF.20261122.0042_cal.fits.gz",
            "OF.20261122.0042_cal.3.fits.gz",
        ),
        ("{prefix}-{night}-log", {"night": "ignored"}, "OF-20261121-log", "OF-20261121-log.3"),
    ],
)
def test_a_product_template_is_deterministic_and_numbers_a_taken_id(
    template: str, groups: dict[str, str], first: str, third: str
) -> None:
    ids = scheme(template, **groups)
    assert ids(0) == first and ids(0) == scheme(template, **groups)(0)
    assert ids(2) == third


def write_registry(root: Path, archive_id: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cam.yaml").write_text(
        f"""\
instrument: {{name: CAM, prefix: CM}}
products:
  - id: cam_arc
    level: 1
    instrument: CAM
    filename: 'cam_(?P<night>\\d{{8}})_arc_(?P<grating>\\w+)\\.fits'
    archive_id: "{archive_id}"
"""
    )


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{prefix}.{gratng}.fits", "unknown field(s) ['gratng']"),
        ("{prefix}/{grating}.fits", "plain file name"),
        ("{prefix}.{grating:04d}.fits", "file name groups are text"),
    ],
)
def test_a_bad_product_template_is_refused_at_its_product(
    tmp_path: Path, template: str, words: str
) -> None:
    write_registry(tmp_path, template)
    with pytest.raises(RegistryError) as caught:
        load_registry(tmp_path)
    assert words in str(caught.value) and "cam.yaml:" in str(caught.value)


def test_a_good_product_template_loads(tmp_path: Path) -> None:
    write_registry(tmp_path, "{prefix}.{night}.arc_{grating}.fits")
    assert load_registry(tmp_path).products["cam_arc"].archive_id is not None


def test_a_product_with_its_own_template_is_archived_under_it_and_its_versions_numbered(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = make_site()
    registry = settings.registry / "ofcam.yaml"
    text = registry.read_text()
    old = "    filename: 'ofc_(?P<night>\\d{8})_mbias\\.fits'\n"
    assert text.count(old) == 1
    registry.write_text(text.replace(old, old + '    archive_id: "{prefix}.{night}.mbias.fits"\n'))
    site = open_site(settings)
    try:
        source = settings.incoming / "ofc_20261121_mbias.fits"
        with fits.open(frames[0]) as hdul:
            data, header = hdul[0].data.copy(), hdul[0].header.copy()
        cards = fits.Header([c for c in header.cards if c.keyword not in ("SIMPLE", "BITPIX")])
        for ncombine in (5, 7):
            cards["NCOMBINE"] = ncombine
            write_frame(source, data, cards)
            result = site.receiver.receive(source)
            assert result.outcome is Outcome.CACHED, result
            if ncombine == 5:
                assert result.archive_id == "OF.20261121.mbias.fits"
            else:
                assert result.archive_id == "OF.20261121.mbias.2.fits"
                assert result.superseded == "OF.20261121.mbias.fits"
    finally:
        site.close()


@pytest.mark.parametrize(
    ("archive_id", "stem"),
    [
        ("KB.20261122.18000.00.fits", "KB.20261122.18000.00"),
        ("LS20261122_01000000.fits.gz", "LS20261122_01000000"),
        ("OF-log", "OF-log"),
    ],
)
def test_a_derived_product_may_be_named_as_its_raw_frames_id_plus_a_suffix(
    archive_id: str, stem: str
) -> None:
    """KOA's way: an output named ``{archive_stem}_cal.fits``, recognised by a product
    whose ``archive_id`` is ``"{raw}_cal.fits"`` over that name's group."""
    assert name_parts({"archive_id": archive_id})["archive_stem"] == stem
    ids = scheme("{raw}_cal.fits", raw=stem)
    assert ids(0) == f"{stem}_cal.fits"

"""The second example instrument, a long-slit spectrograph (``examples/lspec/``): its own
keywords (date + UT, ITIME x COADDS, OBSTYPE in its own words, grating and slit), its own
archive IDs, nights in America/Santiago, and an arc/flat pipeline grouped by grating and
slit; beside OFCAM in one site, through the daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from obsflow.catalog.records import FileQuery
from obsflow.receipt.receiver import Outcome
from obsflow.registry import load_registry
from obsflow.settings import Settings
from obsflow.site import example_registry, open_site
from obsflow.states import FileState
from tests.conftest import SiteFactory
from tests.test_daemon import daemon, running, wait_for

LSPEC = Path(__file__).resolve().parents[1] / "examples" / "lspec" / "registry"
START = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)  # 22:00 on 2026-11-21 in Santiago (UTC-3)
SETUPS = (("R600", "1.0"), ("B300", "1.5"))


def write_lspec(
    target: Path, frame: int, obstype: str, moment: datetime, grating: str, slit: str
) -> Path:
    """One raw LSPEC frame as the instrument writes it, moved into ``target`` whole."""
    rng = np.random.default_rng(frame)
    data = rng.normal(1000.0, 5.0, (32, 64)).astype(np.float32)
    header = fits.Header()
    header["INSTRUME"] = "LSPEC"
    header["TELESCOP"] = "OBSFLOW 1.0m"
    header["DATE-OBS"] = moment.strftime("%Y-%m-%d")
    header["UT"] = moment.strftime("%H:%M:%S.%f")[:11]
    header["ITIME"] = 5.0
    header["COADDS"] = 2
    header["OBSTYPE"] = obstype
    header["TARGNAME"] = "HD 1234" if obstype == "Object" else obstype.lower()
    header["GRATNAME"] = grating
    header["SLITNAME"] = slit
    header["BINNING"] = "1,1"
    header["PROGID"] = "ENG"
    name = f"ls{moment.strftime('%y%m%d')}_{frame:04d}.fits"
    temp = target.parent / f".{name}.part"
    fits.PrimaryHDU(data, header).writeto(temp)
    target.mkdir(parents=True, exist_ok=True)
    os.replace(temp, target / name)
    return target / name


def write_night(target: Path) -> list[Path]:
    """Per setup three arcs and three lamp flats, then two object frames and a bias."""
    paths, frame, moment = [], 1, START
    for grating, slit in SETUPS:
        for obstype in ("Arc", "Arc", "Arc", "Lamp", "Lamp", "Lamp", "Object", "Object"):
            paths.append(write_lspec(target, frame, obstype, moment, grating, slit))
            frame, moment = frame + 1, moment + timedelta(seconds=30.25)
    paths.append(write_lspec(target, frame, "Bias", moment, *SETUPS[0]))
    return paths


@pytest.fixture
def two_instruments(make_site: SiteFactory) -> Settings:
    """A site with the example OFCAM registry (no OFCAM pipelines) and LSPEC beside it."""
    settings = make_site(
        receipt={"settle_seconds": 0.2},
        daemon={"reconcile_seconds": 1.0, "status_seconds": 0.3},
    )
    shutil.copy(LSPEC / "lspec.yaml", settings.registry / "lspec.yaml")
    (settings.incoming / "lspec").mkdir(parents=True, exist_ok=True)
    return settings


def test_the_spectrograph_loads_beside_the_camera() -> None:
    for path in (LSPEC / "lspec.yaml", *example_registry().glob("*.yaml")):
        assert path.is_file()
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"lspec-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(example_registry(), root)
    try:
        shutil.copy(LSPEC / "lspec.yaml", root / "lspec.yaml")
        registry = load_registry(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert set(registry.instruments) == {"OFCAM", "LSPEC"}
    assert registry.pipelines["lspec_arcs"].group.by == ("night", "gratname", "slitname")
    assert registry.products["lspec_arc"].archive_id == "{prefix}.{night}.arc_{grating}_{slit}.fits"
    assert registry.recognise("ls261122_0001.fits").product.id == "lspec_raw"
    assert registry.recognise("ofc_20261122_0001.fits").product.id == "ofcam_raw"


def test_spectrograph_frames_are_mapped_by_the_registry_alone(
    two_instruments: Settings, tmp_path: Path
) -> None:
    site = open_site(two_instruments)
    try:
        arc = write_lspec(tmp_path / "in", 1, "Arc", START, "R600", "1.0")
        lamp = write_lspec(
            tmp_path / "in", 2, "Lamp", START + timedelta(seconds=12.5), "R600", "1.0"
        )
        results = [site.receiver.receive(p) for p in (arc, lamp)]
        assert [r.outcome for r in results] == [Outcome.CACHED, Outcome.CACHED]
        # the counter restarted: the same name (the same UT date), another exposure
        same_name = write_lspec(
            tmp_path / "late", 1, "Arc", START + timedelta(hours=2), "R600", "1.0"
        )
        assert same_name.name == arc.name
        late = site.receiver.receive(same_name)
        records = {r.archive_id: r for r in site.catalog.find(FileQuery(instrument="LSPEC"))}
    finally:
        site.close()
    first = records[results[0].archive_id]
    assert first.archive_id == "LS20261122_01000000.fits"
    assert first.exptime == 10.0  # ITIME * COADDS
    assert first.frame_type == "ARC" and records[results[1].archive_id].frame_type == "FLAT"
    assert first.object == "arc" and first.filter is None
    assert first.night == date(2026, 11, 21)
    assert first.start == START and first.stop == START + timedelta(seconds=10)
    assert first.keywords["GRATNAME"] == "R600"
    assert late.outcome is Outcome.CACHED and late.same_name_as == first.archive_id
    assert records[late.archive_id].superseded_by is None and first.superseded_by is None


@pytest.fixture
def night(tmp_path: Path) -> Iterator[tuple[list[Path], list[Path]]]:
    from obsflow.sim.simulate import simulate_night

    camera = [f.path for f in simulate_night(tmp_path / "ofcam", 6, seed=3, shape=(32, 32))]
    spectra = write_night(tmp_path / "lspec")
    yield camera, spectra


@pytest.mark.slow
def test_a_site_with_two_instruments_archives_both_and_reduces_the_spectrograph_in_the_daemon(
    two_instruments: Settings, night: tuple[list[Path], list[Path]]
) -> None:
    settings = two_instruments
    camera, spectra = night
    with daemon(settings) as proc:
        wait_for(lambda: running(settings, proc), 60, "the daemon to start")
        for path in camera:
            shutil.copy(path, settings.incoming / f".{path.name}.part")
            os.replace(settings.incoming / f".{path.name}.part", settings.incoming / path.name)
        for path in spectra:
            target = settings.incoming / "lspec" / path.name
            shutil.copy(path, target.with_name(f".{path.name}.part"))
            os.replace(target.with_name(f".{path.name}.part"), target)

        def done() -> bool:
            site = open_site(settings)
            try:
                files = site.catalog.find(FileQuery(state=FileState.ARCHIVED))
            finally:
                site.close()
            made = [f for f in files if f.product in ("lspec_arc", "lspec_flat")]
            return len(files) == len(camera) + len(spectra) + 4 and len(made) == 4

        wait_for(done, 180, "both instruments archived and LSPEC's arcs and flats made")
        assert proc.poll() is None
    site = open_site(settings)
    try:
        files = site.catalog.find(FileQuery())
    finally:
        site.close()
    by_product: dict[str, list[str]] = {}
    for record in files:
        assert record.state is FileState.ARCHIVED, record
        by_product.setdefault(record.product or "", []).append(record.archive_id or "")
    assert len(by_product["ofcam_raw"]) == len(camera)
    assert len(by_product["lspec_raw"]) == len(spectra)
    expected = {
        f"LS.20261121.{kind}_{grating}_{slit}.fits"
        for kind in ("arc", "flat")
        for grating, slit in SETUPS
    }
    assert set(by_product["lspec_arc"] + by_product["lspec_flat"]) == expected
    arcs = [r for r in files if r.product == "lspec_arc"]
    assert {r.keywords["NCOMBINE"] for r in arcs} == {3}
    assert {r.keywords["GRATNAME"] for r in arcs} == {"R600", "B300"}


def test_the_longslit_tool_combines_and_names_a_frame_of_another_grating(tmp_path: Path) -> None:
    arcs = [write_lspec(tmp_path, n, "Arc", START, "R600", "1.0") for n in (1, 2, 3)]
    out = tmp_path / "out" / "ls_20261121_flat_R600_1.0.fits"
    tool = [sys.executable, "-m", "obsflow.tools.longslit", "combine", "--kind", "flat"]
    done = subprocess.run(
        [*tool, "--out", str(out), *map(str, arcs)], check=False, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    with fits.open(out) as hdul:
        header, data = hdul[0].header, hdul[0].data
        assert abs(float(np.median(data)) - 1.0) < 1e-6
    assert header["NCOMBINE"] == 3 and header["OBSTYPE"] == "MASTERFLAT"
    assert header["DATE-BEG"] == "2026-11-22T01:00:00.000"
    assert header["DATE-END"] == "2026-11-22T01:00:10.000"
    other = write_lspec(tmp_path / "b", 4, "Arc", START, "B300", "1.0")
    bad = tmp_path / "bad.fits"
    failed = subprocess.run(
        [*tool, "--out", str(bad), *map(str, arcs), str(other)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and str(other) in failed.stderr and "GRATNAME" in failed.stderr
    assert not bad.exists()

"""The science tools on a simulated night: real subprocesses of the CLIs, and the science checked
against the simulator's truth (its injected stars, its flat pattern, its noise model).

One night (46 frames of 384 x 384: 5 biases, 3 dome flats per filter, then science frames
cycling B, V, R) is simulated once for the module. The masters are made by the CLIs; the first
nine science frames are calibrated, cleaned of cosmic rays and measured by direct calls, as a
pipeline would, and each subcommand's CLI is run on one of them.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits
from astropy.stats import mad_std, sigma_clip, sigma_clipped_stats
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from obsflow.receipt import header as fitsheader
from obsflow.receipt.metadata import extract
from obsflow.registry import load_registry
from obsflow.sim.simulate import _flat_pattern, simulate_night
from obsflow.tools import BadInputError, ccd, check_same
from obsflow.tools.ccd import calibrate, clean_cosmics, find_cosmics
from obsflow.tools.sources import SATURATED, detect, merge, read_catalog

FloatArray = npt.NDArray[np.float64]

SEED, FRAMES, SHAPE = 5, 46, (384, 384)
NIGHT = "20261121"  # the local evening of the simulated night (frames are dated 2026-11-22 UTC)
SCIENCE = 9  # science frames reduced: three per filter, exposures of 30 to 300 s
REGISTRY = Path(__file__).resolve().parent.parent / "examples" / "registry"
RECEIPT_KEYS = (
    *("DATE-OBS", "DATE-END", "EXPTIME", "IMAGETYP", "INSTRUME", "TELESCOP", "PROGID"),
    *("OBJECT", "OBSERVER", "GAIN", "RDNOISE"),
)


def tool(module: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m obsflow.tools.MODULE ARGS`` as a pipeline step would."""
    return subprocess.run(
        [sys.executable, "-m", f"obsflow.tools.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning either


def wcs_of(header: fits.Header) -> WCS:
    with warnings.catch_warnings():  # astropy notes that it derived MJD-END from DATE-END
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


@dataclass(frozen=True)
class Frame:
    """A raw science frame and what the tools made of it."""

    raw: Path
    band: str
    exptime: float
    calibrated: Path  # calibrate
    cleaned: Path  # calibrate, then cosmics
    catalog: Path  # detect on the cleaned frame, at 5 sigma


@dataclass(frozen=True)
class Night:
    root: Path
    biases: list[Path]
    flats: dict[str, list[Path]]
    master_bias: Path
    master_flats: dict[str, Path]
    science: list[Frame]
    stars: Table

    def frames(self, band: str) -> list[Frame]:
        return [f for f in self.science if f.band == band]


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Night:
    root = tmp_path_factory.mktemp("tools")
    raw = simulate_night(root / "raw", FRAMES, seed=SEED, shape=SHAPE)
    biases = [f.path for f in raw if f.frame_type == "BIAS"]
    flats = {b: [f.path for f in raw if f.frame_type == "FLAT" and f.filter == b] for b in "BVR"}
    assert len(biases) >= 5 and all(len(paths) >= 3 for paths in flats.values())
    master_bias = root / "masters" / f"ofc_{NIGHT}_mbias.fits"
    succeeded(tool("ccd", "combine", "--kind", "bias", "--out", master_bias, *biases))
    master_flats = {b: root / "masters" / f"ofc_{NIGHT}_mflat_{b}.fits" for b in "BVR"}
    for band, path in master_flats.items():
        flat: list[str | Path] = ["combine", "--kind", "flat", "--bias", master_bias, "--out", path]
        flat += flats[band]
        succeeded(tool("ccd", *flat))
    science = []
    for frame in [f for f in raw if f.frame_type == "OBJECT"][:SCIENCE]:
        assert frame.filter is not None
        name = frame.path.stem
        calibrated = root / "reduced" / f"{name}_cal.fits"
        calibrate(frame.path, master_bias, master_flats[frame.filter], calibrated)
        cleaned = root / "cleaned" / f"{name}_cal.fits"
        cleaned.parent.mkdir(exist_ok=True)
        shutil.copyfile(calibrated, cleaned)
        clean_cosmics(cleaned)
        catalog = root / "catalogs" / f"{name}_src.fits"
        detect(cleaned, 5.0, catalog)
        science.append(Frame(frame.path, frame.filter, frame.exptime, calibrated, cleaned, catalog))
    stars = Table.read(root / "raw" / "injected_stars.ecsv")
    return Night(root, biases, flats, master_bias, master_flats, science, stars)


def image(path: Path) -> tuple[FloatArray, fits.Header]:
    with fits.open(path) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float64), hdul[0].header.copy()


# ------------------------------------------------------------------ masters


def test_master_bias_keeps_the_column_pattern_and_averages_the_read_noise(night: Night) -> None:
    master, header = image(night.master_bias)
    single, raw_header = image(night.biases[0])
    assert fits.getval(night.master_bias, "BITPIX") == -32
    assert header["IMAGETYP"] == "MASTERBIAS" and header["NCOMBINE"] == len(night.biases)
    assert header["EXPTIME"] == 0.0
    assert abs(np.median(master) - 1000.0) < 2.0  # the simulator's bias level, ±0.3 ADU drift
    # the fixed column pattern (0.7 ADU rms) is in the master: its column means follow a bias's
    columns, single_columns = master.mean(axis=0), single.mean(axis=0)
    assert np.corrcoef(columns, single_columns)[0, 1] > 0.9
    # and the read noise per pixel drops like a median of n frames: 1.25 sigma / sqrt(n)
    noise = mad_std(master - columns)
    read_noise = raw_header["RDNOISE"] / raw_header["GAIN"]
    expected = 1.2533 * read_noise / math.sqrt(len(night.biases))
    assert 0.8 * expected < noise < 1.2 * expected, (noise, expected)


@pytest.mark.parametrize("band", ["B", "V", "R"])
def test_master_flat_is_the_true_sensitivity_normalised_to_one(night: Night, band: str) -> None:
    master, header = image(night.master_flats[band])
    assert header["IMAGETYP"] == "MASTERFLAT" and header["FILTER"] == band
    assert header["NCOMBINE"] == len(night.flats[band])
    assert np.median(master) == pytest.approx(1.0, abs=1e-6)
    truth = _flat_pattern(SEED, SHAPE, band)  # the simulator's pattern, median 1
    ratio = master / truth
    # what is left is the photon noise of the flats: ~30000 e- a pixel and flat, median of 3
    assert mad_std(ratio) < 1.25 * 1.2 / math.sqrt(30_000 * len(night.flats[band]))
    assert abs(np.median(ratio) - 1.0) < 1e-3


# ------------------------------------------------------------------ calibrate


def box_levels(data: FloatArray, box: int = 32) -> tuple[FloatArray, FloatArray]:
    """The sigma-clipped median and the MAD-std of each ``box`` x ``box`` block of ``data``."""
    ny, nx = data.shape
    grid = data[: ny // box * box, : nx // box * box].reshape(ny // box, box, nx // box, box)
    blocks = grid.transpose(0, 2, 1, 3).reshape(-1, box * box)
    clipped = sigma_clip(blocks, sigma=3.0, maxiters=5, axis=1)
    return np.nanmedian(clipped.filled(np.nan), axis=1), mad_std(blocks, axis=1)


def flatness(data: FloatArray, box: int = 32) -> float:
    """The scatter of the background levels of large boxes across the frame, in units of the
    noise of one box's level (the noise of a median of box**2 pixels, 1.25 sigma / box)."""
    levels, noise = box_levels(data, box)
    expected = 1.2533 * float(np.median(noise)) / box
    return float(mad_std(levels)) / expected  # MAD: robust to a box holding a bright star


def test_calibrated_background_is_flat_within_the_noise(night: Night) -> None:
    ratios = {f.calibrated.name: flatness(image(f.calibrated)[0]) for f in night.science}
    assert max(ratios.values()) < 3.0, ratios
    # and the noise is the one the detector and the sky make: sqrt(sky + RN^2) electrons
    data, header = image(night.science[0].calibrated)
    _, sky, measured = sigma_clipped_stats(data, sigma=3.0, maxiters=5)
    model = math.sqrt(sky * header["GAIN"] + header["RDNOISE"] ** 2) / header["GAIN"]
    assert measured == pytest.approx(model, rel=0.1)


def test_the_flatness_check_fails_on_the_raw_frames(night: Night) -> None:
    """The same check on the raw frames: vignetting, dust and the column pattern show."""
    ratios = [flatness(image(f.raw)[0]) for f in night.science]
    assert min(ratios) > 3.0, ratios


def test_calibrate_cli_writes_float32_adu_with_the_frame_header(night: Night) -> None:
    frame = night.science[1]
    out = night.root / "cli" / frame.calibrated.name
    bias, flat = night.master_bias, night.master_flats[frame.band]
    succeeded(tool("ccd", "calibrate", frame.raw, "--bias", bias, "--flat", flat, "--out", out))
    data, header = image(out)
    raw, raw_header = image(frame.raw)
    expected = (raw - image(bias)[0]) / image(flat)[0]
    np.testing.assert_allclose(data, expected, rtol=1e-6)
    assert fits.getval(out, "BITPIX") == -32
    for key in ("DATE-OBS", "EXPTIME", "IMAGETYP", "FILTER", "AIRMASS", "CRVAL1", "CD1_2"):
        assert header[key] == raw_header[key], key
    assert header["IMAGETYP"] == "OBJECT" and header["BUNIT"] == "adu"
    assert header["SATURATE"] < raw_header["SATURATE"] - 900  # the bias is gone
    history = [str(h) for h in header["HISTORY"]]
    assert [h for h in history if h.startswith("input:")] == [
        f"input: {p.name}" for p in (frame.raw, bias, flat)
    ]
    assert any(h.startswith("obsflow.tools.ccd calibrate") for h in history)
    assert not list(out.parent.glob(".*.part"))


def test_the_same_inputs_give_the_same_bytes(night: Night, tmp_path: Path) -> None:
    """No time stamp in the output: receipt takes a re-run's output for a duplicate."""
    frame = night.science[0]
    outs = [tmp_path / "one" / "cal.fits", tmp_path / "two" / "cal.fits"]
    for out in outs:
        calibrate(frame.raw, night.master_bias, night.master_flats[frame.band], out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_bytes() == frame.calibrated.read_bytes()


# ------------------------------------------------------------------ cosmics


def hot_pixels(data: FloatArray, sigma: float) -> int:
    """Pixels standing more than 5 sigma above every one of their 8 neighbours."""
    padded = np.pad(data, 1, mode="edge")
    ny, nx = data.shape
    neighbours = [
        padded[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if dy or dx
    ]
    return int(np.sum(data - np.max(neighbours, axis=0) > 5 * sigma))


def test_cosmics_cli_cleans_a_long_exposure_in_place(night: Night) -> None:
    frame = max(night.science, key=lambda f: f.exptime)
    assert frame.exptime > 30
    path = night.root / "cli" / "cosmics" / frame.calibrated.name
    path.parent.mkdir(parents=True)
    shutil.copyfile(frame.calibrated, path)
    before, _ = image(path)
    succeeded(tool("ccd", "cosmics", path))
    after, header = image(path)
    assert header["NCOSMIC"] > 0 and header["NCRPIX"] >= header["NCOSMIC"]
    noise = sigma_clipped_stats(before)[2]
    assert hot_pixels(after, noise) < hot_pixels(before, noise)
    changed = before != after
    assert changed.sum() == header["NCRPIX"]
    # the stars are left alone: no pixel near an injected star brighter than 19 is touched
    x, y = wcs_of(header).all_world2pix(night.stars["ra"], night.stars["dec"], 0)
    bright = np.asarray(night.stars[f"mag_{frame.band}"]) < 19
    for xs, ys in zip(x[bright], y[bright], strict=True):
        j, i = round(float(xs)), round(float(ys))
        assert not changed[max(0, i - 3) : i + 4, max(0, j - 3) : j + 4].any(), (xs, ys)
    assert _history(path)[-2] == f"input: {path.name}"  # then the tool


def test_find_cosmics_finds_more_in_longer_exposures(night: Night) -> None:
    counts: dict[float, int] = {}
    for frame in night.science:
        data, header = image(frame.calibrated)
        found = find_cosmics(
            data, gain=header["GAIN"], rdnoise=header["RDNOISE"], saturate=header["SATURATE"]
        )
        counts[frame.exptime] = counts.get(frame.exptime, 0) + found.count
    assert counts[300.0] > counts[30.0]


def test_find_cosmics_in_strips_finds_what_the_whole_frame_does(night: Night) -> None:
    # a tall frame, five long exposures one above the other, with cosmic rays on and across
    # the rows where the strips of three threads meet (640, 1280) and a hole of no data there
    frame = max(night.science, key=lambda f: f.exptime)
    data, header = image(frame.calibrated)
    tall = np.concatenate([data] * 5)
    sky = float(np.median(data))
    for edge in (640, 1280):
        tall[edge - 4 : edge + 4, 50] += 2000.0  # a track across the edge
        tall[edge - 1, 120] += 1500.0  # single hits on either side of it
        tall[edge, 200] += 1500.0
        tall[edge - 2 : edge + 2, 300:304] = np.nan
    noise = {"gain": header["GAIN"], "rdnoise": header["RDNOISE"], "saturate": header["SATURATE"]}
    whole = find_cosmics(tall, **noise, threads=1)
    assert whole.mask[636:644, 50].all() and whole.mask[639, 120] and whole.mask[640, 200]
    for threads in (2, 3):
        strips = find_cosmics(tall, **noise, threads=threads)
        assert np.array_equal(strips.mask, whole.mask), threads
        assert np.array_equal(strips.cleaned, whole.cleaned, equal_nan=True), threads
        assert (strips.count, strips.sky) == (whole.count, whole.sky)
    assert whole.sky == pytest.approx(sky, rel=0.05)


# ------------------------------------------------------------------ detect


@dataclass(frozen=True)
class Truth:
    """The injected stars in one frame: pixel position, flux [ADU] in the tool's aperture and
    the S/N of that flux."""

    id: npt.NDArray[np.int64]
    x: FloatArray
    y: FloatArray
    flux: FloatArray
    snr: FloatArray


def truth_in(frame: Frame, stars: Table, margin: float = 5.0) -> Truth:
    """The stars inside ``frame`` (``margin`` px from its edges) and the S/N the tool's aperture
    should give each, computed from the magnitude as the simulator makes its flux."""
    data, header = image(frame.cleaned)
    catalog = read_catalog(frame.catalog)
    gain, rdnoise, band = header["GAIN"], header["RDNOISE"], frame.band
    x, y = wcs_of(header).all_world2pix(stars["ra"], stars["dec"], 0)
    mag = np.asarray(stars[f"mag_{band}"], dtype=np.float64)
    zeropoint, extinction = stars.meta["zeropoint"][band], stars.meta["extinction"][band]
    electrons = 10 ** (-0.4 * (mag - zeropoint + extinction * header["AIRMASS"])) * frame.exptime
    sigma = header["SIMFWHM"] / (2 * math.sqrt(2 * math.log(2)))
    radius = catalog.header["APRAD"]
    inside = electrons * (1 - math.exp(-(radius**2) / (2 * sigma**2)))
    sky = sigma_clipped_stats(data, sigma=3.0, maxiters=5)[1] * gain  # e- per pixel
    snr = inside / np.sqrt(inside + math.pi * radius**2 * (sky + rdnoise**2))
    ny, nx = data.shape
    keep = (x >= margin) & (x <= nx - 1 - margin) & (y >= margin) & (y <= ny - 1 - margin)
    ids = np.asarray(stars["id"])
    return Truth(ids[keep], x[keep], y[keep], inside[keep] / gain, snr[keep])


def nearest(truth: Truth, table: Table) -> tuple[FloatArray, npt.NDArray[np.intp]]:
    """For each true star, the distance [px] to the nearest detection and its row."""
    dx = truth.x[:, None] - np.asarray(table["x"])[None, :]
    dy = truth.y[:, None] - np.asarray(table["y"])[None, :]
    distance = np.hypot(dx, dy)
    rows = distance.argmin(axis=1)
    return distance[np.arange(len(rows)), rows], rows


def test_detect_recovers_the_injected_stars(night: Night) -> None:
    errors, found, expected_snr, flux_ratio, noise_ratio = [], [], [], [], []
    for frame in night.science:
        truth = truth_in(frame, night.stars)
        table = read_catalog(frame.catalog).table
        distance, rows = nearest(truth, table)
        errors.append(distance)
        found.append(distance < 1.0)
        expected_snr.append(truth.snr)
        # photometry of clean, well-exposed stars: the flux in the aperture, and its error
        clean = (truth.snr > 30) & (distance < 1.0) & (np.asarray(table["flags"])[rows] == 0)
        flux_ratio.append(np.asarray(table["flux"])[rows][clean] / truth.flux[clean])
        noise_ratio.append(
            np.asarray(table["flux_err"])[rows][clean] / (truth.flux / truth.snr)[clean]
        )
    error, hit, snr = np.concatenate(errors), np.concatenate(found), np.concatenate(expected_snr)
    significant = snr >= 10
    assert significant.sum() >= 100  # enough stars for a fraction to mean something
    recovered = hit[significant].mean()
    assert recovered >= 0.9, f"{recovered:.1%} of {significant.sum()} stars with S/N >= 10"
    # positions: found means within 1 px; most are far better than that
    assert np.median(error[significant & hit]) < 0.15
    assert np.percentile(error[significant & hit], 90) < 0.5
    flux, noise = np.median(np.concatenate(flux_ratio)), np.median(np.concatenate(noise_ratio))
    assert abs(flux - 1.0) < 0.02, flux  # the flat field and the aperture lose nothing
    assert abs(noise - 1.0) < 0.1, noise  # flux_err is the real noise


def test_detect_finds_few_sources_that_are_not_stars(night: Night) -> None:
    spurious, total = 0, 0
    for frame in night.science:
        truth = truth_in(frame, night.stars, margin=-3.0)
        table = read_catalog(frame.catalog).table
        strong = table[table["snr"] >= 10]
        dx = np.asarray(strong["x"])[:, None] - truth.x[None, :]
        dy = np.asarray(strong["y"])[:, None] - truth.y[None, :]
        spurious += int(np.sum(np.hypot(dx, dy).min(axis=1) > 2.0))
        total += len(strong)
    assert spurious <= 0.05 * total, (spurious, total)


def test_detect_cli_writes_a_catalog_table_in_hdu_1(night: Night) -> None:
    frame = max(night.science, key=lambda f: f.exptime)  # 300 s in B: saturated stars
    out = night.root / "cli" / frame.catalog.name
    succeeded(tool("sources", "detect", frame.cleaned, "--threshold", "5", "--out", out))
    with fits.open(out) as hdul:
        assert len(hdul) == 2 and hdul[0].data is None
        table = Table.read(hdul[1])
        header = hdul[0].header
    assert table.colnames == ["x", "y", "flux", "flux_err", "snr", "fwhm", "ra", "dec", "flags"]
    assert str(table["ra"].unit) == "deg" and str(table["x"].unit) == "pix"
    assert header["IMAGETYP"] == "CATALOG" and header["NSOURCES"] == len(table) > 10
    assert header["FWHM"] == pytest.approx(fits.getval(frame.raw, "SIMFWHM"), rel=0.1)
    # the same as the direct call, and ra/dec are the WCS of x/y (0-based)
    direct = read_catalog(frame.catalog).table
    np.testing.assert_allclose(table["x"], direct["x"])
    ra, dec = wcs_of(image(frame.cleaned)[1]).all_pix2world(table["x"], table["y"], 0)
    np.testing.assert_allclose(table["ra"], ra, atol=1e-9)
    np.testing.assert_allclose(table["dec"], dec, atol=1e-9)


def test_detect_flags_the_sources_that_reach_saturate(night: Night, tmp_path: Path) -> None:
    frame = max(night.science, key=lambda f: f.exptime)
    copy = tmp_path / frame.cleaned.name
    shutil.copyfile(frame.cleaned, copy)
    data, _ = image(copy)
    fits.setval(copy, "SATURATE", value=float(np.percentile(data, 99.9)))  # a few star cores
    detect(copy, 5.0, tmp_path / "cat.fits")
    table = read_catalog(tmp_path / "cat.fits").table
    saturated = (np.asarray(table["flags"]) & SATURATED) != 0
    assert 0 < saturated.sum() < len(table)
    flux = np.asarray(table["flux"])
    assert flux[saturated].min() > np.median(flux[~saturated])


# ------------------------------------------------------------------ merge


def test_merge_cli_lists_each_star_once_with_every_observation(night: Night) -> None:
    frames = night.frames("V")
    out = night.root / "merged" / f"ofc_{NIGHT}_ngc1234_cat.fits"
    succeeded(tool("sources", "merge", "--out", out, *(f.catalog for f in frames)))
    merged = read_catalog(out)
    table = merged.table
    assert table.colnames == ["ra", "dec", "flux", "flux_err", "snr", "nobs"]
    assert merged.header["NCOMBINE"] == len(frames)
    assert merged.header["EXPTIME"] == sum(f.exptime for f in frames)
    truths = [truth_in(frame, night.stars, margin=6.0) for frame in frames]
    # bright: an expected S/N of 15 or more in every frame (all of those are found: see above)
    bright = set.intersection(*({int(i) for i in t.id[t.snr >= 15]} for t in truths))
    assert len(bright) >= 5
    ra, dec = np.asarray(table["ra"]), np.asarray(table["dec"])
    for star in night.stars[np.isin(night.stars["id"], sorted(bright))]:
        cos_dec = math.cos(math.radians(star["dec"]))
        arcsec = 3600 * np.hypot((ra - star["ra"]) * cos_dec, dec - star["dec"])
        near = np.flatnonzero(arcsec < 2.0)
        assert len(near) == 1, (star["id"], arcsec[near])
        assert table["nobs"][near[0]] == len(frames)
        assert arcsec[near[0]] < 0.3  # one pixel is 0.3 arcsec


# ------------------------------------------------------------------ bad input


def _bad_cases(night: Night) -> dict[str, tuple[list[str | Path], Path]]:
    """Each bad command line and the file its message must name."""
    work = night.root / "bad"
    work.mkdir(exist_ok=True)
    missing = work / "ofc_20261122_9999.fits"
    text = work / "notes.fits"
    text.write_text("not a FITS file\n" * 100)
    other = work / "other_field_cat.fits"
    shutil.copyfile(night.science[0].catalog, other)
    fits.setval(other, "OBJECT", value="M 31")
    b, v = night.flats["B"], night.flats["V"]
    frame = night.science[0]  # a B frame
    return {
        "missing frame": (["ccd", "calibrate", missing, "--bias", night.master_bias,
                           "--flat", night.master_flats["B"]], missing),
        "not FITS": (["sources", "detect", text, "--threshold", "5"], text),
        "flat of another filter in a combine": (
            ["ccd", "combine", "--kind", "flat", "--bias", night.master_bias, b[0], v[0], b[1]],
            v[0],
        ),
        "flat of another filter for a frame": (
            ["ccd", "calibrate", frame.raw, "--bias", night.master_bias,
             "--flat", night.master_flats["V"]],
            night.master_flats["V"],
        ),
        "catalog of another field": (
            ["sources", "merge", *(f.catalog for f in night.frames("B")), other], other
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "missing frame",
        "not FITS",
        "flat of another filter in a combine",
        "flat of another filter for a frame",
        "catalog of another field",
    ],
)
def test_bad_input_exits_2_naming_the_file_and_writes_nothing(night: Night, case: str) -> None:
    args, culprit = _bad_cases(night)[case]
    out = night.root / "bad" / f"out_{case.replace(' ', '_')}.fits"
    module, command, *rest = args
    result = tool(str(module), command, "--out", out, *rest)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(culprit) in lines[0], result.stderr
    assert not out.exists()
    assert not list(out.parent.glob(".*.part"))


def test_an_image_of_the_wrong_shape_is_refused_by_name(night: Night, tmp_path: Path) -> None:
    small = tmp_path / "small_bias.fits"
    data, header = image(night.master_bias)
    fits.PrimaryHDU(data[:128].astype(np.float32), header).writeto(small)
    with pytest.raises(BadInputError, match=r"small_bias\.fits: shape"):
        calibrate(night.science[0].raw, small, night.master_flats["B"], tmp_path / "out.fits")
    assert not (tmp_path / "out.fits").exists()


def test_a_truncated_file_and_a_missing_bias_are_refused(
    night: Night, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = tmp_path / "cut.fits"
    cut.write_bytes(night.science[0].raw.read_bytes()[:20_000])
    assert ccd.main(["cosmics", str(cut)]) == 2
    assert f"{cut}: truncated" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a usage error, from argparse
        ccd.main(["combine", "--kind", "flat", "--out", str(tmp_path / "f.fits"), str(cut)])
    assert exit_.value.code == 2
    assert "--kind flat needs --bias" in capsys.readouterr().err


def test_the_odd_one_out_is_named_not_the_first() -> None:
    items: list[tuple[Path, object]] = [(Path("a"), "B"), (Path("b"), "V"), (Path("c"), "V")]
    with pytest.raises(BadInputError, match=r"^a: FILTER is 'B' but the other inputs have 'V'"):
        check_same(items, "FILTER")
    check_same(items[1:], "FILTER")


# ------------------------------------------------------------------ receipt


def test_every_output_is_accepted_by_receipt_metadata(night: Night) -> None:
    """Each output, named as the example pipelines name it, is recognised by the OFCAM
    registry, read by obsflow's own header walker and mapped to metadata as receipt does."""
    registry = load_registry(REGISTRY)
    frames = night.frames("V")
    merged = night.root / "merged" / f"ofc_{NIGHT}_ngc_1234_field_cat.fits"
    succeeded(tool("sources", "merge", "--out", merged, *(f.catalog for f in frames)))
    single = frames[0].exptime  # outputs of one frame end EXPTIME after they start
    outputs = {
        night.master_bias: ("MASTERBIAS", 0.0, "NONE", None),
        night.master_flats["V"]: ("MASTERFLAT", 4.0, "V", None),
        frames[0].calibrated: ("OBJECT", single, "V", single),
        frames[0].cleaned: ("OBJECT", single, "V", single),
        frames[0].catalog: ("CATALOG", single, "V", single),
        merged: ("CATALOG", sum(f.exptime for f in frames), "V", None),
    }
    for path, (kind, exptime, band, duration) in outputs.items():
        recognised = registry.recognise(path.name)
        product = recognised.product
        with path.open("rb") as fh:
            header = fitsheader.walk_hdus(fh, path.stat().st_size, name=path)[0][1]
        for key in RECEIPT_KEYS:
            assert key in header, f"{path.name}: {key}"
        meta = extract(header, product, registry.instrument_of(product), recognised.groups, path)
        start = datetime.fromisoformat(str(header["DATE-OBS"])).replace(tzinfo=UTC)
        end = datetime.fromisoformat(str(header["DATE-END"])).replace(tzinfo=UTC)
        assert (meta.start, meta.exptime, meta.frame_type) == (start, exptime, kind), path.name
        assert meta.stop == end >= start, path.name
        if duration is not None:
            assert end == start + timedelta(seconds=duration), path.name
        assert meta.night == date(2026, 11, 21)
        assert meta.program == "2026B-U017" and meta.telescope == "OBSFLOW 1.0m"
        assert meta.filter == band and meta.object is not None
        history = _history(path)
        assert any(h.startswith("input: ") for h in history), path.name
        assert any(h.startswith("obsflow.tools.") for h in history), path.name


def _history(path: Path) -> Sequence[str]:
    return [str(card) for card in fits.getheader(path).get("HISTORY", [])]


def test_merged_catalog_spans_the_first_start_to_the_last_end(night: Night) -> None:
    frames = night.frames("R")
    out = night.root / "merged" / "r.fits"
    merge([f.catalog for f in frames], out)
    header = fits.getheader(out)
    starts = [fits.getval(f.raw, "DATE-OBS") for f in frames]
    ends = [
        datetime.fromisoformat(start) + timedelta(seconds=f.exptime)
        for start, f in zip(starts, frames, strict=True)
    ]
    assert header["DATE-OBS"] == min(starts)
    assert datetime.fromisoformat(header["DATE-END"]) == max(ends)
    assert header["NCOMBINE"] == len(frames) and header["FILTER"] == "R"
    assert "AIRMASS" not in header  # a quantity of single frames

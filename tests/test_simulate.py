"""Tests of obsflow.sim.simulate: real FITS files in temporary directories, read back with astropy.

The suite turns warnings into errors, so every read here also checks that astropy (and
astropy.wcs) accept the files without complaint.
"""

from __future__ import annotations

import itertools
import math
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from obsflow.sim.simulate import GAIN, RDNOISE, SimulatedFrame, simulate_night

SHAPE = (96, 128)  # rows, columns: small, and not square, to catch swapped axes
REQUIRED = [
    *("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "BZERO", "BSCALE", "DATE-OBS", "EXPTIME"),
    *("IMAGETYP", "FILTER", "OBJECT", "RA", "DEC", "INSTRUME", "TELESCOP", "PROGID", "OBSERVER"),
    *("GAIN", "RDNOISE", "FRAMENUM"),
]
WCS_KEYS = [
    *("WCSAXES", "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2"),
    *("CD1_1", "CD1_2", "CD2_1", "CD2_2", "RADESYS", "EQUINOX"),
]
NAME = re.compile(r"ofc_(\d{8})_(\d{4,})\.fits")


def read(path: Path) -> tuple[fits.Header, np.ndarray[Any, np.dtype[np.float64]]]:
    """The raw header (with BZERO/BSCALE) and the data as float, from a single-HDU file."""
    with fits.open(path) as hdul:
        assert len(hdul) == 1
        header = hdul[0].header.copy()  # copied before the data is touched: keeps BZERO
        data = np.asarray(hdul[0].data, dtype=np.float64)
        assert hdul[0].data.dtype == np.uint16
    return header, data


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> list[SimulatedFrame]:
    """A 30-frame night, shared by the read-only tests below."""
    return simulate_night(tmp_path_factory.mktemp("night"), 30, seed=3, shape=SHAPE)


def test_files_are_named_readable_and_match_the_returned_list(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"  # created if missing
    frames = simulate_night(out, 12, seed=1, shape=SHAPE, start_number=998)
    assert len(frames) == 12
    assert sorted(p.name for p in out.glob("*.fits")) == sorted(f.path.name for f in frames)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".fits")) == [
        "injected_stars.ecsv"
    ]  # no temporary files left behind
    for number, frame in enumerate(frames, start=998):
        assert frame.path.parent == out
        match = NAME.fullmatch(frame.path.name)
        assert match is not None
        assert match.group(1) == frame.date_obs.strftime("%Y%m%d")
        assert int(match.group(2)) == number
        assert frame.path.name.endswith(f"_{number:04d}.fits")
        header, data = read(frame.path)
        missing = [key for key in REQUIRED if key not in header]
        assert not missing, f"{frame.path.name} lacks {missing}"
        assert (header["BITPIX"], header["BZERO"], header["BSCALE"]) == (16, 32768, 1)
        assert (header["NAXIS"], header["NAXIS2"], header["NAXIS1"]) == (2, *SHAPE)
        assert data.shape == SHAPE
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d\d", header["DATE-OBS"])
        date_obs = datetime.fromisoformat(header["DATE-OBS"]).replace(tzinfo=UTC)
        assert frame.date_obs == date_obs and frame.date_obs.tzinfo is not None
        assert header["EXPTIME"] == frame.exptime
        assert header["IMAGETYP"] == frame.frame_type
        assert header["FILTER"] == (frame.filter or "NONE")
        assert header["FRAMENUM"] == number
        assert (header["INSTRUME"], header["TELESCOP"]) == ("OFCAM", "OBSFLOW 1.0m")
        assert re.fullmatch(r"\d{4}[AB]-\w+", header["PROGID"])
        assert header["OBJECT"] == {"BIAS": "bias", "FLAT": "domeflat"}.get(
            frame.frame_type, "NGC 1234 field"
        )
        if frame.frame_type == "OBJECT":
            assert [key for key in [*WCS_KEYS, "AIRMASS"] if key not in header] == []
            assert (header["CTYPE1"], header["CTYPE2"]) == ("RA---TAN", "DEC--TAN")
            assert header["RADESYS"] == "ICRS"
            assert 1.0 <= header["AIRMASS"] < 6.0
            assert WCS(header).pixel_to_world_values(0, 0) is not None  # no FITSFixedWarning
            assert (header["CRVAL1"], header["CRVAL2"]) == (header["RA"], header["DEC"])


def test_a_30_frame_night_has_biases_then_flats_per_filter_then_science(
    night: list[SimulatedFrame],
) -> None:
    kinds = [f.frame_type for f in night]
    assert kinds == sorted(kinds, key=["BIAS", "FLAT", "OBJECT"].index)  # in this order
    assert 1 <= kinds.count("BIAS") <= 5
    assert all(f.filter is None and f.exptime == 0 for f in night if f.frame_type == "BIAS")
    for band in "BVR":
        flats = [f for f in night if f.frame_type == "FLAT" and f.filter == band]
        assert len(flats) >= 1
        assert all(0 < f.exptime < 30 for f in flats)
        assert any(f.frame_type == "OBJECT" and f.filter == band for f in night)
    science = [f for f in night if f.frame_type == "OBJECT"]
    assert len(science) >= 15
    assert all(30 <= f.exptime <= 300 for f in science)


def test_timing_starts_at_0500_utc_the_next_day_and_strictly_increases(
    night: list[SimulatedFrame],
) -> None:
    assert night[0].date_obs == datetime(2026, 11, 22, 5, 0, tzinfo=UTC)
    for before, after in itertools.pairwise(night):
        gap = after.date_obs - before.date_obs
        assert timedelta(seconds=before.exptime + 15) < gap < timedelta(seconds=before.exptime + 30)
        assert after.date_obs.microsecond % 10_000 == 0  # hundredths of a second


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 7])
def test_tiny_nights_are_sensible(tmp_path: Path, frames: int) -> None:
    written = simulate_night(tmp_path, frames, shape=(32, 32), night=date(2027, 1, 5))
    assert len(written) == frames == len(list(tmp_path.glob("*.fits")))
    assert written[-1].frame_type == "OBJECT"
    assert ("BIAS" in [f.frame_type for f in written]) == (frames >= 3)
    assert written[0].date_obs == datetime(2027, 1, 6, 5, 0, tzinfo=UTC)
    assert fits.getheader(written[0].path)["PROGID"].startswith("2026B-")  # January: 2026B


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frames=0"):
        simulate_night(tmp_path, 0)
    with pytest.raises(ValueError, match="seed=-1"):
        simulate_night(tmp_path, 1, seed=-1)


def test_same_seed_gives_identical_bytes_and_another_seed_other_data(tmp_path: Path) -> None:
    first = simulate_night(tmp_path / "a", 8, seed=42, shape=(48, 48))
    again = simulate_night(tmp_path / "b", 8, seed=42, shape=(48, 48))
    other = simulate_night(tmp_path / "c", 8, seed=43, shape=(48, 48))
    for x, y in zip(first, again, strict=True):
        assert x.path.name == y.path.name
        assert x.path.read_bytes() == y.path.read_bytes()
    stars = [(tmp_path / d / "injected_stars.ecsv").read_bytes() for d in "abc"]
    assert stars[0] == stars[1] != stars[2]
    for x, z in zip(first, other, strict=True):
        assert not np.array_equal(read(x.path)[1], read(z.path)[1])


def test_biases_have_the_bias_level_and_the_read_noise(night: list[SimulatedFrame]) -> None:
    biases = [read(f.path)[1] for f in night if f.frame_type == "BIAS"]
    assert len(biases) >= 2
    for bias in biases:
        assert abs(np.median(bias) - 1000) < 5
        assert 0.9 * RDNOISE / GAIN < np.std(bias) < 1.2 * RDNOISE / GAIN
    # the difference of two biases cancels the fixed column pattern: pure read noise
    noise = np.std(biases[0] - biases[1]) / math.sqrt(2)
    assert noise == pytest.approx(RDNOISE / GAIN, rel=0.05)


def test_flats_are_bright_vignetted_and_share_one_pattern(night: list[SimulatedFrame]) -> None:
    flats = [read(f.path)[1] for f in night if f.frame_type == "FLAT" and f.filter == "V"]
    assert len(flats) >= 2
    for flat in flats:
        assert 18_000 < np.median(flat) - 1000 < 22_000  # ~20000 ADU above the bias
        centre, corner = np.median(flat[40:56, 56:72]), np.median(flat[:16, :16])
        assert corner < 0.97 * centre
    # the same sensitivity pattern in both: their pixel values correlate strongly
    a, b = ((f - 1000) / np.median(f - 1000) for f in flats[:2])
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.6


def test_a_bright_injected_star_is_at_its_wcs_position(tmp_path: Path) -> None:
    frames = simulate_night(tmp_path, 6, seed=7, shape=(256, 256))
    science = next(f for f in frames if f.frame_type == "OBJECT")
    header, data = read(science.path)
    stars = Table.read(tmp_path / "injected_stars.ecsv", format="ascii.ecsv")
    assert {"id", "ra", "dec", "mag_B", "mag_V", "mag_R"} <= set(stars.colnames)
    x, y = WCS(header).world_to_pixel_values(stars["ra"], stars["dec"])  # zero-based
    inside = (x > 20) & (x < 235) & (y > 20) & (y < 235)
    assert inside.sum() >= 5
    band = science.filter
    assert band is not None
    best = int(np.argmin(np.where(inside, stars[f"mag_{band}"], np.inf)))
    col, row = round(float(x[best])), round(float(y[best]))
    sky = np.median(data)
    sky_noise = 1.4826 * np.median(np.abs(data - sky))
    peak = data[row - 1 : row + 2, col - 1 : col + 2].max() - sky
    assert peak > 20 * sky_noise
    # the brightest pixel around it is within a pixel of the WCS position
    peak_row, peak_col = np.unravel_index(
        np.argmax(data[row - 5 : row + 6, col - 5 : col + 6]), (11, 11)
    )
    assert abs(int(peak_row) - 5) <= 1 and abs(int(peak_col) - 5) <= 1
    # aperture photometry (sky from an annulus) recovers the injected flux, to within the
    # flat-field pattern (a few %) and noise, given the zero point and extinction in the table
    yy, xx = np.ogrid[: data.shape[0], : data.shape[1]]
    r2 = (xx - x[best]) ** 2 + (yy - y[best]) ** 2
    local_sky = np.median(data[(r2 > 12**2) & (r2 < 20**2)])
    measured = (data[r2 < 6**2] - local_sky).sum() * GAIN / science.exptime
    zeropoint, extinction = stars.meta["zeropoint"][band], stars.meta["extinction"][band]
    magnitude = stars[f"mag_{band}"][best] + extinction * header["AIRMASS"]
    expected = 10 ** (-0.4 * (magnitude - zeropoint))
    assert measured == pytest.approx(expected, rel=0.15)


def test_a_full_size_2048_frame_can_be_generated(tmp_path: Path) -> None:
    (frame,) = simulate_night(tmp_path, 1, shape=(2048, 2048))
    header, data = read(frame.path)
    assert frame.frame_type == "OBJECT"
    assert data.shape == (2048, 2048)
    assert (header["NAXIS1"], header["NAXIS2"]) == (2048, 2048)
    assert data.max() > np.median(data) + 1000  # stars (or cosmic rays) are there

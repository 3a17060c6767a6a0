"""Simulate one night of raw frames from OFCAM, the imaging camera of the OBSFLOW 1.0m telescope.

:func:`simulate_night` writes biases, dome flats in B, V and R, and science exposures of a fixed
star field, as single-HDU unsigned 16-bit FITS files named ``ofc_YYYYMMDD_NNNN.fits``, plus the
list of injected stars as ``injected_stars.ecsv``; :func:`night_frames` yields the same frames
without writing them (:mod:`obsflow.sim.live` writes them one by one, as a detector does).  The
physics is simple but honest, so that a pipeline can reduce the frames for real and compare its
photometry with the truth:

* ADU = electrons / GAIN + bias level (~1000 ADU) + a fixed column pattern + read noise;
* electrons = Poisson((sky + stars or lamp) * flat pattern) + cosmic rays (count ∝ EXPTIME);
* stars have magnitudes above the atmosphere; they are dimmed by EXTINCTION * AIRMASS and turned
  into e-/s with ``10 ** (-0.4 * (mag - ZEROPOINT))``; the PSF is a Gaussian of FWHM ~3 px;
* the flat pattern (vignetting, pixel-to-pixel, dust donuts) is fixed by ``seed`` per filter;
* the header WCS of a science frame is the exact one used to place the stars.

Everything random comes from generators seeded by ``seed`` (and the frame number), so the same
arguments give byte-identical files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final

import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.table import Table

FloatArray = npt.NDArray[np.float64]

FIELD_NAME: Final = "NGC 1234 field"
FIELD_RA: Final = 52.0  # deg, ICRS
FIELD_DEC: Final = 19.5  # deg
PIXEL_SCALE: Final = 0.3  # arcsec per pixel
ROTATION: Final = 0.25  # deg, position angle of the detector columns
GAIN: Final = 1.5  # e-/ADU
RDNOISE: Final = 5.0  # e-
BIAS_LEVEL: Final = 1000.0  # ADU
FLAT_LEVEL: Final = 20000.0  # ADU above the bias, median of a dome flat (±5 %)
READOUT: Final = 20.0  # s, readout plus overheads between frames (plus up to 1 s)
SATURATION: Final = 65535
CR_RATE: Final = 2e-7  # cosmic rays per pixel per second of exposure
STAR_DENSITY: Final = 8.0  # stars per square arcmin, V = 13 to 21.5
SITE_LAT: Final = 19.82  # deg, the telescope site (Maunakea-like)
SITE_LON: Final = -155.47  # deg east
PROGID: Final = "U017"  # program number; the semester is derived from the night
OBSERVER: Final = "OBSFLOW simulator"
FILTERS: Final = ("B", "V", "R")


@dataclass(frozen=True)
class _Band:
    zeropoint: float  # magnitude giving 1 e-/s above the atmosphere
    extinction: float  # magnitudes per airmass
    sky: float  # sky brightness, mag per square arcsec
    flat_exptime: float  # s
    science_exptimes: tuple[float, ...]  # s, cycled
    vignetting: float  # fractional loss of illumination in the corners
    p2p: float  # rms pixel-to-pixel sensitivity variation


BANDS: Final = MappingProxyType(
    {
        "B": _Band(24.2, 0.25, 22.5, 8.0, (120.0, 300.0), 0.14, 0.012),
        "V": _Band(24.6, 0.15, 21.5, 4.0, (60.0, 30.0), 0.12, 0.010),
        "R": _Band(24.5, 0.10, 20.8, 3.0, (60.0, 120.0), 0.10, 0.008),
    }
)


@dataclass(frozen=True)
class SimulatedFrame:
    """One raw frame written by :func:`simulate_night`."""

    path: Path
    frame_type: str  # "BIAS", "FLAT" or "OBJECT"
    filter: str | None  # None for BIAS
    date_obs: datetime  # timezone-aware UTC, a whole number of hundredths of a second
    exptime: float  # seconds


def write_frame(path: Path, data: npt.NDArray[np.uint16], header: fits.Header) -> None:
    """Write ``data`` and ``header`` as a single-HDU FITS file at ``path``, atomically.

    The bytes go to ``.<name>.part`` in the same directory (a name that does not end in
    ``.fits``), are flushed to disk and then renamed over ``path``.
    """
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as fh:
            fits.PrimaryHDU(data=data, header=header).writeto(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _plan(frames: int) -> list[tuple[str, str | None, float]]:
    """The (frame type, filter, exptime) of each frame: biases, dome flats, then science."""
    n_bias = max(1, round(0.1 * frames)) if frames >= 3 else 0
    per_filter = min(10, max(1, round(frames / 15))) if frames - n_bias >= 4 else 0
    plan: list[tuple[str, str | None, float]] = [("BIAS", None, 0.0)] * n_bias
    for f in FILTERS:
        plan += [("FLAT", f, BANDS[f].flat_exptime)] * per_filter
    for i in range(frames - len(plan)):
        band = FILTERS[i % 3]
        exptimes = BANDS[band].science_exptimes
        plan.append(("OBJECT", band, exptimes[(i // 3) % len(exptimes)]))
    return plan


def _catalog(seed: int, shape: tuple[int, int]) -> Table:
    """Stars around the field centre, covering every dithered frame of this ``shape``."""
    rng = np.random.default_rng([seed, 1])
    half = np.array(shape[::-1]) * PIXEL_SCALE / 2 * 1.05 + 15.0  # arcsec, (x, y)
    n = max(10, round(STAR_DENSITY * 4 * half[0] * half[1] / 3600))
    xi, eta = (rng.uniform(-h, h, n) / 3600 for h in half)
    # dN/dm ∝ 10**(0.3 m) between m=13 and 21.5, drawn by inverting the cumulative distribution
    lo, hi = 10 ** (0.3 * 13.0), 10 ** (0.3 * 21.5)
    mag_v = np.round(np.log10(lo + rng.uniform(0, 1, n) * (hi - lo)) / 0.3, 3)
    b_v = rng.uniform(0.3, 1.4, n)
    v_r = 0.55 * b_v + rng.normal(0, 0.05, n)
    table = Table()
    table["id"] = np.arange(1, n + 1)
    table["ra"] = np.round(FIELD_RA + xi / math.cos(math.radians(FIELD_DEC)), 7)
    table["dec"] = np.round(FIELD_DEC + eta, 7)
    table["ra"].unit = table["dec"].unit = "deg"
    table["mag_B"] = np.round(mag_v + b_v, 3)
    table["mag_V"] = mag_v
    table["mag_R"] = np.round(mag_v - v_r, 3)
    table.meta.update(
        field=FIELD_NAME,
        seed=seed,
        gain=GAIN,
        rdnoise=RDNOISE,
        pixel_scale=PIXEL_SCALE,
        zeropoint={f: b.zeropoint for f, b in BANDS.items()},
        extinction={f: b.extinction for f, b in BANDS.items()},
        comments=[
            "Stars injected by obsflow.sim.simulate; mags are above the atmosphere.",
            "e-/s in filter f = 10**(-0.4*(mag_f - zeropoint[f] + extinction[f]*AIRMASS)).",
        ],
    )
    return table


def _flat_pattern(seed: int, shape: tuple[int, int], band: str) -> FloatArray:
    """Relative sensitivity (median 1) of every pixel in ``band``: vignetting, p2p, dust donuts."""
    ny, nx = shape
    y, x = np.ogrid[:ny, :nx]
    r2 = ((x - (nx - 1) / 2) / (nx / 2)) ** 2 + ((y - (ny - 1) / 2) / (ny / 2)) ** 2
    flat = 1.0 - BANDS[band].vignetting / 2 * r2
    # pixel-to-pixel: the same detector for every filter, with a filter-dependent contrast
    flat = flat * (1.0 + BANDS[band].p2p * np.random.default_rng([seed, 2]).standard_normal(shape))
    rng = np.random.default_rng([seed, 3])
    for cx, cy, radius in zip(
        rng.uniform(0, nx, 3), rng.uniform(0, ny, 3), rng.uniform(6, 15, 3), strict=True
    ):
        ys, xs = (
            slice(max(0, int(cy - radius - 3)), int(cy + radius + 4)),
            slice(max(0, int(cx - radius - 3)), int(cx + radius + 4)),
        )
        dist = np.hypot(x[:, xs] - cx, y[ys, :] - cy)
        flat[ys, xs] *= 1.0 - 0.04 * np.exp(-(((dist - radius) / 1.5) ** 2))
    result: FloatArray = flat / np.median(flat)
    return result


def _world_to_pixel(
    ra: FloatArray, dec: FloatArray, ra0: float, dec0: float, cd: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Offsets (x, y) in pixels from the reference pixel (ra0, dec0) in a TAN projection."""
    dra, dec_r, dec0_r = np.radians(ra - ra0), np.radians(dec), math.radians(dec0)
    cos_c = math.sin(dec0_r) * np.sin(dec_r) + math.cos(dec0_r) * np.cos(dec_r) * np.cos(dra)
    xi = np.cos(dec_r) * np.sin(dra) / cos_c
    eta = (
        math.cos(dec0_r) * np.sin(dec_r) - math.sin(dec0_r) * np.cos(dec_r) * np.cos(dra)
    ) / cos_c
    dx, dy = np.linalg.solve(cd, np.degrees(np.vstack([xi, eta])))
    return dx, dy


def _render_stars(
    shape: tuple[int, int], x: FloatArray, y: FloatArray, flux: FloatArray, fwhm: float
) -> FloatArray:
    """Image of Gaussian stars (total ``flux`` each at 0-based ``x``, ``y``), drawn as stamps."""
    ny, nx = shape
    r = math.ceil(2.5 * fwhm)
    keep = (x > -r) & (x < nx - 1 + r) & (y > -r) & (y < ny - 1 + r)
    x, y, flux = x[keep], y[keep], flux[keep]
    k = np.arange(-r, r + 1)
    ix = np.rint(x).astype(np.int64)[:, None, None] + k[None, None, :]  # (star, 1, column)
    iy = np.rint(y).astype(np.int64)[:, None, None] + k[None, :, None]  # (star, row, 1)
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    r2 = (ix - x[:, None, None]) ** 2 + (iy - y[:, None, None]) ** 2
    weight = np.exp(-r2 / (2 * sigma**2)) * (flux / (2 * math.pi * sigma**2))[:, None, None]
    px, py = np.broadcast_arrays(ix, iy)
    inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    index = py[inside] * nx + px[inside]
    image = np.bincount(index, weight[inside], minlength=ny * nx).reshape(shape)
    return np.asarray(image, dtype=np.float64)


def _cosmic_rays(shape: tuple[int, int], exptime: float, rng: np.random.Generator) -> FloatArray:
    """Electrons deposited by cosmic rays: short straight tracks of 1-5 pixels."""
    ny, nx = shape
    n = int(rng.poisson(CR_RATE * nx * ny * exptime))
    x0, y0 = rng.uniform(0, nx, n), rng.uniform(0, ny, n)
    length, angle = rng.integers(1, 6, n), rng.uniform(0, math.pi, n)
    t = np.arange(5)
    px = np.floor(x0[:, None] + t * np.cos(angle)[:, None]).astype(np.int64)
    py = np.floor(y0[:, None] + t * np.sin(angle)[:, None]).astype(np.int64)
    energy = rng.uniform(300, 3000, (n, 5))
    ok = (t < length[:, None]) & (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    image = np.bincount(py[ok] * nx + px[ok], energy[ok], minlength=ny * nx).reshape(shape)
    return np.asarray(image, dtype=np.float64)


def _airmass(when: datetime, ra: float, dec: float) -> float:
    """Plane-parallel airmass sec(z) at the site (altitude clipped at 10 deg)."""
    jd = when.timestamp() / 86400 + 2440587.5
    lst = 280.46061837 + 360.98564736629 * (jd - 2451545.0) + SITE_LON
    ha, lat, dec_r = math.radians(lst - ra), math.radians(SITE_LAT), math.radians(dec)
    sin_alt = math.sin(lat) * math.sin(dec_r) + math.cos(lat) * math.cos(dec_r) * math.cos(ha)
    return round(1.0 / max(sin_alt, math.sin(math.radians(10.0))), 4)


def _science(
    shape: tuple[int, int],
    catalog: Table,
    band: str,
    *,
    exptime: float,
    when: datetime,
    pointing: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[FloatArray, list[tuple[str, object, str]]]:
    """Expected electrons per pixel (before flat and noise) of a science frame, and its cards."""
    (ny, nx), bp, (ra, dec) = shape, BANDS[band], pointing
    airmass, fwhm = _airmass(when, ra, dec), round(float(rng.uniform(2.6, 3.6)), 2)
    theta, scale = math.radians(ROTATION), PIXEL_SCALE / 3600
    cd = scale * np.array([[-math.cos(theta), math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    crpix = ((nx + 1) / 2, (ny + 1) / 2)
    dx, dy = _world_to_pixel(catalog["ra"].data, catalog["dec"].data, ra, dec, cd)
    mags = np.asarray(catalog[f"mag_{band}"].data, dtype=np.float64)
    rate = 10 ** (-0.4 * (mags - bp.zeropoint + bp.extinction * airmass))  # e-/s
    stars = _render_stars(shape, dx + crpix[0] - 1, dy + crpix[1] - 1, rate * exptime, fwhm)
    sky = 10 ** (-0.4 * (bp.sky - bp.zeropoint)) * PIXEL_SCALE**2 * rng.uniform(0.9, 1.1)
    keys = "WCSAXES CTYPE1 CTYPE2 CUNIT1 CUNIT2 CRVAL1 CRVAL2 CRPIX1 CRPIX2 RADESYS EQUINOX"
    values = (2, "RA---TAN", "DEC--TAN", "deg", "deg", ra, dec, *crpix, "ICRS", 2000.0)
    cards: list[tuple[str, object, str]] = [
        ("AIRMASS", airmass, "at start of exposure"),
        ("SIMFWHM", fwhm, "[px] FWHM of the injected PSF"),
    ]
    cards += [(key, value, "") for key, value in zip(keys.split(), values, strict=True)]
    cards += [(f"CD{i + 1}_{j + 1}", float(cd[i, j]), "") for i in range(2) for j in range(2)]
    return sky * exptime + stars, cards


def simulate_night(
    out: Path,
    frames: int,
    *,
    seed: int = 0,
    night: date = date(2026, 11, 21),
    shape: tuple[int, int] = (512, 512),
    start_number: int = 1,
) -> list[SimulatedFrame]:
    """Write ``frames`` raw FITS frames of one night into ``out`` (created if missing).

    The night is the local evening date at the site (UTC-10): the first frame starts at 05:00:00
    UTC on ``night + 1 day`` and each next one after the previous exposure plus ~20 s of readout.
    About 10 % of the frames are biases (at least one when ``frames >= 3``), then come a few dome
    flats in each of B, V and R, then science exposures (30-300 s) of the star field, cycling
    through the filters with dithers of a few arcsec.  ``shape`` is (rows, columns).  Frame
    numbers run from ``start_number``; they are written with at least 4 digits.  The injected
    stars go to ``out/injected_stars.ecsv``.  Returns the frames in the order written.
    """
    _check_arguments("simulate_night", frames, seed, start_number, shape)
    out.mkdir(parents=True, exist_ok=True)
    write_injected_stars(out, seed=seed, shape=shape)
    written: list[SimulatedFrame] = []
    for frame, data, header in night_frames(
        out, frames, seed=seed, night=night, shape=shape, start_number=start_number
    ):
        write_frame(frame.path, data, header)
        written.append(frame)
    return written


def _check_arguments(
    caller: str, frames: int, seed: int, start_number: int, shape: tuple[int, int]
) -> None:
    if frames < 1 or seed < 0 or start_number < 0 or min(shape) < 16:
        raise ValueError(f"{caller}: bad arguments {frames=} {seed=} {start_number=} {shape=}")


def write_injected_stars(out: Path, *, seed: int = 0, shape: tuple[int, int] = (512, 512)) -> Path:
    """Write the stars a night with this ``seed`` and ``shape`` injects, atomically, to
    ``out/injected_stars.ecsv`` (``out`` must exist); returns that path."""
    path = out / "injected_stars.ecsv"
    _catalog(seed, shape).write(
        out / ".injected_stars.ecsv.part", format="ascii.ecsv", overwrite=True
    )
    os.replace(out / ".injected_stars.ecsv.part", path)
    return path


def night_frames(
    out: Path,
    frames: int,
    *,
    seed: int = 0,
    night: date = date(2026, 11, 21),
    shape: tuple[int, int] = (512, 512),
    start_number: int = 1,
) -> Iterator[tuple[SimulatedFrame, npt.NDArray[np.uint16], fits.Header]]:
    """The frames :func:`simulate_night` writes, one by one, without writing anything.

    Yields ``(frame, data, header)``; ``frame.path`` is where the frame belongs in ``out``
    (nothing is created there). Each frame is computed only when asked for, so a live
    simulation can write them at its own pace (:mod:`obsflow.sim.live`).
    """
    _check_arguments("night_frames", frames, seed, start_number, shape)
    return _frames(out, frames, seed, night, shape, start_number)


def _frames(
    out: Path,
    frames: int,
    seed: int,
    night: date,
    shape: tuple[int, int],
    start_number: int,
) -> Iterator[tuple[SimulatedFrame, npt.NDArray[np.uint16], fits.Header]]:
    catalog = _catalog(seed, shape)
    semester = f"{night.year}A" if 2 <= night.month <= 7 else f"{night.year - (night.month < 2)}B"
    columns = np.random.default_rng([seed, 4]).normal(0.0, 0.7, shape[1])  # ADU, bias pattern
    flats: dict[str, FloatArray] = {}  # flat pattern per filter, computed when first needed
    start = datetime.combine(night + timedelta(days=1), time(5, 0), tzinfo=UTC)
    clock = 0  # hundredths of a second since start
    for number, (kind, band, exptime) in enumerate(_plan(frames), start=start_number):
        rng = np.random.default_rng([seed, 5, number])
        when = start + timedelta(microseconds=clock * 10_000)
        clock += round((exptime + READOUT + rng.uniform(0.0, 1.0)) * 100)
        ra, dec = FIELD_RA, FIELD_DEC  # where the telescope points; dithered for science
        if kind == "OBJECT":
            ra = round(ra + rng.uniform(-5, 5) / 3600 / math.cos(math.radians(dec)), 7)
            dec = round(dec + rng.uniform(-5, 5) / 3600, 7)
        cards: list[tuple[str, object, str]] = [
            ("DATE-OBS", f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 10_000:02d}", "UTC"),
            ("MJD-OBS", round(when.timestamp() / 86400 + 40587.0, 8), "start of exposure"),
            ("EXPTIME", exptime, "[s] exposure time"),
            ("IMAGETYP", kind, "frame type"),
            ("FILTER", band or "NONE", "filter name"),
            ("OBJECT", {"BIAS": "bias", "FLAT": "domeflat"}.get(kind, FIELD_NAME), ""),
            ("RA", ra, "[deg] telescope pointing, ICRS"),
            ("DEC", dec, "[deg] telescope pointing, ICRS"),
            ("INSTRUME", "OFCAM", "instrument"),
            ("TELESCOP", "OBSFLOW 1.0m", "telescope"),
            ("PROGID", f"{semester}-{PROGID}", "program ID"),
            ("OBSERVER", OBSERVER, ""),
            ("GAIN", GAIN, "[e-/ADU]"),
            ("RDNOISE", RDNOISE, "[e-] read noise"),
            ("SATURATE", SATURATION, "[ADU] saturation level"),
            ("FRAMENUM", number, "frame number"),
        ]
        electrons = np.zeros(shape)
        if band is not None:  # a flat or a science frame: light through the optics
            if band not in flats:
                flats[band] = _flat_pattern(seed, shape, band)
            expected: float | FloatArray = FLAT_LEVEL * GAIN * rng.uniform(0.95, 1.05)
            if kind == "OBJECT":
                expected, extra = _science(
                    shape, catalog, band, exptime=exptime, when=when, pointing=(ra, dec), rng=rng
                )
                cards += extra
            electrons = rng.poisson(expected * flats[band]).astype(np.float64)
        if exptime > 0:
            electrons += _cosmic_rays(shape, exptime, rng)
        adu = electrons / GAIN + BIAS_LEVEL + rng.normal(0.0, 0.3) + columns  # bias drifts a bit
        adu += rng.normal(0.0, RDNOISE / GAIN, shape)
        data = np.clip(np.rint(adu), 0, SATURATION).astype(np.uint16)
        path = out / f"ofc_{when:%Y%m%d}_{number:04d}.fits"
        yield SimulatedFrame(path, kind, band, when, exptime), data, fits.Header(cards)

"""Source catalogs: detection on one calibrated frame, and one night's merged catalog of a field.

``python -m obsflow.tools.sources SUBCOMMAND ...``

``detect FRAME --threshold SIGMA --out CAT``
    With ``sep`` (Source Extractor as a library): the background and its RMS are mapped on a
    64 x 64 px mesh and subtracted; pixels whose matched-filtered signal (3 x 3 kernel)
    is more than SIGMA times its noise, in groups of 5 or more, are sources, deblended as
    Source Extractor does. Each source gets a windowed centroid (Source Extractor's
    XWIN/YWIN), its half-light radius r50 (FWHM = 2 r50, exact for a Gaussian PSF), and the
    flux in a circular aperture of radius APRAD = 1.5 x the frame's median FWHM (99.8 % of a
    Gaussian star) with the pixels of other sources masked; flux_err holds the background
    noise and the source's Poisson noise (GAIN). RA and Dec come from the frame's header WCS.

``merge --out NIGHTCAT CAT [CAT ...]``
    The per-frame catalogs of one field (one OBJECT) are cross-matched on the sky, in order:
    each source of the next catalog joins the nearest merged source within 1.0 arcsec (the
    nearest one only, if several claim it) or starts a new one, and merged positions are
    the running means. Each merged source has the mean position and flux, flux_err the larger
    of the scatter (std / sqrt(n)) and the propagated error (sqrt(sum err^2) / n) — only the
    propagated error for n = 1 — the best snr and nobs, the number of catalogs it is in.

A catalog is a FITS file whose primary HDU is only a header (the metadata every obsflow
product carries) and whose HDU 1 is a binary table with the columns

* ``x``, ``y`` — pixel coordinates, 0-based in the numpy convention: the centre of the first
  pixel ``data[0, 0]`` is (0, 0), x runs along columns (FITS pixel = x + 1);
* ``flux``, ``flux_err`` [ADU], ``snr`` = flux / flux_err, ``fwhm`` [px];
* ``ra``, ``dec`` [deg, ICRS]; ``flags`` — Source Extractor's bits (1 blended, 2 truncated at
  the edge, ...; 16 aperture truncated, 32 aperture has masked pixels) plus SATURATED = 256.

A merged catalog has ``ra``, ``dec``, ``flux``, ``flux_err``, ``snr``, ``nobs``.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import sep
from astropy import units as u
from astropy.coordinates import SkyCoord, match_coordinates_sky
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from scipy import ndimage

from obsflow.tools import (
    BadInputError,
    FloatArray,
    add_provenance,
    check_same,
    header_number,
    open_fits,
    read_image,
    run,
    set_date_end,
    span_cards,
    write_atomic,
)

PROG = "python -m obsflow.tools.sources"
TOOL = "obsflow.tools.sources"
SATURATED = 256  # flag bit: the source has a pixel at or above the frame's SATURATE
MATCH_RADIUS = 1.0 * u.arcsec
MESH = 64  # px, background mesh
MIN_AREA = 5  # px, smallest source
APERTURE_FWHMS = 1.5  # aperture radius in units of the frame's FWHM
FRAME_KEYS = (
    "DATE-OBS", "MJD-OBS", "EXPTIME", "OBJECT", "FILTER", "RA", "DEC", "INSTRUME", "TELESCOP",
    "PROGID", "OBSERVER", "AIRMASS", "GAIN", "RDNOISE", "FRAMENUM",
)  # fmt: skip
CATALOG_COLUMNS = ("ra", "dec", "flux", "flux_err", "snr")


@dataclass(frozen=True)
class Catalog:
    """One per-frame catalog, as read by :func:`read_catalog`."""

    path: Path
    header: fits.Header
    table: Table


def detect(frame_path: Path, threshold: float, out: Path) -> int:
    """Detect the sources of ``frame_path`` above ``threshold`` sigma; write the catalog to
    ``out`` and return the number of sources."""
    frame = read_image(frame_path)
    gain = header_number(frame.path, frame.header, "GAIN")
    wcs = _celestial_wcs(frame.path, frame.header)
    bad = ~np.isfinite(frame.data)
    data = np.where(bad, 0.0, frame.data)
    ny, nx = data.shape
    background = sep.Background(data, mask=bad, bw=min(MESH, nx), bh=min(MESH, ny), fw=3, fh=3)
    light, rms = data - background.back(), background.rms()
    objects, segmap = sep.extract(
        light, threshold, err=rms, mask=bad, minarea=MIN_AREA, segmentation_map=True
    )
    ids = np.arange(1, len(objects) + 1, dtype=np.int32)
    x, y, fwhm = _centroids(light, objects, bad)
    flags = np.asarray(objects["flag"], dtype=np.int32)
    if "SATURATE" in frame.header and len(objects):
        peak = ndimage.maximum(data, labels=segmap, index=ids)
        saturate = header_number(frame.path, frame.header, "SATURATE")
        flags |= np.where(np.asarray(peak) >= saturate, SATURATED, 0).astype(np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        peak_snr = objects["peak"] / rms[_pixel(y, ny), _pixel(x, nx)]
    seeing = _frame_fwhm(fwhm, flags, peak_snr)
    radius = APERTURE_FWHMS * seeing
    flux, flux_err, aperture_flags = sep.sum_circle(
        light, x, y, radius, err=rms, mask=bad, gain=gain, segmap=segmap, seg_id=ids, subpix=5
    )
    flags |= np.asarray(aperture_flags, dtype=np.int32)
    ra, dec = wcs.all_pix2world(x, y, 0) if len(objects) else (x, y)
    table = Table()
    table["x"], table["y"] = u.Quantity(x, u.pix), u.Quantity(y, u.pix)
    table["flux"], table["flux_err"] = u.Quantity(flux, u.adu), u.Quantity(flux_err, u.adu)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["snr"] = np.where(flux_err > 0, flux / flux_err, 0.0)
    table["fwhm"] = u.Quantity(fwhm, u.pix)
    table["ra"], table["dec"] = u.Quantity(ra, u.deg), u.Quantity(dec, u.deg)
    table["flags"] = flags
    header = fits.Header([card for card in frame.header.cards if card.keyword in FRAME_KEYS])
    set_date_end(frame.path, header)
    header["IMAGETYP"] = ("CATALOG", "a source catalog (table in HDU 1)")
    header["NSOURCES"] = (len(table), "sources detected")
    header["THRESH"] = (threshold, "[sigma] detection threshold (matched filter)")
    header["BKGLEVEL"] = (round(background.globalback, 4), "[ADU] mean background")
    header["BKGRMS"] = (round(background.globalrms, 4), "[ADU] mean background RMS")
    header["FWHM"] = (round(seeing, 3), "[px] median FWHM of the unflagged stars")
    header["APRAD"] = (round(radius, 3), "[px] radius of the photometric aperture")
    add_provenance(header, [frame.path], f"{TOOL} detect")
    _write_catalog(out, header, table)
    return len(table)


def merge(catalogs: Sequence[Path], out: Path) -> int:
    """Merge the per-frame ``catalogs`` of one field into ``out``; return its number of rows."""
    inputs = [read_catalog(path) for path in catalogs]
    check_same([(c.path, str(c.header.get("OBJECT", ""))) for c in inputs], "OBJECT")
    rows = Table(
        {
            name: np.concatenate([np.asarray(c.table[name], dtype=np.float64) for c in inputs])
            for name in CATALOG_COLUMNS
        }
    )
    sizes = [len(c.table) for c in inputs]
    owner = _cross_match(rows["ra"], rows["dec"], sizes)
    table = _merged_rows(rows, owner)
    header = span_cards(catalogs, [c.header for c in inputs])
    filters = sorted({str(c.header.get("FILTER", "")) for c in inputs} - {""})
    if len(filters) > 1:
        header["FILTER"] = ("+".join(filters), "filters of the merged catalogs")
    header["EXPTIME"] = (
        sum(header_number(c.path, c.header, "EXPTIME") for c in inputs),
        "[s] total exposure time of the merged catalogs",
    )
    header["IMAGETYP"] = ("CATALOG", "a merged source catalog (table in HDU 1)")
    if len(table):
        centre = SkyCoord(table["ra"], table["dec"], unit="deg").cartesian.mean()
        sky = SkyCoord(centre).spherical
        header["RA"] = (round(float(sky.lon.deg), 7), "[deg] centre of the sources, ICRS")
        header["DEC"] = (round(float(sky.lat.deg), 7), "[deg] centre of the sources, ICRS")
    header["NCOMBINE"] = (len(inputs), "number of catalogs merged")
    header["NSOURCES"] = (len(table), "distinct sources")
    header["MATCHRAD"] = (MATCH_RADIUS.to_value(u.arcsec), "[arcsec] cross-match radius")
    add_provenance(header, catalogs, f"{TOOL} merge")
    _write_catalog(out, header, table)
    return len(table)


def read_catalog(path: Path) -> Catalog:
    """Read a catalog written by :func:`detect` (HDU 1 a table with ra, dec, flux, ...)."""
    with open_fits(path) as hdul:
        if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
            raise BadInputError(path, "expected a source catalog: a binary table in HDU 1")
        header, table = hdul[0].header.copy(), Table.read(hdul[1])
    missing = [name for name in CATALOG_COLUMNS if name not in table.colnames]
    if missing:
        raise BadInputError(path, f"the catalog has no column(s) {', '.join(missing)}")
    for key in ("DATE-OBS", "EXPTIME"):
        if key not in header:
            raise BadInputError(path, f"header keyword {key} is missing")
    return Catalog(path, header, table)


# ------------------------------------------------------------------ detection helpers


def _celestial_wcs(path: Path, header: fits.Header) -> WCS:
    try:
        with warnings.catch_warnings():  # astropy's notes on the fixes it made (MJD-END ...)
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, naxis=2)
    except (ValueError, KeyError, MemoryError) as exc:
        raise BadInputError(path, f"the header WCS cannot be read: {exc}") from None
    if not wcs.has_celestial:
        raise BadInputError(path, "the header has no celestial WCS (CTYPE1/2 RA---/DEC--)")
    return wcs


def _pixel(coordinate: FloatArray, size: int) -> npt.NDArray[np.intp]:
    """The index of the pixel holding each ``coordinate``, kept inside ``0 .. size - 1``."""
    return np.clip(np.rint(coordinate), 0, size - 1).astype(np.intp)


def _centroids(
    light: FloatArray, objects: npt.NDArray[np.void], bad: npt.NDArray[np.bool_]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Windowed centroids (x, y) and FWHM = 2 r50 of each object."""
    x0, y0 = np.asarray(objects["x"], np.float64), np.asarray(objects["y"], np.float64)
    if not len(objects):
        return x0, y0, x0.copy()
    rmax = np.clip(6.0 * np.asarray(objects["a"], np.float64), 6.0, 40.0)
    r50, _ = sep.flux_radius(light, x0, y0, rmax, 0.5, mask=bad, subpix=5)
    sig = np.where(np.isfinite(r50) & (r50 > 0), 2.0 * r50 / 2.3548, 1.3)
    x, y, wflag = sep.winpos(light, x0, y0, sig, mask=bad)
    lost = (wflag != 0) | ~np.isfinite(x) | (np.hypot(x - x0, y - y0) > 2.0 * sig)
    x, y = np.where(lost, x0, x), np.where(lost, y0, y)
    r50, _ = sep.flux_radius(light, x, y, rmax, 0.5, mask=bad, subpix=5)
    return x, y, 2.0 * np.asarray(r50, dtype=np.float64)


def _frame_fwhm(fwhm: FloatArray, flags: npt.NDArray[np.int32], peak_snr: FloatArray) -> float:
    """The median FWHM of clean, well-measured stars (3 px if there are none)."""
    for chosen in ((flags == 0) & (peak_snr > 20), flags == 0, np.ones_like(flags, bool)):
        good = fwhm[chosen & np.isfinite(fwhm) & (fwhm > 0.5)]
        if len(good):
            return float(np.median(good))
    return 3.0


def _write_catalog(out: Path, header: fits.Header, table: Table) -> None:
    hdu = fits.table_to_hdu(table)
    hdu.name = "SOURCES"
    write_atomic(out, fits.HDUList([fits.PrimaryHDU(header=header), hdu]))


# ------------------------------------------------------------------ merging helpers


def _cross_match(ra: FloatArray, dec: FloatArray, sizes: Sequence[int]) -> npt.NDArray[np.intp]:
    """The merged source of each row: rows come catalog by catalog (``sizes``), each catalog
    is matched against the running mean positions of the sources merged so far."""
    owner = np.full(len(ra), -1, dtype=np.intp)
    vectors = SkyCoord(ra, dec, unit="deg").cartesian.xyz.value.T  # (row, 3)
    merged = 0
    start = 0
    for size in sizes:
        rows = np.arange(start, start + size)
        start += size
        if not size:
            continue
        claimed = np.full(size, -1, dtype=np.intp)
        if merged:
            sums = np.stack(
                [np.bincount(owner[: rows[0]], vectors[: rows[0], k], merged) for k in range(3)]
            )
            centres = SkyCoord(*sums, representation_type="cartesian")
            found = SkyCoord(ra[rows], dec[rows], unit="deg")
            index, distance, _ = match_coordinates_sky(found, centres)
            order = np.argsort(distance)
            near = order[distance[order] < MATCH_RADIUS]  # nearest first
            _, first = np.unique(index[near], return_index=True)  # one row per merged source
            claimed[near[first]] = index[near[first]]
        new = claimed < 0
        claimed[new] = merged + np.arange(int(new.sum()))
        merged += int(new.sum())
        owner[rows] = claimed
    return owner


def _merged_rows(rows: Table, owner: npt.NDArray[np.intp]) -> Table:
    n_sources = int(owner.max()) + 1 if len(owner) else 0
    nobs = np.bincount(owner, minlength=n_sources)
    vectors = SkyCoord(rows["ra"], rows["dec"], unit="deg").cartesian.xyz.value
    sums = [np.bincount(owner, vectors[k], n_sources) for k in range(3)]
    mean = SkyCoord(*sums, representation_type="cartesian").spherical
    flux = np.asarray(rows["flux"], dtype=np.float64)
    mean_flux = np.bincount(owner, flux, n_sources) / np.maximum(nobs, 1)
    spread = np.bincount(owner, (flux - mean_flux[owner]) ** 2, n_sources)
    with np.errstate(divide="ignore", invalid="ignore"):
        scatter = np.sqrt(spread / np.maximum(nobs - 1, 1) / nobs)
        err2 = np.asarray(rows["flux_err"], dtype=np.float64) ** 2
        propagated = np.sqrt(np.bincount(owner, err2, n_sources)) / nobs
    best = np.full(n_sources, -math.inf)
    np.maximum.at(best, owner, np.asarray(rows["snr"], dtype=np.float64))
    table = Table()
    table["ra"] = u.Quantity(mean.lon.deg, u.deg)
    table["dec"] = u.Quantity(mean.lat.deg, u.deg)
    table["flux"] = u.Quantity(mean_flux, u.adu)
    table["flux_err"] = u.Quantity(
        np.where(nobs > 1, np.fmax(scatter, propagated), propagated), u.adu
    )
    table["snr"] = best
    table["nobs"] = nobs.astype(np.int32)
    return table


# ------------------------------------------------------------------ command line


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    find = commands.add_parser("detect", help="a source catalog of one calibrated frame")
    find.add_argument("frame", type=Path, metavar="FRAME", help="a calibrated frame with a WCS")
    find.add_argument(
        "--threshold", type=_positive, required=True, metavar="SIGMA", help="in background sigmas"
    )
    find.add_argument("--out", type=Path, required=True, metavar="CAT", help="the catalog")
    join = commands.add_parser("merge", help="one night's catalog of one field")
    join.add_argument("--out", type=Path, required=True, metavar="NIGHTCAT", help="the catalog")
    join.add_argument("catalogs", type=Path, nargs="+", metavar="CAT", help="per-frame catalogs")
    return top


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of sigmas, got {text!r}")
    return value


def _handle(args: argparse.Namespace) -> None:
    if args.command == "detect":
        detect(args.frame, args.threshold, args.out)
    else:
        merge(args.catalogs, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; return the exit status."""
    return run(parser(), _handle, argv)


if __name__ == "__main__":
    raise SystemExit(main())

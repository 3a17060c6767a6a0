"""CCD reduction: master bias, master flat, calibration of a frame, cosmic-ray cleaning.

``python -m obsflow.tools.ccd SUBCOMMAND ...``; every image written is float32 in ADU.

``combine --kind bias --out OUT IN [IN ...]``
    The biases are stacked and, pixel by pixel, values further than 3 sigma from the median
    (sigma from the median absolute deviation) are rejected; the median of the rest is the
    master bias (``ccdproc.combine``). Read noise averages down and the fixed column
    pattern of the detector stays, which is what a master bias is for.

``combine --kind flat --bias MBIAS --out OUT IN [IN ...]``
    Each dome flat minus the master bias is divided by its own median, so that changes of the
    lamp between flats cancel; the scaled flats are combined like the biases and the result
    is divided by its median. The master flat (median 1.0) is the relative sensitivity of
    every pixel in one filter: vignetting, pixel-to-pixel response and dust. All flats must
    share FILTER.

``calibrate FRAME --bias MBIAS --flat MFLAT --out OUT``
    ``(frame - bias) / flat``, still in ADU: GAIN still turns it into electrons and nothing
    else is converted. The frame's header (WCS included) is kept; SATURATE becomes the lowest
    calibrated value that a saturated raw pixel can have. The flat's FILTER must be the
    frame's.

``cosmics FILE``
    L.A.Cosmic (van Dokkum 2001, PASP 113, 1420) through ``astroscrappy``: cosmic rays are
    sharp features of the Laplacian of the image that are significant against the noise
    expected in electrons (from GAIN, RDNOISE and the sky level) and sharper than the PSF.
    Their pixels are replaced by the mean of their good neighbours, in place, and the number
    of cosmic rays (groups of touching pixels) is recorded as NCOSMIC. FILE must be
    bias-subtracted (debiased or calibrated) so that its values are light. A large frame is
    cleaned in horizontal strips on ``--threads`` threads (default: the CPUs this process
    may use), each with a margin wide enough that it finds exactly what the whole frame
    would: a 2k x 2k frame takes about half the time on two cores.

Bad input (a missing or non-FITS file, a shape or FILTER that does not match) exits 2 with
one line naming the file; see :mod:`obsflow.tools`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import astroscrappy
import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.stats import mad_std, sigma_clipped_stats
from scipy import ndimage

from obsflow.tools import (
    BadInputError,
    FloatArray,
    Image,
    UsageError,
    add_provenance,
    check_same,
    header_number,
    read_image,
    run,
    set_date_end,
    span_cards,
    write_atomic,
)

PROG = "python -m obsflow.tools.ccd"
TOOL = "obsflow.tools.ccd"
SIGMA_CLIP = 3.0  # rejection threshold of the combines, in MAD-based sigmas
# L.A.Cosmic's thresholds. sigclip 4.5 (astroscrappy's default) also takes Poisson noise peaks
# of a low sky for cosmic rays: ~2 false ones per 256 x 256 frame of the simulated night, and none
# at 6, where every ray is still found (they deposit >= 300 e-, tens of sigmas).
SIGCLIP, SIGFRAC, OBJLIM = 6.0, 0.3, 5.0
NITER = 4  # L.A.Cosmic's iterations (astroscrappy's default)
# L.A.Cosmic is local: in one iteration, what it decides at a pixel depends only on pixels a few
# rows away (its Laplacian on the 2x subsampled image, the 5x5 median of its noise model, the
# 3x3 and 7x7 medians of its fine-structure image, two growths of the mask by a pixel, the 5x5
# mean that cleans), under 16 rows in all. A strip of the frame with NITER times that on each
# side of the rows it keeps finds and cleans exactly what the whole frame does there
# (tests/test_tools.py holds them equal), so a frame is cleaned in strips on several threads:
# astroscrappy releases the GIL in its C loops but has no threads of its own here (it is built
# without OpenMP).
REACH_PER_ITERATION = 16
MIN_STRIP = 512  # rows a strip keeps, at least: below that the margins cost more than they save
BIAS_KINDS = ("BIAS", "ZERO")  # IMAGETYP of the frames a combine accepts
FLAT_KINDS = ("FLAT", "DOMEFLAT", "SKYFLAT", "TWIFLAT")
SCALING = frozenset({"BSCALE", "BZERO", "BLANK"})  # the data are written as float32 instead


def combine_bias(inputs: Sequence[Path], out: Path) -> None:
    """Write the sigma-clipped median of the biases ``inputs`` to ``out`` as a master bias."""
    frames = _read_stack(inputs, kinds=BIAS_KINDS)
    master = _clipped_median([frame.data for frame in frames], unit="adu")
    header = _combined_header(frames, "MASTERBIAS", exptime=0.0, tool="combine --kind bias")
    header["BUNIT"] = ("adu", "data unit")
    write_atomic(out, fits.HDUList([fits.PrimaryHDU(master.astype(np.float32), header)]))


def combine_flat(inputs: Sequence[Path], bias: Path, out: Path) -> None:
    """Write the normalised, sigma-clipped median of the debiased, scaled flats to ``out``."""
    frames = _read_stack(inputs, kinds=FLAT_KINDS)
    check_same([(f.path, str(f.header.get("FILTER", ""))) for f in frames], "FILTER")
    master_bias = _read_calibration(bias, "MASTERBIAS", frames[0])
    scaled = []
    for frame in frames:
        light = frame.data - master_bias.data
        level = float(np.median(light))
        if not level > 0:
            raise BadInputError(frame.path, f"median {level:.1f} ADU above the bias: no light")
        scaled.append(light / level)
    master = _clipped_median(scaled, unit="")
    master /= np.median(master)
    exptime = float(np.mean([header_number(f.path, f.header, "EXPTIME") for f in frames]))
    header = _combined_header(
        frames, "MASTERFLAT", exptime=exptime, tool="combine --kind flat", extra=[bias]
    )
    header["EXPTIME"] = (exptime, "[s] mean exposure time of the flats")
    write_atomic(out, fits.HDUList([fits.PrimaryHDU(master.astype(np.float32), header)]))


def calibrate(frame_path: Path, bias: Path, flat: Path, out: Path) -> None:
    """Write ``(frame - bias) / flat`` to ``out`` (float32, ADU) with the frame's header."""
    frame = read_image(frame_path)
    master_bias = _read_calibration(bias, "MASTERBIAS", frame)
    master_flat = _read_calibration(flat, "MASTERFLAT", frame)
    want, have = frame.header.get("FILTER"), master_flat.header.get("FILTER")
    if have != want:
        raise BadInputError(flat, f"FILTER is {have!r} but {frame.path.name} has {want!r}")
    good = np.isfinite(master_flat.data) & (master_flat.data > 0)
    light = frame.data - master_bias.data
    calibrated = np.divide(light, master_flat.data, out=np.full_like(light, np.nan), where=good)
    header = _single_header(frame)
    header["BUNIT"] = ("adu", "bias-subtracted, flat-fielded")
    if "SATURATE" in header:
        raw = header_number(frame.path, header, "SATURATE")
        ceiling = (raw - master_bias.data[good]) / master_flat.data[good]
        header["SATURATE"] = (float(ceiling.min()), "[ADU] calibrated value of raw saturation")
    add_provenance(header, [frame.path, bias, flat], f"{TOOL} calibrate")
    write_atomic(out, fits.HDUList([fits.PrimaryHDU(calibrated.astype(np.float32), header)]))


def clean_cosmics(path: Path, threads: int | None = None) -> int:
    """Clean the cosmic rays of the bias-subtracted frame ``path`` in place; return how many.
    ``threads``: how many strips of the frame are cleaned at once (default: the CPUs this
    process may use)."""
    frame = read_image(path)
    gain = header_number(path, frame.header, "GAIN")
    rdnoise = header_number(path, frame.header, "RDNOISE")
    if not (gain > 0 and rdnoise >= 0):
        raise BadInputError(path, f"GAIN = {gain} and RDNOISE = {rdnoise} make no noise model")
    saturate = header_number(path, frame.header, "SATURATE", default=math.inf)
    found = find_cosmics(frame.data, gain=gain, rdnoise=rdnoise, saturate=saturate, threads=threads)
    header = _single_header(frame)
    header["NCOSMIC"] = (found.count, "cosmic rays cleaned (groups of touching pixels)")
    header["NCRPIX"] = (int(found.mask.sum()), "pixels cleaned of cosmic rays")
    header["SKYLEVEL"] = (round(found.sky, 3), "[ADU] sky level used for the noise model")
    add_provenance(header, [path], f"{TOOL} cosmics")
    write_atomic(path, fits.HDUList([fits.PrimaryHDU(found.cleaned.astype(np.float32), header)]))
    return found.count


@dataclass(frozen=True)
class Cosmics:
    """What :func:`find_cosmics` found: the cosmic-ray pixels, how many rays, the sky level
    and the image with those pixels replaced."""

    mask: npt.NDArray[np.bool_]
    count: int
    sky: float
    cleaned: FloatArray


def find_cosmics(
    data: FloatArray,
    *,
    gain: float,
    rdnoise: float,
    saturate: float,
    threads: int | None = None,
) -> Cosmics:
    """L.A.Cosmic on ``data`` (ADU above the bias; NaN = no data), with GAIN [e-/ADU],
    RDNOISE [e-] and SATURATE [ADU]; on ``threads`` strips at once (default: the CPUs this
    process may use), with the same result as the whole frame at once."""
    bad = ~np.isfinite(data)
    _, median, _ = sigma_clipped_stats(data, mask=bad, sigma=3.0, maxiters=5)
    sky = float(median) if np.isfinite(median) and median > 0 else 0.0
    filled = np.where(bad, sky, data)
    background = np.full(data.shape, sky, dtype=np.float32)  # the sky: known Poisson variance

    def strip(rows: tuple[int, int, int, int]) -> tuple[npt.NDArray[np.bool_], FloatArray]:
        keep_from, keep_to, lo, hi = rows
        crmask, cleaned = astroscrappy.detect_cosmics(
            filled[lo:hi],
            inmask=bad[lo:hi],
            inbkg=background[lo:hi],
            gain=gain,
            readnoise=rdnoise,
            satlevel=saturate * gain,  # astroscrappy compares in electrons
            sigclip=SIGCLIP,
            sigfrac=SIGFRAC,
            objlim=OBJLIM,
            niter=NITER,
            cleantype="meanmask",
        )
        keep = slice(keep_from - lo, keep_to - lo)
        return np.asarray(crmask, dtype=bool)[keep], np.asarray(cleaned, dtype=np.float64)[keep]

    strips = _strips(data.shape[0], _threads() if threads is None else threads)
    if len(strips) == 1:
        parts = [strip(strips[0])]
    else:
        with ThreadPoolExecutor(len(strips), thread_name_prefix="cosmics") as pool:
            parts = list(pool.map(strip, strips))
    mask = np.concatenate([part[0] for part in parts])
    cleaned = np.concatenate([part[1] for part in parts])
    _, count = ndimage.label(mask, structure=np.ones((3, 3)))
    # only the cosmic-ray pixels change (astroscrappy rounds every pixel through electrons)
    result = np.where(mask, cleaned, data)
    return Cosmics(mask, int(count), sky, result)


def _strips(rows: int, threads: int) -> list[tuple[int, int, int, int]]:
    """The strips of a frame of ``rows`` rows for ``threads`` threads: (first row kept, row
    after the last kept, first row read, row after the last read)."""
    margin = NITER * REACH_PER_ITERATION
    count = max(1, min(threads, rows // MIN_STRIP))
    edges = [rows * n // count for n in range(count + 1)]
    return [
        (start, end, max(0, start - margin), min(rows, end + margin))
        for start, end in itertools.pairwise(edges)
    ]


def _threads() -> int:
    """The CPUs this process may use (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


# ------------------------------------------------------------------ helpers


def _read_stack(inputs: Sequence[Path], *, kinds: tuple[str, ...]) -> list[Image]:
    """Read the frames to combine; all of one shape and of one of the IMAGETYP ``kinds``."""
    frames = [read_image(path) for path in inputs]
    for frame in frames:
        kind = str(frame.header.get("IMAGETYP", kinds[0])).strip().upper()
        if kind not in kinds:
            raise BadInputError(frame.path, f"IMAGETYP is {kind!r}, expected {kinds[0]}")
    check_same([(f.path, f.data.shape) for f in frames], "the image shape")
    return frames


def _read_calibration(path: Path, kind: str, frame: Image) -> Image:
    """Read a master calibration of IMAGETYP ``kind`` that matches ``frame``'s shape."""
    master = read_image(path)
    if master.header.get("IMAGETYP") != kind:
        raise BadInputError(path, f"IMAGETYP is {master.header.get('IMAGETYP')!r}, not {kind}")
    if master.data.shape != frame.data.shape:
        raise BadInputError(
            path, f"shape {master.data.shape} differs from {frame.path.name}'s {frame.data.shape}"
        )
    return master


def _clipped_median(images: Sequence[FloatArray], *, unit: str) -> FloatArray:
    """The pixel-wise median after rejecting values beyond SIGMA_CLIP MAD-sigmas."""
    from ccdproc import combine  # here: it takes ~0.5 s to import, and only combines need it

    combined = combine(
        [CCDData(image, unit=unit) for image in images],
        method="median",
        sigma_clip=True,
        sigma_clip_low_thresh=SIGMA_CLIP,
        sigma_clip_high_thresh=SIGMA_CLIP,
        sigma_clip_func=np.ma.median,
        sigma_clip_dev_func=mad_std,
        dtype=np.float64,
    )
    return np.asarray(combined.data, dtype=np.float64)


def _combined_header(
    frames: Sequence[Image],
    imagetyp: str,
    *,
    exptime: float,
    tool: str,
    extra: Sequence[Path] = (),
) -> fits.Header:
    paths = [frame.path for frame in frames]
    header = span_cards(paths, [frame.header for frame in frames])
    header["EXPTIME"] = (exptime, "[s]")
    header["IMAGETYP"] = (imagetyp, "frame type")
    header["NCOMBINE"] = (len(frames), "number of frames combined")
    add_provenance(header, [*paths, *extra], f"{TOOL} {tool}")
    return header


def _single_header(frame: Image) -> fits.Header:
    """The frame's header without its scaling keywords, with DATE-END."""
    header = fits.Header([card for card in frame.header.cards if card.keyword not in SCALING])
    set_date_end(frame.path, header)
    return header


# ------------------------------------------------------------------ command line


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    combine = commands.add_parser("combine", help="a master bias or master flat")
    combine.add_argument("--kind", choices=("bias", "flat"), required=True)
    combine.add_argument("--bias", type=Path, metavar="MBIAS", help="master bias (for flats)")
    combine.add_argument("--out", type=Path, required=True, help="the master")
    combine.add_argument("inputs", type=Path, nargs="+", metavar="IN", help="raw biases or flats")
    cal = commands.add_parser("calibrate", help="(frame - bias) / flat")
    cal.add_argument("frame", type=Path, metavar="FRAME", help="a raw frame")
    cal.add_argument("--bias", type=Path, required=True, metavar="MBIAS", help="master bias")
    cal.add_argument("--flat", type=Path, required=True, metavar="MFLAT", help="master flat")
    cal.add_argument("--out", type=Path, required=True, help="the calibrated frame")
    cosmics = commands.add_parser("cosmics", help="clean cosmic rays in place")
    cosmics.add_argument("file", type=Path, metavar="FILE", help="a bias-subtracted frame")
    cosmics.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="strips of the frame cleaned at once (default: the CPUs this process may use)",
    )
    return top


def _handle(args: argparse.Namespace) -> None:
    if args.command == "combine" and args.kind == "bias":
        combine_bias(args.inputs, args.out)
    elif args.command == "combine":
        if args.bias is None:
            raise UsageError("combine --kind flat needs --bias MBIAS")
        combine_flat(args.inputs, args.bias, args.out)
    elif args.command == "calibrate":
        calibrate(args.frame, args.bias, args.flat, args.out)
    else:
        clean_cosmics(args.file, args.threads)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; return the exit status."""
    return run(parser(), _handle, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Long-slit calibrations for the example spectrograph (LSPEC): combined arcs and flats.

``python -m obsflow.tools.longslit combine --kind arc|flat --out OUT IN [IN ...]``
    The frames (of one grating and slit) are stacked and the median of each pixel is
    taken (a cosmic ray in one arc does not reach the master). A flat is then divided by
    its own median, so it holds each pixel's relative response (median 1.0). The header
    is the first frame's, with DATE-BEG and DATE-END (UTC) spanning every exposure
    (DATE-OBS + UT, for ITIME x COADDS seconds), NCOMBINE and OBSTYPE ``MASTERARC`` or
    ``MASTERFLAT``, and one HISTORY card per input.

Bad input (a missing or non-FITS file, frames of other shapes, gratings or slits, a
header without its time) exits 2 with one line naming the file; see :mod:`obsflow.tools`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits

from obsflow.tools import (
    BadInputError,
    Image,
    add_provenance,
    check_same,
    header_number,
    iso,
    read_image,
    run,
    write_atomic,
)

PROG = "python -m obsflow.tools.longslit"
TOOL = "obsflow.tools.longslit"
STRUCTURAL = frozenset({"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND"})
STRUCTURAL |= {"BSCALE", "BZERO", "BLANK"}


def combine(inputs: Sequence[Path], kind: str, out: Path) -> None:
    """Write the median of ``inputs`` (normalised for a flat) to ``out``."""
    frames = [read_image(path, required=()) for path in inputs]  # no EXPTIME here
    check_same([(f.path, f.data.shape) for f in frames], "shape")
    for key in ("GRATNAME", "SLITNAME"):
        check_same([(f.path, str(f.header.get(key, "")).strip()) for f in frames], key)
    master = np.median(np.stack([f.data for f in frames]), axis=0)
    if kind == "flat":
        level = float(np.median(master))
        if not level > 0:
            raise BadInputError(frames[0].path, f"median {level:.1f}: a flat without light")
        master = master / level
    spans = [_span(f) for f in frames]
    header = fits.Header([c for c in frames[0].header.cards if c.keyword not in STRUCTURAL])
    header["DATE-BEG"] = (iso(min(s for s, _ in spans)), "UTC, start of the first exposure")
    header["DATE-END"] = (iso(max(e for _, e in spans)), "UTC, end of the last exposure")
    header["OBSTYPE"] = (f"MASTER{kind.upper()}", "frame type")
    header["NCOMBINE"] = (len(frames), "number of frames combined")
    add_provenance(header, list(inputs), f"{TOOL} combine --kind {kind}")
    write_atomic(out, fits.HDUList([fits.PrimaryHDU(master.astype(np.float32), header)]))


def _span(frame: Image) -> tuple[datetime, datetime]:
    """The exposure of ``frame``: DATE-OBS (the UT date) + UT, for ITIME x COADDS s."""
    date, clock = frame.header.get("DATE-OBS"), frame.header.get("UT")
    try:
        start = datetime.fromisoformat(f"{str(date).strip()}T{str(clock).strip()}")
    except ValueError:
        raise BadInputError(
            frame.path, f"DATE-OBS {date!r} and UT {clock!r} are not a UT date and time"
        ) from None
    seconds = header_number(frame.path, frame.header, "ITIME") * header_number(
        frame.path, frame.header, "COADDS", 1.0
    )
    start = start.replace(tzinfo=UTC)
    return start, start + timedelta(seconds=seconds)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("combine", help="a combined arc or a normalised flat")
    cmd.add_argument("--kind", choices=("arc", "flat"), required=True)
    cmd.add_argument("--out", type=Path, required=True, help="the combined frame")
    cmd.add_argument("inputs", type=Path, nargs="+", metavar="IN", help="raw arcs or flats")
    return top


def _handle(args: argparse.Namespace) -> None:
    combine(args.inputs, args.kind, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; return the exit status."""
    return run(parser(), _handle, argv)


if __name__ == "__main__":
    raise SystemExit(main())

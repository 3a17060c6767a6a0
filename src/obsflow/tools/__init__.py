"""The science tools that pipeline steps run as subprocesses, and what they share.

Each tool is an argparse command run as ``python -m obsflow.tools.MODULE SUBCOMMAND ...``:

* :mod:`obsflow.tools.ccd` — ``combine`` (master bias, master flat), ``calibrate``
  (bias and flat correction) and ``cosmics`` (cosmic-ray cleaning in place);
* :mod:`obsflow.tools.sources` — ``detect`` (a per-frame source catalog) and ``merge``
  (one night's catalog of one field).
* :mod:`obsflow.tools.longslit` — ``combine`` (the example spectrograph's combined arcs
  and normalised flats).

The contract every tool keeps, so that a pipeline can rely on it:

* exit 0 on success; exit 2 with one line on stderr naming the culprit file when an input is
  bad (missing, not FITS, wrong shape, mismatched FILTER or OBJECT), and never a traceback for
  bad input; nothing is written then;
* an output appears whole or not at all: it is written to a temporary file in the same
  directory and renamed over the target (:func:`write_atomic`);
* the primary header of every output carries what receipt requires of an OFCAM file
  (DATE-OBS, DATE-END, EXPTIME, IMAGETYP, INSTRUME, ...) and one ``HISTORY`` card per input
  file plus one naming the tool (:func:`add_provenance`).

This module holds that shared plumbing: :class:`BadInputError`, reading images and their
headers once into a frozen :class:`Image`, the header helpers and the command runner.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from obsflow import __version__
from obsflow.errors import FitsError, ObsflowError
from obsflow.receipt import header as fitsheader

FloatArray = npt.NDArray[np.float64]

EXIT_BAD_INPUT = 2
SHARED_KEYS = ("INSTRUME", "TELESCOP", "PROGID", "OBJECT", "FILTER", "OBSERVER", "GAIN", "RDNOISE")
"""Keywords an output made from several inputs copies from the first of them."""


class BadInputError(ObsflowError):
    """An input file is missing, unreadable or unfit for the step; the tool exits 2."""

    def __init__(self, path: Path | str, detail: str) -> None:
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


class UsageError(ObsflowError):
    """The command line is wrong in a way argparse cannot see; the tool exits 2 with usage."""


@dataclass(frozen=True)
class Image:
    """A 2-D image read from the primary HDU of a FITS file (data as float64)."""

    path: Path
    data: FloatArray
    header: fits.Header


def open_fits(path: Path) -> fits.HDUList:
    """Open ``path`` fully into memory; raise :class:`BadInputError` unless it is whole FITS.

    obsflow's own header walker proves first that every HDU is complete, so that a
    truncated or foreign file is refused with a clear reason before astropy reads it.
    """
    if not path.is_file():
        raise BadInputError(path, "no such file")
    try:
        with path.open("rb") as fh:
            fitsheader.walk_hdus(fh, os.fstat(fh.fileno()).st_size, name=path)
        return fits.open(path, memmap=False, lazy_load_hdus=False)
    except FitsError as exc:
        raise BadInputError(path, exc.detail) from None  # "not a FITS file: ...", "truncated: ..."
    except (OSError, ValueError) as exc:
        raise BadInputError(path, f"cannot be read as FITS: {exc}") from None


def read_image(path: Path, required: tuple[str, ...] = ("DATE-OBS", "EXPTIME")) -> Image:
    """Read the 2-D image in the primary HDU of ``path``, whose header must hold the
    ``required`` keywords (a spectrograph's arcs carry no EXPTIME: ``required=()``)."""
    with open_fits(path) as hdul:
        try:
            data, header = hdul[0].data, hdul[0].header.copy()
        except (OSError, ValueError) as exc:
            raise BadInputError(path, f"cannot read the primary HDU: {exc}") from None
    if data is None or data.ndim != 2:
        shape = "no data" if data is None else f"shape {data.shape}"
        raise BadInputError(path, f"expected a 2-D image in the primary HDU, found {shape}")
    for key in required:
        if key not in header:
            raise BadInputError(path, f"header keyword {key} is missing")
    return Image(path, np.asarray(data, dtype=np.float64), header)


def header_number(path: Path, header: fits.Header, key: str, default: float | None = None) -> float:
    """The number in ``header[key]`` (or ``default`` if absent); BadInputError otherwise."""
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInputError(path, f"header keyword {key} = {value!r} is not a number")
    return float(value)


def header_time(path: Path, header: fits.Header, key: str = "DATE-OBS") -> datetime:
    """The ISO date-time ``header[key]`` as an aware UTC datetime."""
    value = header.get(key)
    try:
        moment = datetime.fromisoformat(str(value).strip().removesuffix("Z"))
    except ValueError:
        raise BadInputError(path, f"{key} = {value!r} is not an ISO date-time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def exposure_end(path: Path, header: fits.Header) -> datetime:
    """The end of what ``header`` describes: DATE-END if it has one, else DATE-OBS + EXPTIME."""
    if "DATE-END" in header:
        return header_time(path, header, "DATE-END")
    exptime = header_number(path, header, "EXPTIME")
    return header_time(path, header) + timedelta(seconds=exptime)


def iso(moment: datetime) -> str:
    """``moment`` as a FITS date-time: ISO 8601 in UTC, milliseconds, no zone suffix."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds")


def check_same(items: Sequence[tuple[Path, object]], what: str) -> None:
    """Raise BadInputError naming the first file whose value differs from the majority's."""
    counts = Counter(value for _, value in items)
    if len(counts) <= 1:
        return
    common = max(counts, key=lambda value: (counts[value], -_first(items, value)))
    for path, value in items:
        if value != common:
            raise BadInputError(path, f"{what} is {value!r} but the other inputs have {common!r}")


def _first(items: Sequence[tuple[Path, object]], value: object) -> int:
    return next(i for i, (_, v) in enumerate(items) if v == value)


def span_cards(paths: Sequence[Path], headers: Sequence[fits.Header]) -> fits.Header:
    """DATE-OBS (earliest start) and DATE-END (latest end) over inputs, plus SHARED_KEYS."""
    starts = [header_time(p, h) for p, h in zip(paths, headers, strict=True)]
    ends = [exposure_end(p, h) for p, h in zip(paths, headers, strict=True)]
    first = headers[starts.index(min(starts))]
    header = fits.Header()
    header["DATE-OBS"] = (first["DATE-OBS"], "UTC, start of the earliest input")
    header["DATE-END"] = (iso(max(ends)), "UTC, end of the latest input")
    for key in SHARED_KEYS:
        if key in first:
            header[key] = (first[key], first.comments[key])
    return header


def set_date_end(path: Path, header: fits.Header) -> None:
    """Set DATE-END = DATE-OBS + EXPTIME on the header of a single frame, after DATE-OBS."""
    end = header_time(path, header) + timedelta(seconds=header_number(path, header, "EXPTIME"))
    header.set("DATE-END", iso(end), "UTC, end of exposure", after="DATE-OBS")


def add_provenance(header: fits.Header, inputs: Sequence[Path], tool: str) -> None:
    """One HISTORY card per input (base name), then one naming ``tool``.

    No time stamp: the same inputs give the same bytes, so that receipt sees a re-run's
    output as a duplicate rather than a new version.
    """
    for path in inputs:
        header.add_history(f"input: {path.name}")
    header.add_history(f"{tool} (obsflow {__version__})")


def write_atomic(path: Path, hdul: fits.HDUList) -> None:
    """Write ``hdul`` to ``path`` atomically: a temp file in the same directory, then rename.

    The temp file is named ``.<name>.<random>.part`` so that a watcher waiting for
    ``*.fits`` never sees a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask
        with os.fdopen(fd, "wb") as fh:
            hdul.writeto(fh, output_verify="exception")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def run(
    parser: argparse.ArgumentParser,
    handler: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, call ``handler``; exit status 0, or 2 with one line for bad input."""
    args = parser.parse_args(argv)
    try:
        handler(args)
    except UsageError as exc:
        parser.error(str(exc))  # exits 2
    except BadInputError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0

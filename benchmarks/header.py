"""How fast is obsflow.receipt.header, next to astropy and fitsio?

Writes a few hundred small FITS files with a realistic ~80-card primary header (WCS,
observing keywords, HIERARCH, COMMENT/HISTORY, a CONTINUE long string) to a temporary
directory, then times, best of several rounds:

* reading the primary header: ``parse_header`` on the first chunk read from the file (as
  receipt does), ``astropy.io.fits.getheader`` and ``fitsio.read_header`` (if installed).
  Astropy parses a card's value only when it is read, so it is timed both reading no value
  and reading every value (``parse_header`` and fitsio always parse every value);
* parsing alone, on bytes already in memory: ``parse_header`` and ``astropy Header.fromstring``;
* walking every HDU of a 5-HDU file: ``walk_hdus``, ``astropy.io.fits.open`` + ``len`` and
  ``fitsio.FITS`` (if installed).

Run: ``python benchmarks/header.py [--files 300] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from astropy.io import fits

from obsflow.receipt.header import Header, parse_header, walk_hdus


def optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


fitsio = optional_module("fitsio")  # a C library binding: timed only if installed

CHUNK = 64 * 1024  # what receipt reads first


def realistic_header(i: int, rng: np.random.Generator) -> fits.Header:
    h = fits.Header()
    h["TELESCOP"] = ("OBS-2.2m", "telescope")
    h["INSTRUME"] = ("WFCAM", "instrument")
    h["DETECTOR"] = (f"CCD{i % 8}", "detector")
    h["OBSERVER"] = "D'Arcy, O'Brien"
    h["OBJECT"] = (f"FIELD-{i:05d}", "target")
    h["IMAGETYP"] = ("science", "frame type")
    h["FILTER"] = ("r'", "filter")
    h["DATE-OBS"] = (f"2024-03-01T22:{i % 60:02d}:05.123", "UTC start")
    h["MJD-OBS"] = (60370.0 + i / 1000, "MJD start")
    h["EXPTIME"] = (float(rng.uniform(1, 600)), "[s]")
    h["AIRMASS"] = (float(rng.uniform(1, 2)), "")
    h["RA"] = (float(rng.uniform(0, 360)), "[deg]")
    h["DEC"] = (float(rng.uniform(-90, 90)), "[deg]")
    h["EQUINOX"] = 2000.0
    h["RADESYS"] = "ICRS"
    for k in (1, 2):
        h[f"CTYPE{k}"] = ("RA---TAN", "DEC--TAN")[k - 1]
        h[f"CRVAL{k}"] = float(rng.uniform(0, 90))
        h[f"CRPIX{k}"] = 1024.5
        h[f"CUNIT{k}"] = "deg"
        for j in (1, 2):
            h[f"CD{k}_{j}"] = float(rng.normal(0, 1e-4))
    for key, value in [("GAIN", 1.8), ("RDNOISE", 4.2), ("SATURATE", 65535), ("CCDTEMP", -110.5)]:
        h[key] = (value, f"{key.lower()} of the detector")
    h["CCDSUM"] = "1 1"
    h["BIASSEC"] = "[2049:2080,1:2048]"
    h["TRIMSEC"] = "[1:2048,1:2048]"
    h["SIMULATE"] = False
    h["DOMESTAT"] = "open"
    h["PROGRAM"] = ("a long programme title, " * 5, "long string: CONTINUE cards")
    for n, key in enumerate(["DET DIT", "DET NDIT", "TEL AMBI TEMP", "TEL AMBI WINDSP", "OBS ID"]):
        h[f"HIERARCH ESO {key}"] = n * 1.5 if n % 2 else n
    for n in range(20):
        h[f"SENS{n:03d}"] = (float(rng.normal()), f"housekeeping sensor {n}")
    for n in range(5):
        h.add_comment(f"comment line {n}")
        h.add_history(f"history line {n}")
    return h


def write_files(root: Path, n: int) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(1)
    singles, mefs = [], []
    for i in range(n):
        data = rng.integers(0, 1000, (64, 64)).astype(np.int16)
        path = root / f"frame{i:04d}.fits"
        fits.PrimaryHDU(data, header=realistic_header(i, rng)).writeto(path)
        singles.append(path)
        if i < n // 4:
            mef = root / f"mef{i:04d}.fits"
            exts = [fits.ImageHDU(data, name=f"CCD{k}") for k in range(4)]
            fits.HDUList([fits.PrimaryHDU(header=realistic_header(i, rng)), *exts]).writeto(mef)
            mefs.append(mef)
    return singles, mefs


def best_rate(items: Sequence[object], fn: Callable[..., object], rounds: int) -> float:
    """Items per second, best of ``rounds`` passes over all items."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def ours_from_file(path: Path) -> Header:
    with path.open("rb") as f:
        buf = f.read(CHUNK)
        while (header := parse_header(buf, name=path)) is None:
            more = f.read(CHUNK)
            if not more:
                raise RuntimeError(f"{path}: no END")
            buf += more
    return header


def astropy_values(path: Path) -> object:
    header = fits.getheader(path)
    return [header[i] for i in range(len(header))]


def astropy_values_str(text: str) -> object:
    header = fits.Header.fromstring(text)
    return [header[i] for i in range(len(header))]


def ours_walk(path: Path) -> object:
    with path.open("rb") as f:
        return walk_hdus(f, path.stat().st_size, name=path)


def astropy_walk(path: Path) -> object:
    with fits.open(path) as hdul:
        return len(hdul)


def fitsio_walk(path: Path) -> object:
    assert fitsio is not None
    with fitsio.FITS(str(path)) as f:
        return len(f)


def header_text(buf: bytes) -> str:
    header = parse_header(buf)
    assert header is not None
    return buf[: header.size].decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        singles, mefs = write_files(Path(tmp), args.files)
        first = ours_from_file(singles[0])
        ncards = len(fits.getheader(singles[0]).cards)
        print(f"{len(singles)} files, primary header: {ncards} cards, {first.size} bytes")
        heads = [p.read_bytes()[:CHUNK] for p in singles]
        head_strs = [header_text(b) for b in heads]

        def section(title: str, rows: list[tuple[str, float]]) -> None:
            print(f"\n{title}")
            base = rows[0][1]
            for n, (label, rate) in enumerate(rows):
                if n == 0:
                    ratio = "(reference)"
                elif rate <= base:
                    ratio = f"ours is {base / rate:5.2f}x faster"
                else:
                    ratio = f"{rate / base:5.2f}x FASTER than ours"
                print(f"  {label:<42} {rate:>8,.0f} /s   {ratio}")

        r = args.rounds
        rows = [
            ("obsflow parse_header (open + read 64 KiB)", best_rate(singles, ours_from_file, r)),
            ("astropy getheader (values parsed lazily)", best_rate(singles, fits.getheader, r)),
            ("astropy getheader + read every value", best_rate(singles, astropy_values, r)),
        ]
        if fitsio is not None:
            rows.append(("fitsio.read_header", best_rate(singles, fitsio.read_header, r)))
        section("primary header from a file, headers/s:", rows)

        rows = [
            ("obsflow parse_header (bytes)", best_rate(heads, parse_header, r)),
            ("astropy Header.fromstring (lazy)", best_rate(head_strs, fits.Header.fromstring, r)),
            (
                "astropy Header.fromstring + every value",
                best_rate(head_strs, astropy_values_str, r),
            ),
        ]
        section("parsing only, bytes already in memory, headers/s:", rows)

        rows = [
            ("obsflow walk_hdus", best_rate(mefs, ours_walk, r)),
            ("astropy fits.open + len", best_rate(mefs, astropy_walk, r)),
        ]
        if fitsio is not None:
            rows.append(("fitsio.FITS (scans all HDUs)", best_rate(mefs, fitsio_walk, r)))
        section(f"walking all 5 HDUs of {len(mefs)} multi-extension files, files/s:", rows)
        single_walk = best_rate(singles, ours_walk, r)
        print(f"  obsflow walk_hdus on the 1-HDU files: {single_walk:,.0f} files/s")


if __name__ == "__main__":
    main()

"""A toy pipeline step for the processing tests: the mean of FITS images.

    python stack.py --out OUT [--imagetyp T] [--fail STATUS] IN [IN ...]

Writes the mean of the inputs with the first input's header, DATE-OBS the earliest,
DATE-END the latest end, IMAGETYP T and NCOMBINE; ``--fail`` exits with STATUS after
printing a message on stderr, writing nothing.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta

import numpy as np
from astropy.io import fits


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--imagetyp", default="STACK")
    parser.add_argument("--fail", type=int, default=0)
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args()
    if args.fail:
        print(f"stack: refusing on purpose ({len(args.inputs)} inputs)", file=sys.stderr)
        return int(args.fail)
    headers, data = [], []
    for path in args.inputs:
        with fits.open(path) as hdul:
            headers.append(hdul[0].header.copy())
            data.append(np.asarray(hdul[0].data, dtype=np.float32))
    starts = [datetime.fromisoformat(h["DATE-OBS"]) for h in headers]
    exptimes = [float(h.get("EXPTIME", 0)) for h in headers]
    ends = [s + timedelta(seconds=e) for s, e in zip(starts, exptimes, strict=True)]
    header = headers[0]
    header["DATE-OBS"] = min(starts).isoformat()
    header["DATE-END"] = max(ends).isoformat()
    header["IMAGETYP"] = args.imagetyp
    header["NCOMBINE"] = len(data)
    for path in args.inputs:
        header.add_history(f"input {path.rsplit('/', 1)[-1]}")
    fits.PrimaryHDU(np.mean(data, axis=0).astype(np.float32), header).writeto(args.out)
    print(f"stack: wrote {args.out} from {len(data)} inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the corpus of hostile files beside this script, and ``expected.json``: what
receipt must answer for each (the reason code and words its detail must hold).

Each file is a frame of the example instrument (OFCAM) as a broken instrument or a
hostile sender would write it: absurd values, broken structure. ``tests/test_hostile.py``
receives every one. Run ``python tests/hostile/make.py`` after changing a case here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).parent
BLOCK: Final = 2880

GOOD: Final = {
    "SIMPLE": "T",
    "BITPIX": "16",
    "NAXIS": "0",
    "DATE-OBS": "'2026-11-22T05:00:00.00'",
    "EXPTIME": "30.0",
    "IMAGETYP": "'OBJECT'",
    "INSTRUME": "'OFCAM'",
    "OBJECT": "'M31'",
    "RA": "10.68",
    "DEC": "41.27",
    "PROGID": "'2026B-U017'",
}


def card(key: str, value: str) -> bytes:
    return f"{key:<8}= {value:>20}".ljust(80).encode("ascii")


def header(changes: Mapping[str, str | None], *, end: bool = True) -> bytes:
    values = {**GOOD, **changes}
    text = b"".join(card(k, v) for k, v in values.items() if v is not None)
    text += b"END".ljust(80) if end else b""
    return text.ljust((len(text) + BLOCK - 1) // BLOCK * BLOCK, b" ")


# name -> (bytes, reason, words of the detail)
CASES: Final[dict[str, tuple[bytes, str, list[str]]]] = {
    "ofc_20261122_9001.fits": (
        header({"DATE-OBS": "'0001-01-01T00:00:00'"}),
        "bad-metadata",
        ["DATE-OBS", "0001-01-01"],
    ),
    "ofc_20261122_9002.fits": (
        header({"DATE-OBS": "'9999-12-31T23:59:59.99'"}),
        "bad-metadata",
        ["DATE-OBS", "9999"],
    ),
    "ofc_20261122_9003.fits": (header({"EXPTIME": "1E400"}), "bad-metadata", ["EXPTIME", "inf"]),
    "ofc_20261122_9004.fits": (header({"EXPTIME": "NAN"}), "bad-metadata", ["EXPTIME", "nan"]),
    "ofc_20261122_9005.fits": (header({"EXPTIME": "-30.0"}), "bad-metadata", ["EXPTIME", "-30"]),
    "ofc_20261122_9006.fits": (header({"EXPTIME": "1.0E12"}), "bad-metadata", ["EXPTIME"]),
    "ofc_20261122_9007.fits": (header({"RA": "400.0"}), "bad-metadata", ["RA", "400"]),
    "ofc_20261122_9008.fits": (header({"DEC": "-91.5"}), "bad-metadata", ["DEC", "-91.5"]),
    "ofc_20261122_9009.fits": (header({"RA": "'nan'"}), "bad-metadata", ["RA", "nan"]),
    "ofc_20261122_9010.fits": (
        header({"DEC": "'+95:00:00'"}),
        "bad-metadata",
        ["DEC", "out of range"],
    ),
    "ofc_20261121_mbias.fits": (  # a product timed by DATE-OBS .. DATE-END
        header({"DATE-END": "'2026-11-22T04:00:00'"}),
        "bad-metadata",
        ["stop", "before the start"],
    ),
    "ofc_20261122_9011.fits": (header({}, end=False), "invalid-fits", ["no END card"]),
    "ofc_20261122_9012.fits": (
        header({"NAXIS": "2", "NAXIS1": "4096", "NAXIS2": "4096"}),
        "invalid-fits",
        ["truncated"],
    ),
    "ofc_20261122_9013.fits": (header({"BITPIX": "7"}), "invalid-fits", ["BITPIX"]),
    "ofc_20261122_9014.fits": (header({"NAXIS": "-1"}), "invalid-fits", ["NAXIS"]),
    "ofc_20261122_9015.fits": (
        header({}) + header({"SIMPLE": None, "BITPIX": None}, end=False)[:BLOCK],
        "invalid-fits",
        ["extension"],
    ),
    "ofc_20261122_9016.fits": (
        header({}).replace(b"'M31'", b"'M\x001'"),
        "invalid-fits",
        ["non-printable"],
    ),
    "ofc_20261122_9017.fits": (b"SIMPLE  = " + b"\xff" * 6000, "invalid-fits", ["non-printable"]),
}


def main() -> None:
    for path in HERE.glob("ofc_*.fits"):
        path.unlink()
    expected = {}
    for name, (data, reason, words) in CASES.items():
        (HERE / name).write_bytes(data)
        expected[name] = {"reason": reason, "detail": words}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""SODA 1.0 synchronous cutouts at ``/soda/sync?ID=...&CIRCLE=ra dec r`` (or
``POLYGON=ra1 dec1 ra2 dec2 ...``, or ``POS=CIRCLE ...`` / ``POS=POLYGON ...`` /
``POS=RANGE ra1 ra2 dec1 dec2``): the part of an image with a celestial WCS that
covers the region, as a FITS file with the WCS moved to match (astropy's
``Cutout2D``). The proprietary rule applies, as to the whole file. Errors are
``text/plain`` and start with DALI's fault names (``UsageFault``, ``NoOverlap``...).
"""

from __future__ import annotations

import io
import math
from typing import Annotated, Final

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D, NoOverlapError
from astropy.wcs import WCS
from fastapi import APIRouter, Depends, Query, Response

from obsflow.access import may_read_data
from obsflow.api.auth import Caller
from obsflow.api.params import READS_ITS_OWN_QUERY
from obsflow.api.services import Services, services
from obsflow.errors import ObsflowError
from obsflow.ivoa.datalink import DatasetError, lookup

__all__ = ["Region", "SodaError", "parse_region", "router"]

router = APIRouter(prefix="/soda", tags=[READS_ITS_OWN_QUERY], include_in_schema=False)
Svc = Annotated[Services, Depends(services)]
Text = Annotated[str | None, Query(max_length=4000)]
MAX_VERTICES: Final = 100


class SodaError(ObsflowError):
    """A cutout request obsflow cannot do (the message starts with DALI's fault)."""


Region = tuple[str, tuple[float, ...]]
"""("circle", (ra, dec, r)) or ("polygon", (ra1, dec1, ...)), degrees."""


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split())
    except ValueError:
        raise SodaError(f"UsageFault: {what} {text!r}: expected numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise SodaError(f"UsageFault: {what} {text!r}: expected finite numbers")
    return values


def _circle(values: tuple[float, ...], text: str) -> Region:
    if len(values) != 3 or values[2] <= 0 or values[2] > 180 or abs(values[1]) > 90:
        raise SodaError(f"UsageFault: CIRCLE {text!r}: expected ra dec radius (degrees)")
    return ("circle", values)


def _polygon(values: tuple[float, ...], text: str) -> Region:
    if len(values) < 6 or len(values) % 2 or len(values) > 2 * MAX_VERTICES:
        raise SodaError(f"UsageFault: POLYGON {text!r}: expected 3 to {MAX_VERTICES} ra dec pairs")
    if any(abs(d) > 90 for d in values[1::2]):
        raise SodaError(f"UsageFault: POLYGON {text!r}: a declination beyond ±90")
    return ("polygon", values)


def parse_region(circle: str | None, polygon: str | None, pos: str | None) -> Region:
    """The one region a request asks for; :class:`SodaError` if none, or several."""
    given = [p for p in (circle, polygon, pos) if p is not None]
    if len(given) != 1:
        raise SodaError("UsageFault: expected exactly one of CIRCLE, POLYGON or POS")
    if circle is not None:
        return _circle(_numbers(circle, "CIRCLE"), circle)
    if polygon is not None:
        return _polygon(_numbers(polygon, "POLYGON"), polygon)
    assert pos is not None
    shape, _, rest = pos.strip().partition(" ")
    kind = shape.upper()
    if kind == "CIRCLE":
        return _circle(_numbers(rest, "POS"), pos)
    if kind == "POLYGON":
        return _polygon(_numbers(rest, "POS"), pos)
    if kind == "RANGE":
        values = _numbers(rest, "POS")
        if len(values) != 4:
            raise SodaError(f"UsageFault: POS {pos!r}: expected RANGE ra1 ra2 dec1 dec2")
        ra1, ra2, dec1, dec2 = values
        return ("polygon", (ra1, dec1, ra2, dec1, ra2, dec2, ra1, dec2))
    raise SodaError(f"UsageFault: POS {pos!r}: expected CIRCLE, POLYGON or RANGE")


def cutout(data: bytes | str, region: Region) -> bytes:
    """The FITS cutout of the first image HDU with a celestial WCS."""
    with fits.open(data if isinstance(data, str) else io.BytesIO(data)) as hdus:
        for hdu in hdus:
            if hdu.data is None or hdu.data.ndim != 2:
                continue
            wcs = WCS(hdu.header)
            if not wcs.has_celestial:
                continue
            return _cut(hdu, wcs, region)
    raise SodaError("UsageFault: the dataset has no image with a celestial WCS")


def _cut(hdu: fits.ImageHDU | fits.PrimaryHDU, wcs: WCS, region: Region) -> bytes:
    kind, values = region
    if kind == "circle":
        ra, dec, radius = values
        centre = SkyCoord(ra * u.deg, dec * u.deg)
        size: tuple[u.Quantity, u.Quantity] | tuple[int, int] = (2 * radius * u.deg,) * 2
        position: SkyCoord | tuple[float, float] = centre
    else:
        corners = SkyCoord(list(values[0::2]), list(values[1::2]), unit="deg")
        xs, ys = wcs.world_to_pixel(corners)
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            raise SodaError("NoOverlap: the polygon does not project onto the image")
        x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
        position = ((x0 + x1) / 2, (y0 + y1) / 2)
        size = (max(1, math.ceil(y1 - y0) + 1), max(1, math.ceil(x1 - x0) + 1))
    try:
        cut = Cutout2D(hdu.data, position, size, wcs=wcs, mode="trim", copy=True)
    except (NoOverlapError, ValueError):  # ValueError: the region projects to no pixel
        raise SodaError("NoOverlap: the region does not overlap the image") from None
    header = hdu.header.copy()
    for key in ("NAXIS1", "NAXIS2"):
        header.remove(key, ignore_missing=True)
    header.update(cut.wcs.to_header())
    header["HISTORY"] = f"obsflow SODA cutout: {kind} {' '.join(f'{v:g}' for v in values)}"
    out = io.BytesIO()
    fits.PrimaryHDU(cut.data, header=header).writeto(out)
    return out.getvalue()


def _fault(message: str, status: int) -> Response:
    return Response(f"{message}\n", status, media_type="text/plain")


@router.get("/sync")
def sync(
    who: Caller,
    svc: Svc,
    ID: Annotated[str | None, Query(max_length=300)] = None,  # noqa: N803
    CIRCLE: Text = None,  # noqa: N803
    POLYGON: Text = None,  # noqa: N803
    POS: Text = None,  # noqa: N803
) -> Response:
    """A FITS cutout of the dataset ``ID`` over one region."""
    if ID is None:
        return _fault("UsageFault: ID is missing", 400)
    try:
        region = parse_region(CIRCLE, POLYGON, POS)
        record = lookup(svc, ID)
    except SodaError as exc:
        return _fault(str(exc), 400)
    except DatasetError as exc:
        return _fault(str(exc), 404)
    if not may_read_data(who, record, svc.now()):
        status = 401 if who.anonymous else 403
        return _fault("AuthorizationFault: the data are proprietary", status)
    path = svc.retriever.fetch(record.archive_id or "")
    try:
        body = cutout(str(path), region)
    except SodaError as exc:
        return _fault(str(exc), 400)
    name = (record.archive_id or "cutout").removesuffix(".fits") + "_cutout.fits"
    return Response(
        body,
        media_type="application/fits",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )

"""DataLink 1.1 at ``/datalink/links?ID=...``: what goes with a dataset.

For each ``ID`` (a publisher DID ``ivo://...?<archive ID>``, or the archive ID
itself): ``#this`` (its bytes), ``#preview`` (a PNG made from the data, kept under
the site's work directory), ``#calibration`` (the master bias and flat a pipeline
made it with: inputs of products tagged ``calibration``), ``#progenitor`` (its other
inputs), ``#derivation`` (what runs made from it), and ``#cutout``, the SODA service
(:mod:`obsflow.ivoa.soda`) described by a service descriptor. The proprietary rule
(:class:`~obsflow.access.ReadRule`) decides who gets ``#this``, ``#preview`` and
``#cutout``; others read an error message in their place (DataLink's way).

The document is a small fixed VOTable written as text: its columns are the
standard's, and the service descriptor's ``RESOURCE type="meta"`` is written the way
DataLink shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from astropy.io import fits
from astropy.visualization import ZScaleInterval
from fastapi import APIRouter, Depends, Query, Request, Response
from PIL import Image

from obsflow.access import Principal, may_read_data
from obsflow.api.auth import Caller
from obsflow.api.params import READS_ITS_OWN_QUERY
from obsflow.api.services import Services, services
from obsflow.catalog.obscore import derived_from
from obsflow.catalog.records import FileRecord
from obsflow.errors import ObsflowError
from obsflow.states import FileState

log = logging.getLogger(__name__)

__all__ = ["Link", "archive_id_of", "links_of", "preview", "router"]

router = APIRouter(prefix="/datalink", tags=[READS_ITS_OWN_QUERY], include_in_schema=False)
Svc = Annotated[Services, Depends(services)]

MEDIA: Final = "application/x-votable+xml;content=datalink"
PREVIEW_PIXELS: Final = 512
"""The longest side of a preview."""


class DatasetError(ObsflowError):
    """An ID names no dataset the reader may see (the message says which)."""


@dataclass(frozen=True)
class Link:
    id: str
    access_url: str | None
    semantics: str
    description: str
    content_type: str | None = None
    content_length: int | None = None
    service_def: str | None = None
    error_message: str | None = None


def archive_id_of(identifier: str, authority: str) -> str:
    """The archive ID in a publisher DID (``<authority>?<archive ID>``) or a bare one."""
    text = identifier.strip()
    prefix = authority + "?"
    if text.startswith(prefix):
        return text[len(prefix) :]
    if text.startswith("ivo://"):
        raise DatasetError(f"NotFoundFault: {identifier!r} is not an ID of {authority}")
    return text


def lookup(svc: Services, identifier: str) -> FileRecord:
    archive_id = archive_id_of(identifier, svc.site.settings.ivoa.authority)
    record = svc.site.catalog.get(archive_id) if archive_id else None
    if record is None or record.state is FileState.REJECTED:
        raise DatasetError(f"NotFoundFault: no dataset {identifier!r}")
    return record


def links_of(svc: Services, who: Principal, identifier: str, base: str) -> Iterator[Link]:
    """The links of one ID, as :class:`Link` rows."""
    try:
        record = lookup(svc, identifier)
    except DatasetError as exc:
        yield Link(identifier, None, "#this", "", error_message=str(exc))
        return
    archive_id = record.archive_id or ""
    now = svc.now()
    if may_read_data(who, record, now):
        yield Link(identifier, f"{base}api/v1/files/{archive_id}/data", "#this",
                   "The dataset (FITS)", "application/fits", record.size)  # fmt: skip
        yield Link(identifier, f"{base}datalink/preview?ID={archive_id}", "#preview",
                   "A PNG preview of the data", "image/png")  # fmt: skip
        yield Link(identifier, None, "#cutout", "Cut out a region (SODA)",
                   service_def="soda")  # fmt: skip
    else:
        until = record.proprietary_until.isoformat() if record.proprietary_until else "?"
        yield Link(identifier, None, "#this", "The dataset (FITS)",
                   error_message=f"NotAuthorizedFault: proprietary until {until}")  # fmt: skip
    registry = svc.site.registry
    if record.made_by_run is not None:
        run = svc.runs.get(record.made_by_run)
        ids = [i for group in (run.inputs.values() if run else ()) for i in group]
        for source in svc.site.catalog.records(ids):
            product = registry.products.get(source.product or "")
            calibration = product is not None and "calibration" in product.tags
            yield Link(
                identifier,
                f"{base}datalink/links?ID={source.archive_id}",
                "#calibration" if calibration else "#progenitor",
                f"{source.product} {source.archive_id}, an input of run {record.made_by_run}",
                MEDIA,
            )
    for made in svc.site.catalog.records(derived_from(svc.site.catalog, record.id)):
        yield Link(
            identifier,
            f"{base}datalink/links?ID={made.archive_id}",
            "#derivation",
            f"{made.product} {made.archive_id}, made from it",
            MEDIA,
        )


_COLUMNS: Final = (
    ("ID", "meta.id;meta.main"),
    ("access_url", "meta.ref.url"),
    ("service_def", "meta.ref"),
    ("error_message", "meta.code.error"),
    ("semantics", "meta.code"),
    ("description", "meta.note"),
    ("content_type", "meta.code.mime"),
    ("content_length", "phys.size;meta.file"),
)


def _cell(value: object) -> str:
    return "<TD/>" if value is None else f"<TD>{escape(str(value))}</TD>"


def document(links: list[Link], base: str) -> bytes:
    fields = "".join(
        f'      <FIELD name="{n}" datatype="{"long" if n == "content_length" else "char"}"'
        + ("" if n == "content_length" else ' arraysize="*"')
        + (' unit="byte"' if n == "content_length" else "")
        + f' ucd="{u}"/>\n'
        for n, u in _COLUMNS
    )
    rows = "".join(
        "        <TR>"
        + "".join(
            _cell(v)
            for v in (
                link.id,
                link.access_url,
                link.service_def,
                link.error_message,
                link.semantics,
                link.description,
                link.content_type,
                link.content_length,
            )
        )
        + "</TR>\n"
        for link in links
    )
    soda = (
        '  <RESOURCE type="meta" utype="adhoc:service" ID="soda">\n'
        '    <PARAM name="standardID" datatype="char" arraysize="*"'
        ' value="ivo://ivoa.net/std/SODA#sync-1.0"/>\n'
        '    <PARAM name="accessURL" datatype="char" arraysize="*"'
        f" value={quoteattr(base + 'soda/sync')}/>\n"
        '    <GROUP name="inputParams">\n'
        '      <PARAM name="ID" datatype="char" arraysize="*" ucd="meta.id;meta.dataset"'
        ' value="" ref="primaryID"/>\n'
        '      <PARAM name="CIRCLE" datatype="double" arraysize="3" xtype="circle"'
        ' unit="deg" ucd="obs.field" value=""/>\n'
        '      <PARAM name="POLYGON" datatype="double" arraysize="*" xtype="polygon"'
        ' unit="deg" ucd="obs.field" value=""/>\n'
        '      <PARAM name="POS" datatype="char" arraysize="*" ucd="obs.field" value=""/>\n'
        "    </GROUP>\n"
        "  </RESOURCE>\n"
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        '  <RESOURCE type="results">\n'
        '    <INFO name="standardID" value="ivo://ivoa.net/std/DataLink#links-1.1"/>\n'
        "    <TABLE>\n"
        + fields.replace('ucd="meta.id;meta.main"/>', 'ucd="meta.id;meta.main" ID="primaryID"/>')
        + "      <DATA><TABLEDATA>\n"
        + rows
        + "      </TABLEDATA></DATA>\n"
        "    </TABLE>\n"
        "  </RESOURCE>\n" + soda + "</VOTABLE>\n"
    ).encode()


@router.get("/links")
def links(
    request: Request,
    who: Caller,
    svc: Svc,
    ids: Annotated[list[str], Query(alias="ID", max_length=200)] = [],  # noqa: B006
) -> Response:
    """The links of each ``ID`` (DataLink 1.1 ``{links}``)."""
    if not ids:
        return Response("UsageFault: ID is missing\n", 400, media_type="text/plain")
    if len(ids) > 100:
        return Response("UsageFault: at most 100 IDs\n", 400, media_type="text/plain")
    base = str(request.base_url)
    found = [link for i in ids for link in links_of(svc, who, i, base)]
    return Response(document(found, base), media_type=MEDIA)


def preview(data_path: Path, cache: Path) -> bytes:
    """A PNG of the first image in a FITS file (IRAF's zscale limits, astropy's
    :class:`~astropy.visualization.ZScaleInterval`, a linear stretch between them: how
    astronomers look at a frame; at most :data:`PREVIEW_PIXELS` on a side), made once
    into ``cache``."""
    if cache.is_file():
        return cache.read_bytes()
    with fits.open(data_path, memmap=False) as hdus:
        image = next((h.data for h in hdus if h.data is not None and h.data.ndim >= 2), None)
    if image is None:
        raise DatasetError("NoPreview: the dataset holds no image")
    plane = np.asarray(image, dtype=np.float64)
    while plane.ndim > 2:
        plane = plane[0]
    finite = plane[np.isfinite(plane)]
    low, high = ZScaleInterval().get_limits(finite) if finite.size else (0.0, 1.0)
    scaled = np.clip((plane - low) / max(high - low, 1e-12), 0, 1)
    pixels = (np.nan_to_num(scaled) * 255).astype(np.uint8)[::-1]  # FITS: y up
    picture = Image.fromarray(pixels, mode="L")
    picture.thumbnail((PREVIEW_PIXELS, PREVIEW_PIXELS))
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".part")
    picture.save(partial, format="PNG")
    partial.replace(cache)
    return cache.read_bytes()


@router.get("/preview")
def get_preview(
    who: Caller,
    svc: Svc,
    ID: Annotated[str, Query(max_length=300)],  # noqa: N803
) -> Response:
    """The dataset's PNG preview (``#preview``), if the reader may read its data."""
    try:
        record = lookup(svc, ID)
    except DatasetError as exc:
        return Response(f"{exc}\n", 404, media_type="text/plain")
    if not may_read_data(who, record, svc.now()):
        return Response("NotAuthorizedFault: the data are proprietary\n", 403,
                        media_type="text/plain")  # fmt: skip
    path = svc.retriever.fetch(record.archive_id or "")
    cache = svc.site.settings.work / "previews" / f"{record.sha256}.zscale.png"
    try:
        png = preview(path, cache)
    except (DatasetError, OSError, ValueError) as exc:
        return Response(f"{exc}\n", 422, media_type="text/plain")
    return Response(png, media_type="image/png")

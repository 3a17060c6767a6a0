"""A query's result as TAP answers it: a VOTable (astropy.io.votable) with its
``QUERY_STATUS``, CSV or JSON; and the VOTable error document of DALI 1.1."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any, Final
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from astropy.io.votable.tree import Field, Info, Resource, TableElement, VOTableFile

from obsflow.errors import ObsflowError
from obsflow.ivoa.obscore import ColumnInfo

__all__ = ["Format", "Result", "error_document", "parse_format", "render"]


class Format(StrEnum):
    VOTABLE = "votable"
    CSV = "csv"
    JSON = "json"

    @property
    def media_type(self) -> str:
        return _MEDIA[self]


_MEDIA: Final = {
    Format.VOTABLE: "application/x-votable+xml",
    Format.CSV: "text/csv",
    Format.JSON: "application/json",
}
_ALIASES: Final = {
    "votable": Format.VOTABLE,
    "application/x-votable+xml": Format.VOTABLE,
    "text/xml": Format.VOTABLE,
    "votable/td": Format.VOTABLE,
    "application/x-votable+xml;serialization=tabledata": Format.VOTABLE,
    "csv": Format.CSV,
    "text/csv": Format.CSV,
    "text/csv;header=present": Format.CSV,
    "json": Format.JSON,
    "application/json": Format.JSON,
}


class FormatError(ObsflowError):
    """A FORMAT parameter naming no format obsflow writes (lists the known ones)."""


def parse_format(text: str | None) -> Format:
    """``FORMAT``/``RESPONSEFORMAT`` as a :class:`Format` (a short name or a MIME type)."""
    if text is None or not text.strip():
        return Format.VOTABLE
    key = text.strip().lower().replace(" ", "")
    if key not in _ALIASES:
        known = ", ".join(sorted(_ALIASES))
        raise FormatError(f"unknown FORMAT {text!r}: expected one of {known}")
    return _ALIASES[key]


@dataclass(frozen=True)
class Result:
    columns: tuple[str, ...]
    rows: Sequence[tuple[Any, ...]]
    overflow: bool
    known: Mapping[str, ColumnInfo]
    """Published columns by name: their units, UCDs and descriptions go with them."""


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == " ":
        return value.replace(" ", "T", 1)  # a timestamp as SQLite hands it back
    return value


def _datatype(values: list[Any]) -> str:
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return "char"
    if kinds <= {bool}:
        return "boolean"
    if kinds <= {int, bool}:
        return "long"
    if kinds <= {int, float, bool}:
        return "double"
    return "char"


def _fields(result: Result) -> list[tuple[str, ColumnInfo]]:
    """Each column's description: the published one when the values fit it."""
    out: list[tuple[str, ColumnInfo]] = []
    for i, name in enumerate(result.columns):
        values = [_plain(r[i]) for r in result.rows]
        found = _datatype(values)
        info = result.known.get(name)
        fits = info is not None and (
            found == info.datatype
            or all(v is None for v in values)
            or (found == "long" and info.datatype in {"int", "double"})
        )
        if info is not None and fits:
            out.append((name, info))
        else:
            out.append((name, ColumnInfo(name, found, "")))
    return out


def render(result: Result, fmt: Format) -> bytes:
    if fmt is Format.CSV:
        return _csv(result)
    if fmt is Format.JSON:
        return _json(result)
    return _votable(result)


def _csv(result: Result) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if v is None else _plain(v) for v in row])
    return out.getvalue().encode()


def _json(result: Result) -> bytes:
    fields = _fields(result)
    doc = {
        "metadata": [
            {"name": n, "datatype": c.datatype, "unit": c.unit, "ucd": c.ucd} for n, c in fields
        ],
        "data": [
            [None if isinstance(v, float) and math.isnan(v) else _plain(v) for v in row]
            for row in result.rows
        ],
        "overflow": result.overflow,
    }
    return json.dumps(doc).encode()


def _votable(result: Result) -> bytes:
    doc = VOTableFile(version="1.4")
    resource = Resource(type="results")
    doc.resources.append(resource)
    resource.infos.append(Info(name="QUERY_STATUS", value="OK"))
    table = TableElement(doc)
    resource.tables.append(table)
    fields = _fields(result)
    seen: set[str] = set()
    for i, (name, info) in enumerate(fields):
        ident = name if name not in seen else f"{name}_{i}"
        seen.add(ident)
        table.fields.append(
            Field(
                doc,
                name=name,
                ID=None,
                datatype=info.datatype,
                arraysize="*" if info.datatype == "char" else None,
                unit=info.unit,
                ucd=info.ucd,
                utype=info.utype,
                xtype=info.xtype,
            )
        )
        if info.description:
            table.fields[-1].description = info.description
    table.create_arrays(len(result.rows))
    for r, row in enumerate(result.rows):
        values = []
        mask = []
        for (_, info), raw in zip(fields, row, strict=True):
            value = _plain(raw)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            mask.append(missing)
            if missing:
                values.append(_EMPTY[info.datatype])
            elif info.datatype == "char":
                values.append(str(value))
            else:
                values.append(value)
        table.array[r] = tuple(values)
        table.array.mask[r] = tuple(mask)
    out = io.BytesIO()
    doc.to_xml(out)
    text = out.getvalue()
    if result.overflow:  # DALI: the overflow INFO follows the table
        text = text.replace(
            b"</TABLE>", b'</TABLE>\n  <INFO name="QUERY_STATUS" value="OVERFLOW"/>', 1
        )
    return text


_EMPTY: Final[dict[str, Any]] = {
    "char": "",
    "long": 0,
    "int": 0,
    "double": np.nan,
    "boolean": False,
}


def error_document(message: str) -> bytes:
    """DALI's error VOTable: ``QUERY_STATUS`` ``ERROR`` with the message."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        '  <RESOURCE type="results">\n'
        f'    <INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO>\n'
        "  </RESOURCE>\n"
        "</VOTABLE>\n"
    ).encode()


def attr(value: str) -> str:
    """An XML attribute value, quoted."""
    return quoteattr(value)

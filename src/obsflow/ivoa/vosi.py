"""VOSI 1.1 documents of the TAP service: capabilities, availability, tables.

Written as text templates: they are small, fixed documents whose every element the
standards name, and no maintained Python library writes them (pyvo reads them)."""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

from obsflow.ivoa.obscore import ColumnInfo, TableInfo
from obsflow.ivoa.tapschema import KEYS_OF

__all__ = ["availability", "capabilities", "tables"]


def _interface(url: str, role: str = "std") -> str:
    return (
        f'    <interface xsi:type="vs:ParamHTTP" role="{role}" version="1.1">\n'
        f'      <accessURL use="base">{escape(url)}</accessURL>\n'
        "    </interface>\n"
    )


def capabilities(base_url: str) -> bytes:
    """``/tap/capabilities``: TAP 1.1 with ADQL 2.1 (its geometry functions), the
    formats, the VOSI resources."""
    tap = f"{base_url}tap"
    geometry = "".join(
        f"        <feature><form>{name}</form></feature>\n"
        for name in ("POINT", "CIRCLE", "POLYGON", "BOX", "CONTAINS", "INTERSECTS", "DISTANCE")
    )
    formats = "".join(
        f"    <outputFormat><mime>{mime}</mime><alias>{alias}</alias></outputFormat>\n"
        for mime, alias in (
            ("application/x-votable+xml", "votable"),
            ("text/csv;header=present", "csv"),
            ("application/json", "json"),
        )
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0"\n'
        '    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
        '    xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1"\n'
        '    xmlns:tr="http://www.ivoa.net/xml/TAPRegExt/v1.0">\n'
        '  <capability standardID="ivo://ivoa.net/std/TAP" xsi:type="tr:TableAccess">\n'
        + _interface(tap)
        + "    <language>\n"
        "      <name>ADQL</name>\n"
        '      <version ivo-id="ivo://ivoa.net/std/ADQL#v2.1">2.1</version>\n'
        '      <version ivo-id="ivo://ivoa.net/std/ADQL#v2.0">2.0</version>\n'
        "      <description>ADQL 2.1, translated by sqlglot</description>\n"
        '      <languageFeatures type="ivo://ivoa.net/std/TAPRegExt#features-adqlgeo">\n'
        + geometry
        + "      </languageFeatures>\n"
        "    </language>\n"
        + formats
        + "    <retentionPeriod><default>0</default></retentionPeriod>\n"
        "    <outputLimit>\n"
        '      <default unit="row">10000</default>\n'
        '      <hard unit="row">1000000</hard>\n'
        "    </outputLimit>\n"
        "  </capability>\n"
        '  <capability standardID="ivo://ivoa.net/std/VOSI#capabilities">\n'
        + _interface(f"{tap}/capabilities")
        + "  </capability>\n"
        '  <capability standardID="ivo://ivoa.net/std/VOSI#availability">\n'
        + _interface(f"{tap}/availability")
        + "  </capability>\n"
        '  <capability standardID="ivo://ivoa.net/std/VOSI#tables-1.1">\n'
        + _interface(f"{tap}/tables")
        + "  </capability>\n"
        "</vosi:capabilities>\n"
    ).encode()


def availability(available: bool, note: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<vosi:availability xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">\n'
        f"  <vosi:available>{'true' if available else 'false'}</vosi:available>\n"
        f"  <vosi:note>{escape(note)}</vosi:note>\n"
        "</vosi:availability>\n"
    ).encode()


def _column(c: ColumnInfo) -> str:
    std = ' std="true"' if c.std else ""
    parts = [f"      <column{std}>\n"]
    parts.append(f"        <name>{escape(c.name)}</name>\n")
    parts.append(f"        <description>{escape(c.description)}</description>\n")
    if c.unit:
        parts.append(f"        <unit>{escape(c.unit)}</unit>\n")
    if c.ucd:
        parts.append(f"        <ucd>{escape(c.ucd)}</ucd>\n")
    if c.utype:
        parts.append(f"        <utype>{escape(c.utype)}</utype>\n")
    arraysize = f" arraysize={quoteattr(c.arraysize)}" if c.arraysize else ""
    xtype = f" extendedType={quoteattr(c.xtype)}" if c.xtype else ""
    parts.append(
        f'        <dataType xsi:type="vs:VOTableType"{arraysize}{xtype}>'
        f"{escape(c.datatype)}</dataType>\n"
    )
    if c.principal:
        parts.append("        <flag>primary</flag>\n")
    parts.append("      </column>\n")
    return "".join(parts)


def tables(published: Sequence[TableInfo]) -> bytes:
    """``/tap/tables``: every published table with its columns."""
    schemas: dict[str, list[TableInfo]] = {}
    for t in published:
        schemas.setdefault(t.schema, []).append(t)
    body = []
    for schema, members in schemas.items():
        body.append(f"  <schema>\n    <name>{escape(schema)}</name>\n")
        for t in members:
            body.append('    <table type="table">\n')
            body.append(f"      <name>{escape(t.name)}</name>\n")
            body.append(f"      <description>{escape(t.description)}</description>\n")
            if t.utype:
                body.append(f"      <utype>{escape(t.utype)}</utype>\n")
            body.extend(_column(c) for c in t.columns)
            for _, target, column, target_column in KEYS_OF.get(t.name, []):
                body.append(
                    "      <foreignKey>\n"
                    f"        <targetTable>{escape(target)}</targetTable>\n"
                    "        <fkColumn>\n"
                    f"          <fromColumn>{escape(column)}</fromColumn>\n"
                    f"          <targetColumn>{escape(target_column)}</targetColumn>\n"
                    "        </fkColumn>\n"
                    "      </foreignKey>\n"
                )
            body.append("    </table>\n")
        body.append("  </schema>\n")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<vosi:tableset xmlns:vosi="http://www.ivoa.net/xml/VOSITables/v1.0"\n'
        '    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
        '    xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1">\n'
        + "".join(body)
        + "</vosi:tableset>\n"
    ).encode()

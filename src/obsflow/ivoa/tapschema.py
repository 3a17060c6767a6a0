"""TAP_SCHEMA (TAP 1.1 §4): the published tables, their columns (units, UCDs,
descriptions) and keys, themselves queryable in ADQL. Made from
:data:`~obsflow.ivoa.obscore.OBSCORE` and from its own description, so it cannot
disagree with what the service runs."""

from __future__ import annotations

from typing import Any, Final

from obsflow.ivoa.obscore import OBSCORE, ColumnInfo, TableInfo

__all__ = ["KEYS_OF", "PUBLISHED", "TAP_SCHEMA_TABLES", "rows_of"]


def _t(name: str, description: str) -> ColumnInfo:
    return ColumnInfo(name, "char", description, std=True, principal=True)


def _i(name: str, description: str) -> ColumnInfo:
    return ColumnInfo(name, "int", description, std=True, principal=True)


SCHEMAS: Final = TableInfo(
    "tap_schema",
    "tap_schema.schemas",
    "The schemas this service publishes",
    (
        _t("schema_name", "Schema name"),
        _t("utype", "Schema utype"),
        _t("description", "Describes the schema"),
        _i("schema_index", "The order of the schemas"),
    ),
)
TABLES: Final = TableInfo(
    "tap_schema",
    "tap_schema.tables",
    "The tables this service publishes",
    (
        _t("schema_name", "The table's schema"),
        _t("table_name", "Fully qualified table name"),
        _t("table_type", "table or view"),
        _t("utype", "Table utype"),
        _t("description", "Describes the table"),
        _i("table_index", "The order of the tables"),
    ),
)
COLUMNS: Final = TableInfo(
    "tap_schema",
    "tap_schema.columns",
    "The columns of the published tables",
    (
        _t("table_name", "Fully qualified table name"),
        _t("column_name", "Column name"),
        _t("utype", "Column utype"),
        _t("ucd", "Column UCD"),
        _t("unit", "Column unit (VOUnit)"),
        _t("description", "Describes the column"),
        _t("datatype", "VOTable datatype"),
        _t("arraysize", "VOTable arraysize ('*': variable; NULL: a scalar)"),
        _t("xtype", "VOTable xtype"),
        _i('"size"', "Deprecated: arraysize as a number"),
        _i("principal", "1 if the column is principal"),
        _i("indexed", "1 if the column is indexed"),
        _i("std", "1 if the column is defined by a standard"),
        _i("column_index", "The order of the columns"),
    ),
)
KEYS: Final = TableInfo(
    "tap_schema",
    "tap_schema.keys",
    "Foreign keys between the published tables",
    (
        _t("key_id", "Key ID"),
        _t("from_table", "The table with the foreign key"),
        _t("target_table", "The table with the primary key"),
        _t("utype", "Key utype"),
        _t("description", "Describes the key"),
    ),
)
KEY_COLUMNS: Final = TableInfo(
    "tap_schema",
    "tap_schema.key_columns",
    "The columns of the foreign keys",
    (
        _t("key_id", "Key ID"),
        _t("from_column", "Column in the from_table"),
        _t("target_column", "Column in the target_table"),
    ),
)

TAP_SCHEMA_TABLES: Final = (SCHEMAS, TABLES, COLUMNS, KEYS, KEY_COLUMNS)
PUBLISHED: Final = (OBSCORE, *TAP_SCHEMA_TABLES)
"""Every table a query may read, in the order TAP_SCHEMA lists them."""

_SCHEMA_TEXT: Final = {
    "ivoa": "IVOA data models: ObsCore",
    "tap_schema": "This service's own description (TAP 1.1)",
}
_KEYS: Final = (
    ("tables_schema", "tap_schema.tables", "tap_schema.schemas", "schema_name"),
    ("columns_table", "tap_schema.columns", "tap_schema.tables", "table_name"),
    ("keys_from", "tap_schema.keys", "tap_schema.tables", "from_table"),
    ("keys_target", "tap_schema.keys", "tap_schema.tables", "target_table"),
    ("key_columns_key", "tap_schema.key_columns", "tap_schema.keys", "key_id"),
)


KEYS_OF: Final = {
    f: [(k, t, c, "table_name" if c in {"from_table", "target_table"} else c)
        for k, f2, t, c in _KEYS if f2 == f]
    for _, f, _, _ in _KEYS
}  # fmt: skip
"""From table → its foreign keys: (key ID, target table, from column, target column)."""


def rows_of(table: TableInfo) -> list[tuple[Any, ...]]:
    """The rows of one of the TAP_SCHEMA tables."""
    if table is SCHEMAS:
        return [(s, None, text, i) for i, (s, text) in enumerate(_SCHEMA_TEXT.items())]
    if table is TABLES:
        return [
            (t.schema, t.name, "table", t.utype, t.description, i) for i, t in enumerate(PUBLISHED)
        ]
    if table is COLUMNS:
        return [
            (
                t.name,
                c.name,
                c.utype,
                c.ucd,
                c.unit,
                c.description,
                c.datatype,
                c.arraysize,
                c.xtype,
                None,
                int(c.principal),
                int(c.indexed),
                int(c.std),
                i,
            )
            for t in PUBLISHED
            for i, c in enumerate(t.columns)
        ]
    if table is KEYS:
        return [(k, f, t, None, f"{f} refers to {t}") for k, f, t, _ in _KEYS]
    if table is KEY_COLUMNS:
        return [(k, c, target) for keys in KEYS_OF.values() for k, _, c, target in keys]
    raise KeyError(table.name)

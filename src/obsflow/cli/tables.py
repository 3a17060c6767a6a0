"""Tables that never cut what the next command needs, and the formats for scripts.

A listing's columns are :class:`Column`\\ s: a *whole* one (an archive ID, a checksum, a
path, an original name) is never shortened nor broken, whatever the terminal's width;
the others give way: when the whole table does not fit, the least needed columns are
left out and a line under the table says which (rich alone would squeeze every column
to nothing, or cut an ID with an ellipsis). :func:`emit` prints rows as that table, or
as TSV, CSV, JSON or one ID a line, the same rows for every format.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from rich.console import Console
from rich.table import Table


class Format(StrEnum):
    """How a listing is printed (``--format``)."""

    TABLE = "table"
    TSV = "tsv"
    CSV = "csv"
    JSON = "json"


@dataclass(frozen=True)
class Column:
    """A column of a listing: ``key`` in each row, ``title`` over it."""

    key: str
    title: str
    whole: bool = False
    """Never shortened or broken (IDs, checksums, paths): the next command needs it."""
    drop: int = 0
    """When the table is too wide, columns are left out from the highest ``drop`` down;
    0: never left out."""


_EDGE = 4
"""The width a table adds around its columns: its two borders and the title's slack."""
_PER_COLUMN = 3
_FOLDED = 12
"""The narrowest a column that may fold is worth showing."""
"""A column's padding (one space each side) and its separator."""


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def fit(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], width: int) -> list[Column]:
    """The columns to show in ``width`` characters: all of them if the whole ones fit
    whole and the others folded to a few characters; else without the ones marked to
    drop first, one at a time, until they do (or none is left to drop: then the whole
    columns stay whole and rich folds the others)."""
    needed = {}
    for c in columns:
        longest = max([0, *(len(_text(r.get(c.key))) for r in rows)])
        # a whole column needs its longest value; another folds, down to a few characters
        needed[c.key] = max(len(c.title), longest if c.whole else min(longest, _FOLDED))
    shown = list(columns)
    while sum(needed[c.key] + _PER_COLUMN for c in shown) + _EDGE > width:
        droppable = [c for c in shown if c.drop > 0]
        if not droppable:
            break
        shown.remove(max(droppable, key=lambda c: (c.drop, shown.index(c))))
    return shown


def table(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str,
) -> None:
    """Print ``rows`` as a table fitted to ``console`` (see :func:`fit`), and under it
    which columns were left out and how to see them."""
    shown = fit(columns, rows, console.width)
    out = Table(title=title)
    for c in shown:
        if c.whole:
            longest = max([len(c.title), *(len(_text(r.get(c.key))) for r in rows)])
            out.add_column(c.title, no_wrap=True, min_width=longest, overflow="ignore")
        else:
            out.add_column(c.title, overflow="fold")
    for r in rows:
        out.add_row(*(_text(r.get(c.key)) for c in shown))
    console.print(out)
    hidden = [c.title for c in columns if c not in shown]
    if hidden and rows:
        console.print(
            f"(not shown, for the terminal's width: {', '.join(hidden)}; "
            "widen it, or use --format tsv or --format json)",
            highlight=False,
        )


def emit(
    console: Console,
    fmt: Format,
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str,
    documents: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Print ``rows`` in ``fmt``: a fitted table; TSV or CSV with a header line and every
    column (tabs and newlines inside a TSV value become spaces, so one line is one row);
    JSON: ``documents`` if given (the full records), else the rows."""
    if fmt is Format.TABLE:
        table(console, columns, rows, title=title)
        return
    if fmt is Format.JSON:
        print(json.dumps(list(documents if documents is not None else rows), indent=1))
        return
    if fmt is Format.CSV:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([c.key for c in columns])
        writer.writerows([_text(r.get(c.key)) for c in columns] for r in rows)
        return
    print("\t".join(c.key for c in columns))
    for r in rows:
        cells = (_text(r.get(c.key)).replace("\t", " ").replace("\n", " ") for c in columns)
        print("\t".join(cells))


def pairs(console: Console, title: str, items: Sequence[tuple[str, str]]) -> None:
    """Print ``items`` as aligned ``name  value`` lines under ``title``: a value (a path,
    a checksum) is never shortened nor broken, as a table's cell would be."""
    console.print(title, style="bold", highlight=False, markup=False)
    width = max((len(name) for name, _ in items), default=0)
    for name, value in items:
        console.print(f"  {name:<{width}}  {value}", highlight=False, markup=False)

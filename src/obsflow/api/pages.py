"""Cursor pagination, shared by the listings of files and runs.

A page is ``{"items": [...], "next": CURSOR | null}``; the client passes ``next``
back as ``?cursor=`` for the page after. A cursor is opaque to clients: today it is
the last row ID the page looked at, in decimal, and listings are ordered by that ID,
so a page never repeats or skips a row, however many are added meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import Query

from obsflow.api.params import MAX_ROW_ID, PageLimit
from obsflow.api.problems import ProblemError

CursorParam = Annotated[
    str | None,
    Query(
        pattern=r"^[0-9]{1,10}$",
        description="Where to go on: the 'next' of the page before (opaque).",
    ),
]
LimitParam = Annotated[
    PageLimit | None,
    Query(description="The most items to return (at most the site's page limit)."),
]


def after(cursor: str | None) -> int:
    """The row ID a cursor points after (0: from the start). A cursor past every ID
    there can be (the pattern of :data:`CursorParam` checked its shape) is the end."""
    if cursor is None:
        return 0
    if not cursor.isdigit():
        raise ProblemError(422, f"invalid cursor {cursor!r}", kind="invalid-request")
    return min(int(cursor), MAX_ROW_ID)


def page_size(limit: int | None, page_limit: int) -> int:
    """``limit`` (default and most: the site's page limit)."""
    if limit is None:
        return page_limit
    if limit > page_limit:
        raise ProblemError(
            422,
            f"limit {limit} is over this site's page limit of {page_limit}",
            kind="invalid-request",
        )
    return limit


def next_cursor(ids: Sequence[int], size: int) -> tuple[list[int], str | None]:
    """Of ``ids`` (up to ``size + 1`` fetched in order), the page's and the next cursor."""
    if len(ids) > size:
        return list(ids[:size]), str(ids[size - 1])
    return list(ids), None

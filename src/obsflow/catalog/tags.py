"""Tags on files: what a tag may be, and adding or removing one (``obsflow tag add|rm``,
``PUT``/``DELETE /api/v1/files/{id}/tags/{tag}``).

A tag is a fact of the catalog: the files a tag names are found through
:meth:`obsflow.catalog.Catalog.find`, in start order straight from the index on
``(tag, start_utc, file_id)``; so each tag's row carries its file's start.
"""

from __future__ import annotations

import re
from typing import Final

from sqlalchemy import delete, select

from obsflow.catalog import Catalog, schema
from obsflow.catalog.inserts import insert_new
from obsflow.errors import NotFoundError, ObsflowError

files = schema.files
tags = schema.tags

TAG_PATTERN: Final = re.compile(r"[\w.:-]{1,64}")
"""What a tag may be: as in the registry (``^[\\w.:-]{1,64}$``)."""


class InvalidTagError(ObsflowError):
    """A tag is not a short word of letters, digits and ``_ . : -``."""


def check_tag(tag: str) -> str:
    """``tag`` if it is a valid tag, else :class:`InvalidTagError` naming it."""
    if not TAG_PATTERN.fullmatch(tag):
        raise InvalidTagError(
            f"invalid tag {tag!r}: expected 1 to 64 letters, digits or '_', '.', ':', '-'"
        )
    return tag


class Tags:
    """The tags of the files of one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def names(self) -> list[str]:
        """Every tag some file carries, sorted."""
        with self.catalog.read() as conn:
            return list(conn.execute(select(tags.c.tag).distinct().order_by(tags.c.tag)).scalars())

    def add(self, archive_id: str, tag: str) -> bool:
        """Tag the live file; False if it had the tag already. :class:`InvalidTagError`
        for a bad tag, :class:`NotFoundError` for no such file."""
        check_tag(tag)
        file_id = self._file_id(archive_id)
        with self.catalog.write() as conn:
            start = select(files.c.start_utc).where(files.c.id == file_id).scalar_subquery()
            stmt = (
                insert_new(conn, tags)
                .values(file_id=file_id, tag=tag, start_utc=start)
                .returning(tags.c.tag)
            )
            return conn.execute(stmt).first() is not None  # (rowcount is -1 on psycopg)

    def remove(self, archive_id: str, tag: str) -> bool:
        """Remove the tag from the live file; False if it did not have it."""
        check_tag(tag)
        file_id = self._file_id(archive_id)
        with self.catalog.write() as conn:
            stmt = delete(tags).where(tags.c.file_id == file_id, tags.c.tag == tag)
            return bool(conn.execute(stmt).rowcount > 0)

    def _file_id(self, archive_id: str) -> int:
        found = self.catalog.file_id(archive_id)
        if found is None:
            raise NotFoundError(archive_id)
        return found

"""What the catalog holds under an archive ID: the bytes' sha256 and the file's state.

The archive server answers an agent that would send a frame from this
(:mod:`obsflow.api.transfer`): the same bytes already here (nothing to send), other
bytes (a conflict, never overwritten), and, after an upload, whether the ingestors have
archived it yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select

from obsflow.catalog import Catalog, schema
from obsflow.states import FileState

files = schema.files

_HELD = select(files.c.sha256, files.c.state, files.c.instrument, files.c.program).where(
    files.c.archive_id == bindparam("archive_id"), schema.is_live()
)
_STATE = select(files.c.state).where(files.c.archive_id == bindparam("archive_id"))


@dataclass(frozen=True)
class Holding:
    """The live file under one archive ID: its bytes' sha256 and its state, and whose it
    is (who may ask about it: :mod:`obsflow.api.transfer`)."""

    sha256: str
    state: FileState
    instrument: str | None = None
    program: str | None = None


class Holdings:
    """The files of one catalog by archive ID."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def of(self, archive_id: str) -> Holding | None:
        """The live file under ``archive_id`` (None: none, or only a refused one)."""
        with self.catalog.read() as conn:
            row = conn.execute(_HELD, {"archive_id": archive_id}).first()
        if row is None:
            return None
        return Holding(row.sha256, FileState(row.state), row.instrument, row.program)

    def is_archived(self, archive_id: str) -> bool:
        """Whether the file under ``archive_id`` is archived (its checksum verified)."""
        with self.catalog.read() as conn:
            state = conn.execute(_STATE, {"archive_id": archive_id}).scalar()
        return bool(state == FileState.ARCHIVED.value)

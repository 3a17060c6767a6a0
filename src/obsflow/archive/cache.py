"""The cache: fast local storage between receipt and the archive (and, later, pipelines).

Files are written to ``cache/.tmp/`` first and moved to their place,
``cache/{instrument}/{night}/{archive_id}``, only inside the catalog transaction that
records them (see :meth:`obsflow.catalog.Catalog.record_cached`).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import date
from pathlib import Path

from obsflow.archive.storage import check_key

TMP = ".tmp"


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / TMP
        self._made: set[Path] = set()  # directories known to exist (place runs in a transaction)

    @staticmethod
    def key(instrument: str, night: date, archive_id: str) -> str:
        """The relative path of a file in the cache (and in archive storage)."""
        key = f"{instrument}/{night.isoformat()}/{archive_id}"
        check_key(key)
        return key

    def path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key))

    def temp_file(self) -> Path:
        if self.tmp not in self._made:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self._made.add(self.tmp)
        return self.tmp / f"{uuid.uuid4().hex}.part"

    def place(self, temp: Path, key: str) -> Path:
        """Move a finished temp file to its place (atomic rename on one file system)."""
        target = self.path(key)
        if target.parent not in self._made:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(target.parent)
        try:
            os.replace(temp, target)
        except FileNotFoundError:
            self._made.discard(target.parent)  # removed behind our back: make it again
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, target)
        return target

    def unplace(self, key: str, temp: Path) -> None:
        """Undo :meth:`place` (its transaction did not commit): back to the temp file."""
        os.replace(self.path(key), temp)

    def clean_temp(self, older_than: float = 3600.0) -> int:
        """Remove temp files a crash left, once ``older_than`` seconds old (a temp file of a
        live receipt lives for seconds; another process may be receiving right now)."""
        removed = 0
        if self.tmp.is_dir():
            cutoff = time.time() - older_than
            for leftover in self.tmp.glob("*.part"):
                try:
                    if leftover.stat().st_mtime < cutoff:
                        leftover.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

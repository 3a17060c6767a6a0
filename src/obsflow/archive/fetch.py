"""Fetch: one way to a file's bytes for runs, the API and the CLI.

:meth:`Fetcher.fetch` turns an archive ID into a local path: the cached copy, or the
archived copy restored into the cache, its sha256 checked against the catalog before it
is placed. An evicted (*virtual*) file is brought back this way, and so is a file whose
cached copy someone deleted: ``fetch`` heals any row not virtual whose file is missing,
and a virtual row whose file is present (a crash during an eviction) is restored over
itself.

The restore moves the verified temp file into place inside the catalog transaction that
marks the row cached again (:meth:`obsflow.catalog.cachestate.CacheState.restoring`),
and takes it back out if that transaction does not commit.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from obsflow.archive.cache import Cache
from obsflow.archive.storage import Storage
from obsflow.catalog import Catalog
from obsflow.catalog.cachestate import CacheState, Resident
from obsflow.errors import NotFoundError, StorageError
from obsflow.states import FileState

log = logging.getLogger(__name__)

TOUCH_SECONDS: Final = 60.0
"""A hit writes ``last_access`` at most once per this many seconds per file."""
COPY_CHUNK: Final = 1 << 20


class Fetcher:
    """Files' bytes, from the cache or restored into it from archive storage."""

    def __init__(
        self, catalog: Catalog, cache: Cache, storage: Storage, clock: Callable[[], datetime]
    ) -> None:
        self.state = CacheState(catalog)
        self.cache = cache
        self.storage = storage
        self.clock = clock

    def fetch(self, archive_id: str) -> Path:
        """The local path of the file's bytes: from the cache, or restored from the
        archive into the cache (checksum verified). :class:`NotFoundError` for an
        unknown or refused file; :class:`StorageError` when the bytes cannot be had.

        A hit records the access (one UPDATE, at most once a minute per file). The path
        holds the bytes until a trim evicts them: open it at once (an open descriptor
        outlives eviction), or pin the file for longer (runs pin their inputs)."""
        row = self.state.resident(archive_id)
        if row is None:
            raise NotFoundError(archive_id)
        if not row.virtual and row.cache_path is not None:
            path = self.cache.path(row.cache_path)
            still_cached = self._touch(row)
            if still_cached and path.is_file():
                return path
            if still_cached:
                log.warning(
                    "%s: its cached copy %s is missing; restoring it from the archive",
                    archive_id,
                    path,
                    extra={"archive_id": archive_id},
                )
        return self._restore(row)

    def _touch(self, row: Resident) -> bool:
        """Record a hit (at most once a minute per file); False if the file was evicted
        since ``row`` was read."""
        now = self.clock()
        if row.last_access is not None and now - row.last_access < timedelta(seconds=TOUCH_SECONDS):
            return True
        return self.state.touch(row.id, now)

    def _restore(self, row: Resident) -> Path:
        if row.state is not FileState.ARCHIVED or row.archive_path is None:
            where = self.cache.path(row.cache_path) if row.cache_path else "the cache"
            raise StorageError(
                f"{row.archive_id}: its cached copy {where} is missing and it is not "
                f"archived yet (state {row.state.value}): nowhere to restore it from"
            )
        key = row.cache_path or row.archive_path
        target = self.cache.path(key)
        temp = self.cache.temp_file()
        try:
            got = self._copy_out(row, temp)
            if got != row.sha256:
                raise StorageError(
                    f"{row.archive_id}: the archived copy at "
                    f"{self.storage.describe(row.archive_path)} has sha256 {got}, the catalog "
                    f"says {row.sha256}; nothing restored into the cache"
                )
            placed = False
            try:
                with self.state.restoring(row.id) as restoring:
                    if not restoring.virtual and target.is_file():
                        return target  # a concurrent fetch restored it first
                    restoring.mark_cached(key, self.clock())
                    self.cache.place(temp, key)
                    placed = True
            except BaseException:
                if placed:  # the catalog still says virtual: take the bytes back out
                    self.cache.unplace(key, temp)
                raise
        finally:
            temp.unlink(missing_ok=True)
        log.info(
            "restored %s from the archive into the cache",
            row.archive_id,
            extra={"archive_id": row.archive_id},
        )
        return target

    def _copy_out(self, row: Resident, temp: Path) -> str:
        """Copy the archived bytes into ``temp`` (fsynced); return their sha256."""
        assert row.archive_path is not None
        digest = hashlib.sha256()
        try:
            with self.storage.open(row.archive_path) as src, temp.open("wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except (OSError, StorageError) as exc:
            raise StorageError(
                f"{row.archive_id}: cannot restore it from the archive: {exc}"
            ) from exc
        return digest.hexdigest()

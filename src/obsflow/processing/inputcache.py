"""A remote worker's own cache of input files, keyed by sha256, within a size budget.

A worker without the site's storage (:mod:`obsflow.processing.serverhost`) fetches each
input of a run over HTTP. A night's master bias and flats are inputs of every one of
its science frames' runs: this cache makes them cross the network once. It is a
directory the worker's processes share (a Celery worker's pool, several workers on one
machine), kept consistent with atomic file operations and ``flock`` alone, so that no
process needs to know of another::

    ROOT/objects/ab/abcdef…    the files, each named by its sha256 (checked on the way in)
    ROOT/tmp/                  downloads in progress (renamed into place when checked)
    ROOT/locks/ab              one download of a given file at a time (256 lock files)
    ROOT/.trim                 one trim at a time

* A file is **held** (:meth:`InputCache.hold`) while a run uses it: a shared ``flock`` on
  it, which the process keeps until the run is over (:meth:`Held.close`; or until the
  process dies: the kernel drops its locks). A trim takes an exclusive lock, without
  waiting, on each file it would evict: a held file is never evicted.
* A file enters by ``link(2)`` from its checked temporary file (held already), which
  fails rather than replaces when another process put it there first: the file at a
  name is never swapped under a holder.
* **Last use** is the file's modification time, set at each hold; over the budget, the
  files least recently used go first, down to the budget (:meth:`InputCache.trim`, after
  each download). Held files may keep the cache over its budget for a while.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from obsflow.errors import StorageError

log = logging.getLogger(__name__)

SHA256: Final = re.compile(r"[0-9a-f]{64}", re.ASCII)

Write = Callable[[bytes], None]
"""Where a download writes the bytes it receives, in order."""


@dataclass(frozen=True)
class Trimmed:
    """What a trim did: files evicted, bytes freed, bytes left, held files skipped."""

    evicted: tuple[str, ...]
    freed: int
    left: int
    held: int


class Held:
    """A file of the cache that a run uses: not evicted until :meth:`close`."""

    def __init__(self, path: Path, sha256: str, fd: int) -> None:
        self.path, self.sha256 = path, sha256
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (the lock goes with the descriptor)
            self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __repr__(self) -> str:
        return f"Held({self.sha256[:12]}…, {'closed' if self.closed else 'open'})"


class InputCache:
    """Files by sha256 under ``root``, within ``budget_bytes`` (see the module)."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the input cache's budget must be >= 0, not {budget_bytes}")
        self.root = root
        self.budget = budget_bytes
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        for folder in (self.objects, self.tmp, self.locks):
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise StorageError(f"not a sha256: {sha256!r}")
        return self.objects / sha256[:2] / sha256

    # ------------------------------------------------------------------ holding

    def hold(self, sha256: str) -> Held | None:
        """The cached file with ``sha256``, held (and marked used now); None if absent."""
        path = self.path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits for a trim that is evicting it
            if not _same_file(fd, path):  # it was evicted (or replaced) meanwhile
                os.close(fd)
                return None
            with contextlib.suppress(PermissionError):  # (another user's file: shared)
                os.utime(path)  # last use
        except BaseException:
            os.close(fd)
            raise
        return Held(path, sha256, fd)

    def fetch(self, sha256: str, download: Callable[[Write], None], *, label: str) -> Held:
        """The file with ``sha256``, held: from the cache, or ``download``-ed into it (one
        process downloads a given file at a time; the others wait and find it there).
        Bytes whose sha256 differs are refused: :class:`StorageError` naming ``label``
        (nothing is kept). An error of ``download`` propagates, nothing kept."""
        found = self.hold(sha256)
        if found is not None:
            return found
        with self._download_lock(sha256):
            found = self.hold(sha256)  # another process fetched it while this one waited
            if found is not None:
                return found
            held = self._download(sha256, download, label)
        self.trim()
        return held

    def _download(self, sha256: str, download: Callable[[Write], None], label: str) -> Held:
        temp = self.tmp / f"{sha256[:16]}.{uuid.uuid4().hex}.part"
        path = self.path(sha256)
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        placed = False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # held before it has a name a trim could see
            digest = hashlib.sha256()

            def write(chunk: bytes) -> None:
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]

            download(write)
            got = digest.hexdigest()
            if got != sha256:
                raise StorageError(
                    f"{label}: the bytes fetched have sha256 {got[:12]}…, not the "
                    f"catalog's {sha256[:12]}…; refused"
                )
            os.fchmod(fd, 0o444)  # runs see it through hard links: none may change it
            path.parent.mkdir(exist_ok=True)
            try:
                os.link(temp, path)  # never replaces: a holder's file stays the one named
                placed = True
            except FileExistsError:  # (only if the lock files were removed by hand)
                pass
        finally:
            temp.unlink(missing_ok=True)
            if not placed:
                os.close(fd)
        if placed:
            os.utime(path)
            return Held(path, sha256, fd)
        found = self.hold(sha256)
        if found is None:
            raise StorageError(f"{label}: {path} vanished as it was cached")
        return found

    @contextmanager
    def _download_lock(self, sha256: str) -> Iterator[None]:
        with _flock(self.locks / sha256[:2], fcntl.LOCK_EX):
            yield

    # ------------------------------------------------------------------ the budget

    def usage(self) -> int:
        """The bytes the cached files take."""
        return sum(size for _, _, size in self._files())

    def trim(self, to: int | None = None) -> Trimmed:
        """Evict the least recently used files that no run holds until the cache takes
        at most ``to`` bytes (default: its budget)."""
        target = self.budget if to is None else to
        with _flock(self.root / ".trim", fcntl.LOCK_EX):
            files = sorted(self._files())  # oldest use first
            left = sum(size for _, _, size in files)
            evicted: list[str] = []
            freed = held = 0
            for _, path, size in files:
                if left <= target:
                    break
                if _evict(path):
                    evicted.append(path.name)
                    freed += size
                    left -= size
                else:
                    held += 1
        if left > target:
            log.info(
                "input cache %s: %d bytes, over its budget of %d: %d file(s) held by runs",
                self.root, left, target, held,
            )  # fmt: skip
        return Trimmed(tuple(evicted), freed, left, held)

    def _files(self) -> Iterator[tuple[int, Path, int]]:
        """(last use in ns, path, size) of each cached file."""
        for shard in _entries(self.objects):
            for entry in _entries(Path(shard.path)):
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if SHA256.fullmatch(entry.name):
                    yield stat.st_mtime_ns, Path(entry.path), stat.st_size


def _evict(path: Path) -> bool:
    """Remove ``path`` unless a run holds it (a shared lock on it); True if removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held
        if not _same_file(fd, path):
            return False
        path.unlink()
        return True
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as found:
            return [e for e in found if e.is_dir(follow_symlinks=False) or e.is_file()]
    except FileNotFoundError:
        return []


@contextmanager
def _flock(path: Path, how: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)

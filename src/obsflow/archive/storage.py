"""Archive storage: where files live for good. One small interface, one local backend.

A backend must make :meth:`Storage.put` atomic (a reader never sees a partial
object under a key), make every object put durable by the time :meth:`Storage.flush`
returns, and read the stored bytes back from the medium for :meth:`Storage.sha256`
rather than trusting what it was given or what a cache holds: the ingestor marks a
batch of files archived only after their stored copies' checksums match and ``flush``
has returned, and fixity audits (:mod:`obsflow.archive.fixity`) re-read them later.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from obsflow.errors import StorageError

CHUNK = 1 << 20


def check_key(key: str) -> list[str]:
    """A storage key is a relative POSIX path with no '..', '.', hidden or empty parts;
    return its parts. (Split by hand rather than parsed by PurePosixPath: every cache and
    archive path is checked, several times per file, and a split is ~10x cheaper.)"""
    parts = key.split("/")
    if "\\" in key or not all(parts) or any(part[0] == "." for part in parts):
        raise StorageError(
            f"invalid storage key {key!r}: expected a relative path inside the archive"
        )
    return parts


class Storage(ABC):
    """Permanent archive storage, addressed by relative keys like ``OFCAM/2026-11-21/OF...fits``."""

    @abstractmethod
    def put(self, source: Path, key: str) -> None:
        """Store the bytes of ``source`` under ``key`` atomically (durable after flush)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every object put so far durable."""

    @abstractmethod
    def sha256(self, key: str, *, throttle: Throttle | None = None) -> str:
        """The hex sha256 of the bytes stored under ``key``, read back from the medium
        (not from a cache of the operating system's that would hold what was written
        rather than what the medium holds), at most as fast as ``throttle`` allows."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open the stored bytes for reading."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if present (used to drop a copy that failed verification)."""

    @abstractmethod
    def recover(self) -> int:
        """Remove what interrupted puts left behind (never a put in progress elsewhere);
        return how many."""

    @abstractmethod
    def describe(self, key: str) -> str:
        """A human-readable location of ``key`` (for messages and ``show``)."""


class LocalStorage(Storage):
    """A directory tree on a local or shared file system."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"  # one file system with the archive: renames are atomic
        self._unsynced: set[Path] = set()  # directories with renames not yet fsynced
        self._made: set[Path] = set()  # directories known to exist
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key))

    def put(self, source: Path, key: str) -> None:
        target = self.path(key)
        try:
            for folder in (target.parent, self.tmp):
                if folder not in self._made:
                    folder.mkdir(parents=True, exist_ok=True)
                    self._made.add(folder)
            temp = self.tmp / f"{uuid.uuid4().hex}.part"
            try:
                with source.open("rb") as src, temp.open("wb") as dst:
                    # held until closed (or the process dies): recover() leaves it alone
                    fcntl.flock(dst.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _copy(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
                    os.replace(temp, target)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            self._made.discard(target.parent)  # perhaps removed: look again next time
            raise StorageError(f"cannot store {key} under {self.root}: {exc}") from exc
        with self._lock:
            self._unsynced.add(target.parent)

    def flush(self) -> None:
        """fsync each directory that received a file since the last flush (once per batch,
        not once per file: most files of a batch share their night's directory)."""
        with self._lock:
            folders, self._unsynced = self._unsynced, set()
        try:
            for folder in folders:
                _fsync_dir(folder)
        except OSError as exc:
            with self._lock:
                self._unsynced |= folders
            raise StorageError(f"cannot make {self.root} durable: {exc}") from exc

    def sha256(self, key: str, *, throttle: Throttle | None = None) -> str:
        """Read from the disk: the file's pages are dropped from the page cache first
        (``posix_fadvise(DONTNEED)``; written pages are clean once :meth:`put` has synced
        them), so the bytes hashed are the medium's. On a file system in memory (tmpfs)
        the two are the same."""
        try:
            with self.path(key).open("rb") as f:
                _drop_cached_pages(f.fileno())
                if throttle is None:
                    return hashlib.file_digest(f, "sha256").hexdigest()
                digest = hashlib.sha256()
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    throttle.spend(len(chunk))
                return digest.hexdigest()
        except OSError as exc:
            raise StorageError(f"cannot read {key} back from {self.root}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def open(self, key: str) -> BinaryIO:
        try:
            return self.path(key).open("rb")
        except OSError as exc:
            raise StorageError(f"cannot open {key} in {self.root}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key} from {self.root}: {exc}") from exc

    def describe(self, key: str) -> str:
        return str(self.path(key))

    def recover(self) -> int:
        """Remove temp files of puts whose process died (their lock is free)."""
        removed = 0
        if not self.tmp.is_dir():
            return 0
        for temp in self.tmp.glob("*.part"):
            try:
                with temp.open("rb") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    temp.unlink(missing_ok=True)
                    removed += 1
            except (BlockingIOError, FileNotFoundError):
                continue  # a put in progress, or finished meanwhile
        return removed


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    # copy_file_range lets the kernel copy without passing the bytes through Python.
    try:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), size - offset)
            if sent == 0:
                break
            offset += sent
        if offset == size:
            return
        src.seek(offset)
        dst.seek(offset)
    except (AttributeError, OSError):
        src.seek(0)
        dst.seek(0)
        dst.truncate()
    while chunk := src.read(CHUNK):
        dst.write(chunk)


def _drop_cached_pages(fd: int) -> None:
    """Ask the kernel to forget the file's clean cached pages (a no-op where it cannot)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class Throttle:
    """At most ``rate`` bytes a second on average, for reads that must not crowd out the
    night's own I/O (fixity audits): :meth:`spend` sleeps as long as the bytes read so
    far are ahead of the rate. ``clock`` and ``sleep`` are seams for tests."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        stop: threading.Event | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate {rate}: expected bytes a second above 0")
        self.rate, self.clock, self.sleep, self.stop = rate, clock, sleep, stop
        self.started = clock()
        self.spent = 0

    def spend(self, count: int) -> None:
        self.spent += count
        ahead = self.spent / self.rate - (self.clock() - self.started)
        if ahead > 0:
            if self.stop is not None:
                self.stop.wait(ahead)  # a daemon stopping does not wait for the rate
            else:
                self.sleep(ahead)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

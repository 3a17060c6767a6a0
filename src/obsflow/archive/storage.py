"""Archive storage: where files live for good. One small interface, one local backend.

A backend must make :meth:`Storage.put` atomic (a reader never sees a partial
object under a key), make every object put durable by the time :meth:`Storage.flush`
returns, and read the stored bytes back from the medium for :meth:`Storage.sha256`
rather than trusting what it was given or what a cache holds: the ingestor marks a
batch of files archived only after their stored copies' checksums match and ``flush``
has returned, and fixity audits (:mod:`obsflow.archive.fixity`) re-read them later.

:class:`LocalStorage` stores a file by the cheapest correct means the operating system
offers: a reflink (``FICLONE``: the file system shares the blocks, copy-on-write), else
``copy_file_range`` (the kernel copies, no bytes through Python), else a plain copy. With
``link=True`` (setting ``ingest.link_cache``) and the source on the archive's file system,
the stored object is a *hard link* to the source (the cached file) made read-only (0444):
no bytes copied, one copy on the medium under two names, neither writable through the
other (by any process but root's).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from obsflow.errors import StorageError

log = logging.getLogger(__name__)
CHUNK = 1 << 20
FICLONE = 0x40049409
"""ioctl: make the destination share the source's blocks (Linux ``_IOW(0x94, 9, int)``)."""
CANNOT = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL,
     errno.ENOSYS, errno.EBADF}
)  # fmt: skip
"""What a link or reflink answers where the file systems cannot make it (no failure)."""
READ_ONLY = 0o444


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

    def __init__(self, root: Path, *, link: bool = False) -> None:
        """``link``: store a source on the archive's file system as a read-only hard link
        to it (``ingest.link_cache``); elsewhere, or where links fail, copy."""
        self.root = root
        self.tmp = root / ".tmp"  # one file system with the archive: renames are atomic
        self.link = link
        self._clone = True  # reflinks, until the file system says it has none
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
                if not (self.link and self._put_link(source, temp, target)):
                    self._put_copy(source, temp, target)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            self._made.discard(target.parent)  # perhaps removed: look again next time
            raise StorageError(f"cannot store {key} under {self.root}: {exc}") from exc
        with self._lock:
            self._unsynced.add(target.parent)

    def _put_copy(self, source: Path, temp: Path, target: Path) -> None:
        with source.open("rb") as src, temp.open("wb") as dst:
            # held until closed (or the process dies): recover() leaves it alone
            fcntl.flock(dst.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not (self._clone and self._reflink(src, dst)):
                _copy(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
            os.replace(temp, target)

    def _reflink(self, src: BinaryIO, dst: BinaryIO) -> bool:
        """Clone ``src`` into ``dst`` (no bytes copied: the blocks are shared until either
        is written); False, and never tried again, where the file system cannot."""
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError as exc:
            if exc.errno not in CANNOT:
                raise
            self._clone = False
            return False
        return True

    def _put_link(self, source: Path, temp: Path, target: Path) -> bool:
        """Store ``source`` as a hard link, read-only and synced; False (and copies from
        then on) where it cannot be linked (another file system, no hard links)."""
        try:
            os.link(source, temp)
        except OSError as exc:
            if exc.errno not in CANNOT:
                raise
            log.warning(
                "ingest.link_cache: cannot link %s into %s (%s): copying instead",
                source, self.root, exc.strerror,
            )  # fmt: skip
            self.link = False
            return False
        fd = os.open(temp, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (as a copy's: recover() waits)
            os.fchmod(fd, READ_ONLY)  # the inode's: the cached name is read-only too
            os.fsync(fd)  # receipt did not sync the cached file: the link is what is durable
            os.replace(temp, target)
            # a rename onto another name of the same file does nothing: drop the temp name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        finally:
            os.close(fd)
        return True

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

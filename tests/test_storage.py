"""Local archive storage: keys stay inside the archive; interrupted puts are recovered."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from obsflow.archive.storage import LocalStorage, check_key
from obsflow.errors import StorageError


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../outside", "OFCAM/../../outside", "OFCAM/./x", "a//b", ".hidden",
     "OFCAM/.tmp/x", "a\\b"],
)  # fmt: skip
def test_no_key_can_name_a_path_outside_the_archive(key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        check_key(key)


def test_put_stores_atomically_and_reads_back(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "archive")
    source = tmp_path / "frame.fits"
    source.write_bytes(b"\x01" * 10_000)
    storage.put(source, "OFCAM/2026-11-21/OF.1.fits")
    storage.flush()
    assert storage.exists("OFCAM/2026-11-21/OF.1.fits")
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert storage.sha256("OFCAM/2026-11-21/OF.1.fits") == expected
    assert list((tmp_path / "archive" / ".tmp").iterdir()) == []  # no temp left behind


def test_recover_removes_abandoned_temps_but_not_a_put_in_progress(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "archive")
    storage.tmp.mkdir(parents=True)
    abandoned = storage.tmp / "dead.part"
    abandoned.write_bytes(b"half a frame")  # its writer died: nobody holds its lock
    busy = storage.tmp / "busy.part"
    busy.write_bytes(b"being written")
    holder = subprocess.Popen(  # another process holding the lock, as a live put does
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(busy)!r}, 'ab'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert storage.recover() == 1
        assert not abandoned.exists()
        assert busy.exists()
    finally:
        holder.kill()
        holder.communicate()
    time.sleep(0.05)
    assert storage.recover() == 1  # its writer is gone now
    assert not busy.exists()


def test_a_copy_is_never_changed_through_its_twin(tmp_path: Path) -> None:
    """Whatever the copy was made by (a reflink where the file system has them, else
    copy_file_range), writing one name leaves the other's bytes as they were."""
    storage = LocalStorage(tmp_path / "archive")
    source = tmp_path / "frame.fits"
    source.write_bytes(b"\x01" * 100_000)
    storage.put(source, "OFCAM/2026-11-21/OF.1.fits")
    stored = storage.path("OFCAM/2026-11-21/OF.1.fits")
    assert stored.stat().st_ino != source.stat().st_ino
    with source.open("r+b") as f:
        f.write(b"\x02" * 10)
    assert stored.read_bytes() == b"\x01" * 100_000
    with stored.open("r+b") as f:
        f.seek(500)
        f.write(b"\x03")
    assert source.read_bytes() == b"\x02" * 10 + b"\x01" * 99_990


def may_write(path: Path, uid: int | None) -> bool:
    """Whether a process (as ``uid`` if given, a user who owns ``path``) can open it to
    write. (A shell's ``<>`` redirection: the test's Python may be out of that user's reach.)"""
    done = subprocess.run(
        ["/bin/sh", "-c", ': 3<>"$1"', "sh", str(path)],
        user=uid, cwd="/", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0 or "denied" in done.stderr, done.stderr
    return done.returncode == 0


def test_a_linked_copy_is_the_cached_file_made_read_only_under_both_names() -> None:
    """ingest.link_cache: one inode under two names, 0444, so neither name can be written
    to change the other, not even by the user who owns it (root bypasses modes: as root,
    the check runs as another user who owns the file, beside a writable control file)."""
    work = Path(tempfile.mkdtemp(prefix="obsflow-link-"))  # not under pytest's 0700 tree
    try:
        work.chmod(0o755)
        cache = work / "cache"
        cache.mkdir()
        source = cache / "frame.fits"
        source.write_bytes(b"\x01" * 100_000)
        storage = LocalStorage(work / "archive", link=True)
        storage.put(source, "OFCAM/2026-11-21/OF.1.fits")
        storage.flush()
        stored = storage.path("OFCAM/2026-11-21/OF.1.fits")
        assert stored.stat().st_ino == source.stat().st_ino and source.stat().st_nlink == 2
        assert stat.S_IMODE(stored.stat().st_mode) == 0o444
        assert (
            storage.sha256("OFCAM/2026-11-21/OF.1.fits")
            == hashlib.sha256(b"\x01" * 100_000).hexdigest()
        )
        assert list(storage.tmp.iterdir()) == []
        uid = None
        if os.geteuid() == 0:
            uid = 65534  # nobody: owns the file, as obsflow's user would
            os.chown(source, uid, -1)
            control = cache / "control"
            control.write_bytes(b"")
            os.chown(control, uid, -1)
            assert may_write(control, uid)  # the way there is open: only the mode refuses
        assert not may_write(stored, uid)
        assert not may_write(source, uid)
        # stored again (a retry, a restore): the same link, no temp name left behind
        storage.put(source, "OFCAM/2026-11-21/OF.1.fits")
        assert source.stat().st_nlink == 2 and list(storage.tmp.iterdir()) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_link_across_file_systems_is_a_copy(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to link across")
    source = Path(tempfile.mkdtemp(dir=shm)) / "frame.fits"
    try:
        source.write_bytes(b"\x01" * 10_000)
        storage = LocalStorage(tmp_path / "archive", link=True)
        storage.put(source, "OFCAM/2026-11-21/OF.1.fits")
        stored = storage.path("OFCAM/2026-11-21/OF.1.fits")
        assert stored.read_bytes() == source.read_bytes()
        assert stored.stat().st_ino != source.stat().st_ino and not storage.link
        assert stat.S_IMODE(source.stat().st_mode) != 0o444
    finally:
        shutil.rmtree(source.parent, ignore_errors=True)

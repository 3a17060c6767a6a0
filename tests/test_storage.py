"""Local archive storage: keys stay inside the archive; interrupted puts are recovered."""

from __future__ import annotations

import hashlib
import subprocess
import sys
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

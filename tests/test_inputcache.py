"""A remote worker's input cache: files by sha256, fetched once, checked, held while a
run uses them, evicted least recently used first within a budget; several processes
may share it (real files, real flocks, a real second process)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from obsflow.errors import StorageError
from obsflow.processing.inputcache import InputCache, Write


def blob(n: int, size: int = 1000) -> tuple[bytes, str]:
    data = bytes([n % 256]) * size
    return data, hashlib.sha256(data).hexdigest()


class Origin:
    """Where downloads come from (the server, for the cache): counts what it sends."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def of(self, data: bytes, pause: float = 0.0) -> Callable[[Write], None]:
        def download(write: Write) -> None:
            self.sent.append(hashlib.sha256(data).hexdigest())
            time.sleep(pause)
            write(data[: len(data) // 2])
            write(data[len(data) // 2 :])

        return download


def test_a_file_is_fetched_once_then_found_checked_and_read_only(tmp_path: Path) -> None:
    cache, origin = InputCache(tmp_path, 10_000), Origin()
    data, sha = blob(1)
    first = cache.fetch(sha, origin.of(data), label="bias")
    second = cache.fetch(sha, origin.of(data), label="bias")
    assert origin.sent == [sha]  # the second run found it
    assert first.path == second.path and first.path.read_bytes() == data
    assert first.path.stat().st_mode & 0o222 == 0  # no step may change it
    assert list((tmp_path / "tmp").iterdir()) == []
    first.close()
    second.close()


def test_bytes_that_do_not_match_their_sha256_are_refused_and_not_kept(
    tmp_path: Path,
) -> None:
    cache, origin = InputCache(tmp_path, 10_000), Origin()
    data, sha = blob(1)
    with pytest.raises(StorageError, match=r"OF\.1 \(ofc_1\.fits\): the bytes fetched have sha256"):
        cache.fetch(sha, origin.of(data + b"rot"), label="OF.1 (ofc_1.fits)")
    assert cache.hold(sha) is None and cache.usage() == 0
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_failed_download_leaves_nothing(tmp_path: Path) -> None:
    cache = InputCache(tmp_path, 10_000)
    _, sha = blob(1)

    def cut(write: Write) -> None:
        write(b"half")
        raise ConnectionError("the server went away")

    with pytest.raises(ConnectionError):
        cache.fetch(sha, cut, label="x")
    assert cache.usage() == 0 and list((tmp_path / "tmp").iterdir()) == []


def test_over_budget_the_least_recently_used_go_first_never_a_held_one(
    tmp_path: Path,
) -> None:
    cache, origin = InputCache(tmp_path, 2_500), Origin()  # room for two of 1000 bytes
    files = [blob(n) for n in range(4)]
    held = [cache.fetch(sha, origin.of(data), label=str(n)) for n, (data, sha) in
            enumerate(files[:2])]  # fmt: skip
    for each in held:
        each.close()
    os.utime(held[0].path, (1, 1))  # used long ago ...
    again = cache.hold(files[0][1])  # ... and now again: the other is the older one
    assert again is not None
    again.close()
    cache.fetch(files[2][1], origin.of(files[2][0]), label="2").close()
    assert cache.hold(files[1][1]) is None  # the least recently used went
    assert cache.usage() == 2000
    # a run holds both files left; a third one puts the cache over its budget, and
    # stays over it: nothing a run holds is evicted
    holding = [cache.hold(files[0][1]), cache.hold(files[2][1])]
    newest = cache.fetch(files[3][1], origin.of(files[3][0]), label="3")
    assert cache.usage() == 3000
    assert all(h is not None and h.path.is_file() for h in holding)
    trimmed = cache.trim()
    assert trimmed.evicted == () and trimmed.held == 3 and trimmed.left == 3000
    for h in [*holding, newest]:
        assert h is not None
        h.close()
    assert cache.trim().left <= 2500  # once the run is over, the budget holds again


def test_two_threads_wanting_one_file_download_it_once(tmp_path: Path) -> None:
    cache, origin = InputCache(tmp_path, 10_000), Origin()
    data, sha = blob(7)
    got: list[Path] = []

    def want() -> None:
        held = cache.fetch(sha, origin.of(data, pause=0.3), label="flat")
        got.append(held.path)
        held.close()

    threads = [threading.Thread(target=want) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert origin.sent == [sha] and len(got) == 3 and len(set(got)) == 1


HOLDER = """
import sys
from pathlib import Path
from obsflow.processing.inputcache import InputCache
held = InputCache(Path(sys.argv[1]), 10_000).hold(sys.argv[2])
print("held" if held else "absent", flush=True)
sys.stdin.read()
"""


def test_a_file_another_process_holds_is_not_evicted_until_that_process_ends(
    tmp_path: Path,
) -> None:
    cache, origin = InputCache(tmp_path, 10_000), Origin()
    data, sha = blob(3)
    cache.fetch(sha, origin.of(data), label="bias").close()
    other = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), sha],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        assert cache.trim(to=0).evicted == ()
        mine = cache.hold(sha)
        assert mine is not None  # still there
        mine.close()
    finally:
        other.kill()  # however it ends, the kernel drops its lock
        other.communicate(timeout=30)
    assert cache.trim(to=0).evicted == (sha,)
    assert cache.usage() == 0

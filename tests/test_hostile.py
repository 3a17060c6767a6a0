"""Hostile input at receipt: the corpus of broken frames in ``tests/hostile/`` (written by
``tests/hostile/make.py``, with the reason each must get in ``expected.json``), received
directly and through the transfer endpoint. Each is quarantined once with its reason;
none raises, none is offered again as new, none is a 500."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from obsflow.access import Scope, TokenStore
from obsflow.api import ApiServer
from obsflow.catalog import FileQuery
from obsflow.catalog.seen import SeenLedger
from obsflow.receipt.receiver import Outcome, Received
from obsflow.site import Site, open_site
from obsflow.states import FileState
from obsflow.trigger.scan import ReconcileScan
from tests.conftest import SiteFactory
from tests.hostile import make

CORPUS = Path(__file__).parent / "hostile"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())


def test_the_corpus_on_disk_is_the_one_its_script_writes() -> None:
    assert sorted(p.name for p in CORPUS.glob("ofc_*.fits")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_hostile_frame_is_quarantined_once_with_its_reason(site: Site, name: str) -> None:
    source = site.settings.incoming / name
    shutil.copyfile(CORPUS / name, source)
    expected = EXPECTED[name]
    first = site.receiver.receive(source)
    assert first.outcome is Outcome.REJECTED, first
    assert first.reason is not None and first.reason.startswith(f"{expected['reason']}: ")
    for word in expected["detail"]:
        assert word in first.reason, (word, first.reason)
    again = site.receiver.receive(source)  # the next scan offers it again: nothing new
    assert again.outcome is Outcome.REJECTED and again.reason == first.reason
    (row,) = site.catalog.find(FileQuery())
    assert row.state is FileState.REJECTED and row.reason == first.reason
    assert len(list(site.settings.quarantine.rglob(name))) == 1


@pytest.fixture
def server(make_site: SiteFactory) -> Iterator[tuple[Site, str, str]]:
    site = open_site(make_site("server"))
    api = ApiServer(site).start()
    token, _ = TokenStore(site.catalog).create("agent", Scope.WRITE, [], site.clock())
    try:
        yield site, api.url, token
    finally:
        api.stop()
        site.close()


def test_every_hostile_frame_sent_to_the_transfer_endpoint_is_a_422_problem(
    server: tuple[Site, str, str],
) -> None:
    site, url, token = server
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as http:
        for name, expected in EXPECTED.items():
            data = (CORPUS / name).read_bytes()
            answer = http.put(
                "/transfers/OF.20261122.18000.00.fits",
                content=data,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Upload-Length": str(len(data)),
                    "Obsflow-Sha256": hashlib.sha256(data).hexdigest(),
                    "Obsflow-Name": name,
                },
            )
            assert answer.status_code == 422, (name, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            for word in expected["detail"]:
                assert word in answer.json()["detail"], (name, word, answer.text)
    assert site.catalog.find(FileQuery(state=FileState.CACHED)) == []


# ------------------------------------------------------ headers without an END card


def endless_header(path: Path, *, extension: bool, size: int = 64 << 20) -> None:
    """A ``size``-byte file whose primary (or first extension's) header never ends:
    printable blanks, as a broken writer or a hostile sender makes."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8"]
    cards += ["NAXIS   =                    0"]
    cards += ["EXTEND  =                    T", "END"] if extension else []
    primary = "".join(card.ljust(80) for card in cards).encode()
    primary = primary.ljust(-(-len(primary) // 2880) * 2880)
    start = primary + (b"XTENSION= 'IMAGE   '".ljust(80) if extension else b"")
    with path.open("wb") as out:
        out.write(start)
        blanks = b" " * (1 << 20)
        left = size - len(start)
        while left > 0:
            out.write(blanks[:left])
            left -= len(blanks)


@pytest.mark.parametrize("extension", [False, True], ids=["primary", "extension"])
def test_a_64_mb_header_without_end_is_refused_in_linear_time_and_bounded_memory(
    site: Site, extension: bool
) -> None:
    source = site.settings.incoming / "ofc_20261122_9999.fits"
    endless_header(source, extension=extension)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = site.receiver.receive(source)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.outcome is Outcome.REJECTED, result
    assert result.reason is not None and "no END card in its first 4,194,304 bytes" in result.reason
    assert peak < 16 << 20, peak  # the cap and a chunk or two, never the file
    assert seconds < 20, seconds  # (quadratic re-scanning took minutes, or forever)


def test_the_header_cap_is_a_setting(make_site: SiteFactory) -> None:
    site = open_site(make_site(receipt={"max_header_bytes": 2880}))
    try:
        short = site.settings.incoming / "ofc_20261122_0001.fits"
        short.write_bytes(make.header({}))  # one block
        notes = {f"NOTE{n}": f"'{n}'" for n in range(40)}
        long = site.settings.incoming / "ofc_20261122_0002.fits"
        long.write_bytes(make.header(notes))  # two blocks
        refused = site.receiver.receive(long)
        assert refused.outcome is Outcome.REJECTED, refused
        assert refused.reason is not None and "in its first 2,880 bytes" in refused.reason
        assert site.receiver.receive(short).outcome is Outcome.CACHED
    finally:
        site.close()


# -------------------------------------------------------------------- special files


def receive_at_once(site: Site, path: Path) -> Received:
    """Receive ``path`` on a thread; fail the test if it blocks (a FIFO opened)."""
    results: list[Received] = []
    worker = threading.Thread(target=lambda: results.append(site.receiver.receive(path)))
    worker.daemon = True
    worker.start()
    worker.join(10)
    assert results, f"receipt of {path} blocked"
    return results[0]


def test_fifos_sockets_and_devices_are_refused_at_once_with_a_reason(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = site.settings.incoming / "ofc_20261122_0001.fits"
    os.mkfifo(fifo)
    sock_path = site.settings.incoming / "ofc_20261122_0002.fits"
    sock = socket.socket(socket.AF_UNIX)
    try:
        monkeypatch.chdir(sock_path.parent)  # a socket's path is at most 107 bytes: bound
        sock.bind(sock_path.name)  # by its name, however deep pytest's temporary directory
        for path, what in [
            (fifo, "a FIFO"),
            (sock_path, "a socket"),
            (Path("/dev/null"), "a character device"),
        ]:
            result = receive_at_once(site, path)
            assert result.outcome is Outcome.REFUSED, result
            assert (
                result.reason is not None and what in result.reason and str(path) in result.reason
            )
    finally:
        sock.close()
    assert site.catalog.find(FileQuery()) == []
    assert not site.settings.quarantine.exists() or list(site.settings.quarantine.rglob("*")) == []


@pytest.mark.parametrize("follow", [False, True], ids=["default", "follow_symlinks"])
def test_a_symlink_is_never_followed_out_of_the_directories_given(
    make_site: SiteFactory, frames: list[Path], follow: bool
) -> None:
    site = open_site(make_site(receipt={"follow_symlinks": follow}))
    try:
        outside = site.settings.incoming / frames[0].name
        outside.symlink_to(frames[0])  # the frames' folder is no directory receipt was given
        secret = site.settings.incoming / "ofc_20261122_0099.fits"
        secret.symlink_to(site.settings.site / "obsflow.yaml")
        inside_dir = site.settings.incoming / "night"
        inside_dir.mkdir()
        real = inside_dir / frames[1].name
        shutil.copyfile(frames[1], real)
        inside = site.settings.incoming / frames[1].name
        inside.symlink_to(real)
        for link in (outside, secret):
            refused = receive_at_once(site, link)
            assert refused.outcome is Outcome.REFUSED, refused
            assert refused.reason is not None and "symbolic link" in refused.reason
        taken = receive_at_once(site, inside)
        if follow:
            assert taken.outcome is Outcome.CACHED, taken
        else:
            assert taken.outcome is Outcome.REFUSED and "follow_symlinks" in str(taken.reason)
        assert len(site.catalog.find(FileQuery())) == (1 if follow else 0)
    finally:
        site.close()


def test_obsflow_ingest_refuses_special_files_and_links_with_a_reason(
    make_site: SiteFactory, frames: list[Path], tmp_path: Path
) -> None:
    settings = make_site()
    folder = tmp_path / "drop"
    folder.mkdir()
    shutil.copyfile(frames[0], folder / frames[0].name)
    os.mkfifo(folder / "ofc_20261122_0777.fits")
    (folder / "ofc_20261122_0778.fits").symlink_to(settings.site / "obsflow.yaml")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "ingest", "--site", str(settings.site), str(folder)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert done.returncode == 1, done.stderr
    assert "ofc_20261122_0777.fits is a FIFO" in done.stderr
    assert "ofc_20261122_0778.fits is a symbolic link" in done.stderr
    with contextlib.closing(open_site(settings)) as site:
        (row,) = site.catalog.find(FileQuery())
        assert row.original_name == frames[0].name  # the regular file went in


def test_the_reconcile_scan_offers_special_files_for_receipt_to_refuse(site: Site) -> None:
    fifo = site.settings.incoming / "ofc_20261122_0001.fits"
    os.mkfifo(fifo)
    offered: list[Path] = []
    ReconcileScan(
        [(site.settings.incoming, False)], SeenLedger(site.catalog), interval_seconds=60
    ).scan_once(offered.append)
    assert offered == [fifo]
    assert receive_at_once(site, fifo).outcome is Outcome.REFUSED

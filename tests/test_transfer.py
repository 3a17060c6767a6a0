"""The transfer protocol: an agent's client against a real archive server on 127.0.0.1
(the server's API in a thread, its ingestor in another; each side its own catalog)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from obsflow.access import Scope, TokenStore
from obsflow.api import ApiServer, create_app
from obsflow.api.services import Uploads
from obsflow.catalog import FileQuery
from obsflow.receipt.intake import Wake
from obsflow.receipt.receiver import Prepared
from obsflow.settings import Settings
from obsflow.site import Site, open_site
from obsflow.states import FileState, LedgerEvent
from obsflow.transfer.agent import Transferer
from obsflow.transfer.client import (
    BusyError,
    Client,
    ConflictError,
    DeniedError,
    Outgoing,
    RefusedError,
    TransferError,
)
from tests.conftest import SiteFactory

ACQUIRED = datetime(2026, 11, 22, 5, 0, 1, tzinfo=UTC)


@dataclass
class Archive:
    """A running archive server: its site, its URL, tokens of each kind."""

    site: Site
    url: str
    write: str
    read: str
    elsewhere: str  # write scope, for another instrument's frames only
    requests: list[str]
    uploads: Uploads | None = None  # the server's uploads in progress

    def client(self, token: str | None = None) -> Client:
        client = Client(self.url, token if token is not None else self.write, timeout=10)
        client.http.event_hooks["request"] = [
            lambda request: self.requests.append(f"{request.method} {request.url.path}")
        ]
        return client


@pytest.fixture
def archive(make_site: SiteFactory) -> Iterator[Archive]:
    settings = make_site("server", transfer={"confirm_seconds": 5.0, "max_queue": 3})
    site = open_site(settings)
    committed = threading.Event()
    stop = threading.Event()
    ingestor = threading.Thread(
        target=site.ingestor().run, args=(stop,), kwargs={"wake": committed}, daemon=True
    )
    ingestor.start()
    server = ApiServer(site, app=create_app(site, wake=Wake(committed))).start()
    tokens = TokenStore(site.catalog)
    now = site.clock()
    write, _ = tokens.create("agent", Scope.WRITE, [], now)
    read, _ = tokens.create("reader", Scope.READ, [], now)
    elsewhere, _ = tokens.create("other", Scope.WRITE, [], now, instruments=["OTHERCAM"])
    try:
        yield Archive(
            site, server.url, write, read, elsewhere, [], server.app.state.services.uploads
        )
    finally:
        server.stop()
        stop.set()
        ingestor.join(30)
        site.close()


def given_id(site: Site, frame: Path, bump: int = 0) -> str:
    """The archive ID the registry gives ``frame`` (the agent's and the server's alike),
    or the ``bump``-th after it (frames of one hundredth of a second)."""
    prepared = site.receiver.prepare(frame)
    assert isinstance(prepared, Prepared), prepared
    prepared.temp.unlink()
    return prepared.scheme()(bump)


def outgoing(frame: Path, archive_id: str | Site) -> Outgoing:
    """``frame`` to send under ``archive_id``, or the one ``site``'s registry gives it."""
    data = frame.read_bytes()
    if not isinstance(archive_id, str):
        archive_id = given_id(archive_id, frame)
    return Outgoing(
        archive_id=archive_id,
        path=frame,
        name=frame.name,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        acquired=ACQUIRED,
        received=ACQUIRED + timedelta(seconds=0.05),
    )


def server_file(archive: Archive, archive_id: str) -> Any:
    return archive.site.catalog.get(archive_id)


def test_a_frame_arrives_once_verified_and_a_second_send_sends_no_bytes(
    archive: Archive, frames: list[Path]
) -> None:
    out = outgoing(frames[0], archive.site)
    client = archive.client()
    try:
        client.send(out)
        record = server_file(archive, out.archive_id)
        assert record is not None and record.state is FileState.ARCHIVED
        assert record.sha256 == out.sha256 and record.original_name == frames[0].name
        stored = archive.site.storage.sha256(record.archive_path)
        assert stored == out.sha256  # verified in the server's archive
        ledger = {e.event: e.at for e in archive.site.catalog.ledger(record.id)}
        assert ledger[LedgerEvent.ACQUIRED] == ACQUIRED  # the telescope's moment, kept
        assert ledger[LedgerEvent.ARCHIVED] >= ledger[LedgerEvent.CACHED] > ACQUIRED
        archive.requests.clear()
        client.send(out)  # again (a retry after a lost answer): asks, sends nothing
        assert archive.requests == [f"GET /api/v1/transfers/{out.archive_id}"]
    finally:
        client.close()
    assert [r.archive_id for r in archive.site.catalog.find(FileQuery())] == [out.archive_id]
    uploads = archive.site.settings.cache / ".uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []  # nothing half-written


def test_an_interrupted_upload_resumes_from_the_bytes_the_server_holds(
    archive: Archive, frames: list[Path]
) -> None:
    out = outgoing(frames[1], archive.site)
    data = out.path.read_bytes()
    half = len(data) // 2
    headers = {
        "Authorization": f"Bearer {archive.write}",
        "Upload-Length": str(out.size),
        "Upload-Offset": "0",
        "Obsflow-Sha256": out.sha256,
        "Obsflow-Name": out.name,
    }
    url = f"{archive.url}/api/v1/transfers/{out.archive_id}"
    first = httpx.put(url, content=data[:half], headers=headers, timeout=10)  # the cut
    assert first.status_code == 200 and first.json()["state"] == "partial"
    client = archive.client()
    try:
        assert client.state(out.archive_id, out.sha256) == {
            "archive_id": out.archive_id,
            "state": "partial",
            "offset": half,
        }
        archive.requests.clear()
        client.send(out)
    finally:
        client.close()
    record = server_file(archive, out.archive_id)
    assert record is not None and record.state is FileState.ARCHIVED
    assert record.sha256 == out.sha256
    assert f"PUT /api/v1/transfers/{out.archive_id}" in archive.requests


def test_a_wrong_checksum_is_refused_and_nothing_is_stored(
    archive: Archive, frames: list[Path]
) -> None:
    out = outgoing(frames[2], archive.site)
    wrong = Outgoing(**{**out.__dict__, "sha256": hashlib.sha256(b"other").hexdigest()})
    client = archive.client()
    try:
        with pytest.raises(RefusedError, match="sha256"):
            client.send(wrong)
    finally:
        client.close()
    assert server_file(archive, out.archive_id) is None
    assert list((archive.site.settings.cache / ".uploads").glob("*.part")) == []


def test_an_upload_already_in_progress_asks_the_agent_to_wait(
    archive: Archive, frames: list[Path]
) -> None:
    out = outgoing(frames[3], archive.site)
    assert archive.uploads is not None
    assert archive.uploads.claim(out.archive_id)  # another connection is sending it
    client = archive.client()
    try:
        with pytest.raises(BusyError, match="being uploaded already") as caught:
            client.send(out)
        assert caught.value.retry_after == 1.0
    finally:
        archive.uploads.release(out.archive_id)
        client.close()
    assert server_file(archive, out.archive_id) is None


def test_the_same_id_with_other_bytes_is_a_conflict_never_an_overwrite(
    archive: Archive, frames: list[Path]
) -> None:
    """Another copy of the same frame (same header, a changed pixel) under its ID."""
    folder = frames[3].parent.parent / "other"
    folder.mkdir()
    other = folder / frames[3].name
    data = bytearray(frames[3].read_bytes())
    data[-1] ^= 0xFF
    other.write_bytes(bytes(data))
    archive_id = given_id(archive.site, frames[3])
    client = archive.client()
    try:
        client.send(outgoing(frames[3], archive_id))
        with pytest.raises(ConflictError, match="other bytes"):
            client.send(outgoing(other, archive_id))
    finally:
        client.close()
    record = server_file(archive, archive_id)
    assert record is not None and record.original_name == frames[3].name


@pytest.mark.parametrize("who", ["none", "bad", "read", "elsewhere"])
def test_a_transfer_needs_a_write_token_and_a_refused_one_stores_nothing(
    archive: Archive, frames: list[Path], who: str
) -> None:
    token = {
        "none": "",
        "bad": "obsflow_" + "x" * 43,
        "read": archive.read,
        "elsewhere": archive.elsewhere,
    }[who]
    client = archive.client(token)
    try:
        with pytest.raises(DeniedError):
            client.send(outgoing(frames[5], archive.site))
    finally:
        client.close()
    assert archive.site.catalog.find(FileQuery()) == []
    assert not (archive.site.settings.cache / ".uploads").exists()


def test_a_busy_archive_answers_503_with_retry_after(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    site = open_site(make_site("busy", transfer={"max_queue": 2, "confirm_seconds": 0}))
    server = ApiServer(site).start()  # no ingestor: the queue only grows
    token, _ = TokenStore(site.catalog).create("agent", Scope.WRITE, [], site.clock())
    client = Client(server.url, token, timeout=10)
    try:
        for frame in frames[:3]:
            with pytest.raises(TransferError, match="cached at the server"):
                client.send(outgoing(frame, site))
        with pytest.raises(BusyError, match="3 files wait") as busy:
            client.send(outgoing(frames[3], site))
        assert busy.value.retry_after == 2.0
    finally:
        client.close()
        server.stop()
        site.close()


def test_an_agent_frame_the_server_keeps_refusing_is_quarantined_with_its_reason(
    archive: Archive, make_site: SiteFactory, frames: list[Path]
) -> None:
    """The agent's cached copy went bad after receipt: every upload is refused (its
    sha256 is not the one recorded), and after transfer.max_refusals the frame is
    quarantined at the agent, failed, with the server's reason."""
    agent = open_site(
        make_site(
            "agent",
            catalog={"url": "sqlite:///agent.db"},
            transfer={"max_refusals": 2},
            ingest={"backoff_seconds": 0.0},
        )
    )
    client = archive.client()
    try:
        received = agent.receiver.receive(frames[6])
        assert received.archive_id is not None
        record = agent.catalog.get(received.archive_id)
        assert record is not None and record.cache_path is not None
        cached = agent.cache.path(record.cache_path)
        data = bytearray(cached.read_bytes())
        data[-1] ^= 0xFF  # a bit flipped in the data, after the checksum was taken
        cached.write_bytes(bytes(data))
        sender = Transferer(
            agent.catalog, agent.storage, agent.cache, agent.settings.ingest,
            agent.settings.transfer, client, agent.settings.quarantine, clock=agent.clock,
        )  # fmt: skip
        for _ in range(2):
            report = sender.run_once()
            assert report.archived == [] and "sha256" in report.errors[0][1]
        assert sender.run_once().errors == []  # failed for good: nothing more to try
        failed = agent.catalog.get(received.archive_id)
        assert failed is not None and failed.state is FileState.FAILED
        (kept,) = agent.settings.quarantine.glob(f"*/{received.archive_id}")
        note = json.loads(kept.with_name(kept.name + ".reason.json").read_text())
        assert "sha256" in note["detail"] and note["archive_id"] == received.archive_id
        assert kept.read_bytes() == bytes(data)
    finally:
        client.close()
        agent.close()
    assert server_file(archive, received.archive_id) is None  # nothing stored


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--role", "agent"], "an agent needs its archive server"),
        (["--role", "agent", "--server", "archive.example.org"], "expected an http(s) URL"),
        (["--role", "server"], "a server needs an address to listen on"),
    ],
)
def test_a_role_without_what_it_needs_says_so_and_starts_nothing(
    make_site: SiteFactory, args: list[str], expected: str
) -> None:
    settings = make_site("lonely")
    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "run", "--site", str(settings.site), *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("OBSFLOW_")},
    )  # fmt: skip
    assert done.returncode != 0
    assert expected in done.stderr
    assert not (settings.site / ".obsflow" / "daemon.json").exists()


# ------------------------------------------------- the server decides identities


def nothing_kept(archive: Archive) -> None:
    """No row, no cached or quarantined bytes, no partial upload."""
    assert archive.site.catalog.find(FileQuery()) == []
    assert [p for p in archive.site.settings.quarantine.rglob("*") if p.is_file()] == []
    uploads = archive.site.settings.cache / ".uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def edited(frame: Path, old: bytes, new: bytes, folder: str = "edited") -> Path:
    """A copy of ``frame`` (same name, another folder) with one header value changed."""
    data = frame.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    target = frame.parent.parent / folder / frame.name
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data.replace(old, new))
    return target


@pytest.mark.parametrize("claim", ["no template", "another frame's", "a later suffix"])
def test_an_upload_under_an_id_its_header_does_not_give_is_refused_and_nothing_kept(
    archive: Archive, frames: list[Path], claim: str
) -> None:
    """An uploader cannot squat another frame's archive ID: the server gives the ID."""
    archive_id = {
        "no template": "ZZ-any-name",
        "another frame's": given_id(archive.site, frames[1]),
        "a later suffix": given_id(archive.site, frames[0], bump=3),
    }[claim]
    client = archive.client()
    try:
        with pytest.raises(RefusedError, match=f"{archive_id} is not") as refused:
            client.send(outgoing(frames[0], archive_id))
    finally:
        client.close()
    if claim == "no template":
        assert "no instrument's template gives it" in str(refused.value)
    else:
        assert given_id(archive.site, frames[0]) in str(refused.value)  # says which it is
    nothing_kept(archive)


def test_a_frame_of_the_same_hundredth_takes_the_next_free_suffix_only(
    archive: Archive, frames: list[Path]
) -> None:
    """Two frames whose headers give one ID: the second may take the next, never further."""
    twin = edited(frames[3], b"U017", b"U018")  # the same moment, other bytes
    first, second, third = (given_id(archive.site, frames[3], bump) for bump in range(3))
    client = archive.client()
    try:
        client.send(outgoing(frames[3], first))
        with pytest.raises(RefusedError, match=f"the next free one, {second}"):
            client.send(outgoing(twin, third))
        client.send(outgoing(twin, second))
    finally:
        client.close()
    held = {r.archive_id: r.sha256 for r in archive.site.catalog.find(FileQuery())}
    assert held == {first: outgoing(frames[3], first).sha256, second: outgoing(twin, second).sha256}


def test_a_frame_whose_header_names_another_instrument_is_refused(
    archive: Archive, frames: list[Path]
) -> None:
    renamed = edited(frames[0], b"'OFCAM   '", b"'OTHERCAM'")
    client = archive.client()
    try:
        with pytest.raises(RefusedError, match="INSTRUME = 'OTHERCAM' is not OFCAM"):
            client.send(outgoing(renamed, given_id(archive.site, frames[0])))
    finally:
        client.close()
    nothing_kept(archive)


def test_a_program_limited_token_uploads_only_its_programs_frames(
    archive: Archive, frames: list[Path]
) -> None:
    tokens = TokenStore(archive.site.catalog)
    now = archive.site.clock()
    outsider, _ = tokens.create("outsider", Scope.WRITE, ["NOPE"], now)
    prepared = archive.site.receiver.prepare(frames[0])
    assert isinstance(prepared, Prepared) and prepared.meta.program
    prepared.temp.unlink()
    insider, _ = tokens.create("insider", Scope.WRITE, [prepared.meta.program], now)
    out = outgoing(frames[0], archive.site)
    client = archive.client(outsider)
    try:
        with pytest.raises(RefusedError, match=f"program {prepared.meta.program}; the sender"):
            client.send(out)
    finally:
        client.close()
    nothing_kept(archive)
    client = archive.client(insider)
    try:
        client.send(out)
    finally:
        client.close()
    assert server_file(archive, out.archive_id) is not None


# --------------------------------------------------- no oracle in the transfer state


def test_the_transfer_state_answers_only_for_ids_the_token_may_send(
    archive: Archive, frames: list[Path]
) -> None:
    """Else it would be an oracle: whether given bytes are some other program's file."""
    out = outgoing(frames[0], archive.site)
    client = archive.client()
    try:
        client.send(out)
    finally:
        client.close()
    record = server_file(archive, out.archive_id)
    outsider, _ = TokenStore(archive.site.catalog).create(
        "outsider", Scope.WRITE, ["NOPE"], archive.site.clock()
    )
    for token, archive_id in [
        (outsider, out.archive_id),  # a file of another program
        (archive.elsewhere, out.archive_id),  # of another instrument
        (archive.elsewhere, given_id(archive.site, frames[1])),  # an ID OFCAM's template gives
    ]:
        answer = httpx.get(
            f"{archive.url}/api/v1/transfers/{archive_id}",
            params={"sha256": out.sha256},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 403, (archive_id, answer.text)
        assert "state" not in answer.json()
    assert record is not None and record.program  # (the file's program is not NOPE)


def test_a_conflict_never_shows_any_part_of_the_stored_sha256(
    archive: Archive, frames: list[Path]
) -> None:
    out = outgoing(frames[0], archive.site)
    client = archive.client()
    try:
        client.send(out)
        other = hashlib.sha256(b"guess").hexdigest()
        state = client.http.get(f"/transfers/{out.archive_id}", params={"sha256": other}).json()
    finally:
        client.close()
    assert state["state"] == "conflict"
    text = json.dumps(state)
    assert not any(out.sha256[i : i + 6] in text for i in range(0, 59))
    assert other[:6] not in text


# ------------------------------------------------------------------ bounded uploads


@contextmanager
def server_with(
    make_site: SiteFactory | Settings, **transfer: Any
) -> Iterator[tuple[Site, str, str]]:
    """A server (no ingestor) with these transfer settings (or of a site made before),
    and a write token."""
    if not isinstance(make_site, Settings):
        make_site = make_site("bounded", transfer={"confirm_seconds": 0, **transfer})
    site = open_site(make_site)
    server = ApiServer(site).start()
    token, _ = TokenStore(site.catalog).create("agent", Scope.WRITE, [], site.clock())
    try:
        yield site, server.url, token
    finally:
        server.stop()
        site.close()


def put(url: str, token: str, out: Outgoing, data: bytes, **headers: str) -> httpx.Response:
    return httpx.put(
        f"{url}/api/v1/transfers/{out.archive_id}",
        content=data,
        headers={
            "Authorization": f"Bearer {token}",
            "Upload-Length": str(out.size),
            "Obsflow-Sha256": out.sha256,
            "Obsflow-Name": out.name,
            **headers,
        },
        timeout=30,
    )


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize(
    ("limits", "status", "words"),
    [
        ({"max_bytes": 1000}, 413, "transfer.max_bytes"),
        ({"reserve_bytes": 1 << 62}, 507, "transfer.reserve_bytes"),
    ],
)
def test_an_upload_larger_than_allowed_or_than_the_room_is_refused_before_a_byte(
    make_site: SiteFactory, frames: list[Path], limits: dict[str, int], status: int, words: str
) -> None:
    with server_with(make_site, **limits) as (site, url, token):
        out = outgoing(frames[0], site)
        answer = put(url, token, out, out.path.read_bytes())
        assert answer.status_code == status, answer.text
        assert words in answer.json()["detail"]
        assert files_in(site.settings.cache) == []
        assert site.catalog.find(FileQuery()) == []


def test_partial_uploads_expire_at_start_up_and_periodically(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    with server_with(make_site, partial_seconds=1.0) as (site, url, token):
        first, second = (outgoing(frame, site) for frame in frames[:2])
        data = first.path.read_bytes()
        cut = put(url, token, first, data[: len(data) // 2])
        assert cut.json()["state"] == "partial"
        (part,) = files_in(site.settings.cache / ".uploads")
        time.sleep(1.5)
        put(url, token, second, second.path.read_bytes())  # any upload: the sweep runs
        assert not part.exists()
        put(url, token, first, data[: len(data) // 2])  # another cut upload
        assert files_in(site.settings.cache / ".uploads") != []
        stale = time.time() - 3600
        for leftover in files_in(site.settings.cache / ".uploads"):
            os.utime(leftover, (stale, stale))
    with server_with(site.settings) as (site, url, token):  # restarted
        assert files_in(site.settings.cache / ".uploads") == []


def test_an_upload_that_sends_nothing_is_cut_and_its_id_freed(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    with server_with(make_site, idle_seconds=0.5) as (site, url, token):
        out = outgoing(frames[0], site)
        data = out.path.read_bytes()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            head = (
                f"PUT /api/v1/transfers/{out.archive_id} HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: {len(data)}\r\n"
                f"Upload-Length: {len(data)}\r\nObsflow-Sha256: {out.sha256}\r\n"
                f"Obsflow-Name: {out.name}\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            raw.sendall(head.encode() + data[:1000])  # then nothing
            started = time.monotonic()
            received = b""
            while chunk := raw.recv(65536):  # (the server closes the connection)
                received += chunk
            answer = received.decode("latin-1")
            waited = time.monotonic() - started
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "transfer.idle_seconds" in answer and waited < 5
        resumed = put(url, token, out, data[1000:], **{"Upload-Offset": "1000"})
        assert resumed.status_code == 200, resumed.text  # the ID is free; it resumes
        assert resumed.json()["state"] in ("cached", "archived")

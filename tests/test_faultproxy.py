"""The fault-injecting proxy (:mod:`tests.faultproxy`) on real sockets: a threaded HTTP/1.1
server that answers a PUT with the sha256 of its body, behind the proxy, and httpx
streaming uploads through it.
"""

from __future__ import annotations

import hashlib
import http.server
import queue
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.faultproxy import FaultProxy, Faults, MiB, ProxyStats

DATA = random.Random(0).randbytes(5_000_000)
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass(frozen=True)
class Received:
    """What the server read of one request body, and whether that was all of it."""

    nbytes: int
    complete: bool


class HashServer(http.server.ThreadingHTTPServer):
    """Answers PUT with the sha256 of the body; records every body it read in ``received``."""

    daemon_threads = False  # server_close() joins the handler threads

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HashHandler)
        self.received: queue.Queue[Received] = queue.Queue()

    def handle_error(self, request: object, client_address: object) -> None:
        """Connections reset by the proxy are expected: no tracebacks on stderr."""


class HashHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: HashServer

    def do_PUT(self) -> None:
        digest = hashlib.sha256()
        nbytes = 0
        try:
            for block in self._body():
                digest.update(block)
                nbytes += len(block)
        except (OSError, ValueError):
            self.server.received.put(Received(nbytes, complete=False))
            self.close_connection = True
            return
        self.server.received.put(Received(nbytes, complete=True))
        answer = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def _body(self) -> Iterator[bytes]:
        """The body, by Content-Length or chunked; raises ConnectionError if cut short."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            yield from self._exactly(int(self.headers.get("Content-Length", "0")))
            return
        while size := int(self._line().split(b";")[0], 16):
            yield from self._exactly(size)
            self._line()
        self._line()  # no trailers: the final empty line

    def _line(self) -> bytes:
        line = self.rfile.readline(1024)
        if not line.endswith(b"\r\n"):
            raise ConnectionError("incomplete chunked body")
        return line

    def _exactly(self, n: int) -> Iterator[bytes]:
        while n > 0:
            block = self.rfile.read(min(n, 256 * 1024))
            if not block:
                raise ConnectionError("incomplete body")
            n -= len(block)
            yield block


@pytest.fixture
def server() -> Iterator[HashServer]:
    srv = HashServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        thread.join()
        srv.server_close()


@pytest.fixture
def proxy(server: HashServer) -> Iterator[FaultProxy]:
    with FaultProxy(target=("127.0.0.1", server.server_port), seed=7) as p:
        yield p


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def upload(
    client: httpx.Client, url: str, data: bytes = DATA, *, chunked: bool = False
) -> httpx.Response:
    """PUT ``data`` streamed from a generator, with a Content-Length unless ``chunked``."""
    headers = {} if chunked else {"Content-Length": str(len(data))}
    return client.put(f"{url}/upload", content=chunks(data), headers=headers)


def failed_upload(url: str, data: bytes = DATA) -> httpx.TransportError:
    """The transport error of an upload expected to fail."""
    with httpx.Client(timeout=10) as client, pytest.raises(httpx.TransportError) as info:
        upload(client, url, data)
    return info.value


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_healthy_proxy_passes_uploads_through_on_one_connection(
    server: HashServer, proxy: FaultProxy, chunked: bool
) -> None:
    with httpx.Client(timeout=10) as client:
        for _ in range(2):  # keep-alive: the second upload reuses the connection
            response = upload(client, proxy.url, chunked=chunked)
            assert response.status_code == 200
            assert response.text == SHA
            assert server.received.get(timeout=5) == Received(len(DATA), complete=True)
    stats = proxy.stats
    assert stats.connections == 1
    assert stats.bytes_up > 2 * len(DATA)
    assert stats.bytes_down > 2 * len(SHA)
    assert (stats.resets, stats.cuts, stats.stalls, stats.refused) == (0, 0, 0, 0)


def test_reset_fails_the_request(server: HashServer, proxy: FaultProxy) -> None:
    proxy.faults = Faults(reset=1.0)
    exc = failed_upload(proxy.url, DATA[: 64 * 1024])
    assert isinstance(exc, httpx.TransportError)
    assert proxy.stats.resets == 1
    assert proxy.stats.connections == 1


def test_reset_is_a_tcp_rst(proxy: FaultProxy) -> None:
    proxy.faults = Faults(reset=1.0, reset_within_bytes=0)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"PUT /upload HTTP/1.1\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)
    assert proxy.stats == ProxyStats(connections=1, resets=1)


def test_cut_interrupts_an_upload_midway(server: HashServer, proxy: FaultProxy) -> None:
    proxy.faults = Faults(cut=1.0, cut_within_bytes=1 * MiB)
    failed_upload(proxy.url)
    received = server.received.get(timeout=5)
    assert not received.complete
    assert received.nbytes < 1 * MiB
    stats = proxy.stats
    assert stats.cuts == 1
    assert stats.bytes_up <= 1 * MiB
    assert stats.bytes_down == 0


@pytest.mark.parametrize("size", [1024, 2 * MiB], ids=["small", "large"])
def test_stall_delays_but_does_not_fail(server: HashServer, proxy: FaultProxy, size: int) -> None:
    proxy.faults = Faults(stall=1.0, stall_seconds=1.0)
    data = DATA[:size]
    with httpx.Client(timeout=10) as client:
        start = time.monotonic()
        response = upload(client, proxy.url, data)
        elapsed = time.monotonic() - start
    assert response.text == hashlib.sha256(data).hexdigest()
    assert elapsed >= 0.95
    assert proxy.stats.stalls == 1


def test_refuse_resets_before_reaching_the_server(server: HashServer, proxy: FaultProxy) -> None:
    proxy.faults = Faults(refuse=1.0)
    failed_upload(proxy.url, b"x")
    assert proxy.stats == ProxyStats(connections=1, refused=1)
    assert server.received.empty()


def test_healthy_faults_apply_to_later_connections(server: HashServer, proxy: FaultProxy) -> None:
    proxy.faults = Faults(reset=1.0)
    failed_upload(proxy.url, b"x" * 1000)
    proxy.faults = Faults()
    with httpx.Client(timeout=10) as client:
        assert upload(client, proxy.url).text == SHA
    assert proxy.stats.connections == 2
    assert proxy.stats.resets == 1


def test_same_seed_same_faults(server: HashServer) -> None:
    def outcomes() -> list[bool]:
        with (
            FaultProxy(("127.0.0.1", server.server_port), seed=3, faults=Faults(reset=0.5)) as p,
            httpx.Client(timeout=10, headers={"Connection": "close"}) as client,
        ):
            results = []
            for _ in range(10):
                try:
                    results.append(upload(client, p.url, b"x" * 1000).status_code == 200)
                except httpx.TransportError:
                    results.append(False)
            assert p.stats.connections == 10
            assert p.stats.resets == results.count(False)
            return results

    first = outcomes()
    assert first == outcomes()
    assert True in first
    assert False in first


def test_stop_closes_open_connections_and_is_idempotent(
    server: HashServer, proxy: FaultProxy
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n12345")
        deadline = time.monotonic() + 5
        while proxy.stats.bytes_up == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.stop()
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)
    received = server.received.get(timeout=5)
    assert not received.complete
    assert received.nbytes <= 5
    proxy.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()


def test_faults_are_checked() -> None:
    with pytest.raises(ValueError, match="probability"):
        Faults(reset=1.5)
    with pytest.raises(ValueError, match="stall_seconds"):
        Faults(stall_seconds=-1)

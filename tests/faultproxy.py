"""A fault-injecting TCP proxy for end-to-end tests: resets, cuts, stalls and refusals.

:class:`FaultProxy` listens on 127.0.0.1 and forwards each connection to a target. It runs
its own asyncio loop in a daemon thread, so synchronous tests can use it. What happens to a
connection is decided when it is accepted, from ``proxy.faults`` and the proxy's seeded
``random.Random``: the same seed and the same sequence of connections give the same faults.

A drawn reset, cut or stall always happens before the client sees a response: if the
client sends fewer bytes than the drawn point (a small request), the fault happens when the
server's first response byte arrives instead.

Why our own and not Toxiproxy (issue 19 asked): Toxiproxy is a Go server; Debian has no
package of it, and PyPI has only clients (``toxiproxy-python``) that need that server, so
it cannot be installed from the registries this project's machines and CI reach. This
proxy is ~300 lines with a seeded, reproducible choice of faults, which Toxiproxy's
toxics (probabilistic per connection) would not give us anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self, get_args

KiB = 1024
MiB = 1024 * KiB
CHUNK = 256 * KiB
"""Bytes read at a time in each direction."""
CONNECT_TIMEOUT = 10.0
"""Seconds to connect to the target before resetting the client."""
STOP_TIMEOUT = 10.0
"""Seconds :meth:`FaultProxy.stop` waits for the loop thread."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    """What to do to new connections. Each probability is drawn once per connection."""

    reset: float = 0.0
    """Reset the client (TCP RST) after 0 to ``reset_within_bytes`` bytes sent up."""
    reset_within_bytes: int = 256 * KiB
    cut: float = 0.0
    """Reset the client and close the server after 1 to ``cut_within_bytes`` bytes sent up."""
    cut_within_bytes: int = 8 * MiB
    stall: float = 0.0
    """Stop forwarding both ways for ``stall_seconds``, below ``stall_within_bytes`` sent up."""
    stall_seconds: float = 2.0
    stall_within_bytes: int = 1 * MiB
    refuse: float = 0.0
    """Reset the client as soon as it is accepted, without connecting to the target."""

    def __post_init__(self) -> None:
        for name in ("reset", "cut", "stall", "refuse"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Faults.{name} is a probability in [0, 1], not {p!r}")
        if self.reset_within_bytes < 0:
            raise ValueError("Faults.reset_within_bytes must be >= 0")
        if self.cut_within_bytes < 1 or self.stall_within_bytes < 1:
            raise ValueError("Faults.cut_within_bytes and stall_within_bytes must be >= 1")
        if self.stall_seconds < 0:
            raise ValueError("Faults.stall_seconds must be >= 0")


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started. Bytes are counted as they are forwarded."""

    connections: int = 0
    resets: int = 0
    cuts: int = 0
    stalls: int = 0
    refused: int = 0
    bytes_up: int = 0
    """Client to server."""
    bytes_down: int = 0
    """Server to client."""


Counter = Literal["connections", "resets", "cuts", "stalls", "refused", "bytes_up", "bytes_down"]


@dataclass(frozen=True)
class _Plan:
    """The faults drawn for one connection."""

    refuse: bool
    kill_at: int | None
    kill_kind: Literal["resets", "cuts"]
    stall_at: int | None
    stall_seconds: float


class _KilledError(Exception):
    """A pump ended its connection on purpose (reset or cut)."""


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close abruptly with a TCP RST (SO_LINGER 0), dropping anything unsent."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One proxied connection: a pump each way, and the faults planned for it."""

    def __init__(
        self,
        proxy: FaultProxy,
        plan: _Plan,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._proxy = proxy
        self._plan = plan
        self._client_reader, self._client_writer = client
        self._server_reader, self._server_writer = server
        self._kill_at = plan.kill_at
        self._stall_at = plan.stall_at
        self._up = 0
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def run(self) -> None:
        """Forward both ways until both have ended, or one fails or is killed."""
        up = asyncio.create_task(self._pump_up())
        down = asyncio.create_task(self._pump_down())
        try:
            await asyncio.wait((up, down), return_when=asyncio.FIRST_EXCEPTION)
        finally:
            up.cancel()
            down.cancel()
            results = await asyncio.gather(up, down, return_exceptions=True)
        if any(isinstance(r, _KilledError) for r in results):
            return
        failed = False
        for result in results:
            if result is None or isinstance(result, asyncio.CancelledError):
                continue
            failed = True
            if isinstance(result, OSError):
                log.debug("fault proxy: connection ended by %r", result)
            else:
                log.error("fault proxy: connection failed", exc_info=result)
        if failed:
            self.abort()

    def abort(self) -> None:
        """Reset both sides."""
        _rst(self._client_writer)
        _rst(self._server_writer)

    async def close(self) -> None:
        """Close both sides and wait until they are closed (abort them after a while)."""
        for writer in (self._client_writer, self._server_writer):
            writer.close()
        for writer in (self._client_writer, self._server_writer):
            try:
                await asyncio.wait_for(writer.wait_closed(), CONNECT_TIMEOUT)
            except TimeoutError:
                _rst(writer)
            except Exception:  # the pumps have already reported how the connection ended
                pass

    async def _pump_up(self) -> None:
        while chunk := await self._client_reader.read(CHUNK):
            await self._forward_up(chunk)
        if self._server_writer.can_write_eof():
            self._server_writer.write_eof()

    async def _forward_up(self, chunk: bytes) -> None:
        """Forward one chunk client to server, stalling or killing at the planned byte."""
        while True:
            await self._flowing.wait()
            n = len(chunk)
            for at in (self._kill_at, self._stall_at):
                if at is not None:
                    n = min(n, at - self._up)
            if n > 0:
                self._up += n
                self._proxy._count("bytes_up", n)
                self._server_writer.write(chunk[:n])
                await self._server_writer.drain()
                chunk = chunk[n:]
            if self._kill_at is not None and self._up >= self._kill_at:
                self._kill()
            if self._stall_at is not None and self._up >= self._stall_at:
                await self._stall()
            if not chunk:
                return

    async def _pump_down(self) -> None:
        while chunk := await self._server_reader.read(CHUNK):
            if self._kill_at is not None:
                self._kill()
            if self._stall_at is not None:
                await self._stall()
            await self._flowing.wait()
            self._proxy._count("bytes_down", len(chunk))
            self._client_writer.write(chunk)
            await self._client_writer.drain()
        if self._client_writer.can_write_eof():
            self._client_writer.write_eof()

    def _kill(self) -> None:
        """Reset the client and close the server side, ending the connection."""
        self._kill_at = None
        self._proxy._count(self._plan.kill_kind)
        _rst(self._client_writer)
        self._server_writer.close()
        raise _KilledError

    async def _stall(self) -> None:
        """Stop forwarding both ways for the planned time."""
        self._stall_at = None
        self._proxy._count("stalls")
        self._flowing.clear()
        try:
            await asyncio.sleep(self._plan.stall_seconds)
        finally:
            self._flowing.set()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 to ``target`` that injects :class:`Faults`.

    ``faults`` may be replaced from any thread at any time; it applies to connections
    accepted afterwards, not to keep-alive connections a client already holds. Use
    :meth:`start` and :meth:`stop`, or ``with``.
    """

    def __init__(
        self, target: tuple[str, int], *, seed: int | None = None, faults: Faults | None = None
    ) -> None:
        self.target = target
        self.faults = faults if faults is not None else Faults()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: dict[Counter, int] = dict.fromkeys(get_args(Counter), 0)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._port: int | None = None
        self._start_error: BaseException | None = None
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ test thread

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1; return once listening."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy.start() was already called")
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(STOP_TIMEOUT):
            raise RuntimeError("fault proxy did not start listening")
        if self._start_error is not None:
            raise RuntimeError("fault proxy could not start") from self._start_error
        if self._port is None:
            raise RuntimeError("fault proxy stopped while starting")

    def stop(self) -> None:
        """Close the listener and reset every open connection. Safe to call again."""
        if self._stopped or self._thread is None:
            self._stopped = True
            return
        self._stopped = True
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stopping.set)
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            log.error("fault proxy: the loop thread did not stop in %s s", STOP_TIMEOUT)

    @property
    def port(self) -> int:
        """The port to connect to."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            return ProxyStats(**self._counts)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ loop thread

    def _count(self, name: Counter, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:  # never into the test: log it
            log.exception("fault proxy: the event loop failed")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        except OSError as exc:
            self._start_error = exc
            return
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for _ in range(3):  # let connections accepted just before close get their handlers
            await asyncio.sleep(0)
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    def _draw(self, faults: Faults) -> _Plan:
        """The faults for a new connection: always the same number of draws."""
        rng = self._rng
        refuse, reset, cut, stall = (
            rng.random() < p for p in (faults.refuse, faults.reset, faults.cut, faults.stall)
        )
        reset_at = rng.randint(0, faults.reset_within_bytes)
        cut_at = rng.randint(1, faults.cut_within_bytes)
        stall_at = rng.randrange(faults.stall_within_bytes)
        kills: list[tuple[int, Literal["resets", "cuts"]]] = []
        if reset:
            kills.append((reset_at, "resets"))
        if cut:
            kills.append((cut_at, "cuts"))
        kill = min(kills) if kills else None
        return _Plan(
            refuse=refuse,
            kill_at=kill[0] if kill else None,
            kill_kind=kill[1] if kill else "resets",
            stall_at=stall_at if stall else None,
            stall_seconds=faults.stall_seconds,
        )

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(client_reader, client_writer)
        except asyncio.CancelledError:  # stop(): end quietly, asyncio would log it
            _rst(client_writer)
        except Exception:
            log.exception("fault proxy: connection handler failed")
            _rst(client_writer)
        finally:
            client_writer.close()
            self._tasks.discard(task)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        plan = self._draw(self.faults)
        self._count("connections")
        if plan.refuse:
            self._count("refused")
            _rst(client_writer)
            return
        try:
            server = await asyncio.wait_for(asyncio.open_connection(*self.target), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.info("fault proxy: cannot connect to %s:%s: %r", *self.target, exc)
            _rst(client_writer)
            return
        conn = _Connection(self, plan, (client_reader, client_writer), server)
        try:
            await conn.run()
        except asyncio.CancelledError:
            conn.abort()
            raise
        finally:
            await conn.close()

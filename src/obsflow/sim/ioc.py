"""The simulated instrument's keyword server: a small EPICS Channel Access IOC (caproto).

At Keck, a newly written file is announced by the instrument's keyword system: a keyword
such as ``LASTFILE`` takes the file's name, and whoever monitors the keyword is called back.
This IOC plays that part for the simulator (:mod:`obsflow.sim.live`) and the tests. It serves,
under a prefix (default ``OFCAM:``):

``{prefix}LASTFILE``
    a CHAR array of up to 1024 bytes (UTF-8): the last file written, a path or a bare name.
    Every write posts a monitor update, even when the name is the same as before.
``{prefix}HEARTBEAT``
    a LONG counter, one more every second (``--heartbeat-seconds``) while the IOC runs.

Run it on its own, until SIGTERM or SIGINT::

    python -m obsflow.sim.ioc --prefix OFCAM: [--interfaces 127.0.0.1 ...] [--port N]
                          [--heartbeat-seconds 1]

``--port`` is the Channel Access search port (UDP) and the first TCP port tried; without it,
and for everything else about the network (beacons, ...), caproto follows the usual EPICS
environment (``EPICS_CA_SERVER_PORT``, ``EPICS_CAS_INTF_ADDR_LIST``,
``EPICS_CAS_BEACON_ADDR_LIST``, ...). On start it prints one line to standard output,
``obsflow.sim.ioc: serving ...``, naming the PVs and ports.

From Python, :class:`InstrumentIoc` runs the IOC in this process on a thread of its own and
publishes names; :class:`IocClient` connects to an IOC running elsewhere and publishes by
writing ``LASTFILE``, as the instrument's software would. Both have ``publish(name)`` and
``close()`` (:class:`obsflow.live.Publisher`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from obsflow.errors import ObsflowError

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "OFCAM:"
LASTFILE: Final = "LASTFILE"
HEARTBEAT: Final = "HEARTBEAT"
MAX_NAME_BYTES: Final = 1024
"""The longest file name (in UTF-8 bytes) LASTFILE holds."""


class PublishError(ObsflowError):
    """A file name could not be published: the IOC is not running or cannot be reached."""


def pv_names(prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """The (LASTFILE, HEARTBEAT) PV names under ``prefix``."""
    return f"{prefix}{LASTFILE}", f"{prefix}{HEARTBEAT}"


def _checked(name: str) -> str:
    size = len(name.encode("utf-8"))
    if not name or size > MAX_NAME_BYTES or "\x00" in name:
        raise ValueError(
            f"cannot publish {name[:80]!r}: a name must be 1 to {MAX_NAME_BYTES} UTF-8 bytes "
            f"without NUL (this one is {size})"
        )
    return name


def _lastfile_channel(listened: threading.Event) -> Any:
    """The LASTFILE channel: a UTF-8 CHAR array that sets ``listened`` when monitored."""
    from caproto import ChannelChar

    class LastFile(ChannelChar):  # type: ignore[misc]  # caproto is untyped
        async def subscribe(self, queue: Any, sub_spec: Any, sub: Any) -> None:
            await super().subscribe(queue, sub_spec, sub)  # queues the current value first
            listened.set()

    return LastFile(value="", max_length=MAX_NAME_BYTES, string_encoding="utf-8")


class InstrumentIoc:
    """The IOC, run in this process: blocking with :meth:`run`, or on a thread with :meth:`start`.

    ``interfaces``: addresses to serve on (default all); ``port``: the search port (default
    caproto's, from ``EPICS_CA_SERVER_PORT`` or 5064). Thread-safe: :meth:`publish` may be
    called from any thread but the IOC's own.
    """

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        *,
        interfaces: Sequence[str] = (),
        port: int | None = None,
        heartbeat_seconds: float = 1.0,
    ) -> None:
        if heartbeat_seconds <= 0:
            raise ValueError(f"heartbeat_seconds must be positive, not {heartbeat_seconds}")
        self.prefix = prefix
        self.lastfile_pv, self.heartbeat_pv = pv_names(prefix)
        self._interfaces = list(interfaces)
        self._port = port
        self._heartbeat_seconds = heartbeat_seconds
        self._listened = threading.Event()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lastfile: Any = None
        self.tcp_port: int | None = None
        """The TCP port clients connect to, once serving."""
        self.search_port: int | None = None
        """The UDP port answering searches, once serving."""

    # ------------------------------------------------------------ running

    def run(self, *, handle_signals: bool = False) -> None:
        """Serve until :meth:`stop` (from another thread), or SIGTERM/SIGINT if
        ``handle_signals`` (only from the main thread)."""
        asyncio.run(self._serve(handle_signals))

    def start(self, timeout: float = 10.0) -> None:
        """Serve on a thread of this IOC's own; return once it answers searches."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this IOC was started already")
            self._thread = threading.Thread(
                target=self._thread_main, name=f"ioc:{self.prefix}", daemon=True
            )
            self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise PublishError(f"the IOC for {self.lastfile_pv} did not start in {timeout} s")
        if self._error is not None:
            self.stop()
            raise PublishError(
                f"the IOC for {self.lastfile_pv} could not start: {self._error}"
            ) from self._error

    def stop(self, *, grace: float = 0.0, timeout: float = 10.0) -> None:
        """Stop serving (after ``grace`` seconds, so that monitor updates already queued reach
        their clients) and wait for the IOC's thread to end. Idempotent."""
        with self._lock:
            loop, stop, thread = self._loop, self._stop, self._thread
        if grace > 0 and self._ready.is_set() and self._error is None:
            time.sleep(grace)
        if loop is not None and stop is not None:
            # RuntimeError: the loop has closed, the IOC has stopped already
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    close = stop

    def wait_for_listener(self, timeout: float) -> bool:
        """Wait until some client monitors LASTFILE (at most ``timeout`` seconds)."""
        return self._listened.wait(timeout)

    def publish(self, name: str, *, timeout: float = 5.0) -> None:
        """Write ``name`` to LASTFILE; every monitoring client is sent it."""
        _checked(name)
        with self._lock:
            loop, channel = self._loop, self._lastfile
        if loop is None or channel is None or not self._ready.is_set() or loop.is_closed():
            raise PublishError(f"cannot publish {name!r}: the IOC for {self.lastfile_pv} is down")
        write = channel.write(name)
        try:
            future = asyncio.run_coroutine_threadsafe(write, loop)
        except RuntimeError as exc:  # the loop closed meanwhile
            write.close()
            raise PublishError(f"cannot publish {name!r}: the IOC has stopped") from exc
        try:
            future.result(timeout)
        except Exception as exc:  # a timeout, or the write failed inside the IOC
            future.cancel()
            raise PublishError(f"cannot publish {name!r} on {self.lastfile_pv}: {exc}") from exc

    # ------------------------------------------------------------ internals

    def _thread_main(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported by start(); the thread ends either way
            self._error = exc
            log.error("IOC %s failed: %s", self.prefix, exc)
        finally:
            self._ready.set()

    async def _serve(self, handle_signals: bool) -> None:
        from caproto import ChannelInteger
        from caproto.asyncio.server import Context

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
        lastfile = _lastfile_channel(self._listened)
        heartbeat = ChannelInteger(value=0)
        context = Context(
            {self.lastfile_pv: lastfile, self.heartbeat_pv: heartbeat},
            self._interfaces or None,
        )
        if self._port is not None:
            context.ca_server_port = self._port  # what EPICS_CA_SERVER_PORT would set
        with self._lock:
            self._loop, self._stop, self._lastfile = loop, stop, lastfile
        server = asyncio.create_task(
            context.run(startup_hook=self._startup_hook(context, heartbeat))
        )
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if server in done:
                server.result()  # the server gave up: raise its error
                return
            server.cancel()  # caproto's Context.run shuts down and returns on cancel
            await asyncio.gather(server, return_exceptions=True)
        finally:
            stopping.cancel()
            with self._lock:
                self._lastfile = None  # publish() refuses from now on

    def _startup_hook(
        self, context: Any, heartbeat: Any
    ) -> Callable[[Any], Coroutine[Any, Any, None]]:
        async def started(async_lib: Any) -> None:
            self.tcp_port, self.search_port = int(context.port), int(context.ca_server_port)
            addresses = ", ".join(context.interfaces)
            print(
                f"obsflow.sim.ioc: serving {self.lastfile_pv} and {self.heartbeat_pv} on "
                f"{addresses} (search port {self.search_port}, tcp port {self.tcp_port})",
                flush=True,
            )
            self._ready.set()
            beats = 0
            while True:
                await asyncio.sleep(self._heartbeat_seconds)
                beats = (beats + 1) % 2**31
                await heartbeat.write(beats)

        return started


class IocClient:
    """Publishes names to an IOC running elsewhere, by writing its LASTFILE PV.

    The IOC is found as any Channel Access client finds it: through the EPICS environment
    (``EPICS_CA_ADDR_LIST``, ``EPICS_CA_AUTO_ADDR_LIST``, ``EPICS_CA_SERVER_PORT``), which
    caproto reads. Raises :class:`PublishError` if no IOC answers within ``timeout``.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, timeout: float = 5.0) -> None:
        from caproto import CaprotoError
        from caproto.threading.client import Context

        self.lastfile_pv, _ = pv_names(prefix)
        self._timeout = timeout
        self._errors: tuple[type[BaseException], ...] = (CaprotoError, OSError, TimeoutError)
        self._context: Any = Context(timeout=timeout)
        (self._pv,) = self._context.get_pvs(self.lastfile_pv)
        try:
            self._pv.wait_for_connection(timeout=timeout)
        except self._errors as exc:
            self.close()
            raise PublishError(
                f"no IOC answers for {self.lastfile_pv} within {timeout} s "
                "(is it running? does EPICS_CA_ADDR_LIST reach it?)"
            ) from exc

    def publish(self, name: str) -> None:
        """Write ``name`` to LASTFILE and wait for the IOC to confirm it."""
        _checked(name)
        try:
            self._pv.write(name.encode("utf-8"), wait=True, timeout=self._timeout)
        except self._errors as exc:
            raise PublishError(f"cannot publish {name!r} on {self.lastfile_pv}: {exc}") from exc

    def close(self) -> None:
        from obsflow.trigger.epics import disconnect_context

        disconnect_context(self._context)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m obsflow.sim.ioc",
        description="Serve the simulated instrument's LASTFILE and HEARTBEAT PVs "
        "(EPICS Channel Access) until SIGTERM or SIGINT.",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="PV name prefix (%(default)s)")
    parser.add_argument(
        "--interfaces", nargs="+", default=[], help="addresses to serve on (default: all)"
    )
    parser.add_argument(
        "--port", type=int, help="search port (default: $EPICS_CA_SERVER_PORT or 5064)"
    )
    parser.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=1.0,
        help="seconds between heartbeats (%(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    ioc = InstrumentIoc(
        args.prefix,
        interfaces=args.interfaces,
        port=args.port,
        heartbeat_seconds=args.heartbeat_seconds,
    )
    from caproto import CaprotoError

    try:
        ioc.run(handle_signals=True)
    except (OSError, CaprotoError) as exc:  # e.g. an interface this host does not have
        print(f"obsflow.sim.ioc: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

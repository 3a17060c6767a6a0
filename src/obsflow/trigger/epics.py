"""Offer each file name published on an EPICS Channel Access PV: the Keck way.

At Keck, an instrument announces a new file through its keyword system (a keyword such as
``LASTFILE`` takes the file's name) and the archive's monitor is called back on every change:
no directory polling, no schedule. :class:`EpicsTrigger` monitors such a PV with caproto's
threading client and offers every non-empty value it is sent: absolute names as given,
relative ones under the trigger's directory. The PV may be a CHAR array (a long string, UTF-8,
cut at the first NUL) or a STRING (at most 40 characters, EPICS's limit).

What to expect:

* **Duplicates.** A name published twice is offered twice. And when the connection is made,
  or made again after the IOC restarts or the network drops, Channel Access sends the PV's
  current value: the last name is offered once more. Harmless: the catalog refuses bytes it
  already holds.
* **Misses.** Channel Access may coalesce updates that come faster than the client reads
  them, and names published while disconnected are never seen; the reconcile scan finds those
  files.
* **Reconnection** is caproto's: when the circuit drops, it searches again (once at once,
  then after about 8 s, then every 5 s; after 8 minutes without an answer, every 60 s) and
  re-subscribes on its own when the PV is found. :meth:`health` shows an alarm meanwhile.
* **Heartbeat.** With ``heartbeat_pv``, the trigger also monitors that PV; it counts as alive
  while its value keeps changing (a value sent again unchanged on reconnection does not count),
  and :meth:`health` is an alarm once it has not changed for ``heartbeat_stale_seconds``.
* **Network settings** come from the EPICS environment (``EPICS_CA_ADDR_LIST``,
  ``EPICS_CA_AUTO_ADDR_LIST``, ``EPICS_CA_SERVER_PORT``, ...), which caproto reads from the
  process environment when the client context is made and at every search; obsflow reads
  none of it. To use other settings, set them in the process environment before
  :meth:`EpicsTrigger.start`, or pass a caproto ``Context`` of your own (it is then shared:
  :meth:`~EpicsTrigger.stop` removes this trigger's callbacks but leaves the context open).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from obsflow.catalog.processes import EpicsLink
from obsflow.registry.specs import EpicsTriggerSpec
from obsflow.trigger import Health, Offer, Trigger

log = logging.getLogger(__name__)

_STRING_TYPE = 0  # caproto.ChannelType.STRING: a list of up-to-40-byte strings
_CHAR_TYPE = 4  # caproto.ChannelType.CHAR: an array of bytes


def decode_name(response: Any) -> str:
    """The text a Channel Access monitor ``response`` holds ("" if none), for a STRING or a
    CHAR PV. Bytes that are not UTF-8 are read as Latin-1."""
    from caproto import native_type

    if not response.data_count:
        return ""
    kind = int(native_type(response.data_type))
    if kind == _STRING_TYPE:
        raw = bytes(response.data[0])
    elif kind == _CHAR_TYPE:
        raw = bytes(response.data.tobytes())
    else:
        raise ValueError(f"a file name PV must be STRING or CHAR, not {response.data_type!r}")
    raw = raw.split(b"\x00", 1)[0]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.strip()


def disconnect_context(context: Any, timeout: float = 5.0) -> None:
    """Disconnect a caproto threading ``Context`` (one with a broadcaster of its own) and join
    its threads, promptly and without a race.

    caproto's search-retry thread sleeps up to 5 s between searches without watching for
    disconnection, and ``disconnect()`` joins it; worse, it may be sending a search just as
    ``disconnect()`` closes the UDP socket, and dies of the OSError. So first tell it to end,
    wake it and wait for it (caproto 1.3's internals; skipped if they change), then disconnect.
    """
    with contextlib.suppress(AttributeError):
        broadcaster = context.broadcaster
        broadcaster._close_event.set()
        broadcaster._search_now.set()
        retry = broadcaster._retry_unanswered_searches_thread
        if retry is not None:
            retry.join(timeout)
    context.disconnect(wait=True)


class EpicsTrigger(Trigger):
    """Monitors ``spec.pv`` (and ``spec.heartbeat_pv``) and offers each name published.

    ``directory`` is where relative names are found (the site resolves ``spec.directory``).
    ``context``: a caproto threading ``Context`` to use instead of a new one of the
    trigger's own. ``clock``: seconds, monotonic (for the heartbeat's age). Thread-safe;
    ``offer`` is called on caproto's callback thread, one update at a time, and must not
    call :meth:`stop`.
    """

    kind = "epics"

    def __init__(
        self,
        spec: EpicsTriggerSpec,
        directory: Path,
        *,
        context: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = f"epics:{spec.pv}"
        self.spec = spec
        self.directory = directory
        self._shared_context = context
        self._clock = clock
        self._lock = threading.Condition()
        self._state = "new"  # new -> started -> stopped
        self._offer: Offer | None = None
        self._in_flight = 0  # offers being made right now
        self._offering: set[int] = set()  # the threads making them
        self._context: Any = None
        self._pvs: dict[str, Any] = {}  # PV name -> caproto PV
        self._callbacks: list[tuple[Any, int]] = []  # (caproto CallbackHandler, token)
        self._started_at = 0.0
        self._changed_at: dict[str, float] = {}  # PV name -> when it (dis)connected
        self._beat_at: float | None = None
        self._beat_value: object = None

    # ------------------------------------------------------------ Trigger

    def start(self, offer: Offer) -> None:
        from caproto.threading.client import Context

        # callbacks wait for this lock: none runs before start() is done
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"{self.name}: a trigger starts once ({self._state})")
            self._state = "started"
            self._offer = offer
            self._started_at = self._clock()
            names = [self.spec.pv]
            if self.spec.heartbeat_pv is not None:
                names.append(self.spec.heartbeat_pv)
            try:
                self._context = self._shared_context or Context()
                # caproto holds callbacks weakly: these bound methods live as long as the trigger
                pvs = self._context.get_pvs(*names, connection_state_callback=self._on_connection)
                self._pvs = dict(zip(names, pvs, strict=True))
                for name, pv in self._pvs.items():
                    self._changed_at[name] = self._started_at
                    on_update = self._on_file if name == self.spec.pv else self._on_heartbeat
                    subscription = pv.subscribe()
                    self._callbacks.append((subscription, subscription.add_callback(on_update)))
            except BaseException:  # e.g. a malformed EPICS_CA_* variable: release what was made
                self.stop()
                raise
            log.info("%s: monitoring %s", self.name, ", ".join(names))

    def stop(self) -> None:
        with self._lock:
            if threading.get_ident() in self._offering:
                raise RuntimeError(f"{self.name}: stop() called from within offer()")
            if self._state != "started":
                self._state = "stopped"
                return
            self._state = "stopped"
            self._offer = None  # from here on, updates still on their way are dropped
            callbacks, self._callbacks = self._callbacks, []
            pvs, self._pvs = self._pvs, {}
            context, self._context = self._context, None
        for handler, token in callbacks:
            # unsubscribing sends a message; on a dead circuit there is nothing to tell
            with contextlib.suppress(Exception):
                handler.remove_callback(token)
        if context is not None and self._shared_context is None:
            disconnect_context(context)  # joins caproto's threads, the callback one included
        elif context is not None:  # get_pvs gave no tokens for the connection callbacks
            for pv in pvs.values():
                handler = pv.connection_state_callback
                for token, ref in list(handler.callbacks.items()):
                    if ref() == self._on_connection:
                        handler.remove_callback(token)
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0)
        log.info("%s: stopped", self.name)

    def health(self) -> Health:
        with self._lock:
            if self._state != "started":
                return Health(ok=False, detail=f"{self._state}, not monitoring {self.spec.pv}")
            now = self._clock()
            for name, pv in self._pvs.items():
                if not pv.connected:
                    since = now - self._changed_at.get(name, self._started_at)
                    return Health(ok=False, detail=f"not connected to {name} for {since:.0f} s")
            if self.spec.heartbeat_pv is None:
                return Health(ok=True, detail=f"connected to {self.spec.pv}")
            beat = self._beat_at if self._beat_at is not None else self._started_at
            age = now - beat
            if age > self.spec.heartbeat_stale_seconds:
                heard = "has not changed" if self._beat_at is not None else "no value yet"
                return Health(
                    ok=False,
                    detail=f"heartbeat {self.spec.heartbeat_pv} stale: {heard} for {age:.1f} s "
                    f"(alarm after {self.spec.heartbeat_stale_seconds:g} s)",
                )
            return Health(ok=True, detail=f"connected to {self.spec.pv}; heartbeat {age:.1f} s ago")

    def link(self) -> EpicsLink:
        """Its Channel Access link, as the catalog records it: connected (every PV it
        monitors), and how long ago the heartbeat PV last changed."""
        with self._lock:
            connected = self._state == "started" and all(pv.connected for pv in self._pvs.values())
            age: float | None = None
            if self.spec.heartbeat_pv is not None and self._beat_at is not None:
                age = max(0.0, self._clock() - self._beat_at)
            return EpicsLink(
                trigger=self.name,
                pv=self.spec.pv,
                connected=connected,
                heartbeat_pv=self.spec.heartbeat_pv,
                heartbeat_age_seconds=age,
            )

    # ------------------------------------------------------------ callbacks (caproto threads)

    def _on_connection(self, pv: Any, state: str) -> None:
        with self._lock:
            if self._state != "started":
                return
            self._changed_at[pv.name] = self._clock()
        if state == "connected":
            log.info("%s: connected to %s", self.name, pv.name)
        else:
            log.warning("%s: %s %s; caproto will reconnect", self.name, pv.name, state)

    def _on_file(self, subscription: Any, response: Any) -> None:
        try:
            name = decode_name(response)
        except Exception as exc:  # a malformed update must not end the monitor
            log.error("%s: cannot read a file name from %r: %s", self.name, response, exc)
            return
        if not name:
            return
        path = Path(name)
        self._deliver(path if path.is_absolute() else self.directory / path)

    def _on_heartbeat(self, subscription: Any, response: Any) -> None:
        try:
            value = tuple(response.data) if response.data_count else ()
        except Exception as exc:
            log.error("%s: cannot read the heartbeat from %r: %s", self.name, response, exc)
            return
        with self._lock:
            if self._state == "started" and value != self._beat_value:
                self._beat_value = value
                self._beat_at = self._clock()

    def _deliver(self, path: Path) -> None:
        me = threading.get_ident()
        with self._lock:
            offer = self._offer
            if offer is None:
                return
            self._in_flight += 1
            self._offering.add(me)
        try:
            offer(path)
        except Exception:
            log.exception("%s: offering %s failed", self.name, path)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._offering.discard(me)
                self._lock.notify_all()

"""``obsflow run``: the daemon in the foreground, and its readiness told to systemd."""

from __future__ import annotations

import os
import socket
from typing import Annotated

import typer

from obsflow.cli import SiteOption, _settings, app, choice, choices, err, log
from obsflow.settings import Role
from obsflow.site import open_site


@app.command()
def run(
    site: SiteOption = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            metavar="HOST:PORT",
            help="Serve the REST API there (else the settings' api.listen, if set).",
            show_default=False,
        ),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(
            metavar=choices(Role),
            help="all: one machine; agent: send frames to --server; server: take them "
            "(else the settings' transfer.role).",
            show_default=False,
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            envvar="OBSFLOW_SERVER_URL",
            metavar="URL",
            help="An agent's archive server (else the settings' transfer.server).",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="OBSFLOW_TOKEN",
            help="A write token of the server's (else the settings' transfer.token).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the daemon: triggers → receipt → cache → archive → pipelines (and the REST
    API, if it has an address), until SIGINT or SIGTERM."""
    the_role = choice(role, Role, "role", "--role")
    import signal
    import threading

    from obsflow.daemon import Daemon, Upstream

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %s: finishing in-flight work, then exiting", signum)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    notify_socket = os.environ.get("NOTIFY_SOCKET")  # set by systemd for Type=notify
    settings = _settings(site)
    s = open_site(settings, retry_seconds=settings.daemon.start_seconds)
    try:
        transfer = s.settings.transfer
        upstream = None
        if server or transfer.server:
            upstream = Upstream(server or transfer.server or "", token or transfer.token)
        daemon = Daemon(s, listen=listen, role=the_role, upstream=upstream)
        err.print(
            f"obsflow run: site {s.settings.site}; role {daemon.role.value}; triggers: "
            + ", ".join(t.name for t in daemon.triggers)
            + (f"; the API on {daemon.listen}" if daemon.listen else "")
            + (f"; frames to {upstream.server}" if daemon.role is Role.AGENT and upstream else ""),
            highlight=False,
        )

        def ready() -> None:
            err.print("obsflow run: ready", highlight=False)
            _notify_systemd(notify_socket, b"READY=1")

        daemon.run(stop, on_ready=ready)
        _notify_systemd(notify_socket, b"STOPPING=1")
        err.print("obsflow run: stopped cleanly", highlight=False)
    finally:
        s.close()


def _notify_systemd(address: str | None, message: bytes) -> None:
    """Tell systemd (a ``Type=notify`` unit) of readiness: the sd_notify protocol is one
    datagram on the socket systemd names, written here rather than adding a dependency."""
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)

"""``obsflow serve``: the REST API alone, without the daemon. Registered on the main
app by :mod:`obsflow.cli`."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from obsflow.cli import SiteOption, _site, app, err, log
from obsflow.settings import DEFAULT_LISTEN


@app.command()
def serve(
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            metavar="HOST:PORT",
            help=f"Where to listen (else the settings' api.listen, else {DEFAULT_LISTEN}).",
            show_default=False,
        ),
    ] = None,
    site: SiteOption = None,
) -> None:
    """Serve the REST API (no daemon) until SIGINT or SIGTERM."""
    from obsflow.api import ApiServer, parse_listen  # FastAPI is loaded by the commands that serve

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %s: finishing the requests in flight, then exiting", signum)
        stop.set()

    with _site(site) as s:
        host, port = parse_listen(listen or s.settings.api.listen or DEFAULT_LISTEN)
        server = ApiServer(s, host, port, stop=stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        err.print(
            f"obsflow serve: site {s.settings.site}; the API on {server.url}/api/v1 "
            f"(OpenAPI: {server.url}/api/v1/openapi.json)",
            highlight=False,
        )
        server.run()
        err.print("obsflow serve: stopped cleanly", highlight=False)

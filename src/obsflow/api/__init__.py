"""The REST API: files, runs, status and metrics of one site over HTTP (FastAPI).

The app is assembled here, in one readable place (:func:`create_app`): one module
per noun contributes a router, :mod:`~obsflow.api.problems` turns every error into
RFC 9457 problem details, :mod:`~obsflow.api.auth` says who is asking.

========================================  ==========================================
``GET /api/v1/files``                      find files (filters, cursor pages)
``GET /api/v1/files/{id}``                 one file: metadata, ledger, provenance
``GET /api/v1/files/{id}/data``            its bytes (Range; restores virtual files)
``GET /api/v1/files/{id}/tags``            its tags
``PUT|DELETE /api/v1/files/{id}/tags/{t}``  tag, untag (write scope)
``GET /api/v1/tags``                       tags in use, with counts
``GET /api/v1/runs``                       pipeline runs (filters, cursor pages)
``GET /api/v1/runs/{n}``                   one run, with its steps and log
``POST /api/v1/runs/{n}/retry``            queue a failed run again (write scope)
``POST /api/v1/runs/{n}/reprocess``        a new version of its group (write scope)
``POST /api/v1/runs/{n}/claim``            a remote worker claims a run (worker scope;
                                           also ``lease``, ``steps``, ``publish``,
                                           ``finish``, ``release``: :mod:`.workers`)
``GET|PUT /api/v1/runs/{n}/outputs/{f}``   a run's output sent back (resumable)
``GET|PUT /api/v1/transfers/{id}``         an agent's frame sent (resumable; write scope)
``GET /api/v1/status``                     site snapshot: counts, depth, runs, cache, latency, stuck
``GET /healthz``                           alive, and the catalog answers
``GET /metrics``                           Prometheus
``GET /api/v1/openapi.json``               this API, described
``GET /api/v1/docs``                       the same, interactive (assets served here)
``GET|POST /tap/sync``                     IVOA TAP 1.1: ADQL over ObsCore
                                           (:mod:`obsflow.ivoa`; also
                                           ``/tap/capabilities``, ``availability``,
                                           ``tables``)
``GET /``, ``/login``, ``/ui/...``         the operator's dashboard
                                           (:mod:`obsflow.dashboard`)
========================================  ==========================================

:func:`serve` runs it with uvicorn until a :class:`threading.Event` is set;
:class:`ApiServer` does the same in a thread of its own (``start``/``stop``), for
the daemon and for tests. Neither touches signal handlers: stopping is the caller's
business.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Generator
from types import TracebackType
from typing import Any, Final

import uvicorn
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from obsflow import __version__
from obsflow.access import TokenStore
from obsflow.api import (
    files,
    metrics,
    params,
    problems,
    reductions,
    runs,
    status,
    transfer,
    workers,
)
from obsflow.api.metrics import Metrics, RequestMetrics
from obsflow.api.services import Services, Uploads
from obsflow.archive.retrieval import Retriever
from obsflow.catalog.runs import RunStore
from obsflow.errors import ObsflowError
from obsflow.receipt.intake import Wakeable
from obsflow.settings import DEFAULT_LISTEN
from obsflow.site import Site

log = logging.getLogger(__name__)

OPENAPI_URL: Final = "/api/v1/openapi.json"
DOCS_URL: Final = "/api/v1/docs"
"""The interactive docs (Swagger UI), with every asset served from here."""
"""Where ``obsflow serve`` listens when neither ``--listen`` nor the settings say."""

__all__ = [
    "DEFAULT_LISTEN",
    "OPENAPI_URL",
    "ApiServer",
    "ListenError",
    "create_app",
    "parse_listen",
    "serve",
]


class ListenError(ObsflowError):
    """The API cannot listen where it was asked to (a bad HOST:PORT, or in use)."""


def create_app(
    site: Site, *, retriever: Retriever | None = None, wake: Wakeable | None = None
) -> FastAPI:
    """The API of ``site`` as an ASGI app (it keeps no state but its metrics and the
    uploads in progress). ``wake`` is set when an upload is cached."""
    retriever = retriever or Retriever(
        site.catalog, site.cache, site.storage, site.settings.cache_policy, site.clock
    )
    run_store = RunStore(site.catalog)
    app_metrics = Metrics(site)
    # FastAPI's docs pages load Swagger UI from a CDN; observatory networks are often
    # offline, so its assets (Swagger UI 5) come from fastapi-offline, served here
    app = FastAPIOffline(
        title="obsflow",
        version=__version__,
        summary="Telescope data: files, runs and the state of the site.",
        description=(
            "Send `Authorization: Bearer <token>` for more than public data. "
            "Errors are RFC 9457 problem details (`application/problem+json`)."
        ),
        openapi_url=OPENAPI_URL,
        docs_url=DOCS_URL,
        redoc_url=None,
        static_url=DOCS_URL + "-assets",
        favicon_url=DOCS_URL + "-assets/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from outside
        dependencies=[Depends(params.known_query)],
    )
    app.state.services = Services(
        site=site,
        tokens=TokenStore(site.catalog),
        runs=run_store,
        retriever=retriever,
        metrics=app_metrics,
        page_limit=site.settings.api.page_limit,
        uploads=Uploads(),
        wake=wake,
    )
    app.state.sweeper = transfer.sweeper(site)  # partial uploads expire
    app.state.sweeper.maybe()  # (at start-up, then as uploads come)
    problems.install(app)
    for module in (files, runs, reductions, status, metrics, transfer, workers):
        app.include_router(module.router)
    # imported here, not at the top: the IVOA services and the dashboard are built on
    # obsflow.api's modules (auth, params, ...), so importing them first must not need
    # this package's __init__ to have finished (a cycle otherwise)
    from obsflow.dashboard import routes as dashboard
    from obsflow.ivoa import tap

    tap.install(app, app.state.services)  # IVOA: /tap beside /api/v1
    dashboard.install(app)  # the operator's pages at /, out of the OpenAPI document
    app.add_middleware(RequestMetrics, metrics=app_metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, site.settings.api.page_limit)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _document(app: FastAPI, page_limit: int) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, with the Problem schema, the page limit, and
    the bearer token optional where anonymous readers are welcome (every GET)."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    problems.add_schemas(doc)
    for operations in doc.get("paths", {}).values():
        for method, operation in operations.items():
            if method == "get" and operation.get("security"):
                operation["security"] = [{}, *operation["security"]]  # a token is optional
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "limit" and parameter["in"] == "query":
                    schema = parameter["schema"]
                    for option in schema.get("anyOf", [schema]):
                        if option.get("type") == "integer":
                            option["maximum"] = page_limit
    return doc


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6) as (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"cannot listen on {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


class _Server(uvicorn.Server):
    """uvicorn that leaves signals alone and stops when ``stop`` is set."""

    def __init__(self, config: uvicorn.Config, stop: threading.Event) -> None:
        super().__init__(config)
        self.stop = stop

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        if self.stop.is_set():
            return True
        return await super().on_tick(counter)


class ApiServer:
    """The API of ``site`` on ``host:port`` (port 0: any free port; see :attr:`port`).

    The socket is bound when this is made (a :class:`ListenError` says why not), so
    that clients may connect at once; :meth:`run` serves in the calling thread until
    ``stop`` is set, :meth:`start` in a thread of its own until :meth:`stop`.
    """

    def __init__(
        self,
        site: Site,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        app: FastAPI | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.app = app or create_app(site)
        self.socket = _bind(host, port)
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        self.stopping = stop or threading.Event()
        self.app.state.stopping = self.stopping  # long responses (event streams) end with it
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            log_level="warning",
            log_config=None,  # the process's logging is its own (the CLI's, the daemon's)
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self._server = _Server(config, self.stopping)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until the stop event is set; then finish in-flight requests (5 s at
        most) and close the socket."""
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout: float = 30.0) -> ApiServer:
        """Serve in a thread; return once the server answers."""
        self._thread = threading.Thread(target=self.run, name=f"api-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not self._server.started:
            self.stop()
            raise ListenError(f"the API on {self.url} did not start within {timeout:g} s")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the server's thread to end."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(site: Site, host: str, port: int, stop: threading.Event | None = None) -> None:
    """Serve the API of ``site`` on ``host:port`` in this thread until ``stop`` is set
    (without one, until the process ends). Raises :class:`ListenError` at once if it
    cannot listen there."""
    ApiServer(site, host, port, stop=stop).run()

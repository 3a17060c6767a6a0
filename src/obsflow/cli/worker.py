"""``obsflow worker``: a Celery worker that executes the runs a daemon hands to its broker
(:mod:`obsflow.processing.worker` says how it runs and stops)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from obsflow.cli import SiteOption, _settings, app, err
from obsflow.settings import DEFAULT_CACHE_BYTES, Containers, Processing

_QUEUE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")  # as processing.queue


@app.command()
def worker(
    site: SiteOption = None,
    broker: Annotated[
        str | None,
        typer.Option(
            envvar="OBSFLOW_BROKER",
            metavar="URL",
            help="The Celery broker: redis://HOST:6379/0 or amqp://USER:PASSWORD@HOST:5672// "
            "(else the site's processing.broker).",
            show_default=False,
        ),
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option(
            metavar="Q,...",
            help="The queues to consume (else processing.queue); a pipeline or profile names "
            "its queue with queue:.",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Runs executed at once (else one per CPU).", show_default=False),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            envvar="OBSFLOW_SERVER_URL",
            metavar="URL",
            help="No shared storage: the archive server's URL (then no --site).",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="OBSFLOW_TOKEN",
            help="With --server: a token of the server's with the worker scope.",
            show_default=False,
        ),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="With --server: this worker's work directories and input cache "
            "(default ~/.cache/obsflow-worker).",
            show_default=False,
        ),
    ] = None,
    cache_bytes: Annotated[
        int,
        typer.Option(min=0, help="With --server: the input cache's size budget, in bytes."),
    ] = DEFAULT_CACHE_BYTES,
) -> None:
    """Execute pipeline runs from the Celery broker: with the site's storage (--site), or
    with only the archive server's URL and a token (--server, --token). SIGTERM lets the
    runs in progress finish, then exits."""
    # Celery is loaded by this command only
    from obsflow.processing.worker import ServerAccess, WorkerConfig, run_worker

    wanted = _queues(queues)
    if server:
        if site is not None:
            raise typer.BadParameter(
                "a worker has the site's storage (--site, $OBSFLOW_SITE) or only its "
                "server (--server, $OBSFLOW_SERVER_URL), not both",
                param_hint="--server",
            )
        if not token:
            raise typer.BadParameter(
                "a worker without shared storage needs a token of the server's "
                "(--token or $OBSFLOW_TOKEN)",
                param_hint="--token",
            )
        access = ServerAccess(
            server.rstrip("/"),
            token,
            root=(root or Path.home() / ".cache" / "obsflow-worker").resolve(),
            cache_bytes=cache_bytes,
        )
        containers = Containers(host=os.environ.get("OBSFLOW_CONTAINER_HOST") or None)
        config = WorkerConfig.over_http(
            access,
            _with_broker(Processing(), broker),
            queues=wanted,
            concurrency=concurrency,
            containers=containers,
        )
    else:
        settings = _settings(site)
        processing = _with_broker(settings.processing, broker)
        settings = settings.model_copy(update={"processing": processing})
        config = WorkerConfig.shared(settings, queues=wanted, concurrency=concurrency)
        if processing.executor != "celery":
            err.print(
                f"[yellow]warning:[/] {settings.site}: processing.executor is "
                f"{processing.executor}, not celery: its daemon sends no runs to workers",
                highlight=False,
            )
    err.print(f"obsflow worker: {config.describe()}", highlight=False, markup=False)

    def ready() -> None:
        err.print("obsflow worker: ready", highlight=False)

    code = run_worker(config, on_ready=ready)
    err.print(f"obsflow worker: stopped (exit status {code})", highlight=False)
    if code:
        raise typer.Exit(code)


def _queues(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = tuple(q.strip() for q in value.split(",") if q.strip())
    bad = [q for q in names if not _QUEUE.match(q)]
    if not names or bad:
        raise typer.BadParameter(
            f"{value!r}: queue names are letters, digits, _ . - (a letter first), "
            "separated by commas",
            param_hint="--queues",
        )
    return names


def _with_broker(processing: Processing, broker: str | None) -> Processing:
    """``processing`` with ``--broker`` (or ``$OBSFLOW_BROKER``), checked as the setting is."""
    if not broker:
        return processing
    try:
        return Processing.model_validate({**processing.model_dump(), "broker": broker})
    except ValidationError:
        raise typer.BadParameter(
            f"{broker!r} is not a broker URL (redis://HOST:6379/0, amqp://USER:PASSWORD@HOST//)",
            param_hint="--broker",
        ) from None

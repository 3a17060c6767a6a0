"""The ``obsflow`` command. Settings are read here, once, and passed down."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from obsflow import __version__
from obsflow.catalog import latency as latency_ledger
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.catalog.runs import RunStore
from obsflow.daemon import read_status as read_daemon_status
from obsflow.errors import ConfigError, ObsflowError, SiteError
from obsflow.receipt.metadata import parse_time
from obsflow.receipt.receiver import Outcome
from obsflow.registry import load_registry
from obsflow.settings import Role, Settings, load_settings
from obsflow.site import IngestSummary, Site, ingest_paths, init_site, open_site
from obsflow.states import FileState, RequestState, RunState

app = typer.Typer(
    help="obsflow: telescope frames from the instrument to the archive, with no operator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
registry_app = typer.Typer(help="Check and inspect the registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")

# soft_wrap: a message (file:line: ..., a path) is never broken across lines
log = logging.getLogger(__name__)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

SiteOption = Annotated[
    Path | None,
    typer.Option(
        "--site",
        envvar="OBSFLOW_SITE",
        help="The site directory (else $OBSFLOW_SITE, else the current directory).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings(site: Path | None) -> Settings:
    return load_settings(site or Path.cwd())


@app.callback()
def _main(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output.")
    ] = 0,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        out.print(f"obsflow {__version__}")
        raise typer.Exit()
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err, show_path=False)],
    )


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="The directory to make a site of.")],
    catalog: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="The catalog database, e.g. postgresql+psycopg://obsflow@dbhost/obsflow "
            "(default: SQLite in the site).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Create a site: settings, the example registry, its directories and its catalog."""
    site = init_site(directory, catalog_url=catalog)
    out.print(f"Created an obsflow site in [bold]{site}[/]")
    out.print(f"  settings: {site / 'obsflow.yaml'}\n  registry: {site / 'registry'}")
    out.print(f"Next: obsflow --help, or 'export OBSFLOW_SITE={site}'")


@registry_app.command("check")
def registry_check(site: SiteOption = None) -> None:
    """Validate every registry file; print each problem as file:line: what, expected."""
    settings = _settings(site)
    registry = load_registry(settings.registry)
    out.print(
        f"[green]registry OK[/]: {len(registry.instruments)} instrument(s), "
        f"{len(registry.products)} product(s), {len(registry.pipelines)} pipeline(s), "
        f"{len(registry.profiles)} profile(s) in {settings.registry}"
    )


def _expand(paths: list[Path], recursive: bool) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            yield from sorted(p for p in found if p.is_file() and not p.name.startswith("."))
        else:
            yield path


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories to ingest.")],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Descend into directories.")
    ] = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once files are cached and queued.")
    ] = False,
    site: SiteOption = None,
) -> None:
    """Receive files into the cache and (unless --no-wait) archive them."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise typer.BadParameter(
            "no such file or directory: " + ", ".join(map(str, missing)), param_hint="PATHS"
        )
    with _site(site) as s:
        summary = _ingest(s, list(_expand(paths, recursive)), wait=not no_wait)
        out.print(f"site: {s.settings.site}")
        failed = summary.of(Outcome.REJECTED) + summary.of(Outcome.ERROR)
        if failed or (summary.ingest.errors and not no_wait):
            raise typer.Exit(1)


def _ingest(s: Site, files: list[Path], *, wait: bool) -> IngestSummary:
    """Ingest with a progress bar; print the summary table and every problem."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("receiving", total=len(files))
        summary = ingest_paths(s, files, wait=wait, on_received=lambda r: progress.advance(task))
    table = Table(title="obsflow ingest", show_header=False)
    table.add_row("received", str(len(summary.received)))
    table.add_row("new, cached", str(len(summary.of(Outcome.CACHED))))
    if wait:
        table.add_row("archived", str(len(summary.ingest.archived)))
    table.add_row("duplicate", str(len(summary.of(Outcome.DUPLICATE))))
    table.add_row("rejected", str(len(summary.of(Outcome.REJECTED))))
    table.add_row("ignored (no product)", str(len(summary.of(Outcome.IGNORED))))
    table.add_row("vanished or still changing", str(len(summary.of(Outcome.VANISHED))))
    if summary.of(Outcome.ERROR):
        table.add_row("not received (site error)", str(len(summary.of(Outcome.ERROR))))
    out.print(table)
    for r in summary.of(Outcome.REJECTED):
        err.print(f"[red]rejected[/] {r.path}: {r.reason}", highlight=False)
    for r in summary.of(Outcome.VANISHED):
        err.print(f"[yellow]not received[/] {r.path}: {r.reason}", highlight=False)
    for r in summary.of(Outcome.ERROR):
        err.print(f"[red]not received[/] {r.path}: {r.reason}", highlight=False)
    for archive_id, error in dict(summary.ingest.errors).items():
        err.print(
            f"[red]not archived yet[/] {archive_id}: {error} (it stays cached and queued)",
            highlight=False,
        )
    return summary


@app.command()
def demo(
    frames: Annotated[int, typer.Option(min=1, max=2000, help="Frames in the night.")] = 50,
    cadence: Annotated[
        float, typer.Option(min=0.0, max=60.0, help="Seconds from one frame to the next.")
    ] = 0.2,
    size: Annotated[int, typer.Option(min=16, max=4096, help="Frame size in pixels.")] = 256,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to make the site (default: a temp dir).")
    ] = None,
    quiet_seconds: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="How long the pipelines wait after the last bias, flat or catalog before "
            "combining them (default: the example registry's 15 s).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """A short night in real time: an EPICS simulator announces frames; the daemon archives
    them and reduces them, L0 → L3, as they arrive."""
    from obsflow.sim.demo import ANNOUNCEMENTS, PV_PREFIX, DemoPlan, run_demo

    root = directory or Path(tempfile.mkdtemp(prefix="obsflow-demo-"))
    plan = DemoPlan(root, frames=frames, cadence=cadence, size=size, quiet_seconds=quiet_seconds)
    out.rule("[bold]obsflow demo")
    out.print(
        f"site: [bold]{root}[/]\n"
        f"the instrument (obsflow simulate --epics) writes {frames} frames of {size}x{size}, one "
        f"every {cadence:g} s, announcing each {ANNOUNCEMENTS}x on {PV_PREFIX}LASTFILE;\n"
        "the daemon (obsflow run) hears it over EPICS Channel Access, archives each frame once,\n"
        "and runs the registry's pipelines as their inputs arrive: master bias and flats (L1),\n"
        "calibrated frames (L1), source catalogs (L2), the night's catalog of the field (L3)",
        highlight=False,
    )
    result = run_demo(plan, out)
    settings = result.settings
    with _site(settings.site) as s:
        records = s.catalog.find(FileQuery())
        raw = [r for r in records if r.level == 0]
        night = Table(title="the night in the archive (L0)")
        for column in ("frame type", "filter", "frames", "archived", "total exposure (s)"):
            night.add_column(column)
        groups: dict[tuple[str, str], list[FileRecord]] = {}
        for r in raw:
            groups.setdefault((r.frame_type or "-", r.filter or "-"), []).append(r)
        for (kind, band), members in sorted(groups.items()):
            archived = sum(r.state is FileState.ARCHIVED for r in members)
            exposure = sum(r.exptime or 0.0 for r in members)
            night.add_row(kind, band, str(len(members)), str(archived), f"{exposure:.0f}")
        out.print(night)
        made = Table(title="products made by the pipelines")
        for column in ("level", "product", "files", "archived", "superseded"):
            made.add_column(column)
        by_product: dict[tuple[int, str], list[FileRecord]] = {}
        for r in records:
            if r.level:
                by_product.setdefault((r.level, r.product or "-"), []).append(r)
        for (level, product), members in sorted(by_product.items()):
            archived = sum(r.state is FileState.ARCHIVED for r in members)
            superseded = sum(r.superseded_by is not None for r in members)
            made.add_row(f"L{level}", product, str(len(members)), str(archived), str(superseded))
        out.print(made)
        runs = Table(title="pipeline runs")
        runs.add_column("pipeline")
        for state in RunState:
            runs.add_column(state.value, justify="right")
        per: dict[str, dict[RunState, int]] = {}
        for run in RunStore(s.catalog).find():
            per.setdefault(run.pipeline, {}).setdefault(run.state, 0)
            per[run.pipeline][run.state] += 1
        for pipeline, counts in per.items():
            runs.add_row(pipeline, *(str(counts.get(state, 0)) for state in RunState))
        out.print(runs)
    last = result.last
    p = last.latency
    numbers = ", ".join(
        f"{name} {'-' if v is None else f'{v:.0f} ms'}"
        for name, v in (("p50", p.p50_ms), ("p90", p.p90_ms), ("p99", p.p99_ms), ("max", p.max_ms))
    )
    out.print(
        f"{last.archived}/{last.acquired} frames archived in {result.seconds:.1f} s; "
        f"acquired → archived: {numbers}",
        highlight=False,
    )
    out.print(f"archive: {settings.archive}   logs: {settings.site / '.obsflow'}")
    command = _command_name()
    out.print(f"try:  export OBSFLOW_SITE={root}")
    out.print(f"      {command} status --latency;  {command} find --product ofcam_nightcat")
    out.print(f"      {command} runs;  {command} runs show 1 --log")
    if records:
        out.print(f"      {command} show {records[-1].archive_id}")
    if not result.ok:
        err.print(
            f"[red]the demo did not archive and reduce every frame[/] (simulator exit "
            f"{result.simulator_exit}, daemon exit {result.daemon_exit}); see the logs above",
            highlight=False,
        )
        raise typer.Exit(1)


def _time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO date-time", param_hint=option) from None


@app.command()
def find(
    product: Annotated[str | None, typer.Option(help="Product ID.")] = None,
    instrument: Annotated[str | None, typer.Option(help="Instrument name.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Overlapping this time or later (ISO, UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Overlapping this time or earlier (ISO, UTC).")
    ] = None,
    night: Annotated[str | None, typer.Option(help="Observing night, YYYY-MM-DD.")] = None,
    tag: Annotated[str | None, typer.Option(help="A tag.")] = None,
    object_: Annotated[str | None, typer.Option("--object", help="OBJECT name.")] = None,
    state: Annotated[FileState | None, typer.Option(help="File state.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many.")] = None,
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """Find files in the catalog."""
    try:
        night_date = date.fromisoformat(night) if night else None
    except ValueError:
        raise typer.BadParameter(f"{night!r} is not YYYY-MM-DD", param_hint="--night") from None
    query = FileQuery(
        product=product,
        instrument=instrument,
        since=_time(since, "--since"),
        until=_time(until, "--until"),
        night=night_date,
        tag=tag,
        object=object_,
        state=state,
        limit=limit,
    )
    with _site(site) as s:
        records = s.catalog.find(query)
        if as_json:
            print(json.dumps([_file_json(s, r) for r in records], indent=1))
            return
        table = Table(title=f"{len(records)} file(s)")
        for column in (
            "archive ID",
            "product",
            "state",
            "start (UTC)",
            "object",
            "type",
            "filter",
            "original name",
        ):
            table.add_column(column)
        for r in records:
            table.add_row(
                r.archive_id or "-",
                r.product or "-",
                r.state.value,
                r.start.strftime("%Y-%m-%d %H:%M:%S") if r.start else "-",
                r.object or "",
                r.frame_type or "",
                r.filter or "",
                r.original_name,
            )
        out.print(table)


def _file_json(s: Site, record: FileRecord) -> dict[str, Any]:
    data = record.to_json()
    key = record.archive_path
    data["archive_path"] = s.storage.describe(key) if key else None
    data["cache_path"] = str(s.cache.path(record.cache_path)) if record.cache_path else None
    if record.quarantine_path:
        data["quarantine_path"] = str(s.settings.quarantine / record.quarantine_path)
    return data


@app.command()
def show(
    archive_id: Annotated[str, typer.Argument(help="Archive ID (or original file name).")],
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """Show one file: metadata, tags, keywords, ledger and ingest request."""
    with _site(site) as s:
        record = s.catalog.get(archive_id)
        if record is None:
            versions = s.catalog.find(FileQuery(original_name=archive_id))
            record = versions[-1] if versions else None
        if record is None:
            err.print(f"[red]no file[/] with archive ID or name {archive_id!r}")
            raise typer.Exit(1)
        ledger = s.catalog.ledger(record.id)
        requests = s.queue.requests_for([record.id])
        data = _file_json(s, record)
        data["ledger"] = [{"event": e.event.value, "at": e.at.isoformat()} for e in ledger]
        run = RunStore(s.catalog).get(record.made_by_run) if record.made_by_run else None
        if run is not None:  # provenance: which run made it, from which inputs
            ids = [i for group in run.inputs.values() for i in group]
            names = {r.id: r.archive_id or r.original_name for r in s.catalog.records(ids)}
            data["made_by"] = {
                "run_id": run.id,
                "pipeline": run.pipeline,
                "version": run.version,
                "inputs": {k: [names.get(i, str(i)) for i in v] for k, v in run.inputs.items()},
            }
        data["ingest"] = (
            {
                "state": requests[0].state.value,
                "attempts": requests[0].attempts,
                "last_error": requests[0].last_error,
            }
            if requests
            else None
        )
        if as_json:
            print(json.dumps(data, indent=1))
            return
        table = Table(title=record.archive_id or record.original_name, show_header=False)
        for key, value in data.items():
            if key in ("ledger", "keywords", "ingest", "made_by"):
                continue
            table.add_row(key, "" if value is None else str(value))
        for key, value in record.keywords.items():
            table.add_row(f"keyword {key}", str(value))
        if data["ingest"]:
            table.add_row("ingest", json.dumps(data["ingest"]))
        if "made_by" in data:
            made = data["made_by"]
            table.add_row(
                "made by", f"run {made['run_id']} ({made['pipeline']} v{made['version']})"
            )
            for name, inputs in made["inputs"].items():
                table.add_row(f"  from {name}", ", ".join(inputs))
        out.print(table)
        first = ledger[0].at if ledger else None
        ledger_table = Table(title="ledger")
        ledger_table.add_column("event")
        ledger_table.add_column("at (UTC)")
        ledger_table.add_column("since first", justify="right")
        for entry in ledger:
            since = (entry.at - first).total_seconds() if first else 0.0
            ledger_table.add_row(entry.event.value, entry.at.isoformat(), f"{since:.3f} s")
        out.print(ledger_table)


@app.command()
def status(
    as_json: JsonOption = False,
    latency: Annotated[
        bool,
        typer.Option(
            "--latency",
            help="Latency percentiles acquired → archived and per stage, and the stuck files.",
        ),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            help="With --latency: files that reached a stage at or after this time "
            "(ISO, UTC; default: 24 hours ago).",
            show_default=False,
        ),
    ] = None,
    stuck_after: Annotated[
        float,
        typer.Option(
            "--stuck-after",
            min=0.0,
            metavar="SECONDS",
            help="With --latency: a file cached longer than this, not archived, is stuck.",
        ),
    ] = latency_ledger.DEFAULT_STUCK_AFTER,
    level: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=3,
            help="With --latency: only files of this level (0: the instruments' frames; "
            "a product's 'acquired' is when its run wrote it).",
            show_default=False,
        ),
    ] = None,
    site: SiteOption = None,
) -> None:
    """Counts of files by state, and the ingest queue's depth; --latency for the latency ledger."""
    window_start = _time(since, "--since")
    if not latency and (
        since is not None or level is not None or stuck_after != latency_ledger.DEFAULT_STUCK_AFTER
    ):
        option = (
            "--since" if since is not None else "--level" if level is not None else "--stuck-after"
        )
        raise typer.BadParameter("only meaningful with --latency", param_hint=option)
    with _site(site) as s:
        if latency:
            report = latency_ledger.latency_report(
                s.catalog, s.clock(), window_start, stuck_after, level=level
            )
            if as_json:
                print(json.dumps(report.to_json(), indent=1))
                return
            since_text = report.since.isoformat(timespec="seconds")
            table = Table(title=f"latency (ms) of files that reached each stage since {since_text}")
            for column in ("stage", "files", "p50", "p90", "p99", "max"):
                table.add_column(column, justify="left" if column == "stage" else "right")
            named = [("acquired → archived", report.total)]
            named += [(n.replace("_to_", " → "), p) for n, p in report.stages.items()]
            for name, p in named:
                numbers = (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms)
                cells = ("-" if v is None else f"{v:.1f}" for v in numbers)
                table.add_row(name, str(p.count), *cells)
            out.print(table)
            shown = len(report.stuck)
            more = f", the oldest {shown} shown" if report.stuck_total > shown else ""
            out.print(
                f"stuck: {report.stuck_total} file(s) (cached over {stuck_after:g} s, "
                f"failed, or with an expired ingest lease){more}"
            )
            if not report.stuck:
                return
            stuck = Table()
            for column in ("archive ID", "original name", "state", "since (UTC)", "for", "detail"):
                stuck.add_column(column)
            for f in report.stuck:
                stuck.add_row(
                    f.archive_id or "-",
                    f.original_name,
                    f.state,
                    f.since.isoformat(timespec="seconds"),
                    f"{f.seconds:.0f} s",
                    f.detail or "",
                )
            out.print(stuck)
            return
        counts = s.catalog.counts()
        depth = s.queue.depth()
        daemon = read_daemon_status(s.settings.site, s.clock())
        files = {state.value: counts.get(state, 0) for state in FileState}
        queue_depth = depth.get(RequestState.PENDING, 0) + depth.get(RequestState.LEASED, 0)
        role = (daemon or {}).get("role") or s.settings.transfer.role.value
        sending = None
        if role == Role.AGENT.value:
            from obsflow.transfer.agent import outbox

            sending = outbox(s.catalog, s.clock())
        if as_json:
            data = {
                "files": files,
                "queue": {state.value: n for state, n in depth.items()},
                "queue_depth": queue_depth,
                "daemon": daemon,
            }
            if sending is not None:
                data["outbox"] = sending.to_json()
            print(json.dumps(data, indent=1))
            return
        table = Table(title=f"obsflow status: {s.settings.site}", show_header=False)
        for state_name, n in files.items():
            table.add_row(f"files {state_name}", str(n))
        table.add_row("ingest queue depth", str(queue_depth))
        if sending is not None:
            server = (daemon or {}).get("server") or s.settings.transfer.server or "?"
            table.add_row("outbox: frames to send", f"{sending.depth} (to {server})")
            if sending.oldest is not None:
                age = (s.clock() - sending.oldest).total_seconds()
                table.add_row("outbox: oldest", f"{sending.oldest_name}, {age:.0f} s waiting")
            last = sending.last_success
            table.add_row(
                "outbox: last confirmed", last.isoformat(timespec="seconds") if last else "never"
            )
            table.add_row(
                "outbox: throughput",
                f"{sending.bytes_per_second / 1e6:.2f} MB/s (last {sending.window:.0f} s)",
            )
        if daemon is None or not daemon["alive"]:
            table.add_row("daemon", "not running")
        else:
            readiness = "ready" if daemon["ready"] else "starting"
            table.add_row(
                "daemon",
                f"running (pid {daemon['pid']}, {readiness}, {daemon['in_flight']} in flight)",
            )
            for trigger in daemon["triggers"]:
                state = "ok" if trigger["ok"] else f"[red]ALARM[/]: {trigger['detail']}"
                table.add_row(f"trigger {trigger['name']}", state)
        out.print(table)


@app.command()
def retry(site: SiteOption = None) -> None:
    """Put every failed ingest request back in the queue (after fixing the cause)."""
    with _site(site) as s:
        n = s.ingestor().retry_failed()
        out.print(f"{n} failed request(s) queued again; run 'obsflow ingest' or the daemon")


@app.command()
def simulate(
    frames: Annotated[int, typer.Option(min=1, help="How many frames.")] = 20,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where to write (default: the site's incoming).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[
        int, typer.Option(min=16, max=8192, help="Frame width and height in pixels.")
    ] = 512,
    cadence: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Live: write one frame every SECONDS, each in pieces under its final name "
            "(not atomically), as a detector does. Default with --epics: 1.",
            show_default=False,
        ),
    ] = None,
    epics: Annotated[
        bool,
        typer.Option(
            "--epics",
            help="Live, and announce each complete frame's path on the EPICS PV "
            "OFCAM:LASTFILE of an IOC started in this process (EPICS_CA_SERVER_PORT and "
            "EPICS_CAS_INTF_ADDR_LIST apply), or of a running IOC with --pv-prefix.",
        ),
    ] = False,
    pv_prefix: Annotated[
        str | None,
        typer.Option(
            help="With --epics: connect to the running IOC serving PREFIXLASTFILE "
            "(found through EPICS_CA_ADDR_LIST) instead of starting one.",
            show_default=False,
        ),
    ] = None,
    duplicates: Annotated[
        int, typer.Option(min=1, help="With --epics: announce each frame K times.")
    ] = 1,
    no_publish: Annotated[
        bool,
        typer.Option(
            "--no-publish",
            help="Live: write the frames but announce none (for the reconcile scan); "
            "the IOC, if any, still runs and beats.",
        ),
    ] = False,
    wait_listener: Annotated[
        float,
        typer.Option(
            min=0,
            help="With --epics and no --pv-prefix: wait up to SECONDS for a client to "
            "monitor LASTFILE before the first frame.",
        ),
    ] = 0.0,
    site: SiteOption = None,
) -> None:
    """Write one simulated night of raw OFCAM frames (biases, flats, a star field).

    Live with --cadence or --epics: one frame at a time, written in pieces; --epics announces each.
    """
    live = cadence is not None or epics
    if no_publish and not live:
        raise typer.BadParameter("--no-publish goes with --cadence or --epics")
    for flag, given in (
        ("--pv-prefix", pv_prefix is not None),
        ("--duplicates", duplicates != 1),
        ("--wait-listener", wait_listener > 0),
    ):
        if given and not epics:
            raise typer.BadParameter(f"{flag} goes with --epics")
    if wait_listener > 0 and pv_prefix is not None:
        raise typer.BadParameter("--wait-listener is for the IOC started here, not --pv-prefix")
    target = out_dir or _settings(site).incoming
    if not live:
        from obsflow.sim.simulate import simulate_night  # numpy/astropy only when simulating

        written = simulate_night(target, frames, seed=seed, shape=(size, size))
        out.print(f"wrote {len(written)} frame(s) to {target}")
        return
    _simulate_live(
        target,
        frames,
        seed=seed,
        size=size,
        cadence=1.0 if cadence is None else cadence,
        epics=epics,
        pv_prefix=pv_prefix,
        duplicates=duplicates,
        publish=not no_publish,
        wait_listener=wait_listener,
    )


def _simulate_live(
    target: Path,
    frames: int,
    *,
    seed: int,
    size: int,
    cadence: float,
    epics: bool,
    pv_prefix: str | None,
    duplicates: int,
    publish: bool,
    wait_listener: float,
) -> None:
    """``obsflow simulate`` with --cadence or --epics: see :mod:`obsflow.sim.live`."""
    from obsflow.sim.ioc import InstrumentIoc, IocClient
    from obsflow.sim.live import Publisher, run_live

    ioc: InstrumentIoc | None = None
    client: IocClient | None = None
    publisher: Publisher | None = None
    pv = ""
    if epics and pv_prefix is not None:
        client = IocClient(pv_prefix)  # PublishError (exit 1) if no IOC answers
        publisher, pv = client, client.lastfile_pv
    elif epics:
        ioc = InstrumentIoc()
        ioc.start()
        publisher, pv = ioc, ioc.lastfile_pv
        if wait_listener > 0 and not ioc.wait_for_listener(wait_listener):
            err.print(f"no client monitors {ioc.lastfile_pv} after {wait_listener:g} s; going on")
    try:
        written = run_live(
            target,
            frames,
            cadence=cadence,
            publisher=publisher if publish else None,
            duplicates=duplicates,
            seed=seed,
            shape=(size, size),
            on_frame=lambda frame: out.print(f"wrote {frame.path}", highlight=False),
        )
    finally:
        if client is not None:
            client.close()
        if ioc is not None:
            ioc.stop(grace=1.0)  # let the last monitor updates reach their clients
    announced = f", announced on {pv}" if publisher is not None and publish else ""
    out.print(f"wrote {len(written)} frame(s) to {target}{announced}")


@contextmanager
def _site(site: Path | None) -> Iterator[Site]:
    """Open the site for one command and close it after."""
    opened = open_site(_settings(site))
    try:
        yield opened
    finally:
        opened.close()


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
        Role | None,
        typer.Option(
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
        daemon = Daemon(s, listen=listen, role=role, upstream=upstream)
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


def _command_name() -> str:
    """How the user can type this command: ``obsflow`` if it is on PATH, else its path."""
    if shutil.which("obsflow"):
        return "obsflow"
    script = Path(sys.argv[0]).resolve()
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


from obsflow.cli import cache, runs, serve, tokens  # noqa: E402, F401  (registers their commands)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        err.print("[red]configuration error[/]")
        for problem in exc.problems:
            err.print(str(problem), markup=False, highlight=False)
        sys.exit(2)
    except SiteError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except ObsflowError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)

"""The simulator's commands: ``simulate`` writes OFCAM frames (at once, or live and
announced over EPICS); ``demo`` runs a short night of them through the daemon."""

from __future__ import annotations

import shutil
import sys
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.catalog.runs import RunStore
from obsflow.cli import SiteOption, _settings, _site, app, err, out
from obsflow.states import FileState, RunState

if TYPE_CHECKING:
    from obsflow.sim.demo import DemoResult


class DemoExecutor(StrEnum):
    LOCAL = "local"
    CELERY = "celery"


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
    executor: Annotated[
        DemoExecutor,
        typer.Option(
            help="local: the daemon's own pool of processes; celery: two `obsflow worker` "
            "processes take the runs from --broker."
        ),
    ] = DemoExecutor.LOCAL,
    broker: Annotated[
        str,
        typer.Option(envvar="OBSFLOW_BROKER", help="The Celery broker, with --executor celery."),
    ] = "redis://127.0.0.1:6379/0",
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="Keep the temporary site at the end (a --dir site is always kept)."
        ),
    ] = False,
) -> None:
    """A short night in real time: an EPICS simulator announces frames; the daemon archives
    them and reduces them, L0 → L3, as they arrive."""
    from obsflow.sim.demo import ANNOUNCEMENTS, PV_PREFIX, DemoPlan, run_demo

    root = directory or Path(tempfile.mkdtemp(prefix="obsflow-demo-"))
    temporary = directory is None and not keep
    celery = executor is DemoExecutor.CELERY
    plan = DemoPlan(
        root,
        frames=frames,
        cadence=cadence,
        size=size,
        quiet_seconds=quiet_seconds,
        broker=broker if celery else None,
    )
    out.rule("[bold]obsflow demo")
    out.print(
        f"site: [bold]{root}[/]\n"
        f"the instrument (obsflow simulate --epics) writes {frames} frames of {size}x{size}, one "
        f"every {cadence:g} s, announcing each {ANNOUNCEMENTS}x on {PV_PREFIX}LASTFILE;\n"
        "the daemon (obsflow run) hears it over EPICS Channel Access, archives each frame once,\n"
        "and runs the registry's pipelines as their inputs arrive: master bias and flats (L1),\n"
        "calibrated frames (L1), source catalogs (L2), the night's catalog of the field (L3)"
        + (f";\nthe runs go through Celery ({broker}) to {plan.workers} workers" if celery else ""),
        highlight=False,
    )
    ok = False
    try:
        result = run_demo(plan, out)
        ok = result.ok
        _summary(result, root, temporary)
    finally:
        if temporary and ok:  # a failed night's site stays, with its logs
            shutil.rmtree(root, ignore_errors=True)
            out.print(f"removed the demo's site {root} (--keep or --dir keeps it)", highlight=False)


def _summary(result: DemoResult, root: Path, temporary: bool) -> None:
    """What the night made, how fast; what to try next (on a site that stays)."""
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
    if not temporary or not result.ok:
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
            f"{result.simulator_exit}, daemon exit {result.daemon_exit}"
            + "".join(f", worker exit {code}" for code in result.worker_exits)
            + "); see the logs above",
            highlight=False,
        )
        raise typer.Exit(1)


def _command_name() -> str:
    """How the user can type this command: ``obsflow`` if it is on PATH, else its path."""
    if shutil.which("obsflow"):
        return "obsflow"
    script = Path(sys.argv[0]).resolve()
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


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

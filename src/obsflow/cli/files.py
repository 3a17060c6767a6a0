"""The commands that look files up in the catalog: ``find`` and ``show``."""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated, Any, Final

import typer
from rich.table import Table

from obsflow.catalog.records import Cone, FileQuery, FileRecord
from obsflow.catalog.runs import RunStore
from obsflow.catalog.tags import Tags
from obsflow.cli import (
    TIME_HELP,
    JsonOption,
    SiteOption,
    _site,
    _time,
    app,
    choice,
    choices,
    err,
    known,
    out,
)
from obsflow.cli.tables import Column, Format, emit, pairs
from obsflow.site import Site
from obsflow.states import FileState

FORMAT_HELP = "table (fitted to the terminal), tsv or csv (every column, for scripts), json."
FormatOption = Annotated[
    Format,
    typer.Option("--format", help=FORMAT_HELP, show_default=False),
]
_FILE_COLUMNS: Final = (
    Column("archive_id", "archive ID", whole=True),
    Column("product", "product", drop=2),
    Column("state", "state", drop=1),
    Column("start", "start (UTC)", drop=3),
    Column("exptime", "exptime", drop=8),
    Column("object", "object", drop=4),
    Column("frame_type", "type", drop=6),
    Column("filter", "filter", drop=5),
    Column("original_name", "original name", whole=True, drop=7),
)


def _file_row(r: FileRecord) -> dict[str, Any]:
    return {
        "archive_id": r.archive_id or "-",
        "product": r.product or "-",
        "state": r.state.value,
        "start": r.start.strftime("%Y-%m-%d %H:%M:%S") if r.start else "-",
        "exptime": "" if r.exptime is None else f"{r.exptime:g}",
        "object": r.object or "",
        "frame_type": r.frame_type or "",
        "filter": r.filter or "",
        "original_name": r.original_name,
    }


@app.command()
def find(
    product: Annotated[str | None, typer.Option(help="Product ID.")] = None,
    instrument: Annotated[str | None, typer.Option(help="Instrument name.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Overlapping this time or later: " + TIME_HELP + ".")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Overlapping this time or earlier: " + TIME_HELP + ".")
    ] = None,
    night: Annotated[str | None, typer.Option(help="Observing night, YYYY-MM-DD.")] = None,
    tag: Annotated[str | None, typer.Option(help="A tag.")] = None,
    object_: Annotated[
        str | None,
        typer.Option(
            "--object",
            help="The object's name: the value of the header keyword each instrument maps to "
            "object (keywords.object in its registry file; OBJECT in the example).",
            show_default=False,
        ),
    ] = None,
    state: Annotated[
        str | None, typer.Option(metavar=choices(FileState), help="File state.", show_default=False)
    ] = None,
    filter_: Annotated[
        str | None, typer.Option("--filter", help="The filter (e.g. R).", show_default=False)
    ] = None,
    frame_type: Annotated[
        str | None,
        typer.Option(
            "--type", help="The frame type (BIAS, FLAT, OBJECT, ...).", show_default=False
        ),
    ] = None,
    exptime: Annotated[
        str | None,
        typer.Option(
            metavar="MIN..MAX",
            help="Exposure time in seconds: 30 (exactly), 30..60, 30.. or ..60.",
            show_default=False,
        ),
    ] = None,
    ra: Annotated[
        str | None,
        typer.Option(
            help="A cone's centre: degrees, or hours as 10:30:00 or 10h30m.", show_default=False
        ),
    ] = None,
    dec: Annotated[
        str | None,
        typer.Option(help="A cone's centre: degrees, or as -20:30:00.", show_default=False),
    ] = None,
    radius: Annotated[
        str | None,
        typer.Option(
            help="A cone's radius: degrees, or with a unit: 5arcmin, 30arcsec.", show_default=False
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many.")] = None,
    ids: Annotated[
        bool, typer.Option("--ids", help="Print only the archive IDs, one a line (for scripts).")
    ] = False,
    fmt: FormatOption = Format.TABLE,
    as_json: Annotated[bool, typer.Option("--json", help="The same as --format json.")] = False,
    site: SiteOption = None,
) -> None:
    """Find files in the catalog."""
    try:
        night_date = date.fromisoformat(night) if night else None
    except ValueError:
        raise typer.BadParameter(f"{night!r} is not YYYY-MM-DD", param_hint="--night") from None
    start, end = _time(since, "--since"), _time(until, "--until")
    file_state = choice(state, FileState, "file state", "--state")
    low, high = _range(exptime, "--exptime")
    cone = _cone(ra, dec, radius)
    with _site(site) as s:
        known(product, s.registry.products, "product", "--product")
        known(instrument, s.registry.instruments, "instrument", "--instrument")
        if tag is not None:
            known(tag, Tags(s.catalog).names(), "tag", "--tag")
        query = FileQuery(
            product=product,
            instrument=instrument,
            since=start,
            until=end,
            night=night_date,
            tag=tag,
            object=object_,
            state=file_state,
            filter=filter_,
            frame_type=frame_type,
            exptime_min=low,
            exptime_max=high,
            cone=cone,
            limit=limit,
        )
        records = s.catalog.find(query)
        if ids:
            for r in records:
                print(r.archive_id or r.original_name)
            return
        fmt = Format.JSON if as_json else fmt
        documents = [_file_json(s, r) for r in records] if fmt is Format.JSON else None
        rows = [_file_row(r) for r in records]
        emit(out, fmt, _FILE_COLUMNS, rows, title=f"{len(records)} file(s)", documents=documents)


def _range(text: str | None, option: str) -> tuple[float | None, float | None]:
    """``30`` → (30, 30); ``30..60``, ``30..``, ``..60`` → its bounds."""
    if text is None:
        return None, None
    low, sep, high = text.partition("..")
    try:
        bounds = (float(low) if low else None, float(high) if high else None)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected seconds, or a range such as 30..60, 30.. or ..60",
            param_hint=option,
        ) from None
    if not sep:
        return bounds[0], bounds[0]
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise typer.BadParameter(f"{text!r}: the minimum is above the maximum", param_hint=option)
    return bounds


def _angle(text: str, unit: str, option: str) -> float:
    """Degrees from ``text``: a number of degrees, or what astropy's ``Angle`` reads
    (``10:30:00`` in ``unit``, ``10h30m``, ``5arcmin``); astropy is imported only then."""
    try:
        return float(text)
    except ValueError:
        pass
    from astropy.coordinates import Angle  # slow to import: only for a sexagesimal angle

    try:
        return float(Angle(text, unit=unit).degree)
    except (ValueError, TypeError):
        raise typer.BadParameter(f"{text!r} is not an angle", param_hint=option) from None


def _cone(ra: str | None, dec: str | None, radius: str | None) -> Cone | None:
    given = {"--ra": ra, "--dec": dec, "--radius": radius}
    if all(v is None for v in given.values()):
        return None
    missing = [name for name, v in given.items() if v is None]
    if missing:
        raise typer.BadParameter(
            f"a cone search needs --ra, --dec and --radius; missing {', '.join(missing)}"
        )
    assert ra is not None and dec is not None and radius is not None
    values = (
        _angle(ra, "hourangle", "--ra"),
        _angle(dec, "deg", "--dec"),
        _angle(radius, "deg", "--radius"),
    )
    try:
        return Cone(*values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def lookup(s: Site, name: str) -> FileRecord | None:
    """The file with archive ID ``name``, else the newest version of the file first
    received under the original name ``name``; None if neither."""
    record = s.catalog.get(name)
    if record is None:
        versions = s.catalog.find(FileQuery(original_name=name))
        record = versions[-1] if versions else None
    return record


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
        record = lookup(s, archive_id)
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
        items: list[tuple[str, str]] = []
        for key, value in data.items():
            if key in ("ledger", "keywords", "ingest", "made_by"):
                continue
            items.append((key, "" if value is None else str(value)))
        for key, value in record.keywords.items():
            items.append((f"keyword {key}", str(value)))
        if data["ingest"]:
            items.append(("ingest", json.dumps(data["ingest"])))
        if "made_by" in data:
            made = data["made_by"]
            items.append(
                ("made by", f"run {made['run_id']} ({made['pipeline']} v{made['version']})")
            )
            for name, inputs in made["inputs"].items():
                items.append((f"  from {name}", ", ".join(inputs)))
        pairs(out, record.archive_id or record.original_name, items)
        first = ledger[0].at if ledger else None
        ledger_table = Table(title="ledger")
        ledger_table.add_column("event")
        ledger_table.add_column("at (UTC)")
        ledger_table.add_column("since first", justify="right")
        for entry in ledger:
            since = (entry.at - first).total_seconds() if first else 0.0
            ledger_table.add_row(entry.event.value, entry.at.isoformat(), f"{since:.3f} s")
        out.print(ledger_table)

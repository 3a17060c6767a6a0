"""``obsflow verify``: a fixity audit of the archive (:mod:`obsflow.archive.fixity`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from obsflow.catalog.fixity import FixityCheck
from obsflow.cli import TIME_HELP, JsonOption, SiteOption, _site, _time, app, err, out
from obsflow.states import FixityOutcome


def parse_percent(text: str) -> float:
    """A fraction from ``10%``, ``10`` or ``0.5%``: above 0, at most 100 percent."""
    number = text.strip().removesuffix("%").strip()
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 100:  # NaN too
        raise ValueError(f"{text!r} is not a percentage: expected above 0, at most 100, e.g. 10%")
    return value / 100


@app.command()
def verify(
    ids: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ID", help="Audit only these files (archive IDs).", show_default=False
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only files whose observation started at this time or later: " + TIME_HELP + "."
        ),
    ] = None,
    sample: Annotated[
        str | None,
        typer.Option(
            help="Audit a random sample of this share of them, e.g. 10%.", show_default=False
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            help="Read at most this many MB/s (leave the night its I/O).",
            min=0.001,
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(help="At most this many files (the least recently audited first).", min=1),
    ] = None,
    restore: Annotated[
        bool,
        typer.Option(
            "--restore/--no-restore",
            help="Store a bad or lost file again from a good copy in the cache.",
        ),
    ] = True,
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """Re-read archived files from the medium and check their sha256 (a fixity audit).

    Every check is recorded in the catalog. Exit status 1 if a file is bad (its bytes
    differ, it is missing or cannot be read) and could not be restored."""
    fraction: float | None = None
    if sample is not None:
        try:
            fraction = parse_percent(sample)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--sample") from None
    start = _time(since, "--since")
    with _site(site) as s:
        store = s.auditor().store
        files = store.select(since=start, archive_ids=ids or (), sample=fraction, limit=limit)
        if ids:
            unknown = sorted(set(ids) - {f.archive_id for f in files})
            if unknown:
                err.print(
                    f"[red]error:[/] not archived files (unknown, rejected, or not archived "
                    f"yet): {', '.join(unknown)}",
                    highlight=False,
                )
                raise typer.Exit(2)
        report = s.auditor().audit(files, rate_mb_s=rate, restore=restore)
    bad = report.bad
    if as_json:
        print(
            json.dumps(
                {
                    "checked": len(report.checks),
                    "bytes_read": report.bytes_read,
                    "outcomes": {o.value: report.count(o) for o in FixityOutcome},
                    "checks": [c.to_json() for c in report.checks],
                },
                indent=1,
            )
        )
    else:
        _print(report.checks, report.bytes_read)
    if bad:
        raise typer.Exit(1)


def _print(checks: list[FixityCheck], bytes_read: int) -> None:
    counts = {o: sum(c.outcome is o for c in checks) for o in FixityOutcome}
    shown = ", ".join(f"{n} {o.value}" for o, n in counts.items() if n)
    out.print(
        f"{len(checks)} file(s) audited, {bytes_read / 1e6:.1f} MB read"
        + (f": {shown}" if shown else ""),
        highlight=False,
    )
    notable = [c for c in checks if c.outcome is not FixityOutcome.OK]
    if not notable:
        return
    table = Table(title="not as received")
    table.add_column("archive ID", no_wrap=True)
    table.add_column("outcome")
    table.add_column("detail", overflow="fold")
    for check in notable:
        style = "red" if check.outcome.bad else "yellow"
        table.add_row(check.archive_id, f"[{style}]{check.outcome.value}[/]", check.detail or "")
    out.print(table)

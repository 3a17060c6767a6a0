"""The ingest commands: ``ingest`` files by hand, and ``retry`` the failed requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from obsflow.cli import SiteOption, _site, app, err, out
from obsflow.receipt.receiver import Outcome
from obsflow.site import IngestSummary, Site, ingest_paths


def _expand(paths: list[Path], recursive: bool) -> Iterator[Path]:
    """Every entry of the directories (descending into real ones only, with
    ``recursive``) that is not a directory: FIFOs, devices, sockets and symbolic links
    too, so that receipt refuses them with a reason rather than passing over them."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            yield from sorted(_entries(path, recursive))
        else:
            yield path


def _entries(directory: Path, recursive: bool) -> Iterator[Path]:
    for entry in directory.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if recursive:
                yield from _entries(entry, recursive)
        else:
            yield entry


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
        roots = [p if p.is_dir() and not p.is_symlink() else p.parent for p in paths]
        summary = _ingest(s, list(_expand(paths, recursive)), roots, wait=not no_wait)
        out.print(f"site: {s.settings.site}")
        failed = summary.of(Outcome.REJECTED) + summary.of(Outcome.ERROR)
        failed += summary.of(Outcome.REFUSED)
        if failed or (summary.ingest.errors and not no_wait):
            raise typer.Exit(1)


def _ingest(s: Site, files: list[Path], roots: list[Path], *, wait: bool) -> IngestSummary:
    """Ingest with a progress bar; print the summary table and every problem."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("receiving", total=len(files))
        summary = ingest_paths(
            s, files, wait=wait, on_received=lambda r: progress.advance(task), roots=roots
        )
    table = Table(title="obsflow ingest", show_header=False)
    table.add_row("received", str(len(summary.received)))
    table.add_row("new, cached", str(len(summary.of(Outcome.CACHED))))
    if wait:
        table.add_row("archived", str(len(summary.ingest.archived)))
    cached = summary.of(Outcome.CACHED)
    versions = [r for r in cached if r.superseded]
    namesakes = [r for r in cached if r.same_name_as]
    if versions:
        table.add_row("  new versions (superseding)", str(len(versions)))
    if namesakes:
        table.add_row("  same name, other exposure", str(len(namesakes)))
    table.add_row("duplicate", str(len(summary.of(Outcome.DUPLICATE))))
    table.add_row("rejected", str(len(summary.of(Outcome.REJECTED))))
    if summary.of(Outcome.REFUSED):
        table.add_row("refused (not a regular file)", str(len(summary.of(Outcome.REFUSED))))
    table.add_row("ignored (no product)", str(len(summary.of(Outcome.IGNORED))))
    table.add_row("vanished or still changing", str(len(summary.of(Outcome.VANISHED))))
    if summary.of(Outcome.ERROR):
        table.add_row("not received (site error)", str(len(summary.of(Outcome.ERROR))))
    out.print(table)
    for r in versions:
        err.print(f"new version {r.path} as {r.archive_id}: supersedes {r.superseded}")
    for r in namesakes:
        err.print(
            f"[yellow]same name[/] {r.path} as {r.archive_id}: another file than "
            f"{r.same_name_as} (other bytes); both kept",
            highlight=False,
        )
    for r in summary.of(Outcome.REJECTED):
        err.print(f"[red]rejected[/] {r.path}: {r.reason}", highlight=False)
    for r in summary.of(Outcome.REFUSED):
        err.print(f"[red]refused[/] {r.reason}", highlight=False)
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
def retry(site: SiteOption = None) -> None:
    """Put every failed ingest request back in the queue (after fixing the cause)."""
    with _site(site) as s:
        n = s.ingestor().retry_failed()
        out.print(f"{n} failed request(s) queued again; run 'obsflow ingest' or the daemon")

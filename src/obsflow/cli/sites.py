"""The commands that make and check a site: ``init`` and ``registry check``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from obsflow.cli import SiteOption, _settings, app, err, out, registry_app
from obsflow.registry import load_registry
from obsflow.settings import reference
from obsflow.site import init_site


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
    from obsflow.processing.container import check_images  # docker-py loads only here

    images = check_images(registry, settings.containers)  # on the engine, if reachable
    for warning in images.warnings:
        err.print(f"[yellow]warning[/]: {warning}", highlight=False)
    if images.problems:
        for problem in images.problems:
            err.print(problem, highlight=False)
        raise typer.Exit(1)
    out.print(
        f"[green]registry OK[/]: {len(registry.instruments)} instrument(s), "
        f"{len(registry.products)} product(s), {len(registry.pipelines)} pipeline(s), "
        f"{len(registry.profiles)} profile(s) in {settings.registry}"
    )


@app.command("settings")
def settings_reference() -> None:
    """Print the settings reference: every key of obsflow.yaml, its default and its
    meaning (Markdown), made from the settings model itself."""
    print(reference(), end="")

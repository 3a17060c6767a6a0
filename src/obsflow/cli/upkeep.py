"""Keeping a site: ``migrate`` (an explicit schema upgrade), ``backup`` and ``restore``.

What a backup holds: the catalog (the source of truth: every file's metadata, ledger,
runs, tokens), the site's ``obsflow.yaml`` and its registry. The archive's files are
not copied: they are the archive storage's to back up (its own replication, tape, a
copy of ``archive/``), and ``obsflow verify`` checks them against the catalog.

A SQLite catalog is copied with SQLite's online backup API (a consistent copy while
the daemon runs); a PostgreSQL catalog with ``pg_dump --format=custom`` if it is
installed (else the command says what to run).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final

import typer
from sqlalchemy.engine import make_url

from obsflow.catalog import SCHEMA_REVISION, Catalog
from obsflow.cli import SiteOption, _settings, app, err, out
from obsflow.settings import SETTINGS_FILE, Settings

SQLITE_COPY: Final = "catalog.db"
PG_DUMP: Final = "catalog.pgdump"


@app.command()
def migrate(site: SiteOption = None) -> None:
    """Upgrade the site's catalog to this obsflow's schema (back it up first:
    'obsflow backup DIR'). Other commands refuse an older catalog and say so."""
    settings = _settings(site)
    catalog = Catalog.open(settings.catalog_url, migrate=False)
    try:
        before = catalog.revision()
        catalog.migrate(upgrade=True)
        after = catalog.revision()
    finally:
        catalog.close()
    if before == after:
        out.print(f"the catalog is at schema {after}: nothing to do", highlight=False)
    else:
        out.print(f"migrated the catalog from schema {before or '(none)'} to {after}")


@app.command()
def backup(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="Where to write the backup (made if missing).")
    ],
    site: SiteOption = None,
) -> None:
    """Back up the catalog, obsflow.yaml and the registry into DIR/obsflow-backup-TIME
    (the archive's files are the storage's to back up)."""
    settings = _settings(site)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = directory / f"obsflow-backup-{stamp}"
    target.mkdir(parents=True)
    shutil.copy2(settings.site / SETTINGS_FILE, target / SETTINGS_FILE)
    shutil.copytree(settings.registry, target / "registry")
    url = make_url(settings.catalog_url)
    if url.get_backend_name() == "sqlite":
        _sqlite_backup(Path(url.database or ""), target / SQLITE_COPY)
    else:
        _pg_dump(settings, target / PG_DUMP)
    (target / "SCHEMA").write_text(f"{SCHEMA_REVISION}\n")
    out.print(f"backed up {settings.site} to {target}", highlight=False)


def _sqlite_backup(source: Path, copy: Path) -> None:
    """SQLite's online backup: a consistent copy, even while others write."""
    if not source.is_file():
        raise typer.BadParameter(f"no catalog at {source}", param_hint="--site")
    with sqlite3.connect(source) as reader, sqlite3.connect(copy) as writer:
        reader.backup(writer)
    reader.close()
    writer.close()


def _pg_dump(settings: Settings, dump: Path) -> None:
    url = make_url(settings.catalog_url).set(drivername="postgresql")
    program = shutil.which("pg_dump")
    command = ["pg_dump", "--format=custom", "--file", str(dump), url.render_as_string(False)]
    if program is None:
        err.print(
            "[yellow]pg_dump is not installed[/] (Debian: postgresql-client); back the "
            "catalog up with: pg_dump --format=custom --file "
            f"{dump} {url.render_as_string(hide_password=True)}",
            highlight=False,
        )
        raise typer.Exit(1)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        err.print(f"[red]pg_dump failed[/]: {done.stderr.strip()}", highlight=False)
        raise typer.Exit(1)


@app.command()
def restore(
    backup_dir: Annotated[
        Path, typer.Argument(metavar="BACKUP", help="A directory 'obsflow backup' made.")
    ],
    site: SiteOption = None,
) -> None:
    """Put a backup's catalog back in place of the site's (stop the daemon first); then
    'obsflow migrate' if the backup is of an older obsflow."""
    from obsflow.daemon import read_status  # the daemon's module: at use

    settings = _settings(site)
    status = read_status(settings.site, datetime.now(UTC))
    if status is not None and status.get("alive"):
        err.print("[red]the daemon is running[/]: stop it before restoring the catalog")
        raise typer.Exit(1)
    url = make_url(settings.catalog_url)
    if url.get_backend_name() != "sqlite":
        dump = backup_dir / PG_DUMP
        err.print(
            "restore a PostgreSQL catalog with: pg_restore --clean --if-exists --dbname "
            f"{url.set(drivername='postgresql').render_as_string(hide_password=True)} {dump}",
            highlight=False,
        )
        raise typer.Exit(1)
    copy = backup_dir / SQLITE_COPY
    if not copy.is_file():
        raise typer.BadParameter(f"{backup_dir} holds no {SQLITE_COPY}", param_hint="BACKUP")
    database = Path(url.database or "")
    with sqlite3.connect(copy) as reader, sqlite3.connect(database) as writer:
        reader.backup(writer)  # page by page into the live file: its WAL stays consistent
    reader.close()
    writer.close()
    out.print(f"restored the catalog of {settings.site} from {backup_dir}", highlight=False)

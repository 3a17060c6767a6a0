"""Opening one site from many processes at once: the daemon, read commands and writers
started together on a fresh site never fail for one another, on SQLite and PostgreSQL;
migrations are serialised; the daemon waits for a catalog it cannot reach yet and says
when it is ready."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from obsflow.catalog import MIGRATION_LOCK_KEY, MIGRATIONS, SCHEMA_REVISION, Catalog
from obsflow.settings import Settings
from obsflow.site import init_site
from tests.conftest import SiteFactory

ROUNDS = int(os.environ.get("OBSFLOW_STRESS_ROUNDS", "3"))
"""Rounds of the stress test per engine and case (CI: the default; more by hand)."""


def obsflow(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "obsflow", *args, "--site", str(settings.site)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def command_line(proc: subprocess.Popen[str]) -> str:
    """The obsflow command line ``proc`` runs, for a message."""
    args = proc.args
    assert isinstance(args, list)
    return " ".join(str(a) for a in args[3:])


def daemon_status(settings: Settings) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "status", "--json", "--site", str(settings.site)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def wait_ready(settings: Settings, daemon: subprocess.Popen[str], timeout: float = 60) -> None:
    """Wait as a script would: poll ``status --json`` until ``daemon.ready``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.poll() is None, f"the daemon died: {daemon.communicate()[1][-2000:]}"
        state = daemon_status(settings)["daemon"]
        if state is not None and state["ready"] and state["pid"] == daemon.pid:
            return
        time.sleep(0.2)
    raise AssertionError("the daemon never said it was ready")


def revision(settings: Settings) -> str | None:
    catalog = Catalog.open(settings.catalog_url, migrate=False)
    try:
        return catalog.revision()
    finally:
        catalog.close()


def reap(procs: list[subprocess.Popen[str]]) -> None:
    """Kill what still runs after a failure (a test that passed leaves only the daemon)."""
    if not sys.exc_info()[0]:
        return
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def stop(daemon: subprocess.Popen[str]) -> tuple[int, str]:
    daemon.send_signal(signal.SIGTERM)
    _, stderr = daemon.communicate(timeout=60)
    return daemon.returncode, stderr


def forget_catalog(settings: Settings) -> None:
    """Make the site's catalog empty again: a site laid out before `init` made catalogs."""
    url = make_url(settings.catalog_url)
    if url.get_backend_name() == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{url.database}{suffix}").unlink(missing_ok=True)
        return
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar()
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()


def downgrade_to(settings: Settings, revision: str) -> None:
    """Leave the site's catalog at an older schema revision, as an older obsflow made it."""
    forget_catalog(settings)
    engine = create_engine(settings.catalog_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("catalog", ["made by init", "not made yet"])
def test_the_daemon_five_readers_and_two_writers_started_at_once_all_succeed(
    make_site: SiteFactory, frames: list[Path], catalog: str
) -> None:
    for n in range(ROUNDS):
        settings = make_site(f"site{n}", daemon={"status_seconds": 0.3})
        if catalog == "not made yet":
            forget_catalog(settings)
        daemon = obsflow(settings, "-v", "run")
        others = [
            obsflow(settings, "status", "--json"),
            obsflow(settings, "status"),
            obsflow(settings, "find"),
            obsflow(settings, "runs"),
            obsflow(settings, "token", "list"),
            obsflow(settings, "ingest", str(frames[n % len(frames)])),
            obsflow(settings, "token", "create", "--user", f"user{n}", "--scope", "read"),
        ]
        try:
            for proc in others:
                _, stderr = proc.communicate(timeout=120)
                assert proc.returncode == 0, f"round {n}: {command_line(proc)}: {stderr[-2000:]}"
                assert "locked" not in stderr
            wait_ready(settings, daemon)
        finally:
            reap([daemon, *others])
        code, stderr = stop(daemon)
        assert code == 0, f"round {n}: the daemon failed: {stderr[-2000:]}"
        assert "database is locked" not in stderr
        assert revision(settings) == SCHEMA_REVISION


def test_init_makes_the_catalog_at_the_newest_schema_in_wal_mode(tmp_path: Path) -> None:
    site = init_site(tmp_path / "site")
    database = site / "catalog.db"
    assert database.exists(), "obsflow init leaves the catalog to the first process"
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == (
            SCHEMA_REVISION
        )


def test_init_with_an_unreachable_catalog_says_so_and_can_be_run_again(tmp_path: Path) -> None:
    url = "postgresql+psycopg://obsflow@127.0.0.1:9/obsflow"  # the discard port: refused
    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "init", str(tmp_path / "site"), "--catalog", url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "cannot open the catalog" in done.stderr
    assert "127.0.0.1" in done.stderr
    assert not (tmp_path / "site" / "obsflow.yaml").exists()


def test_an_older_catalog_is_refused_until_migrated_and_migrations_at_once_are_safe(
    make_site: SiteFactory,
) -> None:
    for n in range(ROUNDS):
        settings = make_site(f"site{n}")
        downgrade_to(settings, "0004")
        refused = obsflow(settings, "status", "--json")
        _, stderr = refused.communicate(timeout=120)
        assert refused.returncode == 1
        text_ = " ".join(stderr.split())
        assert "is at schema 0004; this obsflow needs" in text_ and "obsflow migrate" in text_
        assert revision(settings) == "0004", "a command other than migrate upgraded it"
        procs = [obsflow(settings, "migrate") for _ in range(3)]
        for proc in procs:
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"round {n}: {command_line(proc)} failed: {stderr[-2000:]}"
        assert revision(settings) == SCHEMA_REVISION
        status = obsflow(settings, "status", "--json")
        assert status.communicate(timeout=120)[0] and status.returncode == 0


@contextmanager
def migration_lock(settings: Settings) -> Iterator[None]:
    """Hold the lock under which obsflow migrates this catalog, as a migrating process
    would: the writers' flock on SQLite, the advisory lock on PostgreSQL."""
    url = make_url(settings.catalog_url)
    if url.get_backend_name() == "sqlite":
        lock = os.open(f"{url.database}-writelock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(lock)
        return
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    engine.dispose()


def test_migrating_waits_for_a_migration_in_another_process_and_says_so(
    make_site: SiteFactory,
) -> None:
    """A process finding the migration lock taken waits (and logs that it waits), then
    finds the schema at head."""
    settings = make_site(daemon={"status_seconds": 0.3})
    downgrade_to(settings, "0005")
    with migration_lock(settings):
        migrating = obsflow(settings, "-v", "migrate")
        time.sleep(2.0)  # it is waiting for the lock meanwhile
        assert migrating.poll() is None
        assert revision(settings) == "0005", "migrated without the lock"
    _, stderr = migrating.communicate(timeout=120)
    assert migrating.returncode == 0, stderr
    assert revision(settings) == SCHEMA_REVISION
    assert "another process is migrating it; waiting" in " ".join(stderr.split())
    daemon = obsflow(settings, "-v", "run")
    wait_ready(settings, daemon)
    code, stderr = stop(daemon)
    assert code == 0, stderr


def test_a_daemon_whose_catalog_is_unreachable_retries_then_says_why(
    make_site: SiteFactory,
) -> None:
    settings = make_site(daemon={"start_seconds": 1.5})
    settings_file = settings.site / "obsflow.yaml"
    url = "postgresql+psycopg://obsflow@127.0.0.1:9/obsflow"  # nothing listens: refused
    text_ = settings_file.read_text().replace(json.dumps(settings.catalog_url)[1:-1], url)
    settings_file.write_text(text_)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "run", "--site", str(settings.site)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert time.monotonic() - started >= 1.5, "gave up without trying again"
    assert "trying again" in done.stderr
    assert "cannot open the catalog" in done.stderr and "127.0.0.1" in done.stderr
    assert not (settings.site / ".obsflow" / "daemon.json").exists()


def test_status_says_the_daemon_is_ready_and_no_longer_after_it_stops(
    make_site: SiteFactory,
) -> None:
    settings = make_site(daemon={"status_seconds": 0.3})
    daemon = obsflow(settings, "run")
    wait_ready(settings, daemon)
    code, stderr = stop(daemon)
    assert code == 0
    assert "obsflow run: ready" in stderr
    state = daemon_status(settings)["daemon"]
    assert state["ready"] is False and state["alive"] is False

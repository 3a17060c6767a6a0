"""Honest health: the errors module's tree is the classes obsflow defines, and a tracker
that keeps failing shows in ``obsflow status`` (a real daemon, a real cause, recovery)."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import obsflow
from obsflow import errors
from obsflow.catalog import Catalog
from obsflow.catalog.runs import RunStore
from obsflow.errors import ObsflowError
from obsflow.settings import Settings
from tests.conftest import SiteFactory, service_missing
from tests.test_daemon import wait_for, write_slowly
from tests.test_processing_daemon import Daemons, daemons
from tests.test_runs_cli import toy_site

__all__ = ["daemons"]  # a fixture this module uses

NOT_IMPORTED = {
    "obsflow.__main__": "runs the command line",
    "obsflow.catalog.migrations.env": "runs the migrations (Alembic imports it)",
}

# ---------------------------------------------------------------------- the errors tree

_NODE = re.compile(r"^((?:[│ ]   )*)[├└]── ([\w.]+)")
_OUTSIDE = re.compile(r"^\* ``([\w.]+)``")


def all_modules() -> list[Any]:
    """Every obsflow module, imported (but the ones in :data:`NOT_IMPORTED`)."""
    names = [m.name for m in pkgutil.walk_packages(obsflow.__path__, "obsflow.")]
    return [obsflow] + [importlib.import_module(n) for n in names if n not in NOT_IMPORTED]


def drawn_tree() -> tuple[set[tuple[str, str]], set[str]]:
    """The errors docstring's tree as (class, parent) pairs of ``module.Name``, and the
    exceptions it lists outside the tree."""
    doc = errors.__doc__ or ""
    block = doc.split("::\n", 1)[1]
    lines = [line[4:] for line in block.splitlines()]
    assert lines[1] == "ObsflowError", lines[:2]
    edges: set[tuple[str, str]] = set()
    path: list[tuple[str, str]] = [("obsflow.errors", "ObsflowError")]  # (module, name)
    for line in lines[2:]:
        if not line.strip():
            if edges:
                break  # the end of the drawing
            continue
        found = _NODE.match(line)
        if found is None:
            assert line.lstrip(" │"), line
            continue  # a description's second line
        depth = len(found.group(1)) // 4 + 1
        *module, name = found.group(2).split(".")
        del path[depth:]
        parent = path[-1]
        where = f"obsflow.{'.'.join(module)}" if module else parent[0]
        edges.add((f"{where}.{name}", f"{parent[0]}.{parent[1]}"))
        path.append((where, name))
    outside = {f"obsflow.{m[1]}" for line in doc.splitlines() if (m := _OUTSIDE.match(line))}
    return edges, outside


def test_the_errors_tree_draws_every_error_obsflow_defines_and_nothing_else() -> None:
    modules = all_modules()
    defined = {
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__ and issubclass(cls, BaseException)
    }
    tree = {
        (f"{cls.__module__}.{cls.__qualname__}", f"{base.__module__}.{base.__qualname__}")
        for cls in defined
        if issubclass(cls, ObsflowError) and cls is not ObsflowError
        for base in cls.__bases__
    }
    others = {
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in defined
        if not issubclass(cls, ObsflowError)
    }
    drawn, outside = drawn_tree()
    assert len(drawn) > 20  # the parser read the drawing
    assert drawn - tree == set(), "drawn in errors.py, but no such class (or another parent)"
    assert tree - drawn == set(), "defined, but not drawn in errors.py's tree"
    assert outside == others, "the exceptions outside the tree, as errors.py lists them"


# ---------------------------------------------------------------------- the tracker's health

SETTINGS: dict[str, dict[str, Any]] = {
    "receipt": {"settle_seconds": 0.2},
    "ingest": {"lease_seconds": 2.0, "backoff_seconds": 0.2},
    "daemon": {"reconcile_seconds": 1.0, "status_seconds": 0.3},
    "workers": {"runs": 1},
}


@pytest.fixture
def catalog_url(postgres_database: str | None) -> Iterator[str]:
    """A PostgreSQL catalog used as a role of its own, in a schema that role owns (a
    superuser, as the other tests connect, has every privilege and cannot lose one)."""
    if postgres_database is None:
        service_missing("PostgreSQL is not reachable at $OBSFLOW_TEST_POSTGRES_URL")
    assert postgres_database is not None
    role = f"obsflow_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_database, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(text(f'CREATE SCHEMA "{role}" AUTHORIZATION "{role}"'))
    url = make_url(postgres_database).set(username=role, query={"options": f"-csearch_path={role}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                {"r": role},
            )
            conn.execute(text(f'DROP SCHEMA "{role}" CASCADE'))
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()


def as_admin(settings: Settings, statement: str) -> None:
    """Run ``statement`` on the catalog's server as the superuser, ``{role}`` filled in."""
    url = make_url(settings.catalog_url)
    role = url.username
    admin = create_engine(url.set(username="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(statement.format(role=f'"{role}"', schema=f'"{role}"')))
    finally:
        admin.dispose()


def tracker_of(settings: Settings) -> dict[str, Any]:
    status = json.loads((settings.site / ".obsflow" / "daemon.json").read_text())
    tracker: dict[str, Any] = status["tracker"]
    return tracker


def status_json(settings: Settings) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "status", "--json", "--site", str(settings.site)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    shown: dict[str, Any] = json.loads(done.stdout)
    return shown


@pytest.mark.slow
@pytest.mark.postgres
def test_a_tracker_that_keeps_failing_shows_in_obsflow_status_and_recovers(
    make_site: SiteFactory, daemons: Daemons, frames: list[Path]
) -> None:
    settings = toy_site(make_site, sections=SETTINGS)
    with daemons.start(settings) as (proc, _):
        assert tracker_of(settings)["ok"] is True
        assert status_json(settings)["daemon"]["tracker"]["failures"] == 0

        # the catalog role loses a privilege the tracker needs (a grant script that missed
        # a table): receipt still records the frames, every tracker pass fails on them
        as_admin(settings, "REVOKE INSERT ON {schema}.tracker_groups FROM {role}")
        for frame in frames:
            write_slowly(frame, settings.incoming / frame.name, pieces=2, pause=0.001)
        wait_for(lambda: tracker_of(settings)["failures"] >= 3, 30, "tracker passes to fail")
        shown = status_json(settings)["daemon"]
        assert shown["alive"] and shown["ready"]
        failing = shown["tracker"]
        assert failing["ok"] is False
        assert failing["failures"] >= 3
        assert "permission denied for table tracker_groups" in failing["last_error"]
        assert "\n" not in failing["last_error"]

        as_admin(settings, "GRANT INSERT ON {schema}.tracker_groups TO {role}")
        wait_for(lambda: tracker_of(settings)["ok"], 30, "the tracker to recover")
        recovered = status_json(settings)["daemon"]["tracker"]
        assert recovered["ok"] is True
        assert recovered["failures"] == 0
        assert recovered["last_error"] == failing["last_error"]  # what it recovered from
        assert recovered["since"] > failing["since"]
        catalog = Catalog.open(settings.catalog_url, migrate=False)
        try:
            assert RunStore(catalog).find(), "the recovered tracker queued the runs"
        finally:
            catalog.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0

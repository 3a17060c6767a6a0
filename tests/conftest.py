"""Shared fixtures: real catalogs on SQLite and PostgreSQL, real sites, real frames.

PostgreSQL: ``$OBSFLOW_TEST_POSTGRES_URL`` (default the local server's ``test``
database) is used to create one fresh database per test run, and each test gets
its own schema in it. Without a server the PostgreSQL cases skip, unless
``OBSFLOW_REQUIRE_SERVICES=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from obsflow.settings import Settings, load_settings
from obsflow.sim.simulate import SimulatedFrame, simulate_night
from obsflow.site import Site, init_site, open_site

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REQUIRE_SERVICES = os.environ.get("OBSFLOW_REQUIRE_SERVICES") == "1"


def service_missing(reason: str) -> None:
    """Skip the test for a missing service, or fail it when services are required."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (OBSFLOW_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str | None]:
    """A fresh PostgreSQL database for this test run (dropped at the end), or None."""
    base = make_url(os.environ.get("OBSFLOW_TEST_POSTGRES_URL", DEFAULT_PG))
    name = f"obsflow_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(
            base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
        )
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:  # any failure to reach the server means "missing": the cases skip
        yield None
        return
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_database: str | None
) -> str:
    """A catalog URL on each engine: a SQLite file, or a fresh schema in PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    if postgres_database is None:
        service_missing("PostgreSQL is not reachable at $OBSFLOW_TEST_POSTGRES_URL")
    assert postgres_database is not None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(postgres_database, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return f"{postgres_database}?options=-csearch_path%3D{schema}"


SiteFactory = Callable[..., Settings]


@pytest.fixture
def make_site(tmp_path: Path, catalog_url: str) -> SiteFactory:
    """Create a site in tmp_path on this test's catalog; keyword args override settings,
    e.g. ``make_site(receipt={"unmatched": "quarantine"})``. The example pipelines are
    left out (tests of receipt and ingest should not start reductions) unless
    ``pipelines=True``."""

    def make(name: str = "site", pipelines: bool = False, **sections: dict[str, Any]) -> Settings:
        root = init_site(tmp_path / name, catalog_url=catalog_url)
        if not pipelines:
            (root / "registry" / "ofcam_pipelines.yaml").unlink()
        config = yaml.safe_load((root / "obsflow.yaml").read_text())
        config["receipt"]["settle_seconds"] = 0.0
        config["ingest"]["backoff_seconds"] = 0.0
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        (root / "obsflow.yaml").write_text(yaml.safe_dump(config))
        return load_settings(root)

    return make


@pytest.fixture
def site(make_site: SiteFactory) -> Iterator[Site]:
    """An opened site on this test's catalog (SQLite and PostgreSQL)."""
    opened = open_site(make_site())
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def night_frames(tmp_path_factory: pytest.TempPathFactory) -> list[SimulatedFrame]:
    """A small simulated night (12 frames of 64x64), written once per test run."""
    return simulate_night(tmp_path_factory.mktemp("night"), 12, seed=7, shape=(64, 64))


@pytest.fixture
def frames(tmp_path: Path, night_frames: list[SimulatedFrame]) -> list[Path]:
    """Fresh copies of the small night's frames, for one test to use up."""
    target = tmp_path / "frames"
    target.mkdir()
    out = []
    for frame in night_frames:
        copy = target / frame.path.name
        shutil.copyfile(frame.path, copy)
        out.append(copy)
    return out

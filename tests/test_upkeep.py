"""Running obsflow as a service: logs (levels, JSON, a file, journald), the example
systemd units, backup and restore, and schema upgrades that are explicit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

from obsflow.catalog import SCHEMA_REVISION
from tests.conftest import SiteFactory, service_missing
from tests.test_cli import as_json, obsflow
from tests.test_site_open import downgrade_to, revision

UNITS = Path(__file__).resolve().parent.parent / "examples" / "systemd"


def test_logs_in_json_to_a_file_and_with_levels(
    make_site: SiteFactory, frames: list[Path], tmp_path: Path
) -> None:
    site = make_site().site
    log_file = tmp_path / "logs" / "obsflow.log"
    done = obsflow(
        "--log-format", "json", "--log-level", "info", "--log-file", log_file,
        "ingest", frames[0].parent, "--site", site,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    cached = [x for x in lines if x["message"].startswith("cached ")]
    assert cached and all(x["archive_id"] and x["level"] == "info" for x in cached)
    in_file = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [x["message"] for x in in_file] == [x["message"] for x in lines]
    quiet = obsflow("--log-level", "error", "ingest", frames[0].parent, "--site", site)
    assert quiet.returncode == 0 and "cached" not in quiet.stderr
    bad = obsflow("--log-format", "xml", "status", "--site", site)
    assert bad.returncode == 2 and "no log format 'xml'" in " ".join(bad.stderr.split())


def test_under_journald_each_line_carries_its_priority(
    make_site: SiteFactory, frames: list[Path], tmp_path: Path
) -> None:
    site = make_site().site
    journal = tmp_path / "journal"
    with journal.open("w") as stderr:
        stat = os.fstat(stderr.fileno())
        done = subprocess.run(
            [sys.executable, "-m", "obsflow", "-v", "ingest", str(frames[0].parent),
             "--site", str(site)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120, check=False,
            env={**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"},
        )  # fmt: skip
    assert done.returncode == 0
    lines = [line for line in journal.read_text().splitlines() if line.strip()]
    odd = [line for line in lines if not re.match(r"<[3-7]>obsflow\.", line)]
    assert lines and not odd, odd
    assert any(line.startswith("<6>obsflow.receipt") for line in lines)


def test_the_example_systemd_units_are_valid_and_run_real_commands(tmp_path: Path) -> None:
    units = sorted(UNITS.glob("*.service"))
    assert {u.name for u in units} == {
        "obsflow.service", "obsflow-api.service", "obsflow-worker@.service",
    }  # fmt: skip
    obsflow_bin = Path(sys.executable).parent / "obsflow"
    for unit in units:
        exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit.read_text(), re.MULTILINE)
        assert exec_start and exec_start.group(1).endswith("/bin/obsflow"), unit
        args = exec_start.group(2).split()
        helped = obsflow(*args, "--help")  # the command line names options that exist
        assert helped.returncode == 0, (unit.name, helped.stderr)
        name = unit.name.replace("@.service", "@1.service")
        (tmp_path / name).write_text(
            unit.read_text().replace(exec_start.group(1), str(obsflow_bin))
        )
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        service_missing("systemd-analyze is not installed (Debian: systemd)")
        return
    for unit in sorted(tmp_path.glob("*.service")):
        checked = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
        )
        problems = [
            line for line in checked.stderr.splitlines()
            if str(unit) in line or "Unknown" in line or "Failed" in line
        ]  # fmt: skip
        assert checked.returncode == 0 and not problems, (unit.name, checked.stderr)


def test_an_older_catalog_needs_migrate_and_a_newer_one_is_refused(make_site: SiteFactory) -> None:
    settings = make_site()
    downgrade_to(settings, "0007")
    refused = obsflow("status", "--site", settings.site)
    says = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and "is at schema 0007" in says and "obsflow migrate" in says
    assert revision(settings) == "0007"
    done = obsflow("migrate", "--site", settings.site)
    assert done.returncode == 0 and f"from schema 0007 to {SCHEMA_REVISION}" in done.stdout
    assert as_json(obsflow("status", "--json", "--site", settings.site))["queue_depth"] == 0
    again = obsflow("migrate", "--site", settings.site)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    engine = create_engine(settings.catalog_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    for command in ("status", "migrate"):
        newer = obsflow(command, "--site", settings.site)
        says = " ".join(newer.stderr.split())
        assert newer.returncode == 1 and "schema 9999, which this obsflow does not know" in says


def test_backup_and_restore_bring_the_catalog_back(
    make_site: SiteFactory, frames: list[Path], tmp_path: Path
) -> None:
    settings = make_site()
    site = settings.site
    assert obsflow("ingest", frames[0], "--site", site).returncode == 0
    before = as_json(obsflow("find", "--json", "--site", site))
    done = obsflow("backup", tmp_path / "backups", "--site", site)
    if settings.catalog_url.startswith("postgresql") and done.returncode != 0:
        assert "pg_dump" in done.stderr  # says what to run
        return
    assert done.returncode == 0, done.stderr
    (made,) = (tmp_path / "backups").iterdir()
    assert (made / "obsflow.yaml").is_file() and (made / "registry" / "ofcam.yaml").is_file()
    assert (made / "SCHEMA").read_text().strip() == SCHEMA_REVISION
    if settings.catalog_url.startswith("postgresql"):
        assert (made / "catalog.pgdump").stat().st_size > 0
        told = obsflow("restore", made, "--site", site)
        assert told.returncode == 1 and "pg_restore" in told.stderr
        return
    assert obsflow("ingest", *frames[1:3], "--site", site).returncode == 0
    assert len(as_json(obsflow("find", "--json", "--site", site))) == len(before) + 2
    restored = obsflow("restore", made, "--site", site)
    assert restored.returncode == 0, restored.stderr
    after = as_json(obsflow("find", "--json", "--site", site))
    assert [f["archive_id"] for f in after] == [f["archive_id"] for f in before]

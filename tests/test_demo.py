"""The demo (sim/demo.py, ``obsflow demo``): its live view explains waits and raises no
alarm before the instrument has started; its temporary site goes unless --keep."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from obsflow.catalog.latency import Percentiles
from obsflow.processing.tracker import Tracker
from obsflow.settings import load_settings
from obsflow.sim.demo import DemoPlan, Snapshot, make_demo_site, render, snapshot
from obsflow.site import ingest_paths, open_site
from obsflow.states import RunState
from tests.test_cli import obsflow


def _snapshot(**changes: object) -> Snapshot:
    values: dict[str, object] = {
        "acquired": 0,
        "received": 0,
        "archived": 0,
        "quarantined": 0,
        "latency": Percentiles(0, None, None, None, None),
        "triggers": (("epics:OFCAM:LASTFILE", False, "not connected"),),
        "products": {},
        "runs": {RunState.QUEUED: 0},
        "waiting": (),
        "unarchived": 0,
        "untracked": 0,
    }
    values.update(changes)
    return Snapshot(**values)  # type: ignore[arg-type]


def _text(now: Snapshot, *, night_over: bool = False) -> str:
    console = Console(width=200, record=True)
    console.print(render(DemoPlan(Path("/tmp/x")), now, 1.0, night_over=night_over))
    return console.export_text()


def test_no_alarm_before_the_instrument_starts_but_one_after() -> None:
    before = _text(_snapshot())
    assert "ALARM" not in before and "waiting for the instrument to start" in before
    lost = _text(_snapshot(acquired=3))
    assert "ALARM not connected" in lost
    assert "finished its night" in _text(_snapshot(acquired=3), night_over=True)


def test_the_view_says_which_group_waits_for_what(tmp_path: Path, frames: list[Path]) -> None:
    settings = make_demo_site(tmp_path / "demo", quiet_seconds=600.0, broker=None)
    site = open_site(load_settings(settings.site))
    try:
        ingest_paths(site, frames)
        tracker = Tracker(site.registry, site.catalog, site.clock)
        tracker.drain()
        now = snapshot(settings, site.catalog, datetime.now(UTC) - timedelta(hours=1), tracker)
    finally:
        site.close()
    assert now.waiting
    text = " ".join(_text(now).split())
    flat = re.search(
        r"waiting: ofcam_masterflat filter=(\w+) waits for its deadline, (\d+) s", text
    )
    assert flat, text
    assert 590 <= int(flat.group(2)) <= 600
    assert not now.quiet  # the demo does not stop while a group waits


def test_the_demo_removes_its_temporary_site_unless_kept() -> None:
    args = ("demo", "--frames", "6", "--cadence", "0.1", "--size", "32", "--quiet-seconds", "1")
    done = obsflow(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    site = Path(re.search(r"site: (\S+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert not site.exists() and f"removed the demo's site {site}" in done.stdout
    kept = obsflow(*args, "--keep")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    site = Path(re.search(r"site: (\S+)", kept.stdout).group(1))  # type: ignore[union-attr]
    try:
        assert (site / "obsflow.yaml").is_file() and "removed" not in kept.stdout
        assert f"export OBSFLOW_SITE={site}" in kept.stdout
    finally:
        import shutil

        shutil.rmtree(site, ignore_errors=True)

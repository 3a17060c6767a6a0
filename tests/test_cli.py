"""The obsflow command as a user runs it: real subprocesses, on each catalog engine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from astropy.io import fits

from tests.conftest import SiteFactory

FIND_KEYS = {
    "archive_id", "product", "instrument", "level", "original_name", "state", "sha256",
    "size", "archive_path", "start", "stop",
}  # fmt: skip


def obsflow(
    *args: str | Path, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "obsflow", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **env},
        check=False,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_ingest_find_show_status(make_site: SiteFactory, frames: list[Path]) -> None:
    site = make_site().site
    done = obsflow("ingest", "--site", site, frames[0].parent)
    assert done.returncode == 0, done.stderr
    assert "archived" in done.stdout

    found = as_json(obsflow("find", "--site", site, "--json"))
    assert len(found) == len(frames)
    assert set(found[0]) >= FIND_KEYS
    for row in found:
        assert row["state"] == "archived"
        archived = Path(row["archive_path"])
        assert archived.is_file() and archived.is_relative_to(site / "archive")
        assert archived.stat().st_size == row["size"]

    flats = as_json(obsflow("find", "--site", site, "--json", "--object", "domeflat"))
    assert flats and all(r["frame_type"] == "FLAT" for r in flats)
    night = as_json(obsflow("find", "--site", site, "--json", "--night", "2026-11-21"))
    assert len(night) == len(frames)
    assert as_json(obsflow("find", "--site", site, "--json", "--night", "2026-11-22")) == []
    raw = as_json(
        obsflow("find", "--site", site, "--json", "--tag", "raw", "--product", "ofcam_raw")
    )
    assert len(raw) == len(frames)
    first = min(found, key=lambda r: r["start"])
    early = as_json(obsflow("find", "--site", site, "--json", "--until", first["start"]))
    assert [r["archive_id"] for r in early] == [first["archive_id"]]

    shown = as_json(obsflow("show", "--site", site, "--json", first["archive_id"]))
    events = [e["event"] for e in shown["ledger"]]
    assert events[0] == "acquired" and events[-1] == "archived"
    assert shown["ingest"]["state"] == "done"
    header = fits.getheader(first["archive_path"])
    assert shown["keywords"]["FRAMENUM"] == header["FRAMENUM"]
    by_name = as_json(obsflow("show", "--site", site, "--json", first["original_name"]))
    assert by_name["archive_id"] == first["archive_id"]

    status = as_json(obsflow("status", "--site", site, "--json"))
    assert status["files"]["archived"] == len(frames)
    assert status["queue_depth"] == 0


def test_rejected_file_gives_exit_status_1_and_says_why(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    site = make_site().site
    bad = frames[0].parent / "ofc_20261122_0999.fits"
    bad.write_bytes(b"this is not a FITS file at all\n" * 100)
    result = obsflow("ingest", "--site", site, frames[0].parent)
    assert result.returncode == 1
    assert "ofc_20261122_0999.fits" in result.stderr
    assert "not a FITS file" in result.stderr
    status = as_json(obsflow("status", "--site", site, "--json"))
    assert status["files"] == {
        "cached": 0, "archived": len(frames), "failed": 0, "rejected": 1,
    }  # fmt: skip


def test_no_wait_queues_and_a_later_ingest_drains_the_queue(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    site = make_site().site
    queued = obsflow("ingest", "--no-wait", "--site", site, *frames)
    assert queued.returncode == 0, queued.stderr
    status = as_json(obsflow("status", "--site", site, "--json"))
    assert status["files"]["cached"] == len(frames)
    assert status["queue_depth"] == len(frames)
    again = obsflow("ingest", "--site", site, *frames[:1])  # a duplicate; the run drains
    assert again.returncode == 0, again.stderr
    status = as_json(obsflow("status", "--site", site, "--json"))
    assert status["files"]["archived"] == len(frames)
    assert status["queue_depth"] == 0


def test_site_from_environment_and_a_clear_error_without_one(
    make_site: SiteFactory, tmp_path: Path
) -> None:
    site = make_site().site
    assert obsflow("status", "--json", OBSFLOW_SITE=str(site)).returncode == 0
    empty = tmp_path / "not-a-site"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OBSFLOW_SITE"}
    result = subprocess.run(
        [sys.executable, "-m", "obsflow", "status"],
        capture_output=True, text=True, cwd=empty, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "not an obsflow site" in result.stderr and "obsflow init" in result.stderr


def test_bad_arguments_are_refused_clearly(make_site: SiteFactory) -> None:
    site = make_site().site
    bad_time = obsflow("find", "--site", site, "--since", "last tuesday")
    assert bad_time.returncode == 2 and "ISO" in bad_time.stderr
    missing = obsflow("show", "--site", site, "OF.19990101.00000.00.fits")
    assert missing.returncode == 1 and "no file" in missing.stderr
    typo = obsflow("ingest", "--site", site, site / "incomming")
    assert typo.returncode == 2 and "no such file or directory" in typo.stderr


def test_a_time_option_takes_a_time_ago_as_well_as_an_iso_date_time(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    site = make_site().site
    assert obsflow("ingest", "--site", site, *frames).returncode == 0
    found = as_json(obsflow("find", "--site", site, "--json"))
    first = min(datetime.fromisoformat(f["start"]) for f in found)
    last = max(datetime.fromisoformat(f["stop"] or f["start"]) for f in found)
    now = datetime.now(UTC)
    hours_before = math.floor((now - first).total_seconds() / 3600) + 1  # before the night
    minutes_after = math.floor((now - last).total_seconds() / 60) - 1  # after it
    assert minutes_after > 0, "the simulated night is not in the past"

    def names(*args: str) -> set[str]:
        listed = as_json(obsflow("find", "--site", site, "--json", *args))
        return {f["original_name"] for f in listed}

    everything = {f["original_name"] for f in found}
    assert names("--since", f"{hours_before}h") == everything
    assert names("--since", f"{minutes_after}m") == set()
    assert names("--until", f"{minutes_after}M") == everything  # units in either case
    assert names("--since", f"{hours_before / 24:.3f}d", "--until", "1s") == everything
    assert names("--since", first.isoformat()) == everything
    for typo, says in [("3x", "time ago"), ("-3d", "time ago"), ("9" * 30 + "d", "too long ago")]:
        refused = obsflow("find", "--site", site, f"--since={typo}")
        assert refused.returncode == 2, typo
        assert says in " ".join(refused.stderr.split()), refused.stderr


def test_a_misspelt_name_is_an_error_that_lists_the_known_ones_not_an_empty_answer(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    site = make_site(pipelines=True).site
    assert obsflow("ingest", "--site", site, frames[0].parent).returncode == 0
    cases = [
        (("find", "--product", "ofcam_rwa"), "--product", "did you mean 'ofcam_raw'"),
        (("find", "--instrument", "ofcam"), "--instrument", "did you mean 'OFCAM'"),
        (("find", "--tag", "raww"), "--tag", "did you mean 'raw'"),
        (("runs", "--pipeline", "ofcam_calibrat"), "--pipeline", "did you mean 'ofcam_calibrate'"),
        (("reprocess", "--pipeline", "nope", "--no-wait"), "--pipeline", "ofcam_masterbias"),
        (("find", "--state", "archvied"), "--state", "no file state 'archvied'; did you mean"),
        (("runs", "--state", "faild"), "--state", "did you mean 'failed'"),
        (("token", "create", "--user", "u", "--scope", "reed"), "--scope", "did you mean 'read'"),
    ]
    for args, option, says in cases:
        refused = obsflow(*args, "--site", site)
        assert refused.returncode == 2, (args, refused.stdout)
        text = " ".join(refused.stderr.split())  # the error box wraps lines
        assert option in text and says in text, (args, text)
        assert "Value error" not in text  # a sentence, not a validation dump
    # the right names still answer
    assert len(as_json(obsflow("find", "--tag", "raw", "--json", "--site", site))) == len(frames)
    assert as_json(obsflow("runs", "--pipeline", "ofcam_calibrate", "--json", "--site", site)) == []


def test_simulate_writes_a_night_the_registry_recognises(
    make_site: SiteFactory, tmp_path: Path
) -> None:
    site = make_site().site
    out = tmp_path / "sim"
    result = obsflow("simulate", "--site", site, "--frames", "5", "--size", "32", "--out", out)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.glob("*.fits"))
    assert len(names) == 5
    done = obsflow("ingest", "--site", site, out)
    assert done.returncode == 0, done.stderr
    assert len(as_json(obsflow("find", "--site", site, "--json"))) == 5


def test_demo_runs_a_night_live_over_epics_and_reduces_it_from_l0_to_l3(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    result = obsflow(
        "demo", "--frames", "12", "--cadence", "0.1", "--size", "64", "--dir", site,
        "--quiet-seconds", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(site) in result.stdout
    assert "12/12 frames archived" in result.stdout
    assert "acquired → archived: p50" in result.stdout
    assert "kind: epics" in (site / "registry" / "ofcam.yaml").read_text()
    status = as_json(obsflow("status", "--site", site, "--json"))
    assert status["queue_depth"] == 0
    assert status["daemon"]["running"] is False  # stopped cleanly at the end
    assert status["daemon"]["triggers"][0]["name"] == "epics:OFCAM:LASTFILE"
    files = as_json(obsflow("find", "--site", site, "--json"))
    raw = [f for f in files if f["level"] == 0]
    assert len(raw) == 12  # each announced twice, archived once
    levels = {f["level"] for f in files if f["state"] == "archived"}
    assert levels == {0, 1, 2, 3}  # the night went all the way to the L3 catalog
    runs = as_json(obsflow("runs", "--site", site, "--json"))
    assert runs and {r["state"] for r in runs} == {"succeeded"}
    assert "products made by the pipelines" in result.stdout
    assert "pipeline runs" in result.stdout


def test_global_options_work_before_or_after_the_command(make_site: SiteFactory) -> None:
    site = make_site().site
    version = obsflow("--version")
    assert version.returncode == 0 and version.stdout.startswith("obsflow ")
    elsewhere = site.parent / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OBSFLOW_SITE"}
    for args in (
        ("--site", site, "status", "--json"),
        ("status", "--json", "--site", site),
        ("-v", "--site", site, "status", "--json"),
        ("status", "-v", "--json", "--site", site),
        ("--site", site, "runs", "--json", "-vv"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "obsflow", *map(str, args)],
            capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, (args, result.stderr)
        json.loads(result.stdout)


def test_help_shows_flags_without_type_noise_and_completion_is_offered() -> None:
    for args in (("--help",), ("find", "--help"), ("runs", "show", "--help")):
        shown = obsflow(*args)
        assert shown.returncode == 0 and "--help" in shown.stdout
        assert "<bool>" not in shown.stdout, args
    assert "--install-completion" in obsflow("--help").stdout
    script = obsflow("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert script.returncode == 0 and "complete" in script.stdout

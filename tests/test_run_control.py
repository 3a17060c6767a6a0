"""Run control as an operator uses it: ``runs cancel`` and ``groups`` (which groups
wait for their deadline, until when, with what); real subprocesses, both engines."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from obsflow.catalog.runs import RunStore
from obsflow.processing.tracker import Tracker
from obsflow.site import ingest_paths, open_site
from obsflow.states import RunState
from tests.conftest import SiteFactory
from tests.test_cli import as_json, obsflow
from tests.test_runs_cli import SQLITE_ONLY, opened, process, toy_site


def test_groups_says_which_wait_for_what_until_when(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = make_site(pipelines=True)
    pipelines = settings.registry / "ofcam_pipelines.yaml"
    pipelines.write_text(pipelines.read_text().replace("after_minutes: 0.25", "after_minutes: 600"))
    assert as_json(obsflow("groups", "--json", "--site", settings.site)) == []
    site = open_site(settings)
    try:
        ingest_paths(site, frames)
        Tracker(site.registry, site.catalog, site.clock).drain()
        now = site.clock()
    finally:
        site.close()
    waiting = as_json(obsflow("groups", "--json", "--site", settings.site))
    by_pipeline = {w["pipeline"] for w in waiting}
    assert {"ofcam_masterbias", "ofcam_masterflat"} <= by_pipeline
    for w in waiting:
        until = datetime.fromisoformat(w["until"])
        assert now + timedelta(minutes=590) < until < now + timedelta(minutes=610)
        assert w["rule"] == "600 min after its last input"
    bias = next(w for w in waiting if w["pipeline"] == "ofcam_masterbias")
    assert sum(bias["has"].values()) > 0
    text = " ".join(obsflow("groups", "--site", settings.site).stdout.split())
    assert (
        "ofcam_masterflat" in text
        and "waits for its deadline (600 min after its last input)" in text
    )
    assert "in 10.0 h" in text or "in 9.9 h" in text


def test_runs_cancel_by_number_or_pipeline_and_retry_brings_one_back(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = toy_site(make_site)
    process(settings, frames)
    queued = obsflow(
        "reprocess", "--pipeline", "toy_flat", "--no-wait", "--site", settings.site
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    with opened(settings) as site:
        runs = [r.id for r in RunStore(site.catalog).find(state=RunState.QUEUED)]
    listed = as_json(obsflow("runs", "--state", "queued", "--json", "--site", settings.site))
    ids = [r["run_id"] for r in listed]
    assert len(ids) == 3 and runs == ids

    one = obsflow("runs", "cancel", str(ids[0]), "--site", settings.site)
    assert one.returncode == 0 and f"cancelled 1 run(s): {ids[0]}" in one.stdout
    rest = obsflow("runs", "cancel", "--pipeline", "toy_flat", "--state", "queued",
                   "--site", settings.site)  # fmt: skip
    assert rest.returncode == 0 and "cancelled 2 run(s)" in rest.stdout
    failed = as_json(obsflow("runs", "--state", "failed", "--json", "--site", settings.site))
    cancelled = [r for r in failed if r["run_id"] in ids]
    assert len(cancelled) == 3 and all(r["error"].startswith("cancelled") for r in cancelled)
    with opened(settings) as site:  # what the dashboard's failed runs show first
        assert RunStore(site.catalog).newest(2, state=RunState.FAILED) == sorted(ids)[:0:-1]
    assert as_json(obsflow("runs", "--state", "queued", "--json", "--site", settings.site)) == []

    again = obsflow("runs", "cancel", str(ids[0]), "99999", "--site", settings.site)
    assert again.returncode == 1
    assert f"run {ids[0]} not cancelled: it is failed" in again.stderr
    assert "run 99999 not cancelled: it does not exist" in again.stderr
    for args, says in (
        ((), "name runs to cancel, or --pipeline"),
        (("--pipeline", "toy_flta"), "did you mean 'toy_flat'"),
        (("--pipeline", "toy_flat", "--state", "failed"), "no state a run can be cancelled in"),
    ):
        refused = obsflow("runs", "cancel", *args, "--site", settings.site)
        assert refused.returncode == 2 and says in " ".join(refused.stderr.split()), args

    back = obsflow("runs", "retry", str(ids[0]), "--site", settings.site)
    assert back.returncode == 0, back.stdout + back.stderr
    shown = as_json(obsflow("runs", "show", str(ids[0]), "--json", "--site", settings.site))
    assert shown["state"] == "succeeded"


@SQLITE_ONLY
def test_registry_replay_shows_the_whole_cascade(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = toy_site(make_site, sources=True)
    replay = as_json(
        obsflow("registry", "replay", frames[0].parent, "--json", "--site", settings.site)
    )
    (bias,) = [r for r in replay["runs"] if r["pipeline"] == "toy_bias"]
    (made,) = bias["then"]
    assert made["product"] == "ofcam_masterbias"
    (flat,) = made["pipelines"]
    assert flat["pipeline"] == "toy_flat"
    (flat_made,) = flat["then"]
    assert flat_made["product"] == "ofcam_masterflat"
    (calibrate,) = flat_made["pipelines"]
    assert calibrate["pipeline"] == "toy_calibrate"
    assert calibrate["then"][0]["pipelines"][0]["pipeline"] == "toy_sources"
    text = obsflow("registry", "replay", frames[0].parent, "--site", settings.site).stdout
    lines = [line.strip() for line in text.splitlines()]
    assert "→ makes ofcam_masterbias, which starts toy_flat" in lines
    assert "→ makes ofcam_calibrated, which starts toy_sources" in lines
    assert "→ makes ofcam_sources, which starts nothing" in lines


@SQLITE_ONLY
def test_reprocess_shows_progress_and_a_summary_of_every_run(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = toy_site(make_site)
    process(settings, frames)
    done = obsflow("reprocess", "--pipeline", "toy_flat", "--site", settings.site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3/3 run(s) finished" in done.stderr
    flats = as_json(obsflow("runs", "--pipeline", "toy_flat", "--json", "--site", settings.site))
    for run in flats[-3:]:  # each run of the reprocessing, in its table
        assert run["version"] == 2
        assert any(
            line.split("│")[1].strip() == str(run["run_id"])
            for line in done.stdout.splitlines()
            if line.count("│") > 2
        )
    assert "succeeded: 3" in done.stdout
    assert "then 8 downstream run(s) of toy_calibrate: 8 succeeded" in done.stdout

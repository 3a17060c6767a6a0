"""Processing end to end, in process: tracker → runs → executor → controller → receipt.

The registry is the example instrument with toy pipelines whose steps are real
subprocesses (``tests/tools/stack.py``, ``sh``), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from astropy.io import fits
from sqlalchemy import update

from obsflow.catalog import schema
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.catalog.runs import RunStore
from obsflow.errors import RecognitionError
from obsflow.processing.executor import InlineExecutor, LocalExecutor
from obsflow.processing.tracker import Tracker
from obsflow.processing.tracker.loop import TrackerLoop, process_until_idle
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import FileState, LedgerEvent, RunState, StepState
from tests.conftest import SiteFactory

STACK = Path(__file__).parent / "tools" / "stack.py"
PY = sys.executable


def toy_pipelines(*, calibrate_fails: bool = False, image: bool = False) -> str:
    fail = ["--fail", "3"] if calibrate_fails else []
    calibrate = ["{python}", str(STACK), *fail, "--imagetyp", "OBJECT"]
    calibrate += ["--out", "{outputs.ofcam_calibrated}", "{inputs.frame}", "{inputs.flat}"]
    image_line = "        image: example.org/ccd:1\n" if image else ""
    return f"""
pipelines:
  - id: toy_bias
    profile: stack_bias
    inputs:
      - {{product: ofcam_raw, name: biases, where: "frame_type == 'BIAS'", min: 1}}
    group: {{by: [night]}}
    outputs:
      - {{product: ofcam_masterbias, name: "ofc_{{nightid}}_mbias.fits"}}
  - id: toy_flat
    profile: stack_flat
    inputs:
      - {{product: ofcam_raw, name: flats, where: "frame_type == 'FLAT'", min: 1}}
      - {{product: ofcam_masterbias, name: bias, max: 1}}
    group: {{by: [night, filter]}}
    outputs:
      - {{product: ofcam_masterflat, name: "ofc_{{nightid}}_mflat_{{filter}}.fits"}}
  - id: toy_calibrate
    profile: calibrate
    inputs:
      - {{product: ofcam_raw, name: frame, where: "frame_type == 'OBJECT'", max: 1}}
      - {{product: ofcam_masterflat, name: flat, where: "filter == group.filter", max: 1}}
    group: {{by: [file]}}
    on_new_input: rerun
    outputs:
      - {{product: ofcam_calibrated, name: "ofc_{{date}}_{{frame}}_cal.fits"}}
profiles:
  - id: stack_bias
    steps:
      - name: stack
        command: ["{{python}}", "{STACK}", --imagetyp, MASTERBIAS,
                  --out, "{{outputs.ofcam_masterbias}}", "{{inputs.biases}}"]
  - id: stack_flat
    steps:
      - name: stack
        command: ["{{python}}", "{STACK}", --imagetyp, MASTERFLAT,
                  --out, "{{outputs.ofcam_masterflat}}", "{{inputs.flats}}"]
  - id: calibrate
    steps:
      - name: calibrate
        command: {calibrate!r}
{image_line}      - name: long
        needs: [calibrate]
        when: "exptime > 30"
        command: [sh, -c, "echo long exposure {{exptime}}"]
"""


@pytest.fixture
def toy_site(make_site: SiteFactory, frames: list[Path]) -> Iterator[Callable[..., Site]]:
    opened: list[Site] = []

    def make(**options: bool) -> Site:
        settings = make_site(processing={"lease_seconds": 30})
        (settings.registry / "ofcam_pipelines.yaml").write_text(toy_pipelines(**options))
        site = open_site(settings)
        opened.append(site)
        summary = ingest_paths(site, frames)
        assert len(summary.ingest.archived) == len(frames)
        return site

    yield make
    for site in opened:
        site.close()


def products(site: Site, product: str) -> list[FileRecord]:
    return site.catalog.find(FileQuery(product=product))


def test_a_night_cascades_into_one_run_per_group_with_provenance(
    toy_site: Callable[..., Site], frames: list[Path]
) -> None:
    site = toy_site()
    executor = LocalExecutor(site)
    try:
        assert process_until_idle(site, executor, timeout=120)
    finally:
        executor.close()
    runs = RunStore(site.catalog)
    done = runs.find()
    assert done and all(r.state is RunState.SUCCEEDED for r in done), [r.error for r in done]
    by_pipeline: dict[str, int] = {}
    for run in done:
        by_pipeline[run.pipeline] = by_pipeline.get(run.pipeline, 0) + 1
    raw = products(site, "ofcam_raw")
    objects = [r for r in raw if r.frame_type == "OBJECT"]
    flat_filters = {r.filter for r in raw if r.frame_type == "FLAT"}
    assert by_pipeline == {
        "toy_bias": 1,
        "toy_flat": len(flat_filters),
        "toy_calibrate": len([o for o in objects if o.filter in flat_filters]),
    }
    (bias_run,) = runs.find(pipeline="toy_bias")
    biases = sorted(r.id for r in raw if r.frame_type == "BIAS")
    assert bias_run.inputs == {"biases": tuple(biases)}
    (masterbias,) = products(site, "ofcam_masterbias")
    assert masterbias.made_by_run == bias_run.id and masterbias.level == 1
    assert masterbias.state is FileState.ARCHIVED
    assert runs.outputs(bias_run.id) == [masterbias.id]
    ledger = [e.event for e in site.catalog.ledger(biases[0])]
    assert ledger[-1] is LedgerEvent.PROCESSED  # acquired → ... → archived → processed
    for calibrated in products(site, "ofcam_calibrated"):
        made_by = runs.get(calibrated.made_by_run or -1)
        assert made_by is not None and made_by.pipeline == "toy_calibrate"
        run = made_by
        (frame_id,) = run.inputs["frame"]
        (flat_id,) = run.inputs["flat"]
        frame, flat = site.catalog.records([frame_id, flat_id])
        assert calibrated.original_name == frame.original_name.replace(".fits", "_cal.fits")
        assert flat.filter == frame.filter  # where: filter == group.filter
        steps = {s.step: s for s in runs.steps(run.id)}
        assert steps["calibrate"].state is StepState.SUCCEEDED
        assert steps["calibrate"].exit_status == 0
        expected = StepState.SUCCEEDED if (frame.exptime or 0) > 30 else StepState.SKIPPED
        assert steps["long"].state is expected
    # the same events again (every file untracked again): no new run
    with site.catalog.write() as conn:
        conn.execute(update(schema.files).values(tracked=False))
    assert Tracker(site.registry, site.catalog, site.clock).drain() == []
    assert len(runs.find()) == len(done)


def test_a_failed_step_publishes_nothing_and_the_run_can_be_retried(
    toy_site: Callable[..., Site],
) -> None:
    site = toy_site(calibrate_fails=True)
    assert process_until_idle(site, InlineExecutor(site), timeout=120)
    runs = RunStore(site.catalog)
    failed = runs.find(pipeline="toy_calibrate")
    assert failed and all(r.state is RunState.FAILED for r in failed)
    run = failed[0]
    assert run.error is not None
    assert f"run {run.id}" in run.error and "calibrate" in run.error
    assert "refusing on purpose" in run.error  # the tail of stderr names the cause
    steps = {s.step: s for s in runs.steps(run.id)}
    assert steps["calibrate"].exit_status == 3
    assert steps["long"].state is StepState.SKIPPED
    assert products(site, "ofcam_calibrated") == []  # nothing half-made reached the cache
    assert run.work_dir and Path(run.work_dir).is_dir()  # kept to look into
    assert run.log_path and "refusing on purpose" in Path(run.log_path).read_text()
    assert runs.retry(run.id)
    assert runs.get(run.id).state is RunState.QUEUED  # type: ignore[union-attr]
    assert not runs.retry(runs.find(pipeline="toy_bias")[0].id)  # a succeeded run: no


def test_a_container_step_fails_with_a_clear_message(toy_site: Callable[..., Site]) -> None:
    site = toy_site(image=True)
    assert process_until_idle(site, InlineExecutor(site), timeout=120)
    run = RunStore(site.catalog).find(pipeline="toy_calibrate")[0]
    assert run.state is RunState.FAILED
    assert "example.org/ccd:1" in (run.error or "") and "container" in (run.error or "")


def test_a_new_input_makes_a_new_run_version_whose_product_supersedes(
    toy_site: Callable[..., Site], tmp_path: Path
) -> None:
    site = toy_site()
    assert process_until_idle(site, InlineExecutor(site), timeout=120)
    runs = RunStore(site.catalog)
    before = {r.id for r in runs.find(pipeline="toy_calibrate")}
    first = products(site, "ofcam_calibrated")
    # a new master flat for one filter (same name, new bytes: a new version)
    flat = products(site, "ofcam_masterflat")[0]
    from astropy.io import fits

    with fits.open(site.cache.path(flat.cache_path or "")) as hdul:
        hdul[0].header["QUALITY"] = "remade"
        new = tmp_path / flat.original_name
        hdul.writeto(new)
    ingest_paths(site, [new])
    assert process_until_idle(site, InlineExecutor(site), timeout=120)
    again = [r for r in runs.find(pipeline="toy_calibrate") if r.id not in before]
    same_filter = [c for c in first if c.filter == flat.filter]
    assert len(again) == len(same_filter) > 0
    assert all(r.version == 2 and "new input" in r.reason for r in again)
    now = {c.original_name: c for c in products(site, "ofcam_calibrated")}
    for old in same_filter:
        refreshed = site.catalog.records([old.id])[0]
        assert refreshed.superseded_by is not None  # never deleted, superseded
        assert now[old.original_name].version >= 1


def test_a_run_whose_executor_died_is_run_again_or_failed_after_its_attempts(
    toy_site: Callable[..., Site],
) -> None:
    site = toy_site()
    tracker = Tracker(site.registry, site.catalog, site.clock)
    started = tracker.drain()
    runs = RunStore(site.catalog)
    first = started[0].run_id
    # a daemon claims it and dies: its lease runs out
    assert runs.claim(first, "dead-daemon", site.clock() - timedelta(hours=1), 1.0)
    assert not runs.claim(first, "another", site.clock(), 30)  # claimed: nobody else
    loop = TrackerLoop(site, InlineExecutor(site))
    loop.recover()
    assert runs.get(first).state is RunState.SUCCEEDED  # type: ignore[union-attr]
    assert runs.get(first).attempts == 2  # type: ignore[union-attr]
    # one that died max_attempts times is failed, not forgotten
    second = tracker.drain()[0].run_id  # the master bias made, the flats' runs queue
    for _ in range(site.settings.processing.max_attempts):
        with site.catalog.write() as conn:
            conn.execute(
                update(schema.runs)
                .where(schema.runs.c.id == second)
                .values(state=RunState.QUEUED.value)
            )
        assert runs.claim(second, "dead-daemon", site.clock() - timedelta(hours=1), 1.0)
    requeued, failed = runs.recover(site.clock(), site.settings.processing.max_attempts)
    assert failed == [second] and requeued == []
    assert "died" in (runs.get(second).error or "")  # type: ignore[union-attr]


def test_two_trackers_at_once_queue_each_run_once(toy_site: Callable[..., Site]) -> None:
    site = toy_site()
    results: list[int] = []
    errors: list[BaseException] = []

    def track() -> None:
        try:
            mine = Tracker(site.registry, site.catalog, site.clock)
            results.extend(s.run_id for s in mine.drain())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=track) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == len(set(results))
    queued = RunStore(site.catalog).find()
    assert sorted(results) == sorted(r.id for r in queued)
    keys = [(r.pipeline, r.group_key) for r in queued]
    assert len(keys) == len(set(keys))


# ------------------------------------------------------------------ facts from the row


def _set_rows(site: Site, ids: list[int], **values: object) -> None:
    with site.catalog.write() as conn:
        conn.execute(update(schema.files).where(schema.files.c.id.in_(ids)).values(**values))


def test_the_tracker_and_the_executor_read_name_groups_from_the_row(
    toy_site: Callable[..., Site],
) -> None:
    """What receipt recorded is what downstream reads: the name is not recognised again
    (the calibrated frames are named from the stored ``frame`` group)."""
    site = toy_site()
    objects = [r for r in products(site, "ofcam_raw") if r.frame_type == "OBJECT"]
    for record in objects:
        assert record.name_groups is not None and set(record.name_groups) == {"date", "frame"}
        stored = {**record.name_groups, "frame": f"9{record.name_groups['frame']}"}
        _set_rows(site, [record.id], name_groups=stored)
    assert process_until_idle(site, InlineExecutor(site), timeout=120)
    names = sorted(r.original_name for r in products(site, "ofcam_calibrated"))
    expected = sorted(
        f"ofc_{r.name_groups['date']}_9{r.name_groups['frame']}_cal.fits"
        for r in objects
        if r.name_groups is not None
    )
    assert names == expected


def test_a_row_recorded_before_name_groups_were_kept_is_recognised_again(
    toy_site: Callable[..., Site],
) -> None:
    site = toy_site()
    raw = products(site, "ofcam_raw")
    _set_rows(site, [r.id for r in raw], name_groups=None)  # as schema 0006 left them
    assert all(r.name_groups is None for r in products(site, "ofcam_raw"))
    assert process_until_idle(site, InlineExecutor(site), timeout=120)
    objects = [r for r in raw if r.frame_type == "OBJECT"]
    calibrated = products(site, "ofcam_calibrated")
    assert len(calibrated) == len(objects) > 0
    assert {r.name_groups and r.name_groups["frame"] for r in calibrated} == {
        r.original_name.split("_")[2].removesuffix(".fits") for r in objects
    }


def test_a_file_that_cannot_be_recognised_again_is_an_error_naming_it(
    toy_site: Callable[..., Site],
) -> None:
    """Never an empty set of name groups: the tracker leaves the file out, says which,
    and tracks the others; a run whose first input it is fails naming it."""
    site = toy_site()
    raw = products(site, "ofcam_raw")
    lost = next(r for r in raw if r.frame_type == "OBJECT")
    _set_rows(site, [lost.id], name_groups=None, original_name="renamed-by-hand.fits")
    tracker = Tracker(site.registry, site.catalog, site.clock)
    with pytest.raises(RecognitionError, match=re.escape(lost.archive_id or "?")):
        tracker.drain()
    assert tracker.drain() == []  # every file was read: the inbox moves on
    assert site.catalog.untracked(10) == []
    queued = RunStore(site.catalog).find()
    assert {r.pipeline for r in queued} == {"toy_bias"}  # the night's biases went on
    # a run whose primary input can no longer be read fails, naming it
    (bias_run,) = queued
    primary = bias_run.inputs["biases"][0]
    (first,) = site.catalog.records([primary])
    _set_rows(site, [primary], name_groups=None, original_name="renamed-too.fits")
    InlineExecutor(site).submit(bias_run.id)
    failed = RunStore(site.catalog).get(bias_run.id)
    assert failed is not None and failed.state is RunState.FAILED
    assert first.archive_id and first.archive_id in (failed.error or "")
    assert "renamed-too.fits" in (failed.error or "")


def test_a_runs_inputs_come_in_observation_order_whatever_order_they_arrived(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    """Inputs reach a step by observation time, then name, not by arrival (row id), so
    a re-run after files arrived in another order makes the same outputs."""
    count = sum(fits.getheader(f)["IMAGETYP"] == "OBJECT" for f in frames)
    assert count >= 2
    settings = make_site()
    (settings.registry / "ofcam_pipelines.yaml").write_text(toy_pipelines())
    (settings.registry / "order.yaml").write_text(
        f"""\
pipelines:
  - id: all_objects
    profile: stack_bias
    inputs:
      - {{product: ofcam_raw, name: frames, where: "frame_type == 'OBJECT'", min: {count}}}
    group: {{by: [night]}}
"""
    )
    site = open_site(settings)
    try:
        for frame in reversed(frames):  # the last exposure first
            assert site.receiver.receive(frame).file_id is not None
        Tracker(site.registry, site.catalog, site.clock).drain()
        (run,) = RunStore(site.catalog).find(pipeline="all_objects")
        by_id = {r.id: r for r in site.catalog.records(list(run.inputs["frames"]))}
        frames_in = [by_id[i] for i in run.inputs["frames"]]
    finally:
        site.close()
    assert len(frames_in) == count
    order = [(f.start, f.original_name) for f in frames_in]
    assert order == sorted(order)
    assert [f.id for f in frames_in] != sorted(f.id for f in frames_in)  # not arrival order

"""The processing commands as a user runs them: ``runs``, ``runs show``, ``runs retry``,
``reprocess`` and ``registry replay``, each a real ``python -m obsflow`` subprocess.

The site runs toy pipelines (master bias → master flats → calibrated frames) whose steps
are real subprocesses: ``sh`` and :data:`TOY_STEP`, a quick pure-Python FITS step written
into the site (no numpy or astropy to import, so a run takes milliseconds). The night is
processed in this process, as ``tests/test_processing.py`` does; the commands then look
at it, retry it and reprocess it.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from string import Template
from typing import Any

import pytest
from astropy.io import fits

from obsflow.catalog.records import FileQuery
from obsflow.catalog.runs import RunStore
from obsflow.processing.executor import InlineExecutor
from obsflow.processing.tracker.loop import process_until_idle
from obsflow.settings import Settings
from obsflow.sim.simulate import simulate_night
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import FileState, RunState, StepState
from tests.conftest import SiteFactory
from tests.test_cli import as_json, obsflow

RUN_KEYS = {
    "run_id", "pipeline", "group", "version", "state", "started", "finished", "inputs",
    "outputs",
}  # fmt: skip
SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
"""For the commands whose engine adds nothing to test: the catalog is only read."""

TOY_STEP = r'''"""A toy pipeline step for obsflow's tests, quick (no numpy, no astropy to import).

    toystep.py --out OUT --imagetyp T [--note TEXT] [--run ID] [--sleep S]
               [--pids DIR [--helper SECONDS]] IN [IN ...]

Writes the first input FITS file with IMAGETYP, DATE-END (the latest input's DATE-OBS),
NCOMBINE, NOTE and RUNID set: the header first, the data ``--sleep`` seconds later (so
a kill meanwhile leaves the output half-written). With ``--pids`` it writes its pid (and
that of a helper process it leaves running for ``--helper`` seconds, as steps that start
helpers do) to ``DIR/PID.pid``.
"""

import argparse
import os
import subprocess
import sys
import time

BLOCK = 2880


def read(path):
    """The header cards (without END) and the bytes after the header."""
    with open(path, "rb") as f:
        data = f.read()
    cards = []
    for pos in range(0, len(data), BLOCK):
        for i in range(pos, pos + BLOCK, 80):
            card = data[i : i + 80]
            if card[:3] == b"END" and not card[3:].strip():
                return cards, data[pos + BLOCK :]
            cards.append(card)
    sys.exit(f"toystep: {path}: no END card")


def value(cards, key):
    for card in cards:
        if card[:8].decode().rstrip() == key:
            return card[10:].split(b"/")[0].strip().strip(b"'").strip().decode()
    return None


def card(key, val):
    if isinstance(val, str):
        text = "%-8s= %-20s" % (key, "'%-8s'" % val.replace("'", "''")[:60])
    else:
        text = "%-8s= %20s" % (key, val)
    return text.encode().ljust(80)


def main():
    if sys.argv[1:2] == ["--be-helper"]:
        time.sleep(float(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--imagetyp", required=True)
    parser.add_argument("--note", default="")
    parser.add_argument("--run", default="")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--pids", default="")
    parser.add_argument("--helper", type=float, default=0.0)
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args()
    if args.pids:
        os.makedirs(args.pids, exist_ok=True)
        pids = [os.getpid()]
        if args.helper:
            helper = [sys.executable, __file__, "--be-helper", str(args.helper)]
            pids.append(subprocess.Popen(helper).pid)
        for pid in pids:
            with open(os.path.join(args.pids, f"{pid}.pid"), "w") as f:
                f.write(args.out + "\n")
    cards, data = read(args.inputs[0])
    starts = [value(read(path)[0], "DATE-OBS") or "" for path in args.inputs]
    mine = {"IMAGETYP", "DATE-END", "NCOMBINE", "NOTE", "RUNID"}
    cards = [c for c in cards if c[:8].decode().rstrip() not in mine]
    cards += [
        card("IMAGETYP", args.imagetyp),
        card("DATE-END", max(starts)),
        card("NCOMBINE", len(args.inputs)),
        card("NOTE", args.note),
        card("RUNID", args.run),
        b"END".ljust(80),
    ]
    header = b"".join(cards)
    header += b" " * (-len(header) % BLOCK)
    with open(args.out, "wb") as out:
        out.write(header)
        out.flush()
        time.sleep(args.sleep)
        out.write(data)
    print(f"toystep: wrote {args.out} from {len(args.inputs)} input(s) ({args.note})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

BROKEN_CHECK = 'if test -e "$0"; then echo "toy check: $0 says the frame is broken" >&2; exit 4; fi'


TOY_REGISTRY = Template("""\
pipelines:
  - id: toy_bias
    profile: toy_bias
    inputs: [{product: ofcam_raw, name: biases, where: "frame_type == 'BIAS'"}]
    group: {by: [night]}
    outputs: [{product: ofcam_masterbias, name: "ofc_{nightid}_mbias.fits"}]
  - id: toy_flat
    profile: toy_flat
    inputs:
      - {product: ofcam_raw, name: flats, where: "frame_type == 'FLAT'"}
      - {product: ofcam_masterbias, name: bias, max: 1}
    group: {by: [night, filter]}
    parameters: {gain: 1}
    outputs: [{product: ofcam_masterflat, name: "ofc_{nightid}_mflat_{filter}.fits"}]
  - id: toy_calibrate
    profile: toy_calibrate
    inputs:
      - {product: ofcam_raw, name: frame, where: "frame_type == 'OBJECT'", max: 1}
      - {product: ofcam_masterflat, name: flat, where: "filter == group.filter", max: 1}
    group: {by: [file]}
    on_new_input: rerun
    outputs: [{product: ofcam_calibrated, name: "ofc_{date}_{frame}_cal.fits"}]
$sources_pipeline$inspect_pipeline
profiles:
  - id: toy_bias
    steps: [{name: combine, command: $bias}]
  - id: toy_flat
    steps: [{name: combine, command: $flat}]
  - id: toy_calibrate
    steps:
      - {name: check, command: $check}
      - {name: calibrate, needs: [check], command: $calibrate}
$sources_profile$inspect_profile""")
SOURCES = (
    """\
  - id: toy_sources
    profile: toy_sources
    inputs: [{product: ofcam_calibrated, name: frame, max: 1}]
    group: {by: [file]}
    outputs: [{product: ofcam_sources, name: "ofc_{date}_{frame}_src.fits"}]
""",
    """\
  - id: toy_sources
    steps: [{name: detect, command: $sources}]
""",
)
INSPECT = (
    """\
  - id: toy_inspect
    profile: toy_inspect
    inputs: [{product: ofcam_raw, name: frame, where: "frame_type == 'OBJECT'", max: 1}]
    group: {by: [file]}
""",
    """\
  - id: toy_inspect
    steps: [{name: look, command: [sh, -c, "echo {frame}"]}]
""",
)


def toy_pipelines(
    tool: Path,
    *,
    sources: bool = False,
    inspect: bool = False,
    sleep: float = 0.0,
    bias_sleep: float | None = None,
    pids: Path | None = None,
    helper: float = 0.0,
) -> str:
    """The toy registry: master bias per night → master flat per night and filter (with a
    ``gain`` parameter) → calibrated frame per OBJECT frame (after a ``check`` step that
    fails while ``SITE/broken-FRAME`` exists; rerun on a new flat); with ``sources``, an L2
    source list per calibrated frame; with ``inspect``, a step-only pipeline per OBJECT
    frame (no outputs). ``sleep`` (``bias_sleep`` for the master bias), ``pids`` and
    ``helper`` go to every :data:`TOY_STEP`."""
    extra = [] if pids is None else ["--pids", str(pids), "--helper", str(helper)]

    def step(imagetyp: str, output: str, inputs: list[str], note: str) -> str:
        pause = bias_sleep if imagetyp == "MASTERBIAS" and bias_sleep is not None else sleep
        return json.dumps([
            "{python}", str(tool), "--imagetyp", imagetyp, "--note", note, "--run", "{run_id}",
            "--sleep", str(pause), *extra,
            "--out", f"{{outputs.{output}}}", *(f"{{inputs.{i}}}" for i in inputs),
        ])  # fmt: skip

    with_sources = SOURCES if sources else ("", "")
    with_inspect = INSPECT if inspect else ("", "")
    return TOY_REGISTRY.substitute(
        sources_pipeline=with_sources[0],
        inspect_pipeline=with_inspect[0],
        sources_profile=Template(with_sources[1]).substitute(
            sources=step("SOURCES", "ofcam_sources", ["frame"], "src")
        ),
        inspect_profile=with_inspect[1],
        bias=step("MASTERBIAS", "ofcam_masterbias", ["biases"], "run {run_id}"),
        flat=step("MASTERFLAT", "ofcam_masterflat", ["flats", "bias"], "gain={gain}"),
        check=json.dumps(["sh", "-c", BROKEN_CHECK, "{site}/broken-{frame}"]),
        calibrate=step("OBJECT", "ofcam_calibrated", ["frame", "flat"], "cal"),
    )


def toy_site(make_site: SiteFactory, name: str = "site", **options: Any) -> Settings:
    """A site whose registry has the toy pipelines (``options`` go to
    :func:`toy_pipelines`, except ``sections``: settings sections for ``make_site``, by
    default the inline executor, which a command starts at once; ``pids=True`` means
    ``SITE/pids``)."""
    settings = make_site(name, **options.pop("sections", {"processing": {"executor": "inline"}}))
    if options.get("pids") is True:
        options["pids"] = settings.site / "pids"
    tool = settings.site / "toystep.py"
    tool.write_text(TOY_STEP)
    (settings.registry / "ofcam_pipelines.yaml").write_text(toy_pipelines(tool, **options))
    return settings


@contextmanager
def opened(settings: Settings) -> Iterator[Site]:
    site = open_site(settings)
    try:
        yield site
    finally:
        site.close()


def process(settings: Settings, paths: list[Path]) -> None:
    """Ingest ``paths`` and run every pipeline they start, in this process."""
    with opened(settings) as site:
        summary = ingest_paths(site, paths)
        assert len(summary.ingest.archived) == len(paths)
        assert process_until_idle(site, InlineExecutor(site), timeout=120)


def frame_number(path: Path) -> str:
    return path.stem.rsplit("_", 1)[-1]


@pytest.fixture
def night(make_site: SiteFactory, frames: list[Path]) -> Settings:
    """A site whose night is processed; the calibration of frame 0005 failed (broken)."""
    settings = toy_site(make_site)
    (settings.site / "broken-0005").touch()
    process(settings, frames)
    return settings


def runs_json(settings: Settings, *options: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = as_json(
        obsflow("runs", "--site", settings.site, "--json", *options)
    )
    return found


def the_failed_run(settings: Settings) -> int:
    with opened(settings) as site:
        (failed,) = RunStore(site.catalog).find(state=RunState.FAILED)
    return failed.id


def test_runs_lists_each_run_with_inputs_and_outputs_and_filters(night: Settings) -> None:
    listed = runs_json(night)
    assert len(listed) == 1 + 3 + 8  # a bias, three filters' flats, eight OBJECT frames
    for run in listed:
        assert set(run) >= RUN_KEYS, run
        assert run["version"] == 1
        assert datetime.fromisoformat(run["started"]) <= datetime.fromisoformat(run["finished"])
    pipelines = [r["pipeline"] for r in listed]
    assert {p: pipelines.count(p) for p in pipelines} == {
        "toy_bias": 1, "toy_flat": 3, "toy_calibrate": 8,
    }  # fmt: skip
    states = [r["state"] for r in listed]
    assert states.count("failed") == 1 and states.count("succeeded") == len(listed) - 1
    with opened(night) as site:
        store = RunStore(site.catalog)
        for run in listed:
            record = store.get(run["run_id"])
            assert record is not None and record.state.value == run["state"]
            names = {
                f.id: f.archive_id for f in site.catalog.records(
                    [i for ids in record.inputs.values() for i in ids] + store.outputs(record.id)
                )
            }  # fmt: skip
            assert run["inputs"] == {
                name: [names[i] for i in ids] for name, ids in record.inputs.items()
            }
            assert run["outputs"] == [names[i] for i in store.outputs(record.id)]
            assert len(run["outputs"]) == (run["state"] == "succeeded")
            assert run["group"] == record.group_key.text()
        raw = {f.archive_id or "": f for f in site.catalog.find(FileQuery(product="ofcam_raw"))}
    (bias,) = [r for r in listed if r["pipeline"] == "toy_bias"]
    assert sorted(bias["inputs"]["biases"]) == sorted(
        a for a, f in raw.items() if f.frame_type == "BIAS"
    )

    (failed,) = runs_json(night, "--state", "failed")
    assert failed["pipeline"] == "toy_calibrate" and failed["outputs"] == []
    assert raw[failed["inputs"]["frame"][0]].original_name == "ofc_20261122_0005.fits"
    assert "exit status 4" in failed["error"] and "broken" in failed["error"]
    flats = runs_json(night, "--pipeline", "toy_flat")
    assert len(flats) == 3 and {r["pipeline"] for r in flats} == {"toy_flat"}
    assert sorted(r["group"] for r in flats) == sorted(
        r["group"] for r in listed if r["pipeline"] == "toy_flat"
    )
    assert all(f in " ".join(r["group"] for r in flats) for f in "BVR")

    table = obsflow("runs", "--site", night.site)
    assert table.returncode == 0, table.stderr
    for word in ("toy_bias", "toy_flat", "toy_calibrate", "succeeded", "failed", "runs (12)"):
        assert word in table.stdout
    assert "exit status 4" in table.stdout  # the failed run's error, in the reason column


@SQLITE_ONLY
def test_runs_show_a_run_its_steps_profile_and_log(night: Settings) -> None:
    failed_id = the_failed_run(night)
    calibrated = [
        r for r in runs_json(night, "--pipeline", "toy_calibrate") if r["state"] == "succeeded"
    ]
    good = calibrated[0]
    run_id = str(good["run_id"])

    table = obsflow("runs", "show", run_id, "--site", night.site)
    assert table.returncode == 0, table.stderr
    for word in (f"run {run_id}: toy_calibrate", good["group"], "succeeded", "input frame",
                 "input flat", good["outputs"][0], "steps", "check", "calibrate"):  # fmt: skip
        assert word in table.stdout, word

    shown = as_json(obsflow("runs", "show", run_id, "--json", "--site", night.site))
    assert {k: shown[k] for k in ("run_id", "pipeline", "inputs", "outputs")} == {
        k: good[k] for k in ("run_id", "pipeline", "inputs", "outputs")
    }
    assert [s["step"] for s in shown["steps"]] == ["check", "calibrate"]
    for step in shown["steps"]:
        assert step["state"] == "succeeded" and step["exit_status"] == 0
        assert step["argv"] and all(isinstance(a, str) for a in step["argv"])
    check, calibrate = shown["steps"]
    assert check["argv"][:3] == ["sh", "-c", BROKEN_CHECK]
    assert calibrate["argv"][1].endswith("toystep.py")

    profile = json.loads(obsflow("runs", "show", run_id, "--profile", "--site", night.site).stdout)
    assert profile["run_id"] == run_id and profile["pipeline"] == "toy_calibrate"
    argv = [a for s in profile["steps"] for a in s["argv"]]
    assert [s["argv"] for s in profile["steps"]] == [s["argv"] for s in shown["steps"]]
    assert not [a for a in argv if "{" in a or "}" in a], "a placeholder left unfilled"
    assert run_id in argv  # {run_id} filled
    for paths in profile["inputs"].values():
        for path in paths:
            assert path in argv and Path(path).is_file()
    (output,) = profile["outputs"].values()
    assert output in argv and Path(output).is_relative_to(profile["work"])

    failed = as_json(obsflow("runs", "show", str(failed_id), "--json", "--site", night.site))
    assert failed["state"] == "failed" and failed["outputs"] == []
    check, calibrate = failed["steps"]
    assert (check["state"], check["exit_status"]) == ("failed", 4)
    assert "says the frame is broken" in check["stderr_tail"]
    assert (calibrate["state"], calibrate["exit_status"]) == ("skipped", None)
    assert "needs check" in calibrate["reason"]

    log = obsflow("runs", "show", str(failed_id), "--log", "--site", night.site)
    assert log.returncode == 0, log.stderr
    assert shlex.join(check["argv"]) in log.stdout  # the step's argv
    assert "says the frame is broken" in log.stdout  # ... and its stderr
    assert f"run {failed_id} failed" in log.stdout

    missing = obsflow("runs", "show", "9999", "--site", night.site)
    assert missing.returncode == 1
    assert "no run" in missing.stderr and "9999" in missing.stderr


def test_runs_retry_runs_a_failed_run_again_once_fixed_and_refuses_others(
    night: Settings,
) -> None:
    failed_id = the_failed_run(night)
    still = obsflow("runs", "retry", str(failed_id), "--site", night.site)  # not fixed yet
    assert still.returncode == 1, still.stdout + still.stderr
    assert f"run {failed_id}: failed" in still.stdout and "broken" in still.stdout

    (night.site / "broken-0005").unlink()  # the fix
    fixed = obsflow("runs", "retry", str(failed_id), "--site", night.site)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"run {failed_id} queued again" in fixed.stdout
    assert f"run {failed_id}: succeeded" in fixed.stdout
    with opened(night) as site:
        store = RunStore(site.catalog)
        run = store.get(failed_id)
        assert run is not None and run.state is RunState.SUCCEEDED and run.error is None
        assert run.attempts == 1  # a retry starts its attempts afresh
        assert [s.state for s in store.steps(failed_id)] == [StepState.SUCCEEDED] * 2
        (made,) = site.catalog.records(store.outputs(failed_id))
        assert made.original_name == "ofc_20261122_0005_cal.fits"
        assert made.state is FileState.ARCHIVED and made.made_by_run == failed_id
        assert len(store.find()) == 12  # the same run, not a new one

    again = obsflow("runs", "retry", str(failed_id), "--site", night.site)
    assert again.returncode == 1
    assert f"cannot retry run {failed_id}" in again.stderr
    assert "is succeeded, not failed" in again.stderr
    nothing = obsflow("runs", "retry", "9999", "--site", night.site)
    assert nothing.returncode == 1 and "does not exist" in nothing.stderr


def another_flat(flat: Path, number: int, directory: Path) -> Path:
    """A new raw flat of the same night and filter as ``flat``: frame ``number``."""
    directory.mkdir(exist_ok=True)
    target = directory / f"ofc_20261122_{number:04d}.fits"
    with fits.open(flat) as hdul:
        hdul[0].header["DATE-OBS"] = f"2026-11-22T05:{number:02d}:00.000"
        hdul[0].header["FRAMENUM"] = number
        hdul.writeto(target)
    return target


def test_reprocess_makes_new_versions_with_overrides_that_supersede(
    make_site: SiteFactory, frames: list[Path], tmp_path: Path
) -> None:
    settings = toy_site(make_site)
    later = simulate_night(tmp_path / "later", 5, seed=3, night=date(2026, 11, 22), shape=(32, 32))
    process(settings, frames + [f.path for f in later])
    with opened(settings) as site:
        before = RunStore(site.catalog).find()
    first = {r.group_key: r for r in before if r.pipeline == "toy_flat"}
    assert len(first) == 6  # three filters on each of two nights
    assert all(r.state is RunState.SUCCEEDED for r in before)

    done = obsflow(
        "reprocess", "--pipeline", "toy_flat", "--night", "2026-11-21", "--param", "gain=2",
        "--site", settings.site,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 run(s) of toy_flat queued as reprocess-" in done.stdout
    assert "succeeded: 3" in done.stdout

    with opened(settings) as site:
        store = RunStore(site.catalog)
        new = [r for r in store.find(pipeline="toy_flat") if r.id not in {b.id for b in before}]
        assert len(new) == 3
        for run in new:
            assert run.version == 2 and run.night == date(2026, 11, 21)
            assert run.state is RunState.SUCCEEDED and run.overrides == {"gain": 2}
            old = first[run.group_key]
            assert run.inputs == old.inputs  # the same inputs, run again
            assert "gain=1" in json.dumps(json.loads(old.profile or "{}")["steps"])
        recalibrated = [
            r for r in store.find(pipeline="toy_calibrate") if r.id not in {b.id for b in before}
        ]
        assert len(recalibrated) == 8  # each frame of the night, on its new flat (rerun)
        assert all(r.version == 2 and r.night == date(2026, 11, 21) for r in recalibrated)
        untouched = {r.id for r in store.find(night=date(2026, 11, 22))}
        assert untouched == {r.id for r in before if r.night == date(2026, 11, 22)}

    shown = as_json(obsflow("runs", "show", str(new[0].id), "--json", "--site", settings.site))
    assert shown["version"] == 2 and shown["overrides"] == {"gain": 2}
    assert shown["request"].startswith("reprocess-") and shown["reason"].startswith("reprocess")
    profile = json.loads(
        obsflow("runs", "show", str(new[0].id), "--profile", "--site", settings.site).stdout
    )
    argv = [a for s in profile["steps"] for a in s["argv"]]
    assert "gain=2" in argv and "gain=1" not in argv

    flats = as_json(
        obsflow("find", "--product", "ofcam_masterflat", "--json", "--site", settings.site)
    )
    by_id = {f["id"]: f for f in flats}
    by_run = {f["made_by_run"]: f for f in flats}
    assert len(flats) == 9  # three superseded, three new, three of the other night
    for run in new:
        old, fresh = by_run[first[run.group_key].id], by_run[run.id]
        assert old["original_name"] == fresh["original_name"]
        assert old["superseded_by"] == fresh["id"] and fresh["superseded_by"] is None
        assert fresh["version"] == old["version"] + 1
        for kept in (old, fresh):  # never deleted: both in the archive
            assert kept["state"] == "archived" and Path(kept["archive_path"]).is_file()
    other = [f for f in flats if f["night"] == "2026-11-22"]
    assert len(other) == 3 and all(f["superseded_by"] is None for f in other)
    assert sum(f["superseded_by"] is not None for f in by_id.values()) == 3

    # a new flat after the reprocess: toy_flat says on_new_input: ignore (the default),
    # and the group's newest run being a reprocessing one changes nothing about that
    (flat_b,) = [f for f in frames if frame_number(f) == "0002"]
    process(settings, [another_flat(flat_b, 14, tmp_path / "new")])
    with opened(settings) as site:
        assert len(RunStore(site.catalog).find()) == len(before) + 3 + 8  # nothing more


@SQLITE_ONLY
def test_registry_replay_says_which_runs_would_start_and_touches_nothing(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = toy_site(make_site, inspect=True)
    directory = frames[0].parent
    replay = as_json(obsflow("registry", "replay", directory, "--json", "--site", settings.site))
    assert replay["files"] == replay["recognised"] == len(frames)
    would = replay["runs"]
    pipelines = [r["pipeline"] for r in would]
    # flats wait for a master bias, calibration for a flat: only the raw frames' runs
    assert sorted(set(pipelines)) == ["toy_bias", "toy_inspect"]
    assert pipelines.count("toy_bias") == 1 and pipelines.count("toy_inspect") == 8
    assert all(r["state"] == "queued" for r in would)
    inspected = [r for r in would if r["pipeline"] == "toy_inspect"]
    assert len({r["group"] for r in inspected}) == 8
    assert all(len(r["inputs"]["frame"]) == 1 for r in inspected)

    text = obsflow("registry", "replay", directory, "--site", settings.site)
    assert text.returncode == 0, text.stderr
    assert "12 file(s), 12 recognised; 9 run(s) would start" in text.stdout
    assert "toy_bias" in text.stdout and "toy_inspect" in text.stdout

    assert runs_json(settings) == []  # the real site: no run, no file, nothing stored
    assert as_json(obsflow("find", "--json", "--site", settings.site)) == []
    for where in (settings.cache, settings.archive, settings.work):
        assert not [p for p in where.rglob("*") if p.is_file()], where

    # the inputs it named are the archive IDs these frames get when really ingested
    with opened(settings) as site:
        ingest_paths(site, frames)
        raw = {f.archive_id or "": f for f in site.catalog.find(FileQuery(product="ofcam_raw"))}
    (bias,) = [r for r in would if r["pipeline"] == "toy_bias"]
    assert sorted(bias["inputs"]["biases"]) == sorted(
        a for a, f in raw.items() if f.frame_type == "BIAS"
    )
    named = sorted(raw[r["inputs"]["frame"][0]].original_name for r in inspected)
    assert named == sorted(f.name for f in frames if frame_number(f) >= "0005")


@SQLITE_ONLY
def test_reprocess_refuses_bad_arguments_clearly(make_site: SiteFactory) -> None:
    settings = toy_site(make_site)
    unknown = obsflow("reprocess", "--pipeline", "toy_flats", "--site", settings.site)
    assert unknown.returncode == 2
    assert "no pipeline 'toy_flats'" in unknown.stderr
    assert "toy_bias, toy_calibrate, toy_flat" in unknown.stderr
    bad = obsflow("reprocess", "--pipeline", "toy_flat", "--param", "gain", "--site", settings.site)
    assert bad.returncode == 2 and "expected NAME=VALUE" in bad.stderr
    # a misspelt parameter would be ignored: the runs would come out unchanged
    typo = obsflow(
        "reprocess", "--pipeline", "toy_flat", "--param", "gian=2", "--no-wait",
        "--site", settings.site,
    )  # fmt: skip
    text = " ".join(typo.stderr.split())
    assert typo.returncode == 2 and "no parameter of pipeline toy_flat 'gian'" in text
    assert "did you mean 'gain'" in text and "0 run(s)" not in typo.stdout
    night = obsflow(
        "reprocess", "--pipeline", "toy_flat", "--night", "21-11-2026", "--site", settings.site
    )
    assert "Traceback" not in night.stderr
    assert night.returncode == 2 and "--night" in night.stderr and "21-11-2026" in night.stderr

"""The processing commands: ``runs``, ``runs show``, ``runs retry``, ``reprocess`` and
``registry replay``. Registered on the main app by :mod:`obsflow.cli`."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from obsflow.catalog.runs import NewRun, RunRecord, RunStore
from obsflow.cli import (
    JsonOption,
    SiteOption,
    _settings,
    _site,
    app,
    choice,
    choices,
    err,
    known,
    out,
    registry_app,
)
from obsflow.processing.profile import ParameterValue, parameter_names
from obsflow.processing.tracker import Tracker
from obsflow.processing.tracker.loop import process_until_idle
from obsflow.settings import load_settings
from obsflow.site import Site, open_site
from obsflow.states import RunState

runs_app = typer.Typer(
    help="Pipeline runs: list them (no subcommand), show one, retry one.",
    invoke_without_command=True,
)
app.add_typer(runs_app, name="runs")


def _run_json(site: Site, run: RunRecord) -> dict[str, Any]:
    names = {
        r.id: r.archive_id or r.original_name
        for r in site.catalog.records(
            [i for ids in run.inputs.values() for i in ids] + RunStore(site.catalog).outputs(run.id)
        )
    }
    data = run.to_json()
    data["inputs"] = {name: [names.get(i, str(i)) for i in ids] for name, ids in run.inputs.items()}
    data["outputs"] = [names.get(i, str(i)) for i in RunStore(site.catalog).outputs(run.id)]
    return data


@runs_app.callback()
def runs_list(
    ctx: typer.Context,
    state: Annotated[
        str | None,
        typer.Option(
            metavar=choices(RunState), help="Only runs in this state.", show_default=False
        ),
    ] = None,
    pipeline: Annotated[
        str | None, typer.Option(help="Only this pipeline's runs.", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (the newest).")] = 200,
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """List pipeline runs, oldest first."""
    if ctx.invoked_subcommand is not None:
        return
    run_state = choice(state, RunState, "run state", "--state")
    with _site(site) as s:
        found = RunStore(s.catalog).find(state=run_state, pipeline=pipeline)[-limit:]
        if pipeline is not None and not found:  # a pipeline gone from the registry has runs
            known(pipeline, s.registry.pipelines, "pipeline", "--pipeline")
        if as_json:
            print(json.dumps([_run_json(s, r) for r in found], indent=1))
            return
        table = Table(title=f"runs ({len(found)})")
        for column in ("run", "pipeline", "group", "v", "state", "started", "took", "reason"):
            table.add_column(column)
        for r in found:
            took = (
                f"{(r.finished - r.started).total_seconds():.1f} s"
                if r.finished and r.started
                else ""
            )
            style = {RunState.FAILED: "red", RunState.RUNNING: "yellow"}.get(r.state, "")
            table.add_row(
                str(r.id),
                r.pipeline,
                str(r.group_key),
                str(r.version),
                f"[{style}]{r.state.value}[/]" if style else r.state.value,
                r.started.isoformat(timespec="seconds") if r.started else "",
                took,
                (r.error or r.reason)[:80],
            )
        out.print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="The run's number.")],
    profile: Annotated[bool, typer.Option("--profile", help="Print the run-time profile.")] = False,
    show_log: Annotated[bool, typer.Option("--log", help="Print the run's full log.")] = False,
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """One run: its group, inputs, outputs, steps; --profile and --log for the rest."""
    with _site(site) as s:
        store = RunStore(s.catalog)
        run = store.get(run_id)
        if run is None:
            err.print(f"[red]no run[/] {run_id}")
            raise typer.Exit(1)
        if profile:
            print(run.profile or f"run {run_id} has no run-time profile yet (state {run.state})")
            return
        if show_log:
            path = Path(run.log_path) if run.log_path else None
            if path is None or not path.is_file():
                err.print(f"run {run_id} has no log yet (state {run.state.value})")
                raise typer.Exit(1)
            print(path.read_text(errors="replace"), end="")
            return
        data = _run_json(s, run)
        steps = store.steps(run_id)
        data["steps"] = [step.to_json() for step in steps]
        if as_json:
            print(json.dumps(data, indent=1))
            return
        table = Table(title=f"run {run_id}: {run.pipeline} {run.group_key}", show_header=False)
        for key in ("state", "version", "reason", "error", "degraded", "attempts", "created",
                    "started", "finished", "work_dir", "log_path"):  # fmt: skip
            if data.get(key) not in (None, "", False):
                table.add_row(key, str(data[key]))
        for name, ids in data["inputs"].items():
            table.add_row(f"input {name}", ", ".join(ids))
        table.add_row("outputs", ", ".join(data["outputs"]) or "-")
        out.print(table)
        step_table = Table(title="steps")
        for column in ("step", "state", "exit", "tries", "took", "argv / reason"):
            step_table.add_column(column)
        for step in steps:
            took = (
                f"{(step.finished - step.started).total_seconds():.2f} s"
                if step.finished and step.started
                else ""
            )
            step_table.add_row(
                step.step,
                step.state.value,
                "" if step.exit_status is None else str(step.exit_status),
                str(step.attempts),
                took,
                step.reason or " ".join(step.argv),
            )
        out.print(step_table)


def _execute_here(s: Site) -> None:
    """Run the queued runs in this process, unless a daemon runs (it takes them)."""
    from obsflow.daemon import read_status  # the daemon's and executors' modules: at use
    from obsflow.processing.executor import make_executor

    status = read_status(s.settings.site, s.clock())
    if status is not None and status.get("alive"):
        out.print("the daemon is running: it executes the queued runs")
        return
    executor = make_executor(s)
    try:
        process_until_idle(s, executor, timeout=3600)
    finally:
        executor.close()


@runs_app.command("retry")
def runs_retry(
    run_id: Annotated[int, typer.Argument(help="A failed run's number.")],
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Only queue it (for the daemon).")
    ] = False,
    site: SiteOption = None,
) -> None:
    """Queue a failed run again (after fixing the cause), and run it."""
    with _site(site) as s:
        store = RunStore(s.catalog)
        if not store.retry(run_id):
            run = store.get(run_id)
            state = "does not exist" if run is None else f"is {run.state.value}, not failed"
            err.print(f"[red]cannot retry run {run_id}[/]: it {state}")
            raise typer.Exit(1)
        out.print(f"run {run_id} queued again")
        if not no_wait:
            _execute_here(s)
            run = store.get(run_id)
            assert run is not None
            out.print(f"run {run_id}: {run.state.value}" + (f": {run.error}" if run.error else ""))
            if run.state is RunState.FAILED:
                raise typer.Exit(1)


def _parameter(text: str) -> tuple[str, ParameterValue]:
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise typer.BadParameter(f"{text!r}: expected NAME=VALUE", param_hint="--param")
    value: ParameterValue = yaml.safe_load(raw) if raw else ""
    if not isinstance(value, str | int | float | bool) and value is not None:
        value = raw
    return name, value


@app.command()
def reprocess(
    pipeline: Annotated[str, typer.Option(help="The pipeline to run again.")],
    night: Annotated[
        str | None, typer.Option(help="Only this night (YYYY-MM-DD).", show_default=False)
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="Override a parameter: NAME=VALUE (repeatable)."),
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Only queue the runs (for the daemon).")
    ] = False,
    site: SiteOption = None,
) -> None:
    """Run a pipeline again on every group it knows (of one night): new run versions,
    whose products supersede the older ones (which stay, superseded, never deleted)."""
    overrides = dict(_parameter(p) for p in param or [])
    try:
        when = date.fromisoformat(night) if night else None
    except ValueError:
        raise typer.BadParameter(f"{night!r}: expected YYYY-MM-DD", param_hint="--night") from None
    with _site(site) as s:
        known(pipeline, s.registry.pipelines, "pipeline", "--pipeline")
        spec = s.registry.pipelines[pipeline]
        declared = parameter_names(spec, s.registry.profiles[spec.profile])
        for name in overrides:  # a misspelt name would be ignored: the run would not change
            known(name, declared, f"parameter of pipeline {pipeline}", "--param")
        tracker = Tracker(s.registry, s.catalog, s.clock)
        request = f"reprocess-{s.clock():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        queued: list[int] = []
        for key, primary in tracker.known_groups(spec, when):
            decision = tracker.decide(spec, key, primary, deadline_passed=True)
            if not decision.ready:
                out.print(f"  {key}: not ready ({'; '.join(decision.unmet)}); skipped")
                continue
            run_id = tracker.runs.create(
                NewRun(
                    pipeline=spec.id,
                    group_key=key,
                    night=date.fromisoformat(key.night) if key.night else None,
                    inputs={k: v for k, v in decision.selected.items() if v},
                    reason=f"reprocess ({request})",
                    degraded=decision.degraded,
                    request=request,
                    overrides=overrides,
                ),
                s.clock(),
            )
            if run_id is not None:
                queued.append(run_id)
        out.print(f"{len(queued)} run(s) of {pipeline} queued as {request}")
        if queued and not no_wait:
            _execute_here(s)
            store = RunStore(s.catalog)
            states = [r.state for r in store.find(run_ids=queued)]
            out.print(", ".join(f"{st.value}: {states.count(st)}" for st in sorted(set(states))))
            if RunState.FAILED in states:
                raise typer.Exit(1)


@registry_app.command("replay")
def registry_replay(
    directory: Annotated[Path, typer.Argument(help="A directory of files to replay.")],
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """Feed a directory's files through recognition and the tracker, in a scratch catalog,
    running nothing: print which runs would start, with which inputs."""
    if not directory.is_dir():
        raise typer.BadParameter(f"{directory} is not a directory")
    settings = _settings(site)
    scratch = Path(tempfile.mkdtemp(prefix="obsflow-replay-"))
    try:
        shutil.copytree(settings.registry, scratch / "registry")
        (scratch / "obsflow.yaml").write_text(
            "receipt: {settle_seconds: 0}\ncatalog: {url: 'sqlite:///replay.db'}\n"
        )
        replay = open_site(load_settings(scratch))
        try:
            from obsflow.site import ingest_paths

            files = sorted(p for p in directory.iterdir() if p.is_file())
            summary = ingest_paths(replay, files, wait=False)
            later = replay.clock() + timedelta(days=3650)  # every deadline has passed
            tracker = Tracker(replay.registry, replay.catalog, lambda: later)
            started = tracker.drain() + tracker.tick()
            store = RunStore(replay.catalog)
            would = [_run_json(replay, r) for r in store.find(run_ids=[x.run_id for x in started])]
        finally:
            replay.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    recognised = sum(1 for r in summary.received if r.product is not None)
    if as_json:
        print(json.dumps({"files": len(files), "recognised": recognised, "runs": would}, indent=1))
        return
    out.print(f"{len(files)} file(s), {recognised} recognised; {len(would)} run(s) would start:")
    for run in would:
        out.print(
            f"  [bold]{run['pipeline']}[/] {run['group']}"
            + (" (degraded)" if run["degraded"] else "")
        )
        for name, ids in run["inputs"].items():
            out.print(f"      {name}: {', '.join(ids)}", highlight=False)

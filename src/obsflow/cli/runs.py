"""The processing commands: ``runs``, ``runs show``, ``runs retry``, ``reprocess`` and
``registry replay``. Registered on the main app by :mod:`obsflow.cli`."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from obsflow.catalog.runs import RunRecord, RunStore
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
from obsflow.cli.tables import Column
from obsflow.cli.tables import table as fitted_table
from obsflow.processing.profile import ParameterValue, parameter_names
from obsflow.processing.tracker import Tracker
from obsflow.processing.tracker.loop import process_until_idle
from obsflow.registry import Registry, load_registry
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


_RUN_COLUMNS = (
    Column("run", "run", whole=True),
    Column("pipeline", "pipeline", whole=True),
    Column("group", "group", whole=True, drop=2),
    Column("v", "v", drop=4),
    Column("state", "state"),
    Column("started", "started", drop=3),
    Column("took", "took", drop=5),
    Column("reason", "reason", drop=1),
)


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
        rows = [
            {
                "run": str(r.id),
                "pipeline": r.pipeline,
                "group": str(r.group_key),
                "v": str(r.version),
                "state": r.state.value,
                "started": r.started.isoformat(timespec="seconds") if r.started else "",
                "took": f"{(r.finished - r.started).total_seconds():.1f} s"
                if r.finished and r.started
                else "",
                "reason": r.error or r.reason,
            }
            for r in found
        ]
        fitted_table(out, _RUN_COLUMNS, rows, title=f"runs ({len(found)})")


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


def _execute_here(s: Site, watch: Sequence[int] = ()) -> bool:
    """Run the queued runs in this process, unless a daemon runs (it takes them: False).
    While they run, a line on stderr says how many of ``watch`` have finished, each time
    one does."""
    from obsflow.daemon import read_status  # the daemon's and executors' modules: at use
    from obsflow.processing.executor import make_executor

    status = read_status(s.settings.site, s.clock())
    if status is not None and status.get("alive"):
        out.print("the daemon is running: it executes the queued runs")
        return False
    executor = make_executor(s)
    done = threading.Event()
    progress = threading.Thread(target=_progress, args=(s, watch, done), daemon=True)
    if watch:
        progress.start()
    try:
        process_until_idle(s, executor, timeout=3600)
    finally:
        done.set()
        executor.close()
        if watch:
            progress.join()
    return True


def _progress(s: Site, watch: Sequence[int], done: threading.Event) -> None:
    """Say on stderr, each time it changes, how many of ``watch`` have finished."""
    store, last = RunStore(s.catalog), ""
    while not done.wait(1.0):
        states = [r.state for r in store.find(run_ids=watch)]
        finished = sum(1 for st in states if st.finished)
        running = states.count(RunState.RUNNING)
        line = f"{finished}/{len(watch)} run(s) finished, {running} running"
        if line != last:
            err.print(line, highlight=False)
            last = line


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


@runs_app.command("cancel")
def runs_cancel(
    run_ids: Annotated[
        list[int] | None,
        typer.Argument(metavar="[RUN]...", help="Runs to cancel.", show_default=False),
    ] = None,
    pipeline: Annotated[
        str | None,
        typer.Option(help="Cancel this pipeline's runs (queued and running).", show_default=False),
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            metavar="[queued|running]",
            help="With --pipeline: only its runs in this state.",
            show_default=False,
        ),
    ] = None,
    site: SiteOption = None,
) -> None:
    """Cancel queued or running runs: they end failed ("cancelled"); a running one's
    steps are stopped at its next heartbeat. 'obsflow runs retry' queues one again."""
    from obsflow.catalog.cancel import CANCELLABLE, cancel_runs

    if not run_ids and pipeline is None:
        raise typer.BadParameter("name runs to cancel, or --pipeline")
    if run_ids and (pipeline is not None or state is not None):
        raise typer.BadParameter("give run numbers, or --pipeline [--state], not both")
    states = [s for s in CANCELLABLE if s.value == state] if state else list(CANCELLABLE)
    known(state, [s.value for s in CANCELLABLE], "state a run can be cancelled in", "--state")
    with _site(site) as s:
        store = RunStore(s.catalog)
        if pipeline is not None:
            known(pipeline, s.registry.pipelines, "pipeline", "--pipeline")
            chosen = [r.id for st in states for r in store.find(state=st, pipeline=pipeline)]
            who = f"runs of {pipeline}"
        else:
            chosen = list(run_ids or [])
            who = "runs " + ", ".join(map(str, chosen))
        cancelled = cancel_runs(s.catalog, chosen, s.clock(), f"by the operator ({who})")
        for run_id in sorted(set(chosen) - set(cancelled)):
            run = store.get(run_id)
            state_now = "does not exist" if run is None else f"is {run.state.value}"
            err.print(f"run {run_id} not cancelled: it {state_now}", highlight=False)
        out.print(
            f"cancelled {len(cancelled)} run(s)"
            + (": " + ", ".join(map(str, cancelled)) if cancelled else ""),
            highlight=False,
        )
        if run_ids and len(cancelled) < len(set(run_ids)):
            raise typer.Exit(1)


@app.command("groups")
def groups_waiting(as_json: JsonOption = False, site: SiteOption = None) -> None:
    """Which groups wait for their pipeline's deadline: until when, with what, lacking
    what (a run starts for each at its deadline)."""
    with _site(site) as s:
        waiting = Tracker(s.registry, s.catalog, s.clock).waiting()
        now = s.clock()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "pipeline": w.group.pipeline,
                        "group": w.group.text(),
                        "until": w.until.isoformat(),
                        "rule": w.rule,
                        "has": w.has,
                        "lacks": list(w.lacks),
                    }
                    for w in waiting
                ],
                indent=1,
            )
        )
        return
    if not waiting:
        out.print("no group waits for a deadline")
        return
    for w in waiting:
        left = (w.until - now).total_seconds()
        when = f"in {_duration(left)}" if left > 0 else "now (the tracker starts it)"
        has = ", ".join(f"{n} {name}" for name, n in w.has.items())
        lacks = f"; lacks {'; '.join(w.lacks)}" if w.lacks else "; complete"
        out.print(
            f"{w.group.pipeline} {w.group.text()} waits for its deadline ({w.rule}): "
            f"{w.until.isoformat(timespec='seconds')}, {when}; has {has}{lacks}",
            highlight=False,
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
        done = tracker.reprocess(spec, night=when, overrides=overrides)
        for key, unmet in done.skipped:
            out.print(f"  {key}: not ready ({'; '.join(unmet)}); skipped")
        request, queued = done.request, list(done.queued)
        out.print(f"{len(queued)} run(s) of {pipeline} queued as {request}")
        if not queued or no_wait:
            return
        first_new = max(queued) + 1
        if not _execute_here(s, queued):
            return
        store = RunStore(s.catalog)
        mine = store.find(run_ids=queued)
        table = Table(title=f"{request}: {pipeline}")
        for column in ("run", "group", "state", "took", "error"):
            table.add_column(column, overflow="fold")
        for r in mine:
            took = (
                f"{(r.finished - r.started).total_seconds():.1f} s"
                if r.finished and r.started
                else ""
            )
            table.add_row(str(r.id), str(r.group_key), r.state.value, took, r.error or "")
        out.print(table)
        states = [r.state for r in mine]
        out.print(", ".join(f"{st.value}: {states.count(st)}" for st in sorted(set(states))))
        after = [r for r in store.find() if r.id >= first_new]  # what they started downstream
        if after:
            made = sorted({r.pipeline for r in after})
            ok = sum(1 for r in after if r.state is RunState.SUCCEEDED)
            out.print(
                f"then {len(after)} downstream run(s) of {', '.join(made)}: {ok} succeeded",
                highlight=False,
            )
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
    registry = load_registry(settings.registry)
    for run in would:
        run["then"] = _cascade(registry, run["pipeline"], frozenset({run["pipeline"]}))
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
        _print_cascade(run["then"], "      ")


def _cascade(registry: Registry, pipeline: str, seen: frozenset[str]) -> list[dict[str, Any]]:
    """What a run of ``pipeline`` starts in turn: each product it makes, and the
    pipelines that take that product, each with what it makes, and so on (a pipeline
    already on the way is not followed again)."""
    spec = registry.pipelines.get(pipeline)
    made: list[dict[str, Any]] = []
    for output in spec.outputs if spec else ():
        takers = [p.id for p in registry.consumers.get(output.product, ())]
        made.append(
            {
                "product": output.product,
                "pipelines": [
                    {"pipeline": t, "then": [] if t in seen else _cascade(registry, t, seen | {t})}
                    for t in takers
                ],
            }
        )
    return made


def _print_cascade(made: list[dict[str, Any]], indent: str) -> None:
    for product in made:
        takers = ", ".join(p["pipeline"] for p in product["pipelines"]) or "nothing"
        out.print(f"{indent}→ makes {product['product']}, which starts {takers}", highlight=False)
        for taker in product["pipelines"]:
            _print_cascade(taker["then"], indent + "    ")

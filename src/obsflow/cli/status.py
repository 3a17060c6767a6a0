"""The ``status`` command: the site's status (:func:`obsflow.catalog.status.site_status`:
files by state, the ingest queue's depth, an agent's outbox, the daemon, and every process
that writes to the catalog, on any machine, with its health; ``--json`` prints all of it)
and, with ``--latency``, the latency ledger."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from obsflow.catalog import latency as latency_ledger
from obsflow.catalog.processes import ProcessRecord
from obsflow.catalog.status import site_status
from obsflow.cli import TIME_HELP, JsonOption, SiteOption, _site, _time, app, out


@app.command()
def status(
    as_json: JsonOption = False,
    latency: Annotated[
        bool,
        typer.Option(
            "--latency",
            help="Latency percentiles acquired → archived and per stage, the science latency "
            "per processing level (from the raw frame's acquisition), and the stuck files.",
        ),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            help="With --latency: files that reached a stage at or after this time: "
            + TIME_HELP
            + " (default: 24h).",
            show_default=False,
        ),
    ] = None,
    stuck_after: Annotated[
        float,
        typer.Option(
            "--stuck-after",
            min=0.0,
            metavar="SECONDS",
            help="With --latency: a file cached longer than this, not archived, is stuck.",
        ),
    ] = latency_ledger.DEFAULT_STUCK_AFTER,
    level: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=3,
            help="With --latency: only files of this level (0: the instruments' frames; "
            "in the stages, a product's 'acquired' is when its run wrote it; in the "
            "science latency, its raw frame's acquisition).",
            show_default=False,
        ),
    ] = None,
    site: SiteOption = None,
) -> None:
    """Counts of files by state, the ingest queue's depth, the daemons and workers that
    write to the catalog; --latency for the latency ledger."""
    window_start = _time(since, "--since")
    if not latency and (
        since is not None or level is not None or stuck_after != latency_ledger.DEFAULT_STUCK_AFTER
    ):
        option = (
            "--since" if since is not None else "--level" if level is not None else "--stuck-after"
        )
        raise typer.BadParameter("only meaningful with --latency", param_hint=option)
    with _site(site) as s:
        if latency:
            report = latency_ledger.latency_report(
                s.catalog, s.clock(), window_start, stuck_after, level=level
            )
            if as_json:
                print(json.dumps(report.to_json(), indent=1))
                return
            since_text = report.since.isoformat(timespec="seconds")
            table = Table(title=f"latency (ms) of files that reached each stage since {since_text}")
            for column in ("stage", "files", "p50", "p90", "p99", "max"):
                table.add_column(column, justify="left" if column == "stage" else "right")
            named = [("acquired → archived", report.total)]
            named += [(n.replace("_to_", " → "), p) for n, p in report.stages.items()]
            for name, p in named:
                numbers = (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms)
                cells = ("-" if v is None else f"{v:.1f}" for v in numbers)
                table.add_row(name, str(p.count), *cells)
            out.print(table)
            out.print(levels_table(report))
            shown = len(report.stuck)
            more = f", the oldest {shown} shown" if report.stuck_total > shown else ""
            out.print(
                f"stuck: {report.stuck_total} file(s) (cached over {stuck_after:g} s, "
                f"failed, or with an expired ingest lease){more}"
            )
            if not report.stuck:
                return
            stuck = Table()
            for column in ("archive ID", "original name", "state", "since (UTC)", "for", "detail"):
                stuck.add_column(column)
            for f in report.stuck:
                stuck.add_row(
                    f.archive_id or "-",
                    f.original_name,
                    f.state,
                    f.since.isoformat(timespec="seconds"),
                    f"{f.seconds:.0f} s",
                    f.detail or "",
                )
            out.print(stuck)
            return
        now = s.clock()
        from obsflow.daemon import read_status as read_daemon_status  # the daemon's modules

        daemon = read_daemon_status(s.settings.site, now)
        snapshot = site_status(s.catalog, now, role=s.settings.transfer.role, daemon=daemon)
        if as_json:
            print(json.dumps(snapshot.to_json(), indent=1))
            return
        table = Table(title=f"obsflow status: {s.settings.site}", show_header=False)
        for file_state, n in snapshot.files.items():
            table.add_row(f"files {file_state.value}", str(n))
        table.add_row("ingest queue depth", str(snapshot.queue_depth))
        sending = snapshot.outbox
        if sending is not None:
            server = (daemon or {}).get("server") or s.settings.transfer.server or "?"
            table.add_row("outbox: frames to send", f"{sending.depth} (to {server})")
            if sending.oldest is not None:
                age = (now - sending.oldest).total_seconds()
                table.add_row("outbox: oldest", f"{sending.oldest_name}, {age:.0f} s waiting")
            last = sending.last_success
            table.add_row(
                "outbox: last confirmed", last.isoformat(timespec="seconds") if last else "never"
            )
            table.add_row(
                "outbox: throughput",
                f"{sending.bytes_per_second / 1e6:.2f} MB/s (last {sending.window:.0f} s)",
            )
        fixity = snapshot.fixity
        if fixity.archived:
            audited_last = (
                fixity.last_check.isoformat(timespec="seconds") if fixity.last_check else "never"
            )
            table.add_row(
                "fixity audits",
                f"{fixity.audited} of {fixity.archived} archived file(s) audited, "
                f"the last {audited_last}",
            )
            if fixity.bad:
                bad_named = ", ".join(fixity.bad_ids) + (
                    ", ..." if fixity.bad > len(fixity.bad_ids) else ""
                )
                table.add_row("fixity: bad", f"[red]{fixity.bad}[/]: {bad_named} (obsflow verify)")
        if daemon is None or not daemon["alive"]:
            table.add_row("daemon", "not running")
        else:
            readiness = "ready" if daemon["ready"] else "starting"
            table.add_row(
                "daemon",
                f"running (pid {daemon['pid']}, {readiness}, {daemon['in_flight']} in flight)",
            )
            for trigger in daemon["triggers"]:
                state = "ok" if trigger["ok"] else f"[red]ALARM[/]: {trigger['detail']}"
                table.add_row(f"trigger {trigger['name']}", state)
        out.print(table)
        if snapshot.processes:
            out.print(processes_table(snapshot.processes))


def levels_table(report: latency_ledger.LatencyReport) -> Table:
    """Science latency per processing level: the latest raw ancestor acquired → archived."""
    table = Table(
        title="science latency (s) per level: the raw frame acquired → the product archived"
    )
    for column in ("level", "files", "p50", "p90", "p99", "max"):
        table.add_column(column, justify="left" if column == "level" else "right")
    for level, p in report.levels.items():
        numbers = (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms)
        cells = ("-" if v is None else f"{v / 1000:.2f}" for v in numbers)
        table.add_row(latency_ledger.level_name(level), str(p.count), *cells)
    if not report.levels:
        table.add_row("-", "0", "-", "-", "-", "-")
    return table


_STATE_STYLE = {"running": "green", "stopping": "yellow", "stopped": "dim", "lost": "red"}


def processes_table(processes: tuple[ProcessRecord, ...]) -> Table:
    """The processes that write to the catalog: kind (and role), host:pid, state, the age
    of the last heartbeat, triggers healthy of all, workers busy of all or an outbox."""
    table = Table(title="processes writing to this catalog")
    for column in ("kind", "host:pid", "state", "heartbeat", "triggers", "workers / outbox"):
        table.add_column(column, justify="right" if column == "heartbeat" else "left")
    for p in processes:
        me, health = p.identity, p.health
        kind = p.kind.value + (f" ({me.role.value})" if me.role is not None else "")
        healthy = sum(1 for t in health.triggers if t.healthy)
        triggers = f"{healthy}/{len(health.triggers)}" if health.triggers else "-"
        if healthy < len(health.triggers) and p.state.alive:
            bad = escape(", ".join(t.name for t in health.triggers if not t.healthy))
            triggers = f"[red]{triggers}[/] ({bad})"
        load = "-"
        if health.workers is not None:
            load = f"{health.workers.busy}/{health.workers.total} busy"
        if health.outbox_depth is not None:
            load = f"outbox {health.outbox_depth}"
        style = _STATE_STYLE[p.state.value]
        table.add_row(
            kind,
            escape(f"{me.host}:{me.pid}"),
            f"[{style}]{p.state.value}[/]",
            f"{p.age_seconds:.0f} s ago",
            triggers,
            load,
        )
    return table

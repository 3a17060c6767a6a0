"""The ``status`` command: the site's status (:func:`obsflow.catalog.status.site_status`:
files by state, the ingest queue's depth, an agent's outbox, the daemon; ``--json`` prints
all of it, runs and the cache too) and, with ``--latency``, the latency ledger."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from obsflow.catalog import latency as latency_ledger
from obsflow.catalog.status import site_status
from obsflow.cli import JsonOption, SiteOption, _site, _time, app, out


@app.command()
def status(
    as_json: JsonOption = False,
    latency: Annotated[
        bool,
        typer.Option(
            "--latency",
            help="Latency percentiles acquired → archived and per stage, and the stuck files.",
        ),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            help="With --latency: files that reached a stage at or after this time "
            "(ISO, UTC; default: 24 hours ago).",
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
            "a product's 'acquired' is when its run wrote it).",
            show_default=False,
        ),
    ] = None,
    site: SiteOption = None,
) -> None:
    """Counts of files by state, and the ingest queue's depth; --latency for the latency ledger."""
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

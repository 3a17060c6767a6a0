"""How fast does the catalog answer with a million files, and what memory does the daemon
need for them?

A fresh site's SQLite catalog gets 1M synthetic file rows (``--quick``: 100k), inserted
in bulk (untimed; :mod:`synthetic`): 500 a night over 2,000 nights, archived and still in
the cache (cache path, archive path, ``cached`` and ``archived`` stamps; their bytes are
not written anywhere), 2/5 raw frames and the rest the example registry's L1–L3 products
(master bias and flats, calibrated frames, source lists, night catalogs), with their
real sizes (8–17 MB frames: 8.4 TB at 1M), their products' tags and a few operators'
tags from common to rare. The site is on ``/dev/shm`` if it exists, else in the
temporary directory (printed).

1. **Queries**, each ``--repeat`` times (default 200; a series stops after 20 s) with
   random parameters (``--seed``), p50 and p99 against a target of ≤ 10 ms:

   (a) ``Catalog.find(FileQuery(product=P, since=T0, until=T1, limit=100))``: a random
       product, a random 1-hour window in the observing hours of a random night;
   (b) ``Catalog.find(FileQuery(tag=T, limit=100))``: a random tag of all there are;
   (c) the same through the REST listing (``obsflow.api.files.list_files``, the handler
       called directly as an anonymous reader: its SQL, the records and their JSON), if
       that module has it.

   For a series that misses the target, its slowest call is run once more with every
   SQL statement timed, and the costliest statements are printed with SQLite's
   ``EXPLAIN QUERY PLAN``.

2. **Memory**: the cache's budget is set to 99 % of what the cache holds (low-water mark
   98 %, checked every second), and ``python -m obsflow run`` is started on the site; once
   its status file says it runs and its log says the cache was trimmed (each file of
   the catalog stamped, then the oldest 1 % evicted), the resident memory of the daemon
   and of its child processes (the local executor's 2 spawned workers, multiprocessing's
   resource tracker) is read from ``/proc/PID/status`` (``VmRSS``; ``VmHWM``, the peak)
   and ``smaps_rollup`` (``Pss``: shared pages counted once), and it is stopped with
   SIGTERM. The same daemon on an empty site is measured first, for comparison. Target:
   ≤ 200 MB (the catalog, not memory, holds the cache's index), for the daemon alone
   and with its children. The example registry's steps are Python tools, so each run
   worker has a warm zygote (:mod:`obsflow.processing.warm`: numpy, scipy, astropy and
   the tools imported once, ~90 MB each, the same with 0 files or 1M); their share is
   printed, and the total without them (``processing.warm: false``) judged too.

Exit status 0 when a target is missed (it is a measurement); non-zero when something
fails (a query errs, the daemon does not start, trim or stop). About 3 minutes, half of
it inserting the rows.

Run: ``python benchmarks/catalog.py``; quick (100k files): ``--quick``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import yaml
from sqlalchemy import Engine, event

from obsflow.catalog import Catalog, FileQuery
from obsflow.daemon import read_status
from obsflow.settings import SETTINGS_FILE, load_settings
from obsflow.site import Site, init_site, open_site
from synthetic import FIRST_NIGHT, NIGHT_SECONDS, fill, load, machine, verdict

TARGET_MS = 10.0
MEMORY_TARGET_MB = 200.0
ZYGOTE = "a run worker's warm zygote"
LIMIT = 100
WINDOW = timedelta(hours=1)
SERIES_SECONDS = 20.0
"""A series of queries stops after this long, whatever ``--repeat`` says."""
WARM_UP = 3
BUDGET, LOW_WATER = 0.99, 0.98
"""The cache's budget and low-water mark, as shares of what it holds."""
DAEMON_START_SECONDS = 60.0
TRIM_SECONDS = 300.0
STOP_SECONDS = 60.0
CHILDREN_SECONDS = 10.0
EVICTED = re.compile(r"cache over budget:\s+(\d+)\s+file\(s\)\s+evicted,\s+(\d+)\s+bytes\s+freed")
SHOWN_STATEMENTS = 2


def fail(message: str) -> NoReturn:
    print(f"\nFAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


# ---------------------------------------------------------------- the catalog


def fill_site(site_dir: Path, files: int) -> tuple[date, float]:
    """Fill the site's catalog; (its last night, seconds taken)."""
    catalog = Catalog.open(load_settings(site_dir).catalog_url)
    start = time.perf_counter()

    def progress(done: int) -> None:
        if done % 200_000 == 0 or done == files:
            print(f"  {done:>9,} files in {time.perf_counter() - start:5.1f} s", flush=True)

    try:
        last = fill(catalog, files, in_cache=True, derived=True, progress=progress)
    finally:
        catalog.close()
    return last, time.perf_counter() - start


def counts(site: Site, column: str) -> dict[str, int]:
    """Files by ``product``, or by ``tag``."""
    sql = (
        "SELECT product, count(*) FROM files GROUP BY product"
        if column == "product"
        else "SELECT tag, count(*) FROM tags GROUP BY tag"
    )
    with site.catalog.read() as conn:
        return {str(name): int(n) for name, n in conn.exec_driver_sql(sql)}


# ---------------------------------------------------------------- queries


@dataclass(frozen=True)
class Call:
    group: str
    """What the results are broken down by: the product, or the tag."""
    run: Callable[[], int]
    """Makes the query; returns how many files it found."""
    describe: str


@dataclass
class Series:
    label: str
    short: str
    planned: int
    seconds: list[float] = field(default_factory=list)
    found: list[int] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def groups(self) -> list[str]:
        return [c.group for c in self.calls]

    def ms(self, group: str | None = None) -> list[float]:
        return [
            1e3 * s for s, g in zip(self.seconds, self.groups, strict=True) if group in (None, g)
        ]


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` 0.99: the value 99 % of them are at most)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def run_series(label: str, short: str, calls: list[Call]) -> Series:
    series = Series(label, short, len(calls))
    for call in calls[:WARM_UP]:
        call.run()
    began = time.perf_counter()
    for call in calls:
        start = time.perf_counter()
        found = call.run()
        series.seconds.append(time.perf_counter() - start)
        series.found.append(found)
        series.calls.append(call)
        if time.perf_counter() - began > SERIES_SECONDS:
            series.stopped_early = len(series.seconds) < len(calls)
            break
    return series


def windows(
    rng: random.Random, products: list[str], last_night: date, repeat: int
) -> list[tuple[str, datetime, datetime]]:
    """(product, since, until): a random product, a random hour of a random night."""
    nights = (last_night - FIRST_NIGHT).days + 1
    out = []
    for _ in range(repeat):
        night = FIRST_NIGHT + timedelta(days=rng.randrange(nights))
        evening = datetime(night.year, night.month, night.day, 5, tzinfo=UTC)
        since = evening + timedelta(seconds=rng.uniform(0, NIGHT_SECONDS - WINDOW.seconds))
        out.append((rng.choice(products), since, since + WINDOW))
    return out


def find_calls(
    site: Site, chosen: list[tuple[str, datetime, datetime]], tags: list[str]
) -> tuple[list[Call], list[Call]]:
    def by_time(product: str, since: datetime, until: datetime) -> Call:
        query = FileQuery(product=product, since=since, until=until, limit=LIMIT)
        return Call(product, lambda: len(site.catalog.find(query)), f"{product} {since:%F %T}+1h")

    def by_tag(tag: str) -> Call:
        query = FileQuery(tag=tag, limit=LIMIT)
        return Call(tag, lambda: len(site.catalog.find(query)), f"tag {tag}")

    return [by_time(*c) for c in chosen], [by_tag(t) for t in tags]


def rest_calls(
    site: Site, chosen: list[tuple[str, datetime, datetime]], tags: list[str]
) -> tuple[list[Call], list[Call]] | str:
    """The same queries through the REST listing's handler; a reason if there is none."""
    try:
        api = importlib.import_module("obsflow.api")
        files = importlib.import_module("obsflow.api.files")
        access = importlib.import_module("obsflow.access")
        services = api.create_app(site).state.services
        list_files: Callable[..., Any] = files.list_files
        anonymous = access.ANONYMOUS
    except (ImportError, AttributeError) as exc:
        return f"no REST listing to call ({type(exc).__name__}: {exc})"

    def listed(**given: Any) -> int:
        response = list_files(anonymous, services, limit=LIMIT, **given)
        if response.status_code != 200:
            fail(f"REST listing {given}: HTTP {response.status_code}: {response.body[:300]!r}")
        return int(response.body.count(b'"archive_id"'))

    def by_time(product: str, since: datetime, until: datetime) -> Call:
        return Call(
            product,
            lambda: listed(product=product, since=since, until=until),
            f"{product} {since:%F %T}+1h",
        )

    def by_tag(tag: str) -> Call:
        return Call(tag, lambda: listed(tag=tag), f"tag {tag}")

    try:
        by_time(*chosen[0]).run()
    except TypeError as exc:  # the handler's signature is not what we call
        return f"the REST listing cannot be called as expected: {exc}"
    return [by_time(*c) for c in chosen], [by_tag(t) for t in tags]


@dataclass(frozen=True)
class Statement:
    text: str
    calls: int
    seconds: float
    plan: str


@contextmanager
def statements(engine: Engine) -> Iterator[dict[str, list[Any]]]:
    """Every statement made on ``engine`` while entered: text → [calls, seconds, params]."""
    spent: dict[str, list[Any]] = {}
    started: list[float] = [0.0]

    def before(*_: Any) -> None:
        started[0] = time.perf_counter()

    def after(_conn: Any, _cursor: Any, text: str, params: Any, *_: Any) -> None:
        seen = spent.setdefault(text, [0, 0.0, params])
        seen[0] += 1
        seen[1] += time.perf_counter() - started[0]

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield spent
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def slowest(series: Series) -> Call:
    """The slowest call of the group slowest at the median (a slow call of a group that is
    quick most of the time was unlucky: the machine was busy)."""
    worst = max(set(series.groups), key=lambda g: percentile(series.ms(g), 0.5))
    timed = [(s, c) for s, c in zip(series.seconds, series.calls, strict=True) if c.group == worst]
    return max(timed, key=lambda sc: sc[0])[1]


def where_time_goes(site: Site, call: Call) -> list[Statement]:
    """The costliest statements of ``call``, with their plans (of the quickest of 3 more
    runs, each statement timed)."""
    runs = []
    for _ in range(3):
        with statements(site.catalog.engine) as spent:
            call.run()
        runs.append(spent)
    spent = min(runs, key=lambda r: sum(seconds for _, seconds, _ in r.values()))
    found = []
    with site.catalog.read() as conn:
        for text, (calls, seconds, params) in sorted(spent.items(), key=lambda kv: -kv[1][1]):
            if text.lstrip().upper().startswith("SELECT"):
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + text, params)
                plan = "; ".join(str(row[-1]) for row in rows)
                found.append(Statement(" ".join(text.split()), calls, seconds, plan))
    return found[:SHOWN_STATEMENTS]


def short(statement: str) -> str:
    """A statement on one line: a long column list as ``…``, a list of parameters as
    ``(?, …)``."""
    text = re.sub(r"^SELECT ((?:(?! FROM ).){60,}) FROM ", "SELECT … FROM ", statement)
    text = re.sub(r"\((\?, )+\?\)", "(?, …)", text)
    return text if len(text) <= 300 else text[:299] + "…"


def report_series(site: Site, series: Series, sizes: dict[str, int], what: str) -> str:
    """Print a series by group; return its summary line."""
    ran = len(series.seconds)
    cut = f", stopped after {SERIES_SECONDS:g} s" if series.stopped_early else ""
    print(f"\n{series.label}\n  {ran} of {series.planned} queries{cut}, {WARM_UP} to warm up")
    print(f"  {what:<16} {'files':>9} {'queries':>8} {'found':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for group in sorted(set(series.groups), key=lambda g: -sizes.get(g, 0)):
        ms = series.ms(group)
        found = [n for n, g in zip(series.found, series.groups, strict=True) if g == group]
        print(
            f"  {group:<16} {sizes.get(group, 0):>9,} {len(ms):>8} {sum(found) / len(found):>6.1f} "
            f"{percentile(ms, 0.5):>8.2f} {percentile(ms, 0.99):>8.2f}"
        )
    ms = series.ms()
    p50, p99 = percentile(ms, 0.5), percentile(ms, 0.99)
    ruling = (
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (max {max(ms):.1f}), target ≤ {TARGET_MS:g} ms: "
        f"{verdict(p50, TARGET_MS)} (p50), {verdict(p99, TARGET_MS)} (p99)"
    )
    print(f"  all: {ruling}")
    if p99 > TARGET_MS:
        call = slowest(series)
        print(f"  where the time goes in the slowest of the slowest group ({call.describe}):")
        for s in where_time_goes(site, call):
            print(f"    {1e3 * s.seconds:8.1f} ms, {s.calls} call(s): {short(s.text)}")
            print(f"               plan: {s.plan}")
    return f"  {series.short:<34} {ruling}"


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class Memory:
    pid: int
    role: str
    rss_kb: int
    hwm_kb: int
    pss_kb: int | None


def role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    if "resource_tracker" in text:
        return "multiprocessing resource tracker"
    if "spawn_main" in text:
        return "run worker (spawned)"
    if "obsflow.processing.zygote" in text:
        return ZYGOTE
    return text[:60]


def memory(pid: int, name: str | None = None) -> Memory | None:
    """``pid``'s resident memory; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in values:  # a zombie
        return None
    pss = None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    rss, hwm = (int(values[k].split()[0]) for k in ("VmRSS", "VmHWM"))
    return Memory(pid, name or role(pid), rss, hwm, pss)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


def tree(pid: int) -> list[Memory]:
    """The daemon's memory, then its descendants'."""
    daemon = memory(pid, "the daemon (obsflow run)")
    if daemon is None:
        return []
    return [daemon, *(m for c in descendants(pid) if (m := memory(c)) is not None)]


@dataclass(frozen=True)
class DaemonMemory:
    label: str
    processes: list[Memory]
    peak_sum_kb: int
    """The most the daemon and its children held at once, of the samples taken."""
    evicted: int | None
    seconds_to_trim: float | None

    @property
    def daemon(self) -> Memory:
        return self.processes[0]

    @property
    def total_rss_kb(self) -> int:
        return sum(m.rss_kb for m in self.processes)

    @property
    def total_hwm_kb(self) -> int:
        return sum(m.hwm_kb for m in self.processes)


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def measure_daemon(label: str, site_dir: Path, log_path: Path, trim: bool) -> DaemonMemory:
    """Start ``obsflow run`` on the site; once it runs (and, with ``trim``, has trimmed
    the cache once), read its memory; stop it with SIGTERM."""
    env = {**os.environ, "COLUMNS": "200"}  # its log lines on one line each
    command = [sys.executable, "-m", "obsflow", "-v", "run", "--site", str(site_dir)]
    with log_path.open("w") as log:
        daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    began = time.perf_counter()
    peak, evicted, trimmed = 0, None, None
    try:
        running = False
        while True:
            time.sleep(0.25)
            elapsed = time.perf_counter() - began
            peak = max(peak, sum(m.rss_kb for m in tree(daemon.pid)))
            if daemon.poll() is not None:
                fail(f"obsflow run exited ({daemon.returncode}) early:\n{tail(log_path)}")
            if not running:
                status = read_status(site_dir, datetime.now(UTC))
                running = bool(status and status.get("alive") and status["pid"] == daemon.pid)
                if not running and elapsed > DAEMON_START_SECONDS:
                    fail(f"obsflow run did not say it runs in {elapsed:.0f} s:\n{tail(log_path)}")
            text = log_path.read_text(errors="replace")
            if "cache trim failed" in text:
                fail(f"the daemon's cache trim failed:\n{tail(log_path)}")
            if trim and (found := EVICTED.search(text)):
                evicted, trimmed = int(found.group(1)), elapsed
            if running and (not trim or evicted is not None):
                if not trim:
                    time.sleep(2.0)  # let it settle: a turn of every loop
                break
            if trim and elapsed > TRIM_SECONDS:
                fail(f"the daemon did not trim the cache in {elapsed:.0f} s:\n{tail(log_path)}")
        processes = tree(daemon.pid)
        peak = max(peak, sum(m.rss_kb for m in processes))
    finally:
        stop(daemon, log_path)
    return DaemonMemory(label, processes, peak, evicted, trimmed)


def stop(daemon: subprocess.Popen[bytes], log_path: Path) -> None:
    """SIGTERM, and wait; a daemon that does not stop is killed, and that is a failure."""
    if daemon.poll() is not None:
        return
    children = descendants(daemon.pid)
    daemon.send_signal(signal.SIGTERM)
    try:
        code = daemon.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        fail(f"obsflow run did not stop {STOP_SECONDS:g} s after SIGTERM:\n{tail(log_path)}")
    deadline = time.monotonic() + CHILDREN_SECONDS  # the resource tracker sees EOF, then goes
    while (left := [m for pid in children if (m := memory(pid)) is not None]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for m in left:
        os.kill(m.pid, signal.SIGKILL)
    if code != 0 or left:
        roles = ", ".join(f"{m.pid} ({m.role})" for m in left) or "none"
        fail(
            f"obsflow run stopped with exit status {code}; child processes left "
            f"{CHILDREN_SECONDS:g} s after it (killed): {roles}\n{tail(log_path)}"
        )


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def set_budget(site_dir: Path, holds: int) -> tuple[int, int]:
    """Give the site's cache a budget below what it holds; (budget, low-water mark)."""
    path = site_dir / SETTINGS_FILE
    settings = yaml.safe_load(path.read_text())
    budget, low = int(holds * BUDGET), int(holds * LOW_WATER)
    settings["cache_policy"] = {"budget_bytes": budget, "low_water_bytes": low, "trim_seconds": 1}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return budget, low


def report_memory(result: DaemonMemory) -> None:
    print(f"  {result.label}:")
    print(f"    {'pid':>8}  {'process':<34} {'VmRSS':>8} {'VmHWM':>8} {'Pss':>8}")
    for m in result.processes:
        pss = "?" if m.pss_kb is None else mb(m.pss_kb)
        print(f"    {m.pid:>8}  {m.role:<34} {mb(m.rss_kb):>8} {mb(m.hwm_kb):>8} {pss:>8}")
    pss_total = sum(m.pss_kb or 0 for m in result.processes)
    print(
        f"    {'':>8}  {'all ' + str(len(result.processes)) + ' processes':<34} "
        f"{mb(result.total_rss_kb):>8} {mb(result.total_hwm_kb):>8} {mb(pss_total):>8}"
        f"   (most at once, sampled: {mb(result.peak_sum_kb)})"
    )


def memory_rulings(result: DaemonMemory) -> list[str]:
    target_kb = MEMORY_TARGET_MB * 1024
    alone, total = result.daemon.hwm_kb, result.total_hwm_kb
    zygotes = [m for m in result.processes if m.role == ZYGOTE]
    warm = sum(m.hwm_kb for m in zygotes)
    return [
        f"daemon alone: {mb(result.daemon.rss_kb)}, peak {mb(alone)}, target ≤ "
        f"{MEMORY_TARGET_MB:g} MB: {verdict(alone, target_kb)}",
        f"with its {len(result.processes) - 1} child processes: {mb(result.total_rss_kb)}, "
        f"peak {mb(total)} (sum of each VmHWM), target ≤ {MEMORY_TARGET_MB:g} MB: "
        f"{verdict(total, target_kb)}",
        f"of which {len(zygotes)} warm zygote(s) (processing.warm): {mb(warm)}; without "
        f"them {mb(total - warm)}, target ≤ {MEMORY_TARGET_MB:g} MB: "
        f"{verdict(total - warm, target_kb)}",
    ]


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k files, to try it out")
    parser.add_argument("--files", type=int, default=None, help="files (default 1000000)")
    parser.add_argument("--repeat", type=int, default=200, help="queries per series")
    parser.add_argument("--seed", type=int, default=1, help="of the random parameters")
    parser.add_argument("--tmp", type=Path, default=None, help="where to work (default: /dev/shm)")
    args = parser.parse_args()
    files = args.files or (100_000 if args.quick else 1_000_000)
    if files < 1000 or args.repeat < 1:
        parser.error("--files must be at least 1000 and --repeat at least 1")

    began = time.perf_counter()
    print(f"{machine()}\n{load()} at the start")
    shm = Path("/dev/shm")
    tmp = args.tmp or (shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    root = Path(tempfile.mkdtemp(prefix="obsflow-catalog-", dir=tmp))
    where = (
        "/dev/shm, in memory"
        if root.parent == shm
        else "given by --tmp"
        if args.tmp
        else "no /dev/shm: the temporary directory"
    )
    print(f"working in {root} ({where}): the sites, their SQLite catalogs, the daemons' logs")
    summary: list[str] = []
    try:
        empty = init_site(root / "empty")
        site_dir = init_site(root / "site")
        print(f"\nfilling the catalog with {files:,} files (untimed):", flush=True)
        last_night, took = fill_site(site_dir, files)
        database = site_dir / "catalog.db"
        nights = (last_night - FIRST_NIGHT).days + 1
        print(
            f"  {files:,} files over {nights:,} nights ({FIRST_NIGHT} to {last_night}) in "
            f"{took:.0f} s; the database {database.stat().st_size / 1e6:,.0f} MB"
        )

        site = open_site(load_settings(site_dir))
        try:
            products, tags = counts(site, "product"), counts(site, "tag")
            start = time.perf_counter()
            cache = site.retriever().status()
            status_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            site.retriever().cached_bytes()
            sum_ms = 1e3 * (time.perf_counter() - start)
            print(
                f"  the cache holds {cache.files:,} files, {cache.bytes / 1e12:.2f} TB: "
                f"Retriever.status (the SQL of 'obsflow cache status') took {status_ms:.0f} ms, "
                f"Retriever.cached_bytes (the daemon's budget check, every trim_seconds) "
                f"{sum_ms:.0f} ms"
            )
            rng = random.Random(args.seed)
            chosen = windows(rng, sorted(products), last_night, args.repeat)
            picked = [rng.choice(sorted(tags)) for _ in range(args.repeat)]
            by_time, by_tag = find_calls(site, chosen, picked)
            for calls, label, what, sizes, name in (
                (by_time, "(a) time range + product: Catalog.find(FileQuery(product, since, "
                 "until, limit=100)), a random hour of a random night", "product", products,
                 "Catalog.find, range + product"),
                (by_tag, "(b) tag: Catalog.find(FileQuery(tag, limit=100))", "tag", tags,
                 "Catalog.find, tag"),
            ):  # fmt: skip
                series = run_series(label, name, calls)
                summary.append(report_series(site, series, sizes, what))
            rest = rest_calls(site, chosen, picked)
            if isinstance(rest, str):
                print(f"\n(c) the REST listing: skipped, {rest}")
                summary.append(f"  {'REST listing':<34} skipped: {rest}")
            else:
                for calls, label, what, sizes, name in (
                    (rest[0], "(c) the REST listing (list_files, called directly), range + "
                     "product", "product", products, "REST listing, range + product"),
                    (rest[1], "(c) the REST listing (list_files, called directly), tag", "tag",
                     tags, "REST listing, tag"),
                ):  # fmt: skip
                    series = run_series(label, name, calls)
                    summary.append(report_series(site, series, sizes, what))
        finally:
            site.close()

        budget, low = set_budget(site_dir, cache.bytes)
        print(
            f"\nmemory: the cache's budget {budget / 1e12:.3f} TB (99 %), low-water mark "
            f"{low / 1e12:.3f} TB (98 %), trimmed every second",
            flush=True,
        )
        baseline = measure_daemon("an empty site", empty, root / "empty.log", trim=False)
        report_memory(baseline)
        result = measure_daemon(
            f"{files:,} files known to the cache, after one trim", site_dir, root / "run.log", True
        )
        report_memory(result)
        print(
            f"  the trim: {result.evicted:,} files evicted, logged {result.seconds_to_trim:.0f} s "
            f"after the start (each file of the catalog stamped with its last access first)"
        )
        start = time.perf_counter()
        shown = subprocess.run(
            [sys.executable, "-m", "obsflow", "cache", "status", "--json", "--site", str(site_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - start
        if shown.returncode != 0:
            fail(f"obsflow cache status failed ({shown.returncode}): {shown.stderr[-2000:]}")
        after = json.loads(shown.stdout)
        print(
            f"  obsflow cache status --json ({seconds:.1f} s): {after['files']:,} files, "
            f"{after['bytes'] / 1e12:.3f} TB, {after['virtual']:,} virtual, over budget: "
            f"{after['over_budget']}"
        )
        if after["virtual"] != result.evicted or after["bytes"] > low:
            fail(f"after the trim the cache status says {after}, expected {result.evicted} virtual")
        rulings = memory_rulings(result)
        for ruling in rulings:
            print(f"  {ruling}")
        base = f"{mb(baseline.daemon.hwm_kb)} / {mb(baseline.total_hwm_kb)}"
        summary.append(f"  {'daemon memory, ' + f'{files:,} files':<34} {rulings[0]}")
        summary.append(f"  {'':<34} {rulings[1]}")
        summary.append(f"  {'':<34} {rulings[2]}")
        summary.append(f"  {'':<34} (on an empty site, peaks {base})")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nsummary:\n  {machine()}\n  {load()} at the end")
    print(f"  a catalog of {files:,} files on SQLite ({where})")
    print("\n".join(summary))
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

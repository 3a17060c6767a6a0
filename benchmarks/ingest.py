"""How fast is ``obsflow ingest``, next to a floor that does only the necessary work?

For each of two sets of simulated OFCAM frames (default: 2,000 frames of 100×100 and
200 of 2048×2048), in one run on one machine and one disk:

* **obsflow**: a fresh site (``init_site``; its catalog is created untimed, as
  ``obsflow init`` + a first command would), then the real CLI is timed as a subprocess,
  ``python -m obsflow ingest --site SITE DIR`` of the tree this file belongs to (its
  ``src`` first on ``PYTHONPATH``; bytecode compiled beforehand, untimed: start-up is paid
  once per command, not per file), which returns once every file is archived. Default
  settings (what users get). Afterwards, untimed, ``obsflow status --json`` must report
  every file archived. ``--link-cache`` adds a row with ``ingest.link_cache: true``.
* **floor** (raw): this file run as ``python benchmarks/ingest.py --floor DIR DEST DB``, a
  subprocess on the same interpreter, so Python start-up counts on both sides. For each
  file: read the primary header (``obsflow.fitsheader.parse_header``), sha256 of the whole
  file, ``shutil.copyfile`` to DEST, one INSERT into a SQLite table in WAL mode, committed
  in batches of 100.
* **durable floor**: the same, and what the guarantee needs besides: each copy fsynced,
  and DEST fsynced before each batch is committed (as obsflow fsyncs a batch's
  directories once). It does not read the copy back (obsflow does, from the disk).

Both ratios are printed, each with its verdict: against the raw floor (the issue's
figure) and against the durable floor (what a correct archive must at least do). Beside
each figure: the CPU seconds per file of the process (user + system, from
``getrusage``) and the load average before and after the run (the machine is shared).

Generation is not timed. Frames are generated into a temporary directory; their mtimes
are put 10 s into the past so receipt's settle wait is not measured, and ``os.sync()``
runs before each timed step so no run pays for the previous one's write-back.

Prints files/s and MB/s (1 MB = 10^6 bytes) of both and the ratio obsflow/floor (files/s);
the target is ≥ 0.5. Exit status is 0 even below the target (it is a benchmark); it is
non-zero only when a step fails (e.g. not every file archived).

Run: ``python benchmarks/ingest.py [--small 2000] [--large 200]``; quick:
``python benchmarks/ingest.py --small 200 --large 10``. On a shared or noisy machine,
``--repeat 3`` times each side three times (interleaved, each on a fresh site and
destination) and reports the best.
``--profile`` runs ``obsflow ingest`` once more per set under py-spy (``pip install
py-spy``; untimed) and prints where its threads spend their time, station by station.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from obsflow.receipt.header import parse_header

TARGET = 0.5
CHUNK = 1 << 20
BATCH = 100
AGE_SECONDS = 10.0
HERE = Path(__file__).resolve()
SRC = HERE.parent.parent / "src"
"""The tree measured: this checkout's obsflow, whatever the environment installed."""


# ---------------------------------------------------------------- the floor


def floor(src: Path, dest: Path, db: Path, *, fsync: bool = False) -> int:
    """Do only the necessary work for every file in ``src``; return how many files.

    With ``fsync`` (the durable floor) each copy is fsynced, and ``dest`` before each
    batch is committed: the least an archive must do before it says a file is stored.
    """
    dest.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # as obsflow's catalog
    conn.execute(
        "CREATE TABLE files (id INTEGER PRIMARY KEY, name TEXT NOT NULL, size INTEGER NOT NULL,"
        " sha256 TEXT NOT NULL UNIQUE, date_obs TEXT, object TEXT, path TEXT NOT NULL)"
    )
    paths = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    conn.execute("BEGIN")
    for n, path in enumerate(paths, start=1):
        with path.open("rb") as f:
            buf = f.read(CHUNK)
            while (header := parse_header(buf, name=path)) is None:
                more = f.read(CHUNK)
                if not more:
                    raise SystemExit(f"floor: {path}: no END card")
                buf += more
            digest = hashlib.sha256(buf)
            size = len(buf)
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        target = dest / path.name
        shutil.copyfile(path, target)
        if fsync:
            fsync_path(target)
        conn.execute(
            "INSERT INTO files (name, size, sha256, date_obs, object, path)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                path.name,
                size,
                digest.hexdigest(),
                str(header.get("DATE-OBS")),
                str(header.get("OBJECT")),
                str(target),
            ),
        )
        if n % BATCH == 0:
            if fsync:
                fsync_path(dest)
            conn.execute("COMMIT")
            conn.execute("BEGIN")
    if fsync:
        fsync_path(dest)
    conn.execute("COMMIT")
    conn.close()
    return len(paths)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- where the time goes

STATIONS: list[tuple[str, tuple[str, ...]]] = [
    # (station, the functions whose frames count for it: the innermost listed one wins)
    ("receipt: read, validate, map, sha256, cache copy", ("Receiver.prepare",)),
    ("receipt: the catalog transaction (group commit)", ("Receiver.commit",)),
    ("ingest: lease and complete (catalog)", ("IngestQueue.lease", "IngestQueue.complete")),
    ("ingest: archive copy (or link) + fsync + rename", ("LocalStorage.put",)),
    ("ingest: read-back from the medium + sha256", ("LocalStorage.sha256",)),
    ("ingest: directory fsync", ("LocalStorage.flush",)),
    ("start-up: imports, settings, registry, catalog", ("_find_and_load", "open_site")),
    ("the command: the files listed, the progress bar, the summary", ("ingest",)),
]
WAITS = (
    "Condition.wait", "Event.wait", "Queue.get", "Future.result", "Thread.join",
    # blocked in C (a SimpleQueue, a selector, inotify): the Python frame calling it is the leaf
    "_worker (concurrent/futures/thread.py", "Intake._commit_loop (", "EpollSelector.select (",
    "_PollLikeSelector.select (", "InotifyFD._check_inotify_fd (",
)  # fmt: skip


def station(frames: list[str]) -> str:
    if frames and frames[-1].startswith(WAITS):
        return "waiting (for work, a lock, the other threads)"
    for frame in reversed(frames):  # innermost first
        for name, functions in STATIONS:
            if any(frame.startswith(f + " ") for f in functions):
                return name
    return "other (the command, the threads' loops, the progress bar, the summary)"


def profile(frames: Path, work: Path, rate: int = 200) -> None:
    """``obsflow ingest`` of ``frames`` under py-spy: samples of each busy thread
    (wall-clock, so threads in parallel add up to more than the run), by station."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).is_file():
        print("  (no py-spy: pip install py-spy, to see where the time goes)")
        return
    from obsflow.catalog import Catalog
    from obsflow.settings import load_settings
    from obsflow.site import init_site

    site = init_site(work / "site")
    Catalog.open(load_settings(site).catalog_url).close()
    raw = work / "profile.txt"
    cmd = [spy, "record", "-r", str(rate), "-f", "raw", "-o", str(raw), "--threads", "--"]
    run([*cmd, *obsflow_cli(), "ingest", "--site", str(site), str(frames)],
        "py-spy record obsflow ingest")  # fmt: skip
    seconds: dict[str, float] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        name = station(stack.split(";")[1:])  # (the first is the thread)
        seconds[name] = seconds.get(name, 0.0) + int(count) / rate
    total = sum(seconds.values())
    print(f"  where obsflow ingest's threads spend their time ({total:.2f} thread-seconds "
          "sampled by py-spy, busy threads only):")  # fmt: skip
    for name, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"    {name:<52} {spent:6.2f} s  {spent / total:4.0%}")


# ---------------------------------------------------------------- the harness


@dataclass(frozen=True)
class Timing:
    seconds: float
    files: int
    size: int  # bytes
    cpu: float = 0.0
    """CPU seconds (user + system) of the process timed."""
    load: tuple[float, float] = (0.0, 0.0)
    """The 1-minute load average before and after."""

    @property
    def cpu_ms_per_file(self) -> float:
        return 1e3 * self.cpu / self.files

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds


def fail(message: str, output: str = "") -> NoReturn:
    print(f"\nFAILED: {message}", file=sys.stderr)
    if output:
        print(output, file=sys.stderr)
    raise SystemExit(1)


@dataclass(frozen=True)
class Ran:
    seconds: float
    stdout: str
    cpu: float
    load: tuple[float, float]


def run(cmd: list[str], what: str) -> Ran:
    """Run ``cmd`` (after a sync) with the measured tree first on the path; return its
    wall and CPU seconds and stdout; fail loudly on error."""
    os.sync()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    )}  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        fail(f"{what} exited {done.returncode}: {' '.join(cmd)}", done.stdout + done.stderr)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Ran(seconds, done.stdout, cpu, (load, os.getloadavg()[0]))


def generate(out: Path, n: int, shape: tuple[int, int], seed: int) -> list[Path]:
    from obsflow.sim.simulate import simulate_night  # numpy/astropy: only the harness needs them

    frames = simulate_night(out, n, seed=seed, shape=shape)
    (out / "injected_stars.ecsv").unlink(missing_ok=True)  # only frames in the directory
    past = time.time() - AGE_SECONDS
    paths = [f.path for f in frames]
    for path in paths:
        os.utime(path, (past, past))
    if sorted(paths) != sorted(p for p in out.iterdir() if p.is_file()):
        fail(f"{out} holds other files than the {n} frames")
    return paths


def obsflow_cli() -> list[str]:
    """``python -m obsflow`` of the measured tree (:data:`SRC`), its bytecode compiled."""
    if not (SRC / "obsflow" / "__main__.py").is_file():
        fail(f"no obsflow source tree at {SRC}")
    compileall.compile_dir(SRC / "obsflow", quiet=1)  # (untimed: once, not per file)
    return [sys.executable, "-m", "obsflow"]


def time_obsflow(
    frames: Path, work: Path, n: int, size: int, *, link_cache: bool = False
) -> Timing:
    import yaml

    from obsflow.catalog import Catalog
    from obsflow.settings import SETTINGS_FILE, load_settings
    from obsflow.site import init_site

    site = init_site(work)
    if link_cache:
        path = site / SETTINGS_FILE
        settings = yaml.safe_load(path.read_text()) or {}
        settings.setdefault("ingest", {})["link_cache"] = True
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
    Catalog.open(load_settings(site).catalog_url).close()  # migrations: one-time, untimed
    cli = obsflow_cli()
    ran = run([*cli, "ingest", "--site", str(site), str(frames)], "obsflow ingest")
    status = run([*cli, "status", "--json", "--site", str(site)], "obsflow status").stdout
    archived = json.loads(status)["files"]["archived"]
    if archived != n:
        fail(f"obsflow archived {archived} of {n} files", status)
    return Timing(ran.seconds, n, size, ran.cpu, ran.load)


def time_floor(frames: Path, work: Path, n: int, size: int, *, fsync: bool = False) -> Timing:
    dest, db = work / "copies", work / "floor.db"
    cmd = [sys.executable, str(HERE), "--floor", str(frames), str(dest), str(db)]
    ran = run([*cmd, "--fsync"] if fsync else cmd, "floor")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT count(*) FROM files").fetchone()[0]
    copies = sum(1 for _ in dest.iterdir())
    if rows != n or copies != n:
        fail(f"the floor recorded {rows} and copied {copies} of {n} files")
    return Timing(ran.seconds, n, size, ran.cpu, ran.load)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {usable} CPU(s) usable ({os.cpu_count()} online), {model}; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()} "
        f"({sys.executable})"
    )


@dataclass(frozen=True)
class Options:
    seed: int
    tmp: Path | None
    repeat: int
    link_cache: bool
    profile: bool


def best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.seconds)


def report(
    label: str, rows: list[tuple[str, Timing]], raw: Timing, durable: Timing, repeat: int
) -> list[tuple[str, float, float]]:
    """Print the table; return (row, ratio to the raw floor, to the durable floor) of
    each obsflow row."""
    best_of = f", best of {repeat} runs each" if repeat > 1 else ""
    print(f"\n{label}: {raw.files} files, {raw.size / 1e6:,.1f} MB{best_of}")
    print(
        f"  {'':<26} {'seconds':>8} {'files/s':>9} {'MB/s':>7} {'CPU/file':>9}  load before→after"
    )
    table = [*rows, ("floor (raw)", raw), ("floor (durable)", durable)]
    for name, t in table:
        print(f"  {name:<26} {t.seconds:>8.2f} {t.files_per_s:>9.1f} {t.mb_per_s:>7.1f} "
              f"{t.cpu_ms_per_file:>6.2f} ms  {t.load[0]:.2f}→{t.load[1]:.2f}")  # fmt: skip
    ratios = []
    for name, t in rows:
        to_raw, to_durable = t.files_per_s / raw.files_per_s, t.files_per_s / durable.files_per_s
        ratios.append((name, to_raw, to_durable))
        print(f"  {name}: ratio to the raw floor {to_raw:.2f} ({verdict(to_raw)}), "
              f"to the durable floor {to_durable:.2f} ({verdict(to_durable)}); "
              f"target ≥ {TARGET}")  # fmt: skip
    return ratios


def verdict(ratio: float) -> str:
    return "PASS" if ratio >= TARGET else "BELOW TARGET"


def bench_set(
    label: str, n: int, shape: tuple[int, int], opts: Options
) -> list[tuple[str, float, float]]:
    with tempfile.TemporaryDirectory(prefix="obsflow-bench-", dir=opts.tmp) as work_dir:
        work = Path(work_dir)
        frames = work / "frames"
        start = time.perf_counter()
        paths = generate(frames, n, shape, opts.seed)
        size = sum(p.stat().st_size for p in paths)
        print(
            f"\n[{label}] generated {n} frames ({size / 1e6:,.1f} MB) in "
            f"{time.perf_counter() - start:.1f} s (untimed) in {work}",
            flush=True,
        )
        steps: list[tuple[str, Callable[[Path], Timing]]] = [
            ("obsflow ingest", lambda w: time_obsflow(frames, w, n, size)),
            ("floor (raw)", lambda w: time_floor(frames, w, n, size)),
            ("floor (durable)", lambda w: time_floor(frames, w, n, size, fsync=True)),
        ]
        if opts.link_cache:
            steps.insert(1, ("obsflow ingest, link_cache", lambda w: time_obsflow(
                frames, w, n, size, link_cache=True)))  # fmt: skip
        timings: dict[str, list[Timing]] = {name: [] for name, _ in steps}
        for i in range(opts.repeat):  # interleaved, so drifting load hits both sides alike
            for name, step in steps:
                scratch = work / f"run-{i}-{name.split()[0]}-{len(timings[name])}"
                timings[name].append(step(scratch))
                shutil.rmtree(scratch)  # free the disk before the next step
                print(f"[{label}] {name}: {timings[name][-1].seconds:.2f} s", flush=True)
        bests = {name: best(ts) for name, ts in timings.items()}
        rows = [(name, t) for name, t in bests.items() if name.startswith("obsflow")]
        ratios = report(label, rows, bests["floor (raw)"], bests["floor (durable)"], opts.repeat)
        if opts.profile:
            profile(frames, work / "profile")
        return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=2000, help="100×100 frames (0: skip)")
    parser.add_argument("--large", type=int, default=200, help="2048×2048 frames (0: skip)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tmp", type=Path, default=None, help="where to work (default: $TMPDIR)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each side N times, report the best"
    )
    parser.add_argument(
        "--link-cache", action="store_true",
        help="also time obsflow with ingest.link_cache: true (archive entries hard links)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="then run obsflow once more under py-spy and print where the time goes",
    )  # fmt: skip
    parser.add_argument(
        "--floor", nargs=3, type=Path, metavar=("SRC", "DEST", "DB"),
        help="internal: run only the floor on SRC",
    )  # fmt: skip
    parser.add_argument("--fsync", action="store_true", help="internal: with --floor")
    args = parser.parse_args()
    if args.floor is not None:
        floor(*args.floor, fsync=args.fsync)
        return
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    print(machine())
    print(f"temporary directory: {args.tmp or tempfile.gettempdir()}")
    opts = Options(args.seed, args.tmp, args.repeat, args.link_cache, args.profile)
    print(f"measuring {SRC} (python -m obsflow, bytecode compiled first); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    summary: list[tuple[str, str, float, float]] = []
    for label, n, side in (("small", args.small, 100), ("large", args.large, 2048)):
        if n > 0:
            for row, to_raw, to_durable in bench_set(label, n, (side, side), opts):
                summary.append((f"{n} × {side}×{side}", row, to_raw, to_durable))
    print(f"\nsummary (obsflow / floor, files/s; target ≥ {TARGET}); load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}:")  # fmt: skip
    print(f"  {'frames':<16} {'':<28} {'raw floor':>16} {'durable floor':>18}")
    for label, row, to_raw, to_durable in summary:
        print(f"  {label:<16} {row:<28} {to_raw:5.2f} {verdict(to_raw):>10} "
              f"{to_durable:5.2f} {verdict(to_durable):>12}")  # fmt: skip


if __name__ == "__main__":
    main()

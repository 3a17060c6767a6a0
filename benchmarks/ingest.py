"""How fast is ``obsflow ingest``, next to a floor that does only the necessary work?

For each of two sets of simulated OFCAM frames (default: 2,000 frames of 100×100 and
200 of 2048×2048), in one run on one machine and one disk:

* **obsflow**: a fresh site (``init_site``; its catalog is created untimed, as
  ``obsflow init`` + a first command would), then the real CLI is timed as a subprocess,
  ``obsflow ingest --site SITE DIR``, which returns once every file is archived. Default
  settings (what users get). Afterwards, untimed, ``obsflow status --json`` must report
  every file archived.
* **floor**: this file run as ``python benchmarks/ingest.py --floor DIR DEST DB``, a
  subprocess on the same interpreter, so Python start-up counts on both sides. For each
  file: read the primary header (``obsflow.fitsheader.parse_header``), sha256 of the whole
  file, ``shutil.copyfile`` to DEST, one INSERT into a SQLite table in WAL mode, committed
  in batches of 100.

Generation is not timed. Frames are generated into a temporary directory; their mtimes
are put 10 s into the past so receipt's settle wait is not measured, and ``os.sync()``
runs before each timed step so no run pays for the previous one's write-back.

Prints files/s and MB/s (1 MB = 10^6 bytes) of both and the ratio obsflow/floor (files/s);
the target is ≥ 0.5. Exit status is 0 even below the target (it is a benchmark); it is
non-zero only when a step fails (e.g. not every file archived).

Run: ``python benchmarks/ingest.py [--small 2000] [--large 200]``; quick:
``python benchmarks/ingest.py --small 200 --large 10``. On a shared or noisy machine,
``--repeat 3`` times each side three times (interleaved, each on a fresh site and
destination) and reports the best. ``--fsync-floor`` adds an informational row: the floor
with every copy and its directory fsynced, which shows what durability alone costs.
``--profile`` runs ``obsflow ingest`` once more per set under py-spy (``pip install
py-spy``; untimed) and prints where its threads spend their time, station by station.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
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


# ---------------------------------------------------------------- the floor


def floor(src: Path, dest: Path, db: Path, *, fsync: bool = False) -> int:
    """Do only the necessary work for every file in ``src``; return how many files.

    With ``fsync`` (information only, not the floor of the target) each copy and its
    directory are also fsynced, as obsflow makes its cache and archive copies durable.
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
            for synced in (target, dest):
                fd = os.open(synced, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
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
            conn.execute("COMMIT")
            conn.execute("BEGIN")
    conn.execute("COMMIT")
    conn.close()
    return len(paths)


# ---------------------------------------------------------------- where the time goes

STATIONS: list[tuple[str, tuple[str, ...]]] = [
    # (station, the functions whose frames count for it: the innermost listed one wins)
    ("receipt: read, validate, map, sha256, cache copy", ("Receiver.prepare",)),
    ("receipt: the catalog transaction (group commit)", ("Receiver.commit",)),
    ("ingest: lease and complete (catalog)", ("IngestQueue.lease", "IngestQueue.complete")),
    ("ingest: archive copy + fsync + rename", ("LocalStorage.put",)),
    ("ingest: read-back from the medium + sha256", ("LocalStorage.sha256",)),
    ("ingest: directory fsync", ("LocalStorage.flush",)),
    ("start-up: imports, settings, registry, catalog", ("_find_and_load", "open_site")),
]
WAITS = ("Condition.wait", "Event.wait", "Queue.get", "Future.result", "Thread.join")


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
    run([*cmd, sys.executable, obsflow_cli(), "ingest", "--site", str(site), str(frames)],
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


def run(cmd: list[str], what: str) -> tuple[float, str]:
    """Run ``cmd`` (after a sync), return (wall seconds, stdout); fail loudly on error."""
    os.sync()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        fail(f"{what} exited {done.returncode}: {' '.join(cmd)}", done.stdout + done.stderr)
    return seconds, done.stdout


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


def obsflow_cli() -> str:
    cli = Path(sys.executable).parent / "obsflow"
    if not cli.is_file():
        fail(f"no obsflow command beside {sys.executable}; install obsflow in this environment")
    return str(cli)


def time_obsflow(frames: Path, work: Path, n: int, size: int) -> Timing:
    from obsflow.catalog import Catalog
    from obsflow.settings import load_settings
    from obsflow.site import init_site

    site = init_site(work)
    Catalog.open(load_settings(site).catalog_url).close()  # migrations: one-time, untimed
    cli = obsflow_cli()
    seconds, _ = run([cli, "ingest", "--site", str(site), str(frames)], "obsflow ingest")
    _, status = run([cli, "status", "--json", "--site", str(site)], "obsflow status")
    archived = json.loads(status)["files"]["archived"]
    if archived != n:
        fail(f"obsflow archived {archived} of {n} files", status)
    return Timing(seconds, n, size)


def time_floor(frames: Path, work: Path, n: int, size: int, *, fsync: bool = False) -> Timing:
    dest, db = work / "copies", work / "floor.db"
    cmd = [sys.executable, str(HERE), "--floor", str(frames), str(dest), str(db)]
    seconds, _ = run([*cmd, "--fsync"] if fsync else cmd, "floor")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT count(*) FROM files").fetchone()[0]
    copies = sum(1 for _ in dest.iterdir())
    if rows != n or copies != n:
        fail(f"the floor recorded {rows} and copied {copies} of {n} files")
    return Timing(seconds, n, size)


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
    fsync_floor: bool
    profile: bool


def best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.seconds)


def report(label: str, ours: Timing, base: Timing, durable: Timing | None, repeat: int) -> float:
    ratio = ours.files_per_s / base.files_per_s
    verdict = "PASS" if ratio >= TARGET else "BELOW TARGET"
    best_of = f", best of {repeat} runs each" if repeat > 1 else ""
    print(f"\n{label}: {ours.files} files, {ours.size / 1e6:,.1f} MB{best_of}")
    print(f"  {'':<22} {'seconds':>9} {'files/s':>10} {'MB/s':>9}")
    rows = [("obsflow ingest", ours), ("floor", base)]
    if durable is not None:
        rows.append(("floor + fsync (info)", durable))
    for name, t in rows:
        print(f"  {name:<22} {t.seconds:>9.2f} {t.files_per_s:>10.1f} {t.mb_per_s:>9.1f}")
    print(f"  ratio obsflow/floor (files/s): {ratio:.2f}   target ≥ {TARGET}: {verdict}")
    if durable is not None:
        print(
            f"  (ratio obsflow/floor+fsync, for information: "
            f"{ours.files_per_s / durable.files_per_s:.2f})"
        )
    return ratio


def bench_set(label: str, n: int, shape: tuple[int, int], opts: Options) -> float:
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
        ours: list[Timing] = []
        base: list[Timing] = []
        durable: list[Timing] = []
        for i in range(opts.repeat):  # interleaved, so drifting load hits both sides alike
            steps: list[tuple[str, list[Timing], Callable[[Path], Timing]]] = [
                ("obsflow ingest", ours, lambda w: time_obsflow(frames, w, n, size)),
                ("floor", base, lambda w: time_floor(frames, w, n, size)),
            ]
            if opts.fsync_floor:
                steps.append(
                    ("floor + fsync", durable, lambda w: time_floor(frames, w, n, size, fsync=True))
                )
            for name, timings, step in steps:
                scratch = work / f"run-{i}-{len(timings)}-{name.split()[0]}"
                timings.append(step(scratch))
                shutil.rmtree(scratch)  # free the disk before the next step
                print(f"[{label}] {name}: {timings[-1].seconds:.2f} s", flush=True)
        ratio = report(
            label, best(ours), best(base), best(durable) if durable else None, opts.repeat
        )
        if opts.profile:
            profile(frames, work / "profile")
        return ratio


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
        "--fsync-floor", action="store_true",
        help="also time the floor with each copy fsynced (information; not the target's floor)",
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
    opts = Options(args.seed, args.tmp, args.repeat, args.fsync_floor, args.profile)
    ratios: list[tuple[str, float]] = []
    for label, n, side in (("small", args.small, 100), ("large", args.large, 2048)):
        if n > 0:
            ratios.append((f"{n} × {side}×{side}", bench_set(label, n, (side, side), opts)))
    print(f"\nsummary (ratio obsflow/floor, files/s; target ≥ {TARGET}):")
    for label, ratio in ratios:
        print(f"  {label:<22} {ratio:5.2f}  {'PASS' if ratio >= TARGET else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()

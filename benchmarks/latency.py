"""Real-time latency: acquired → archived with ``obsflow run`` watching, and the rate at which
a backlog starts to grow.

A detector is replayed at a fixed rate: 1k×1k 16-bit frames (rendered beforehand,
untimed), each written under its final name in pieces, NOT atomically (a reader may
find it partial), by :func:`obsflow.live.write_in_chunks`. The daemon runs with the
example site's defaults and its directory watch. Reported from the catalog's latency
ledger: acquired → archived p50/p99/max and the slowest stage on the way; beside each
target rate, the rate the replay actually wrote. The floor, in the same run: read +
sha256 + copy of the same files, one by one, at their own pace.

1. The main run: 10 frames/s for 60 s, written as the live simulator writes them
   (8 pieces over 10 ms, then fsync). Target: p50 ≤ 50 ms, p99 ≤ 250 ms, no backlog.
   Then the same with the example pipelines kept (``--no-pipelines`` leaves it out):
   the night's biases and flats are written first and made into a master bias and
   flats (untimed); then science frames only are replayed, each starting its L1 → L2 →
   L3 reductions on the same cores (niced, at low I/O priority: ``processing.nice``,
   ``processing.ionice``). The latency of the science frames (level 0, since the
   replay began) must meet the same target: the pipelines must not slow the archive.
2. The search: 10 s per rate, doubling from twice the main rate up to 320 frames/s,
   then bisecting twice between the last rate without a backlog and the first with
   one. Here the replay writes each frame in 2 pieces with no pause and no fsync (the
   bytes go to the page cache): fsyncing every frame, a 2-core VM's writer tops out
   near 35–40 frames/s, which would hide obsflow's own limit.

A run has a backlog when any of these holds (each run says which):

- unarchived: a frame is still not archived 2 s after the last one was written;
- in-flight rising: every in-flight count the daemon reported (``daemon.json``,
  refreshed every 2 s; at least 4 of them) in the second half of the run is more
  than 2 above every one in the first half;
- p99: acquired → archived p99 above 1000 ms (in a 10 s run, a queue fed ~10 % faster
  than it drains ends about 1 s behind).

When the replay falls more than 10 % short of a target rate with no backlog, the
writer, not obsflow, is the limit: the result says so and the search stops there.
(The writer shares the CPUs with the daemon, so an overloaded daemon slows it too: a
backlog is then reported at the rate actually written, with its target beside it.)
The whole benchmark takes about 3 minutes (under 4).

    python benchmarks/latency.py                 # 10 frames/s for 60 s, then the search
    python benchmarks/latency.py --seconds 20 --no-search
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from obsflow.sim.live import frame_bytes, write_in_chunks
from obsflow.sim.simulate import night_frames
from obsflow.site import init_site

PY = sys.executable

DRAIN_SECONDS = 2.0
"""After the last frame is written, every frame must be archived within this long."""
RISE = 2
"""In-flight rising: second-half readings all exceed first-half readings by more than this."""
P99_BOUND_MS = 1000.0
"""A p99 above this counts as a backlog (the main run's own target is stricter)."""
SHORTFALL = 0.9
"""The writer is the limit when it achieves less than this fraction of the target rate."""
CALIBRATION_SECONDS = 180.0
"""With pipelines: the night's master bias and flats must be made within this long."""
SEARCH_SECONDS = 10.0
MAX_RATE = 320.0
BISECTIONS = 2
SHUTDOWN_SECONDS = 15.0
"""The daemon finishes its backlog on SIGTERM; after this long it is killed instead."""


@dataclass(frozen=True)
class Writer:
    """How the replay writes each frame (the arguments of :func:`write_in_chunks`)."""

    chunks: int
    seconds: float
    fsync: bool

    def write(self, path: Path, payload: bytes) -> None:
        write_in_chunks(path, payload, chunks=self.chunks, seconds=self.seconds, fsync=self.fsync)

    def __str__(self) -> str:
        pause = f"over {1e3 * self.seconds:g} ms" if self.seconds else "with no pause"
        return f"{self.chunks} pieces {pause}, {'then fsync' if self.fsync else 'no fsync'}"


REALISTIC = Writer(chunks=8, seconds=0.01, fsync=True)
"""The main run: as the live simulator (and a detector system) writes a frame."""
FAST = Writer(chunks=2, seconds=0.0, fsync=False)
"""The search: still under the final name, not atomically, but as fast as the page cache."""


@dataclass(frozen=True)
class Result:
    rate: float
    """The target rate, frames per second."""
    achieved: float
    """Frames per second the replay actually wrote (it cannot exceed the disk or the CPU)."""
    frames: int
    count: int
    """Frames archived ``DRAIN_SECONDS`` after the last one was written."""
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    in_flight: tuple[int, ...]
    """The daemon's distinct in-flight readings through the run, in order."""
    slowest: str
    """The stage of the way with the highest p99 (where the time goes), e.g.
    ``cached → archived p99 812 ms``."""
    reasons: tuple[str, ...]
    """Why this run counts as a backlog (empty: it kept up)."""
    runs: dict[str, int] = field(default_factory=dict)
    """Pipeline runs by state at the end (with pipelines)."""
    stages: str = ""
    """Each stage of the way, p50/p99 in ms: where the time goes."""

    @property
    def backlog(self) -> bool:
        return bool(self.reasons)

    @property
    def writer_limited(self) -> bool:
        return self.achieved < SHORTFALL * self.rate


def obsflow(*args: str | Path) -> str:
    """Run an ``obsflow`` command; its standard output (its standard error if it fails)."""
    command = [PY, "-m", "obsflow", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[2:])} exited {done.returncode}: {done.stderr[-2000:]}"
        )
    return done.stdout


def render(directory: Path, count: int, size: int) -> tuple[list[bytes], list[str]]:
    """``count`` distinct frames as bytes, to be replayed (rendered untimed), and the
    frame type (IMAGETYP) of each."""
    frames = list(night_frames(directory, count, seed=5, shape=(size, size)))  # read twice
    return (
        [frame_bytes(data, header) for _, data, header in frames],
        [str(header["IMAGETYP"]) for _, _, header in frames],
    )


T0 = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)


def variant(base: bytes, index: int) -> bytes:
    """``base`` with its DATE-OBS rewritten (same length): new bytes, a new archive ID."""
    card = base.find(b"DATE-OBS= '")
    stamp = (T0 + timedelta(seconds=index / 100)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:22]
    start = card + len(b"DATE-OBS= '")
    return base[:start] + stamp.encode() + base[start + len(stamp) :]


def backlog_reasons(
    frames: int, archived: int, in_flight: list[int], p99_ms: float | None
) -> tuple[str, ...]:
    """The backlog criteria of the module docstring that this run meets."""
    reasons = []
    if archived < frames:
        reasons.append(f"{frames - archived} unarchived after {DRAIN_SECONDS:g} s")
    half = len(in_flight) // 2
    if half >= 2 and min(in_flight[half:]) > max(in_flight[:half]) + RISE:
        reasons.append(f"in-flight rising {in_flight[0]} → {in_flight[-1]}")
    if p99_ms is not None and p99_ms > P99_BOUND_MS:
        reasons.append(f"p99 > {P99_BOUND_MS:g} ms")
    return tuple(reasons)


def run_daemon(
    bases: list[bytes],
    rate: float,
    seconds: float,
    writer: Writer,
    work: Path,
    calibrations: list[bytes] | None = None,
) -> Result:
    """Replay ``rate × seconds`` frames at ``rate`` into a fresh site with the daemon running.

    With ``calibrations``, the example pipelines stay: those frames (the night's biases
    and flats) are written first, untimed, and their master bias and flats made; then
    every replayed frame (``bases``: science frames) starts its own L1 → L2 → L3
    reductions on the same two cores while the next frames arrive."""
    count = max(1, round(rate * seconds))
    site = init_site(work / f"site-{rate:g}{'-pipelines' if calibrations else ''}")
    if not calibrations:
        # the archive path alone (the pipelines' own figures: benchmarks/orchestration.py)
        (site / "registry" / "ofcam_pipelines.yaml").unlink()
    obsflow("status", "--site", site)  # create the catalog before the clock starts
    daemon = subprocess.Popen(
        [PY, "-m", "obsflow", "run", "--site", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status_file = site / ".obsflow" / "daemon.json"
        while not status_file.exists():  # written once the triggers are up
            time.sleep(0.05)
        if calibrations:
            made_calibrations(site, calibrations, writer)
        since = datetime.now(UTC).isoformat()
        readings: dict[str, int] = {}  # the status's "updated" stamp → its in-flight count
        start = next_look = time.monotonic()
        for index in range(count):
            payload = variant(bases[index % len(bases)], index + 1)
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
            writer.write(site / "incoming" / f"ofc_20261122_{index + 1:05d}.fits", payload)
            if time.monotonic() >= next_look:  # twice per status refresh, whatever the rate
                status = json.loads(status_file.read_text())
                readings[status["updated"]] = int(status.get("in_flight", 0))
                next_look = time.monotonic() + 0.5
        written = time.monotonic()
        achieved = count / max(1e-9, written - start)
        time.sleep(DRAIN_SECONDS)
        level = ("--level", "0", "--since", since) if calibrations else ()
        report = json.loads(obsflow("status", "--latency", "--json", *level, "--site", site))
        runs = json.loads(obsflow("runs", "--json", "--limit", "100000", "--site", site))
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:  # still draining a backlog: not worth the wait
            daemon.kill()
            daemon.wait()
        shutil.rmtree(site, ignore_errors=True)
    in_flight = list(readings.values())
    by_state: dict[str, int] = {}
    for run in runs:
        by_state[run["state"]] = by_state.get(run["state"], 0) + 1
    return Result(
        rate=rate,
        achieved=achieved,
        frames=count,
        count=report["count"],
        p50_ms=report["p50_ms"],
        p99_ms=report["p99_ms"],
        max_ms=report["max_ms"],
        in_flight=tuple(in_flight),
        reasons=backlog_reasons(count, report["count"], in_flight, report["p99_ms"]),
        slowest=slowest_stage(report["stages"]),
        runs=by_state,
        stages=stage_figures(report["stages"]),
    )


def made_calibrations(site: Path, frames: list[bytes], writer: Writer) -> None:
    """Write the night's calibration frames (untimed) and wait for their master bias and
    flats: the pipelines' deadline (15 s after the last input), then the runs."""
    for index, payload in enumerate(frames):
        writer.write(
            site / "incoming" / f"ofc_20261122_{90001 + index}.fits",  # ofcam_raw's names: digits
            variant(payload, 9000 + index),
        )
    deadline = time.monotonic() + CALIBRATION_SECONDS
    while time.monotonic() < deadline:
        runs = json.loads(obsflow("runs", "--json", "--site", site))
        made = {r["pipeline"] for r in runs if r["state"] == "succeeded"}
        if {"ofcam_masterbias", "ofcam_masterflat"} <= made and all(
            r["state"] in ("succeeded", "failed") for r in runs
        ):
            return
        time.sleep(1.0)
    raise RuntimeError(f"no master bias and flat after {CALIBRATION_SECONDS:g} s")


def slowest_stage(stages: dict[str, dict[str, float | None]]) -> str:
    """``stages`` of ``obsflow status --latency --json``: the one with the highest p99."""
    p99 = {name: ms for name, value in stages.items() if (ms := value["p99_ms"]) is not None}
    if not p99:
        return "no stage measured"
    name = max(p99, key=lambda n: p99[n])
    return f"{name.replace('_to_', ' → ')} p99 {p99[name]:.0f} ms"


def stage_figures(stages: dict[str, dict[str, float | None]]) -> str:
    """``stages`` of ``obsflow status --latency --json``, each as ``name p50/p99 ms``."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return ", ".join(
        f"{name.split('_to_')[1]} {ms(value['p50_ms'])}/{ms(value['p99_ms'])}"
        for name, value in stages.items()
    )


def floor(bases: list[bytes], work: Path) -> float:
    """Seconds per frame for read + sha256 + copy, one after another."""
    source, target = work / "floor-in", work / "floor-out"
    source.mkdir()
    target.mkdir()
    paths = []
    for index, payload in enumerate(bases):
        path = source / f"f{index}.fits"
        path.write_bytes(payload)
        paths.append(path)
    start = time.perf_counter()
    for path in paths:
        hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, target / path.name)
    return (time.perf_counter() - start) / len(paths)


def readings(values: tuple[int, ...], keep: int = 12) -> str:
    """``values`` joined, with the middle of a long run elided."""
    shown = [str(v) for v in values]
    if len(shown) > keep:
        shown = [*shown[: keep // 2], "…", *shown[-keep // 2 :]]
    return ", ".join(shown)


def show(result: Result, frame_mb: float) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:7.1f}"

    verdict = ["BACKLOG: " + ", ".join(result.reasons) if result.backlog else "keeps up"]
    if result.writer_limited:
        verdict.append("writer short of target")
    return (
        f"  {result.rate:6.1f} frames/s (written {result.achieved:6.1f}/s, "
        f"{result.achieved * frame_mb:4.0f} MB/s): {result.count}/{result.frames} archived, "
        f"p50 {ms(result.p50_ms)} ms  p99 {ms(result.p99_ms)} ms  max {ms(result.max_ms)} ms"
        f"  [{'; '.join(verdict)}]\n"
        f"          in flight {readings(result.in_flight)}; "
        f"slowest stage {result.slowest}\n"
        f"          stages, p50/p99 ms to each moment from the one before: {result.stages}"
        + (
            "\n          pipeline runs meanwhile: "
            + ", ".join(f"{n} {state}" for state, n in sorted(result.runs.items()))
            if result.runs
            else ""
        )
    )


def search(bases: list[bytes], main_run: Result, frame_mb: float, work: Path) -> None:
    """Double the rate until a backlog grows (or the writer falls short), then bisect."""

    def step(rate: float) -> Result:
        result = run_daemon(bases, rate, SEARCH_SECONDS, FAST, work)
        print(show(result, frame_mb), flush=True)
        return result

    print(
        f"backlog search ({SEARCH_SECONDS:g} s per rate, doubling to {MAX_RATE:g}, then "
        f"{BISECTIONS} bisections; writer: {FAST}):\n"
        f"  backlog = a frame unarchived {DRAIN_SECONDS:g} s after the last, or in-flight "
        f"rising by > {RISE}, or p99 > {P99_BOUND_MS:g} ms",
        flush=True,
    )
    good, bad = main_run, None
    rate = 2 * main_run.rate
    while rate <= MAX_RATE:
        result = step(rate)
        if result.backlog:
            bad = result
            break
        good = result
        if result.writer_limited:
            print(
                f"  writer limit reached at {result.achieved:.0f} frames/s "
                f"({result.achieved * frame_mb:.0f} MB/s) before any backlog"
            )
            return
        rate *= 2
    if bad is None:
        print(
            f"  no backlog up to {good.achieved:.0f} frames/s "
            f"({good.achieved * frame_mb:.0f} MB/s), the search's highest rate"
        )
        return
    for _ in range(BISECTIONS):  # between the targets of the last good and the first bad
        result = step((good.rate + bad.rate) / 2)
        if result.backlog:
            bad = result
        else:
            good = result
    short = f" (target {bad.rate:g}: the writer fell short)" if bad.writer_limited else ""
    print(
        f"  obsflow keeps up to {good.achieved:.0f} frames/s ({good.achieved * frame_mb:.0f} "
        f"MB/s); backlog grows at {bad.achieved:.0f} frames/s{short}, "
        f"slowest stage there {bad.slowest}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the main run")
    parser.add_argument("--size", type=int, default=1024, help="frame width and height")
    parser.add_argument("--no-search", action="store_true", help="skip the backlog search")
    parser.add_argument(
        "--no-pipelines", action="store_true", help="skip the run with the pipelines reducing"
    )
    parser.add_argument("--tmp", type=Path, default=None)
    args = parser.parse_args()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "?",
    )  # fmt: skip
    print(f"machine: {os.cpu_count()} CPU(s), {cpu}; Python {platform.python_version()}")
    work = Path(tempfile.mkdtemp(prefix="obsflow-latency-", dir=args.tmp))
    began = time.monotonic()
    try:
        bases, kinds = render(work / "render", 50, args.size)
        frame_mb = len(bases[0]) / 1e6
        print(f"frames of {args.size}×{args.size} ({frame_mb:.1f} MB), 50 rendered untimed")
        per_frame = floor(bases, work)
        print(f"floor (read + sha256 + copy): {1e3 * per_frame:.1f} ms per frame, "
              f"{1 / per_frame:.0f} frames/s")  # fmt: skip
        print(f"obsflow run, acquired → archived (writer: {REALISTIC}):", flush=True)
        main_run = run_daemon(bases, args.rate, args.seconds, REALISTIC, work)
        print(show(main_run, frame_mb))
        met = (main_run.p50_ms or 1e9) <= 50 and (main_run.p99_ms or 1e9) <= 250
        print(f"  target p50 ≤ 50 ms, p99 ≤ 250 ms, no backlog: "
              f"{'MET' if met and not main_run.backlog else 'NOT MET'}")  # fmt: skip
        if main_run.p50_ms is not None:
            print(f"  ratio p50 / floor per frame: {main_run.p50_ms / (1e3 * per_frame):.1f}")
        if not args.no_pipelines:
            science = [b for b, kind in zip(bases, kinds, strict=True) if kind == "OBJECT"]
            calibrations = [b for b, kind in zip(bases, kinds, strict=True) if kind != "OBJECT"]
            print(
                f"the same, science frames only, with the example pipelines reducing each "
                f"(L1 → L2 → L3; {len(calibrations)} calibration frames made into master "
                f"bias and flats first, untimed):",
                flush=True,
            )
            busy = run_daemon(science, args.rate, args.seconds, REALISTIC, work, calibrations)
            print(show(busy, frame_mb))
            met = (busy.p50_ms or 1e9) <= 50 and (busy.p99_ms or 1e9) <= 250
            print(f"  target p50 ≤ 50 ms, p99 ≤ 250 ms with the pipelines running: "
                  f"{'MET' if met and not busy.backlog else 'NOT MET'}")  # fmt: skip
        if main_run.backlog:
            print("  a backlog already at the main rate: no search")
        elif not args.no_search:
            search(bases, main_run, frame_mb, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"took {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()

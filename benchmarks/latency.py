"""Real-time latency: acquired → archived with ``obsflow run`` watching, against a floor.

A detector is replayed at a fixed rate: 1k×1k 16-bit frames (rendered beforehand,
untimed) written under their final names in pieces over some milliseconds, as the
live simulator writes them. The daemon runs with the example site's defaults and
its directory watch. Reported from the catalog's latency ledger: acquired → archived
p50/p99/max, and whether a backlog grew (files not archived 2 s after the last
frame, or the in-flight count rising through the run). The floor, in the same run:
read + sha256 + copy of the same files, one by one, at their own pace.

Then the rate is raised (×2 per step, shorter runs) until a backlog grows, and the
last rate without one is reported.

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from obsflow.live import frame_bytes, write_in_chunks
from obsflow.simulate import night_frames
from obsflow.site import init_site

PY = sys.executable


@dataclass(frozen=True)
class Result:
    rate: float
    achieved: float
    """Frames per second the replay actually wrote (it cannot exceed the disk)."""
    frames: int
    count: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    backlog: bool


def obsflow(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "obsflow", *map(str, args)], capture_output=True, text=True, check=True
    )


def render(directory: Path, count: int, size: int) -> list[bytes]:
    """``count`` distinct frames as bytes, to be replayed (rendered untimed)."""
    return [
        frame_bytes(data, header)
        for _, data, header in night_frames(directory, count, seed=5, shape=(size, size))
    ]


T0 = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)


def variant(base: bytes, index: int) -> bytes:
    """``base`` with its DATE-OBS rewritten (same length): new bytes, a new archive ID."""
    card = base.find(b"DATE-OBS= '")
    stamp = (T0 + timedelta(seconds=index / 100)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:22]
    start = card + len(b"DATE-OBS= '")
    return base[:start] + stamp.encode() + base[start + len(stamp) :]


def run_daemon(bases: list[bytes], count: int, rate: float, work: Path, first: int) -> Result:
    """Replay ``count`` frames at ``rate`` into a fresh site with the daemon running."""
    site = init_site(work / f"site-{rate:g}-{first}")
    obsflow("status", "--site", site)  # create the catalog before the clock starts
    daemon = subprocess.Popen(
        [PY, "-m", "obsflow", "run", "--site", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status_file = site / ".obsflow" / "daemon.json"
        while not status_file.exists():
            time.sleep(0.05)
        start, peaks = time.monotonic(), []
        for index in range(count):
            payload = variant(bases[index % len(bases)], first + index)
            name = f"ofc_20261122_{first + index:05d}.fits"
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
            write_in_chunks(site / "incoming" / name, payload, seconds=0.01)
            if index % max(1, int(rate)) == 0:  # about once a second
                peaks.append(int(json.loads(status_file.read_text()).get("in_flight", 0)))
        achieved = count / max(1e-9, time.monotonic() - start)
        time.sleep(2.0)
        report = json.loads(obsflow("status", "--latency", "--json", "--site", site).stdout)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        shutil.rmtree(site, ignore_errors=True)
    rising = len(peaks) >= 4 and min(peaks[-2:]) > max(peaks[:2]) + 2
    return Result(rate, achieved, count, report["count"], report["p50_ms"], report["p99_ms"],
                  report["max_ms"], backlog=report["count"] < count or rising)  # fmt: skip


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


def show(result: Result) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:7.1f}"

    verdict = "BACKLOG" if result.backlog else "keeps up"
    return (
        f"  {result.rate:6.1f} frames/s (written {result.achieved:6.1f}/s): "
        f"{result.count}/{result.frames} archived, "
        f"p50 {ms(result.p50_ms)} ms  p99 {ms(result.p99_ms)} ms  max {ms(result.max_ms)} ms"
        f"  [{verdict}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the main run")
    parser.add_argument("--size", type=int, default=1024, help="frame width and height")
    parser.add_argument("--no-search", action="store_true", help="skip the backlog search")
    parser.add_argument("--tmp", type=Path, default=None)
    args = parser.parse_args()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "?",
    )  # fmt: skip
    print(f"machine: {os.cpu_count()} CPU(s), {cpu}; Python {platform.python_version()}")
    work = Path(tempfile.mkdtemp(prefix="obsflow-latency-", dir=args.tmp))
    try:
        bases = render(work / "render", 50, args.size)
        size_mb = len(bases[0]) / 1e6
        print(f"frames of {args.size}×{args.size} ({size_mb:.1f} MB), 50 rendered untimed")
        per_frame = floor(bases, work)
        print(f"floor (read + sha256 + copy): {1e3 * per_frame:.1f} ms per frame, "
              f"{1 / per_frame:.0f} frames/s")  # fmt: skip
        count = int(args.rate * args.seconds)
        main_run = run_daemon(bases, count, args.rate, work, first=1)
        print("obsflow run, acquired → archived:")
        print(show(main_run))
        met = (main_run.p50_ms or 1e9) <= 50 and (main_run.p99_ms or 1e9) <= 250
        print(f"  target p50 ≤ 50 ms, p99 ≤ 250 ms, no backlog: "
              f"{'MET' if met and not main_run.backlog else 'NOT MET'}")  # fmt: skip
        if main_run.p50_ms is not None:
            print(f"  ratio p50 / floor per frame: {main_run.p50_ms / (1e3 * per_frame):.1f}")
        if args.no_search:
            return
        print("backlog search (20 s per rate, doubling):")
        rate = args.rate * 2
        last_ok: float | None = None if main_run.backlog else main_run.achieved
        while rate <= 320 and last_ok is not None:
            step = run_daemon(bases, int(rate * 20), rate, work, first=1)
            print(show(step))
            if step.backlog:
                break
            last_ok = step.achieved
            if step.achieved < 0.9 * rate:
                print("  the replay cannot write faster on this disk: obsflow kept up with it")
                break
            rate *= 2
        print(f"  highest rate without a backlog: {last_ok:.0f} frames/s" if last_ok
              else "  a backlog already at the main rate")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

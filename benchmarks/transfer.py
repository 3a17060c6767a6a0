"""Agent → server transfer on loopback: throughput against a plain HTTP upload of the same
files, and acquired → archived latency while the link is healthy.

Two sites on ``/dev/shm`` if it exists (else the temporary directory; printed), each with
the example registry without its pipelines (no reductions) and its own SQLite catalog:
an archive server (``obsflow run --role server --listen 127.0.0.1:PORT``) and an
observatory agent (``obsflow run --role agent --server … --token …``, a write token of
the server's; ``receipt.settle_seconds: 0.2``), two real processes, the rest of their
settings the defaults (2 receipt workers, 4 transfer workers at the agent, 2 ingestors at
the server). Frames: 2048×2048 16-bit OFCAM frames (8.4 MB), 4 rendered by the simulator
and the rest made of them by rewriting DATE-OBS (distinct bytes, archive IDs and names
``ofc_20261122_NNNN.fits``), all written to a staging directory untimed.

1. **Throughput**: 200 frames (``--quick``: 40) moved at once (``os.rename``: the write is
   instant; each file's mtime, its moment acquired, set just before) into the agent's
   incoming directory; timed from the first move until the server's catalog has them all
   archived. Target: ≥ 0.7 of the floor's throughput.
2. **Latency**: 50 more frames (``--quick``: 20) moved in at 5 per second, so the link is
   not saturated; acquired → archived p50/p99 of them from the server's latency ledger
   (the agent sends each frame's acquired moment along), with each stage on the way.
   Target: p99 ≤ 1 s.

The **floors**, in the same run: the same 200 files uploaded by a plain streaming HTTP PUT
with httpx (as many at once as the agent's transfer workers, in 1 MiB chunks as the agent
reads them) to a minimal server on the same stack as obsflow's API (uvicorn, h11) whose
only work is to write each body to a file (the **raw** floor), or to write it and fsync
the file and its directory before it answers (the **durable** floor: the least a server
must do before it says it holds a file); timed from the first request to the last
answer. Each runs twice, before the daemons start and after they stopped; the faster of
the two counts (the machine is shared: the spread shows the noise). Both ratios are
printed, each with its verdict. The daemons are ``python -m obsflow`` of the tree this
file belongs to (its ``src`` first on ``PYTHONPATH``, bytecode compiled first). The floors
do none of what obsflow does on the way: the agent's receipt into its cache (a copy and a
sha256), the server's sha256 of the upload as it streams in, its receipt (the header read,
the upload moved into its cache), its archive copy (fsynced, read back and hashed), and
the two catalogs' transactions. Beside each
throughput, the CPU time per frame of each process (``/proc/PID/stat``: the agent's and
the server's, the floor's client and server), which says where the time goes: on one
machine both sites share the CPUs, so a pipeline that spends more CPU per byte is slower.

Checked, else the benchmark fails (exit status 1): the server archived exactly the frames
sent, each once, its catalog sha256 and its archived copy's bytes those of the staged file;
the agent's catalog has each frame confirmed; nothing was quarantined; no partial upload
is left; both daemons stop cleanly on SIGTERM. A missed target is a measurement (exit
status 0). About 1.5 minutes (``--quick``: 40 s).

Run: ``python benchmarks/transfer.py``; quick: ``--quick``.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

import httpx
import uvicorn
import yaml
from starlette.types import ASGIApp, Receive, Scope, Send

from obsflow.access import Scope as TokenScope
from obsflow.access import TokenStore
from obsflow.archive.storage import LocalStorage
from obsflow.catalog import Catalog, FileQuery
from obsflow.catalog.latency import LatencyReport, Percentiles, latency_report
from obsflow.receipt.receiver import utcnow
from obsflow.settings import SETTINGS_FILE, load_settings
from obsflow.settings import Transfer as TransferSettings
from obsflow.sim.demo import free_port
from obsflow.sim.live import frame_bytes
from obsflow.sim.simulate import night_frames
from obsflow.site import init_site
from obsflow.states import FileState
from synthetic import load, machine

PY = sys.executable
HERE = Path(__file__).resolve()

FRAMES, QUICK_FRAMES = 200, 40
LATENCY_FRAMES, QUICK_LATENCY_FRAMES = 50, 20
RATE = 5.0
"""Frames per second of the latency phase."""
SHAPE = (2048, 2048)
"""Rows × columns of 16-bit pixels: 8 MiB of data, 8.4 MB with the header."""
TEMPLATES = 4
"""Frames rendered by the simulator; the others are these with another DATE-OBS."""
T0 = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)
"""DATE-OBS of frame 0; frame N is N seconds later."""
RATIO_TARGET = 0.7
P99_TARGET_MS = 1000.0
SRC = HERE.parent.parent / "src"
"""The tree measured: this checkout's obsflow, whatever the environment installed."""
CHUNK = 1 << 20
"""The floor client's read size: the agent's (``obsflow.transfer.CHUNK``)."""
START_SECONDS = 60.0
STOP_SECONDS = 60.0
POLL_SECONDS = 0.02
"""How often the server's catalog is asked how many frames it archived."""
SLOWEST_MB_PER_S = 2.0
"""A phase slower than this (plus a minute) counts as stuck: the benchmark fails."""
AGENT_SETTINGS: dict[str, dict[str, object]] = {"receipt": {"settle_seconds": 0.2}}
SERVER_SETTINGS: dict[str, dict[str, object]] = {}


def fail(message: str) -> NoReturn:
    print(f"\nFAILED: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def mb_s(size: int, seconds: float) -> float:
    return size / 1e6 / max(seconds, 1e-9)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of process ``pid`` so far, all its threads; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def per_frame(cpu: float | None, frames: int) -> str:
    return "?" if cpu is None else f"{1e3 * cpu / frames:.0f} ms"


# ---------------------------------------------------------------- frames


@dataclass(frozen=True)
class Staged:
    """A frame written to the staging directory, and what the server must end up with."""

    path: Path
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return self.path.name


def templates(work: Path) -> list[bytes]:
    """:data:`TEMPLATES` frames of the simulator, as bytes (a bias and science frames)."""
    made = night_frames(work, TEMPLATES, seed=11, shape=SHAPE)
    return [frame_bytes(data, header) for _, data, header in made]


def variant(base: bytes, index: int) -> bytes:
    """``base`` with DATE-OBS ``T0 + index`` s (the same length): other bytes, another
    archive ID."""
    card = base.find(b"DATE-OBS= '")
    if card < 0:
        fail("a rendered frame has no DATE-OBS card")
    start = card + len(b"DATE-OBS= '")
    stamp = (T0 + timedelta(seconds=index)).strftime("%Y-%m-%dT%H:%M:%S.00")
    if base[start + len(stamp) : start + len(stamp) + 1] != b"'":
        fail(f"DATE-OBS of a rendered frame is not like {stamp!r}")
    return base[:start] + stamp.encode() + base[start + len(stamp) :]


def stage(directory: Path, bases: list[bytes], first: int, count: int) -> list[Staged]:
    """Frames ``first`` to ``first + count - 1`` written to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    staged = []
    for index in range(first, first + count):
        payload = variant(bases[index % len(bases)], index)
        path = directory / f"ofc_{T0:%Y%m%d}_{index:04d}.fits"
        path.write_bytes(payload)
        staged.append(Staged(path, hashlib.sha256(payload).hexdigest(), len(payload)))
    return staged


def move_in(frame: Staged, incoming: Path) -> None:
    """Acquired now: the mtime set, then the frame renamed into ``incoming`` at once."""
    now = time.time()
    os.utime(frame.path, (now, now))
    os.rename(frame.path, incoming / frame.name)


# ---------------------------------------------------------------- the floor


def floor_app(directory: Path, durable: bool = False) -> ASGIApp:
    """A raw ASGI app: each ``PUT /NAME`` body streamed to ``directory/NAME``, nothing else
    (``durable``: the file and ``directory`` fsynced before the answer)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        target = directory / Path(str(scope["path"])).name
        with target.open("wb") as out:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                out.write(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if durable:
            folder = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b'{"state":"stored"}'})

    return app


def serve_floor(directory: Path, port: int, durable: bool) -> None:
    """The floor's server, in a process of its own (``--serve-floor``)."""
    uvicorn.run(
        floor_app(directory, durable),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the floor's server exited ({proc.returncode}):\n{tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    fail(f"the floor's server did not listen in {START_SECONDS:g} s:\n{tail(log_path)}")


def chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as src:
        while chunk := src.read(CHUNK):
            yield chunk


@dataclass(frozen=True)
class FloorRun:
    seconds: float
    client_cpu: float
    """CPU seconds of this process (the httpx client) while it uploaded."""
    server_cpu: float | None


def floor(paths: list[Path], work: Path, streams: int, durable: bool) -> FloorRun:
    """Upload ``paths`` with httpx to the minimal server, ``streams`` at once, timed (the
    bytes it stored are checked, then removed)."""
    out = work / "floor-out"
    out.mkdir()
    port = free_port()
    log_path = work / "floor-server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                PY,
                str(HERE),
                "--serve-floor",
                str(out),
                "--port",
                str(port),
                *(["--durable"] if durable else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, server, log_path)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=httpx.Timeout(60.0),
            limits=httpx.Limits(max_keepalive_connections=8),
        ) as client:

            def put(path: Path) -> None:
                response = client.put(
                    f"/{path.name}",
                    content=chunks(path),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(path.stat().st_size),
                    },
                )
                if response.status_code != 200:
                    fail(f"the floor's server answered {response.status_code} for {path.name}")

            client.get("/warm-up")  # a connection open, as the agent's is after its first GET
            server_cpu, client_cpu = cpu_seconds(server.pid), own_cpu()
            start = time.perf_counter()
            with ThreadPoolExecutor(streams) as pool:
                list(pool.map(put, paths))
            seconds = time.perf_counter() - start
            client_cpu = own_cpu() - client_cpu
            server_cpu = spent(server_cpu, cpu_seconds(server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    for path in paths:
        stored = out / path.name
        if not stored.is_file() or stored.stat().st_size != path.stat().st_size:
            fail(f"the floor's server did not store {path.name} whole")
    shutil.rmtree(out)
    return FloorRun(seconds, client_cpu, server_cpu)


# ---------------------------------------------------------------- the sites


@dataclass
class Daemon:
    """An ``obsflow run`` process, its log in its site."""

    name: str
    site: Path
    proc: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.site / "daemon.log"

    def check(self) -> None:
        if self.proc.poll() is not None:
            fail(f"the {self.name} exited ({self.proc.returncode}):\n{tail(self.log_path)}")

    def running(self) -> bool:
        self.check()
        try:
            status = json.loads((self.site / ".obsflow" / "daemon.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(status.get("running")) and status.get("pid") == self.proc.pid

    def stop(self) -> None:
        """SIGTERM, and wait: it finishes what is in flight. One that does not stop in
        time is killed, and that is a failure, as is any exit status but 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                fail(f"the {self.name} did not stop {STOP_SECONDS:g} s after SIGTERM")
        if self.proc.returncode != 0:
            fail(f"the {self.name} stopped with status {self.proc.returncode}:\n"
                 f"{tail(self.log_path)}")  # fmt: skip


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def make_site(directory: Path, changes: dict[str, dict[str, object]]) -> Path:
    """A site with the example registry without its pipelines, its settings changed."""
    site = init_site(directory)
    (site / "registry" / "ofcam_pipelines.yaml").unlink()
    path = site / SETTINGS_FILE
    settings = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        settings.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return site


def write_token(server: Path) -> str:
    """A write token of the server's for the agent (creating the server's catalog)."""
    catalog = Catalog.open(load_settings(server).catalog_url)
    try:
        token, _ = TokenStore(catalog).create("agent", TokenScope.WRITE, [], utcnow())
    finally:
        catalog.close()
    return token


def start(name: str, site: Path, *args: str) -> Daemon:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBSFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    with (site / "daemon.log").open("w") as log:
        proc = subprocess.Popen(
            [PY, "-m", "obsflow", "run", "--site", str(site), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Daemon(name, site, proc)


def wait_running(daemons: list[Daemon]) -> None:
    deadline = time.monotonic() + START_SECONDS
    while not all(d.running() for d in daemons):
        if time.monotonic() > deadline:
            fail(f"the daemons did not say they run within {START_SECONDS:g} s")
        time.sleep(0.05)


@contextmanager
def daemons(agent: Path, server: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """The server and the agent running (stopped after: the agent first)."""
    compileall.compile_dir(SRC / "obsflow", quiet=1)  # (start-up is not the transfer's)
    token = write_token(server)
    Catalog.open(load_settings(agent).catalog_url).close()
    port = free_port()
    started: list[Daemon] = []
    try:
        started.append(start("server", server, "--role", "server", "--listen", f"127.0.0.1:{port}"))
        started.append(
            start("agent", agent, "--role", "agent",
                  "--server", f"http://127.0.0.1:{port}", "--token", token)
        )  # fmt: skip
        wait_running(started)
        yield started[1], started[0]
    finally:
        for daemon in reversed(started):
            daemon.stop()


# ---------------------------------------------------------------- the phases


def archived(catalog: Catalog) -> int:
    return catalog.counts().get(FileState.ARCHIVED, 0)


def wait_archived(
    catalog: Catalog, count: int, timeout: float, watch: list[Daemon], what: str
) -> float:
    """Wait until ``catalog`` has ``count`` files archived; the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    last_check = 0.0
    while (done := archived(catalog)) < count:
        now = time.monotonic()
        if now > deadline:
            fail(f"{what}: {done} of {count} archived after {timeout:.0f} s")
        if now - last_check > 1.0:
            for daemon in watch:
                daemon.check()
            last_check = now
        time.sleep(POLL_SECONDS)
    return time.monotonic()


@dataclass(frozen=True)
class Phase:
    frames: int
    size: int
    seconds: float
    """First move → the last frame archived at the server."""
    confirmed: float
    """First move → the agent's catalog has the last one confirmed."""
    written: float
    """First move → the last move."""
    report: LatencyReport
    agent_cpu: float | None
    """CPU seconds of the agent's process from the first move until the last confirmed."""
    server_cpu: float | None


def run_phase(
    frames: list[Staged],
    rate: float | None,
    agent: Daemon,
    server: Daemon,
    catalogs: tuple[Catalog, Catalog],
) -> Phase:
    """Move ``frames`` into the agent's incoming directory (all at once, or ``rate`` a
    second) and wait until the server archived them and the agent knows it."""
    agent_catalog, server_catalog = catalogs
    incoming = load_settings(agent.site).incoming
    before = archived(server_catalog)
    size = sum(f.size for f in frames)
    timeout = 60.0 + size / 1e6 / SLOWEST_MB_PER_S + (len(frames) / rate if rate else 0.0)
    since = utcnow()
    cpu = cpu_seconds(agent.proc.pid), cpu_seconds(server.proc.pid)
    start = time.monotonic()
    for index, frame in enumerate(frames):
        if rate is not None:
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
        move_in(frame, incoming)
    written = time.monotonic() - start
    watch = [agent, server]
    done = wait_archived(server_catalog, before + len(frames), timeout, watch, "the server")
    confirmed = wait_archived(agent_catalog, before + len(frames), 60.0, watch, "the agent")
    agent_cpu = spent(cpu[0], cpu_seconds(agent.proc.pid))
    server_cpu = spent(cpu[1], cpu_seconds(server.proc.pid))
    report = latency_report(server_catalog, utcnow(), since=since, level=0)
    if report.total.count != len(frames):
        fail(f"the server's ledger has {report.total.count} frames archived in the phase, "
             f"not {len(frames)}")  # fmt: skip
    return Phase(
        len(frames), size, done - start, confirmed - start, written, report, agent_cpu, server_cpu
    )


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def show_latency(report: LatencyReport, indent: str = "    ") -> None:
    total = report.total
    print(
        f"{indent}acquired → archived: p50 {ms(total.p50_ms)} ms, p90 {ms(total.p90_ms)} ms, "
        f"p99 {ms(total.p99_ms)} ms, max {ms(total.max_ms)} ms ({total.count} frames)"
    )
    labels = {
        "acquired_to_received": "moved in → the agent's receipt starts",
        "received_to_validated": "→ the server validated it (agent receipt, outbox, upload)",
        "validated_to_cached": "→ in the server's cache and catalog",
        "cached_to_archived": "→ archived at the server (copy, fsync, read back, hash)",
    }
    for name, stage in report.stages.items():
        print(f"{indent}  {labels.get(name, name):<58} {stage_line(stage)}")


def stage_line(stage: Percentiles) -> str:
    return f"p50 {ms(stage.p50_ms):>6} ms  p99 {ms(stage.p99_ms):>6} ms"


# ---------------------------------------------------------------- checks


def verify(agent: Path, server: Path, staged: list[Staged]) -> str:
    """The server archived each staged frame exactly once, with its bytes; the agent
    confirmed each; nothing quarantined; no partial upload left. A summary line."""
    expected = {f.name: f for f in staged}
    server_settings = load_settings(server)
    catalog = Catalog.open(server_settings.catalog_url, migrate=False)
    try:
        records = catalog.find(FileQuery())
    finally:
        catalog.close()
    names = [r.original_name for r in records]
    if len(records) != len(staged) or set(names) != set(expected):
        fail(f"the server holds {len(records)} files ({len(set(names))} names), "
             f"expected the {len(staged)} sent")  # fmt: skip
    storage = LocalStorage(server_settings.archive)
    for record in records:
        frame = expected[record.original_name]
        if record.state is not FileState.ARCHIVED or record.archive_path is None:
            fail(f"{frame.name} is {record.state.value} at the server, not archived")
        if record.sha256 != frame.sha256 or record.size != frame.size:
            fail(f"{frame.name}: the server's catalog has sha256 {record.sha256[:12]}…, "
                 f"{record.size} bytes; staged {frame.sha256[:12]}…, {frame.size}")  # fmt: skip
        if storage.sha256(record.archive_path) != frame.sha256:
            fail(f"{frame.name}: the archived copy's bytes are not the staged file's")
    agent_settings = load_settings(agent)
    catalog = Catalog.open(agent_settings.catalog_url, migrate=False)
    try:
        counts = catalog.counts()
    finally:
        catalog.close()
    if counts != {FileState.ARCHIVED: len(staged)}:
        shown = {state.value: n for state, n in counts.items()}
        fail(f"the agent's catalog says {shown}, expected {len(staged)} archived")
    for settings in (agent_settings, server_settings):
        left = [p for p in settings.quarantine.rglob("*") if p.is_file()]
        if left:
            fail(f"quarantined at {settings.site.name}: {sorted(p.name for p in left)[:5]}")
    uploads = server_settings.cache / ".uploads"
    parts = [p.name for p in uploads.rglob("*") if p.is_file()] if uploads.is_dir() else []
    if parts:
        fail(f"partial uploads left at the server: {parts[:5]}")
    return (
        f"{len(staged)} frames archived once at the server, each with the staged file's "
        f"sha256 (its archived copy read back), all confirmed at the agent"
    )


# ---------------------------------------------------------------- main


def workspace(given: Path | None) -> tuple[Path, str]:
    shm = Path("/dev/shm")
    tmp = given or (shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    root = Path(tempfile.mkdtemp(prefix="obsflow-transfer-", dir=tmp))
    where = (
        "/dev/shm, in memory"
        if root.parent == shm
        else "given by --tmp"
        if given
        else "no /dev/shm: the temporary directory"
    )
    return root, where


def show_floor(label: str, run: FloorRun, total: int, frames: int) -> None:
    print(
        f"    {label}: {mb_s(total, run.seconds):.0f} MB/s ({run.seconds:.2f} s); CPU per "
        f"frame: client {per_frame(run.client_cpu, frames)}, server "
        f"{per_frame(run.server_cpu, frames)}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def floors_both(paths: list[Path], root: Path, streams: int, when: str) -> list[FloorRun]:
    """The raw floor and the durable floor of ``paths``, shown: [raw, durable]."""
    runs = []
    for durable in (False, True):
        runs.append(floor(paths, root, streams, durable))
        show_floor(f"{'durable' if durable else 'raw'}, {when}", runs[-1], sum(
            p.stat().st_size for p in paths), len(paths))  # fmt: skip
    return runs


def sample_load(stop: threading.Event, seen: list[float]) -> None:
    """The 1-minute load average every second while the daemons run (the machine is shared)."""
    while not stop.wait(1.0):
        seen.append(os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 + 20 frames, to try it out")
    parser.add_argument("--frames", type=int, default=None, help="throughput frames (200)")
    parser.add_argument("--latency-frames", type=int, default=None, help="latency frames (50)")
    parser.add_argument("--rate", type=float, default=RATE, help="latency frames per second")
    parser.add_argument("--tmp", type=Path, default=None, help="where to work (default: /dev/shm)")
    parser.add_argument(
        "--workers", type=int, default=None,
        help="the agent's transfer.workers (default: obsflow's); the floors as many at once",
    )  # fmt: skip
    parser.add_argument(
        "--link-cache", action="store_true", help="the server with ingest.link_cache: true"
    )
    parser.add_argument("--serve-floor", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--durable", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor is not None:
        serve_floor(args.serve_floor, args.port, args.durable)
        return
    streams = args.workers or TransferSettings().workers
    agent_settings: dict[str, dict[str, object]] = {
        **AGENT_SETTINGS, "transfer": {"workers": streams}
    }  # fmt: skip
    server_settings: dict[str, dict[str, object]] = (
        {"ingest": {"link_cache": True}} if args.link_cache else SERVER_SETTINGS
    )
    count = args.frames or (QUICK_FRAMES if args.quick else FRAMES)
    slow = args.latency_frames or (QUICK_LATENCY_FRAMES if args.quick else LATENCY_FRAMES)
    if count < 1 or slow < 1 or args.rate <= 0 or count + slow > 9999:
        parser.error("--frames and --latency-frames must be 1 to 9999 in all, --rate above 0")

    began = time.perf_counter()
    print(f"{machine()}\n{load()} at the start")
    root, where = workspace(args.tmp)
    print(f"working in {root} ({where}): the staged frames, both sites, the daemons' logs")
    summary: list[str] = []
    try:
        start = time.perf_counter()
        bases = templates(root / "render")
        staged = stage(root / "staging", bases, 1, count)
        fresh = stage(root / "staging", bases, count + 1, slow)
        size = staged[0].size
        print(
            f"{count} + {slow} frames of {SHAPE[0]}×{SHAPE[1]} 16-bit ({size / 1e6:.1f} MB), "
            f"{TEMPLATES} rendered and the rest with other DATE-OBS, staged in "
            f"{time.perf_counter() - start:.1f} s (untimed)",
            flush=True,
        )
        total = sum(f.size for f in staged)
        paths = [f.path for f in staged]
        print(f"\nfloors: httpx PUT → uvicorn writing each body to a file (durable: and "
              f"fsyncing it and its directory), {streams} at once, {count} frames")  # fmt: skip
        floors = floors_both(paths, root, streams, "before the daemons")

        print(f"\nobsflow: agent transfer.workers {streams}, server "
              f"ingest.link_cache {args.link_cache}; measuring {SRC}")  # fmt: skip
        agent = make_site(root / "agent", agent_settings)
        server = make_site(root / "server", server_settings)
        loads: list[float] = []
        sampling = threading.Event()
        sampler = threading.Thread(target=sample_load, args=(sampling, loads), daemon=True)
        sampler.start()
        with daemons(agent, server) as (agent_daemon, server_daemon):
            catalogs = (
                Catalog.open(load_settings(agent).catalog_url, migrate=False),
                Catalog.open(load_settings(server).catalog_url, migrate=False),
            )
            try:
                print(f"\nobsflow, {count} frames moved in at once:", flush=True)
                busy = run_phase(staged, None, agent_daemon, server_daemon, catalogs)
                print(
                    f"    all archived at the server after {busy.seconds:.2f} s: "
                    f"{mb_s(busy.size, busy.seconds):.0f} MB/s; confirmed at the agent after "
                    f"{busy.confirmed:.2f} s (the moves took {1e3 * busy.written:.0f} ms)"
                )
                print(
                    f"    CPU per frame: agent {per_frame(busy.agent_cpu, count)}, server "
                    f"{per_frame(busy.server_cpu, count)} (the floor's client and server: "
                    f"{per_frame(floors[0].client_cpu, count)} and "
                    f"{per_frame(floors[0].server_cpu, count)})"
                )
                print("    latencies with the link saturated (a queue, as expected):")
                show_latency(busy.report, "      ")
                print(f"\nobsflow, {slow} frames at {args.rate:g}/s "
                      f"({args.rate * size / 1e6:.0f} MB/s, "
                      f"{args.rate * size / 1e6 / mb_s(busy.size, busy.seconds):.0%} of the "
                      f"throughput above):", flush=True)  # fmt: skip
                calm = run_phase(fresh, args.rate, agent_daemon, server_daemon, catalogs)
                print(f"    written over {calm.written:.1f} s ({slow / calm.written:.1f}/s), "
                      f"the last archived {calm.seconds - calm.written:.2f} s after")  # fmt: skip
                show_latency(calm.report)
            finally:
                for catalog in catalogs:
                    catalog.close()
        sampling.set()
        sampler.join()
        print("\nboth daemons stopped cleanly on SIGTERM", flush=True)
        checked = verify(agent, server, staged + fresh)
        print(f"verified: {checked}")
        moved = [load_settings(agent).incoming / f.name for f in staged]
        print("\nfloors, again:")
        floors += floors_both(moved, root, streams, "after the daemons")

        raws, durables = floors[0::2], floors[1::2]
        best = min(raws, key=lambda run: run.seconds)
        best_durable = min(durables, key=lambda run: run.seconds)
        obsflow_mb_s, floor_mb_s = mb_s(busy.size, busy.seconds), mb_s(total, best.seconds)
        durable_mb_s = mb_s(total, best_durable.seconds)
        ratio, durable_ratio = obsflow_mb_s / floor_mb_s, obsflow_mb_s / durable_mb_s
        p50, p99 = calm.report.total.p50_ms, calm.report.total.p99_ms
        spread = ", ".join(f"{mb_s(total, run.seconds):.0f}" for run in raws)
        durable_spread = ", ".join(f"{mb_s(total, run.seconds):.0f}" for run in durables)
        obsflow_cpu = None
        if busy.agent_cpu is not None and busy.server_cpu is not None:
            obsflow_cpu = busy.agent_cpu + busy.server_cpu
        floor_cpu = None if best.server_cpu is None else best.client_cpu + best.server_cpu
        durable_cpu = None
        if best_durable.server_cpu is not None:
            durable_cpu = best_durable.client_cpu + best_durable.server_cpu
        summary += [
            f"  {count} + {slow} frames of {size / 1e6:.1f} MB, agent → server on 127.0.0.1, "
            f"two processes, SQLite catalogs, on {where}",
            f"  load average while the daemons ran: {min(loads, default=0):.2f} to "
            f"{max(loads, default=0):.2f} (1 min)",
            f"  throughput, {count} frames at once:  obsflow {obsflow_mb_s:.0f} MB/s "
            f"({busy.seconds:.1f} s; agent transfer.workers {streams}, server "
            f"ingest.link_cache {args.link_cache})",
            f"    raw floor {floor_mb_s:.0f} MB/s (httpx → uvicorn, {streams} streams; runs "
            f"{spread} MB/s); durable floor {durable_mb_s:.0f} MB/s (and fsync; runs "
            f"{durable_spread} MB/s)",
            f"    ratio obsflow / raw floor {ratio:.2f}: {verdict(ratio >= RATIO_TARGET)}; "
            f"obsflow / durable floor {durable_ratio:.2f}: "
            f"{verdict(durable_ratio >= RATIO_TARGET)}; target ≥ {RATIO_TARGET:g}",
            f"    CPU per frame: obsflow {per_frame(obsflow_cpu, count)} (agent "
            f"{per_frame(busy.agent_cpu, count)}, server {per_frame(busy.server_cpu, count)}),"
            f" raw floor {per_frame(floor_cpu, count)}, durable floor "
            f"{per_frame(durable_cpu, count)}",
            f"  latency, {slow} frames at {args.rate:g}/s: acquired → archived p50 {ms(p50)} "
            f"ms, p99 {ms(p99)} ms, target p99 ≤ {P99_TARGET_MS:g} ms: "
            f"{verdict(p99 is not None and p99 <= P99_TARGET_MS)}",
            f"  {checked}",
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nsummary:\n  {machine()}\n  {load()} at the end")
    print("\n".join(summary))
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

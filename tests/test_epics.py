"""The EPICS trigger, IOC and live simulator: a real caproto IOC in a subprocess, real clients.

Every IOC serves on 127.0.0.1 at a free port, under a prefix of its own. The client side
(the trigger, caproto) finds it through the EPICS environment, which each test sets in
``os.environ`` (``EPICS_CA_ADDR_LIST=127.0.0.1``, ``EPICS_CA_AUTO_ADDR_LIST=NO``,
``EPICS_CA_SERVER_PORT=<port>``) before making a client; caproto reads it at every search.
A trigger's first search goes out at once; after a lost connection caproto searches again
at once, then after ~8 s, then every 5 s, which is what the restart test waits for.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from astropy.io import fits
from caproto import CaprotoError
from typer.testing import CliRunner

from obsflow.cli import app, load
from obsflow.registry.specs import EpicsTriggerSpec
from obsflow.sim.demo import free_port
from obsflow.sim.ioc import IocClient, PublishError
from obsflow.sim.live import frame_bytes, run_live, write_in_chunks
from obsflow.sim.simulate import night_frames, simulate_night
from obsflow.trigger.epics import EpicsTrigger
from tests.conftest import service_missing

STARTUP_SECONDS = 20.0  # an IOC subprocess has this long to say it serves


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def read_line(stream: IO[str], timeout: float) -> str:
    """The first line ``stream`` gives within ``timeout`` seconds ("" if none)."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


def server_env(port: int) -> dict[str, str]:
    """The environment for a process that serves on 127.0.0.1:port (no broadcasts)."""
    return {
        **os.environ,
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    }


class IocProcess:
    """``python -m obsflow.sim.ioc`` in a subprocess, which can be killed and started again."""

    def __init__(self, log: Path, *, heartbeat_seconds: float = 1.0) -> None:
        self.prefix = f"T{uuid.uuid4().hex[:8]}:"
        self.port = free_port()
        self.lastfile = f"{self.prefix}LASTFILE"
        self.heartbeat = f"{self.prefix}HEARTBEAT"
        self.heartbeat_seconds = heartbeat_seconds
        self.process: subprocess.Popen[str] | None = None
        self.log = log  # the IOC's standard error

    def start(self) -> None:
        argv = [sys.executable, "-m", "obsflow.sim.ioc", "--prefix", self.prefix]
        argv += ["--interfaces", "127.0.0.1", "--port", str(self.port)]
        argv += ["--heartbeat-seconds", str(self.heartbeat_seconds)]
        with open(self.log, "a") as stderr:
            self.process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=server_env(self.port)
            )
        assert self.process.stdout is not None
        line = read_line(self.process.stdout, STARTUP_SECONDS)
        if not line.startswith("obsflow.sim.ioc: serving"):
            self.kill()
            service_missing(
                f"the caproto IOC did not start: {line!r} {self.log.read_text()[-800:]}"
            )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None


@pytest.fixture
def make_ioc(tmp_path: Path) -> Iterator[Callable[..., IocProcess]]:
    """Start IOC subprocesses for one test; all are killed after it."""
    started: list[IocProcess] = []

    def make(**kwargs: Any) -> IocProcess:
        ioc = IocProcess(tmp_path / f"ioc{len(started)}.log", **kwargs)
        started.append(ioc)
        ioc.start()
        return ioc

    yield make
    for ioc in started:
        ioc.kill()


@pytest.fixture(scope="module")
def shared_ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IocProcess]:
    """One IOC for the tests that do not stop it."""
    ioc = IocProcess(tmp_path_factory.mktemp("ioc") / "ioc.log")
    try:
        ioc.start()
        yield ioc
    finally:
        ioc.kill()


def client_env(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """Point this process's Channel Access clients at 127.0.0.1:port (and nowhere else)."""
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(port))


@pytest.fixture
def ioc(shared_ioc: IocProcess, monkeypatch: pytest.MonkeyPatch) -> IocProcess:
    client_env(monkeypatch, shared_ioc.port)
    return shared_ioc


class Offers:
    """What a trigger offered, in order; thread-safe, as offer() must be."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: list[Path] = []

    def __call__(self, path: Path) -> None:
        with self._lock:
            self._paths.append(path)

    def all(self) -> list[Path]:
        with self._lock:
            return list(self._paths)

    def names(self, since: int = 0) -> list[str]:
        """Offered paths from the ``since``-th on, without the synchronisation markers."""
        return [str(p) for p in self.all()[since:] if not p.name.startswith("sync-")]

    def wait_for(self, path: Path, timeout: float) -> bool:
        return wait_until(lambda: path in self.all(), timeout)


@pytest.fixture
def triggers() -> Iterator[list[EpicsTrigger]]:
    """Triggers a test starts; all are stopped after it, even on failure."""
    made: list[EpicsTrigger] = []
    yield made
    for trigger in made:
        trigger.stop()


@pytest.fixture
def client(ioc: IocProcess) -> Iterator[IocClient]:
    """A client publishing on the shared IOC, as the instrument's software would."""
    try:
        publisher = IocClient(ioc.prefix)
    except PublishError as exc:
        service_missing(f"cannot reach the caproto IOC: {exc}")
    yield publisher
    publisher.close()


def start_trigger(
    triggers: list[EpicsTrigger],
    ioc: IocProcess,
    directory: Path,
    *,
    heartbeat: bool = False,
    context: Any = None,
    **spec: Any,
) -> tuple[EpicsTrigger, Offers]:
    heartbeat_pv = ioc.heartbeat if heartbeat else None
    trigger = EpicsTrigger(
        EpicsTriggerSpec(kind="epics", pv=ioc.lastfile, heartbeat_pv=heartbeat_pv, **spec),
        directory,
        context=context,
    )
    offers = Offers()
    triggers.append(trigger)
    trigger.start(offers)
    return trigger, offers


def synchronise(offers: Offers, publish: Callable[[str], None], directory: Path) -> int:
    """Publish a marker until the trigger offers it: from then on its subscription is live
    (the value it is sent on connecting is behind us). Returns how many offers came before."""
    marker = f"sync-{uuid.uuid4().hex}.fits"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        publish(marker)
        if offers.wait_for(directory / marker, 0.3):
            return len(offers.all())
    pytest.fail(f"the trigger never offered {marker}")


# ---------------------------------------------------------------- the trigger


def test_an_update_offers_absolute_names_as_given_and_relative_ones_under_the_directory(
    ioc: IocProcess, client: IocClient, triggers: list[EpicsTrigger], tmp_path: Path
) -> None:
    trigger, offers = start_trigger(triggers, ioc, tmp_path / "incoming")
    start = synchronise(offers, client.publish, tmp_path / "incoming")
    assert trigger.name == f"epics:{ioc.lastfile}"
    assert trigger.health().ok, trigger.health()
    absolute = "/data/night/ofc_20261122_0001.fits"
    relative = "sub/ofc_20261122_0002.fits"
    unicode = "nuit_été_0003.fits"  # UTF-8 on the wire, a CHAR array of bytes
    long = "/" + "d" * 900 + "/ofc_20261122_0004.fits"  # more than a DBR_STRING's 40
    for name in (absolute, relative, unicode, long):
        client.publish(name)
    expected = [
        absolute,
        str(tmp_path / "incoming" / relative),
        str(tmp_path / "incoming" / unicode),
        long,
    ]
    assert wait_until(lambda: offers.names(start) == expected, 5), offers.names(start)
    with pytest.raises(ValueError, match="1 to 1024"):
        client.publish("x" * 1025)
    with pytest.raises(ValueError, match="1 to 1024"):
        client.publish("")


def test_each_name_published_three_times_is_offered_and_nothing_else(
    ioc: IocProcess, client: IocClient, triggers: list[EpicsTrigger], tmp_path: Path
) -> None:
    _, offers = start_trigger(triggers, ioc, tmp_path)
    start = synchronise(offers, client.publish, tmp_path)
    names = [f"/data/ofc_20261122_{n:04d}.fits" for n in range(1, 6)]
    for name in names:
        for _ in range(3):
            client.publish(name)
    client.publish("/data/last.fits")
    assert wait_until(lambda: "/data/last.fits" in offers.names(start), 5)
    offered = offers.names(start)
    assert set(offered) == {*names, "/data/last.fits"}
    for name in names:  # duplicates pass through; Channel Access may coalesce, never invent
        assert 1 <= offered.count(name) <= 3, (name, offered)
    assert offered == sorted(offered, key=[*names, "/data/last.fits"].index)  # in order


def test_stop_removes_every_callback_and_offers_nothing_more(
    ioc: IocProcess, client: IocClient, triggers: list[EpicsTrigger], tmp_path: Path
) -> None:
    from caproto.threading.client import Context

    shared = Context()  # one caller-owned context for two triggers: stop() must leave it open
    try:
        kept, kept_offers = start_trigger(triggers, ioc, tmp_path, context=shared)
        stopped, stopped_offers = start_trigger(triggers, ioc, tmp_path, context=shared)
        own, own_offers = start_trigger(triggers, ioc, tmp_path)  # with a context of its own
        for offers in (kept_offers, stopped_offers, own_offers):
            synchronise(offers, client.publish, tmp_path)
        stopped.stop()
        own.stop()
        before = (len(stopped_offers.all()), len(own_offers.all()))
        for n in range(5):
            client.publish(f"/data/after_stop_{n}.fits")
        assert kept_offers.wait_for(Path("/data/after_stop_4.fits"), 5)
        time.sleep(0.3)
        assert (len(stopped_offers.all()), len(own_offers.all())) == before
        assert not stopped.health().ok and "stopped" in stopped.health().detail
        stopped.stop()  # idempotent
        with pytest.raises(RuntimeError, match="starts once"):
            stopped.start(stopped_offers)
        assert kept.health().ok
        kept.stop()
    finally:
        shared.disconnect()


def test_a_failing_offer_is_logged_and_the_monitor_goes_on(
    ioc: IocProcess,
    client: IocClient,
    triggers: list[EpicsTrigger],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    offers = Offers()

    def offer(path: Path) -> None:
        offers(path)
        if path.name == "bad.fits":
            raise OSError("receipt queue unavailable")

    trigger = EpicsTrigger(EpicsTriggerSpec(kind="epics", pv=ioc.lastfile), tmp_path)
    triggers.append(trigger)
    trigger.start(offer)
    synchronise(offers, client.publish, tmp_path)
    client.publish("bad.fits")
    client.publish("good.fits")
    assert offers.wait_for(tmp_path / "good.fits", 5)
    assert "offering" in caplog.text and "bad.fits" in caplog.text


def test_without_its_ioc_a_trigger_is_an_alarm_and_still_stops_at_once(
    triggers: list[EpicsTrigger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_env(monkeypatch, free_port())  # nobody serves there: the PVs stay searching
    spec = EpicsTriggerSpec(kind="epics", pv="NOBODY:LASTFILE", heartbeat_pv="NOBODY:HB")
    trigger = EpicsTrigger(spec, tmp_path)
    assert not trigger.health().ok and "new" in trigger.health().detail
    trigger.start(Offers())
    time.sleep(0.2)  # a search or two goes out
    health = trigger.health()
    assert not health.ok and "not connected to NOBODY:LASTFILE for" in health.detail
    started = time.monotonic()
    trigger.stop()  # while caproto searches: no thread may die of the closed socket
    assert time.monotonic() - started < 2
    assert "stopped" in trigger.health().detail


def test_a_trigger_that_cannot_start_says_why_and_holds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", "not-a-port")
    trigger = EpicsTrigger(EpicsTriggerSpec(kind="epics", pv="X:LASTFILE"), tmp_path)
    with pytest.raises(CaprotoError, match="EPICS_CA_SERVER_PORT"):
        trigger.start(Offers())
    assert not trigger.health().ok and "stopped" in trigger.health().detail
    trigger.stop()


@pytest.mark.slow
def test_offers_resume_after_the_ioc_is_killed_and_restarted(
    make_ioc: Callable[..., IocProcess],
    triggers: list[EpicsTrigger],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ioc = make_ioc()
    client_env(monkeypatch, ioc.port)
    trigger, offers = start_trigger(triggers, ioc, tmp_path)
    publisher = IocClient(ioc.prefix)
    synchronise(offers, publisher.publish, tmp_path)
    publisher.publish("/data/before.fits")
    assert offers.wait_for(Path("/data/before.fits"), 5)
    publisher.close()

    ioc.kill()
    assert wait_until(lambda: not trigger.health().ok, 5), trigger.health()
    assert "not connected" in trigger.health().detail
    ioc.start()  # the same prefix and port, a new process
    publisher = IocClient(ioc.prefix)
    try:
        # published while the trigger may still be searching: it is the current value the
        # trigger is sent when it reconnects (caproto's search back-off: ~8 s)
        publisher.publish("/data/after_restart.fits")
        assert offers.wait_for(Path("/data/after_restart.fits"), 15), offers.all()
        assert trigger.health().ok, trigger.health()
        publisher.publish("/data/later.fits")  # and the monitor is live again
        assert offers.wait_for(Path("/data/later.fits"), 5)
    finally:
        publisher.close()
    assert "/data/before.fits" in offers.names()


def test_health_follows_the_heartbeat_and_the_connection(
    make_ioc: Callable[..., IocProcess],
    triggers: list[EpicsTrigger],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ioc = make_ioc(heartbeat_seconds=0.2)
    client_env(monkeypatch, ioc.port)
    trigger, _ = start_trigger(triggers, ioc, tmp_path, heartbeat=True, heartbeat_stale_seconds=2)
    assert wait_until(lambda: trigger.health().ok, 10), trigger.health()
    assert "heartbeat" in trigger.health().detail
    time.sleep(0.6)  # the heartbeat keeps changing: still fresh
    assert trigger.health().ok, trigger.health()

    ioc.kill()
    assert wait_until(lambda: not trigger.health().ok, 5), trigger.health()
    assert "not connected" in trigger.health().detail


def test_a_heartbeat_that_stops_changing_is_an_alarm_with_its_age(
    make_ioc: Callable[..., IocProcess],
    triggers: list[EpicsTrigger],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ioc = make_ioc(heartbeat_seconds=3600)  # connected, but the counter never moves
    client_env(monkeypatch, ioc.port)
    now = [1000.0]
    trigger = EpicsTrigger(
        EpicsTriggerSpec(
            kind="epics", pv=ioc.lastfile, heartbeat_pv=ioc.heartbeat, heartbeat_stale_seconds=30
        ),
        tmp_path,
        clock=lambda: now[0],
    )
    triggers.append(trigger)
    trigger.start(Offers())
    assert wait_until(lambda: trigger.health().ok, 10), trigger.health()  # its first value
    now[0] += 29
    assert trigger.health().ok
    now[0] += 2
    health = trigger.health()
    assert not health.ok
    assert f"heartbeat {ioc.heartbeat} stale" in health.detail and "31.0 s" in health.detail


# ---------------------------------------------------------------- the live simulator


def test_frames_are_written_in_pieces_and_end_complete(tmp_path: Path) -> None:
    (frame, data, header), *_ = night_frames(tmp_path, 1, shape=(128, 128))
    payload = frame_bytes(data, header)
    sizes: set[int] = set()
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            if frame.path.exists():
                sizes.add(frame.path.stat().st_size)
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        write_in_chunks(frame.path, payload, chunks=8, seconds=0.4)
    finally:
        done.set()
        poller.join()
    assert any(0 < size < len(payload) for size in sizes), sizes  # a reader saw it partial
    assert frame.path.read_bytes() == payload
    with fits.open(frame.path) as hdul:
        hdul.verify("exception")
        assert hdul[0].data.shape == (128, 128)


def test_run_live_publishes_each_frame_once_it_is_complete(tmp_path: Path) -> None:
    published: list[str] = []

    class CheckingPublisher:
        def publish(self, name: str) -> None:
            with fits.open(name) as hdul:  # complete and valid when announced
                hdul.verify("exception")
                assert hdul[0].data is not None
            published.append(name)
            if len(published) == 3:  # the first of frame 2's two
                raise PublishError("the IOC went away")

    started = time.monotonic()
    written = run_live(
        tmp_path / "out", 4, cadence=0.1, publisher=CheckingPublisher(), duplicates=2, seed=3,
        shape=(32, 32),
    )  # fmt: skip
    assert time.monotonic() - started >= 0.3  # the cadence was kept
    names = [str(f.path) for f in written]
    assert all(Path(n).is_absolute() for n in names)
    # a failed publish is logged, the rest of that frame's duplicates skipped, the night goes on
    assert published == [names[0], names[0], names[1], names[2], names[2], names[3], names[3]]
    reference = simulate_night(tmp_path / "ref", 4, seed=3, shape=(32, 32))
    for live, ref in zip(written, reference, strict=True):
        assert live.path.read_bytes() == ref.path.read_bytes()
    assert (tmp_path / "out" / "injected_stars.ecsv").exists()


def simulate(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "obsflow", "simulate", *map(str, args)],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=env,
    )


def assert_same_night(out: Path, reference: Path, frames: int) -> list[str]:
    """``out`` holds exactly the frames simulate_night writes, byte for byte."""
    expected = simulate_night(reference, frames, shape=(64, 64))
    names = sorted(p.name for p in out.glob("*.fits"))
    assert names == [f.path.name for f in expected]
    for frame in expected:
        assert (out / frame.path.name).read_bytes() == frame.path.read_bytes()
        with fits.open(out / frame.path.name) as hdul:
            hdul.verify("exception")
    return [str((out / f.path.name).absolute()) for f in expected]


@pytest.mark.parametrize(("duplicates", "publish"), [(1, True), (2, True), (1, False)])
def test_simulate_epics_announces_on_a_running_ioc(
    ioc: IocProcess,
    client: IocClient,
    triggers: list[EpicsTrigger],
    tmp_path: Path,
    duplicates: int,
    publish: bool,
) -> None:
    _, offers = start_trigger(triggers, ioc, tmp_path)
    start = synchronise(offers, client.publish, tmp_path)
    out = tmp_path / "out"
    flags = ["--duplicates", duplicates] if duplicates > 1 else []
    flags += [] if publish else ["--no-publish"]
    result = simulate(
        "--epics", "--pv-prefix", ioc.prefix, "--frames", 3, "--cadence", 0.2, "--size", 64,
        "--out", out, *flags,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = assert_same_night(out, tmp_path / "ref", 3)
    client.publish("/data/end.fits")  # everything the simulator published came before this
    assert offers.wait_for(Path("/data/end.fits"), 5)
    offered = offers.names(start)[:-1]
    assert offered == ([p for p in paths for _ in range(duplicates)] if publish else [])


@pytest.mark.slow
def test_simulate_epics_without_an_ioc_fails_before_writing(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "EPICS_CA_ADDR_LIST": "127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST": "NO"}
    env["EPICS_CA_SERVER_PORT"] = str(port)
    result = simulate("--epics", "--pv-prefix", "NOBODY:", "--out", tmp_path, env=env)
    assert result.returncode == 1
    assert "no IOC answers for NOBODY:LASTFILE" in result.stderr
    assert not list(tmp_path.glob("*.fits"))


def test_simulate_options_that_need_epics_or_a_cadence_are_refused(tmp_path: Path) -> None:
    cases: list[tuple[list[object], str]] = [
        (["--duplicates", 2], "--duplicates goes with --epics"),
        (["--cadence", 0.1, "--pv-prefix", "X:"], "--pv-prefix goes with --epics"),
        (["--no-publish"], "--no-publish goes with --cadence or --epics"),
    ]
    load("simulate")  # (obsflow's main registers only the command it runs)
    for args, message in cases:
        result = CliRunner().invoke(app, ["simulate", *map(str, args), "--out", str(tmp_path)])
        assert result.exit_code == 2
        assert message in result.output
    assert not list(tmp_path.iterdir())


def test_simulate_epics_serves_its_own_ioc(
    triggers: list[EpicsTrigger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "obsflow", "simulate", "--epics", "--frames", "3"]
    argv += ["--cadence", "0.2", "--size", "64", "--wait-listener", "20", "--out", str(out)]
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(port),
    )
    try:
        assert process.stdout is not None
        line = read_line(process.stdout, STARTUP_SECONDS)
        if not line.startswith("obsflow.sim.ioc: serving OFCAM:LASTFILE"):
            process.kill()
            service_missing(f"simulate --epics did not start its IOC: {line!r}")
        client_env(monkeypatch, port)
        spec = EpicsTriggerSpec(kind="epics", pv="OFCAM:LASTFILE", heartbeat_pv="OFCAM:HEARTBEAT")
        trigger, offers = EpicsTrigger(spec, tmp_path), Offers()
        triggers.append(trigger)
        trigger.start(offers)
        stdout, stderr = process.communicate(timeout=60)  # it waited for the trigger
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert "wrote 3 frame(s)" in stdout and "announced on OFCAM:LASTFILE" in stdout
    paths = assert_same_night(out, tmp_path / "ref", 3)
    assert wait_until(lambda: offers.names() == paths, 5), offers.names()
    assert wait_until(lambda: not trigger.health().ok, 5)  # the IOC ended with the command

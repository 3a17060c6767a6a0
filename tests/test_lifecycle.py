"""The run lifecycle: inputs pinned while a run lives, each queued run handed to the
executor once, a lost lease stops the steps; on SQLite and PostgreSQL, with real
subprocess steps.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest

from obsflow.catalog.records import FileQuery
from obsflow.catalog.runs import RunStore
from obsflow.processing.executor import Executor, InlineExecutor, LocalExecutor
from obsflow.processing.lifecycle import Heartbeat, RunHost, execute_run
from obsflow.processing.sitehost import SiteHost
from obsflow.processing.tracker import Tracker
from obsflow.processing.tracker.loop import TrackerLoop, process_until_idle
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import RunState, StepState
from tests.conftest import SiteFactory
from tests.test_processing import STACK

# The bias pipeline, whose first step waits for a file the test writes into its work
# directory: the test acts while the run is in flight.
WAITING = f"""
pipelines:
  - id: toy_bias
    profile: stack_bias
    inputs:
      - {{product: ofcam_raw, name: biases, where: "frame_type == 'BIAS'", min: 1}}
    group: {{by: [night]}}
    outputs:
      - {{product: ofcam_masterbias, name: "ofc_{{nightid}}_mbias.fits"}}
profiles:
  - id: stack_bias
    steps:
      - name: wait
        command: [sh, -c, "touch {{work}}/waiting; while [ ! -e {{work}}/go ]; do sleep 0.05; done"]
        timeout: 60
      - name: stack
        needs: [wait]
        command: ["{{python}}", "{STACK}", --imagetyp, MASTERBIAS,
                  --out, "{{outputs.ofcam_masterbias}}", "{{inputs.biases}}"]
"""


@pytest.fixture
def waiting_site(make_site: SiteFactory, frames: list[Path]) -> Iterator[Site]:
    settings = make_site(processing={"lease_seconds": 1.5})
    (settings.registry / "ofcam_pipelines.yaml").write_text(WAITING)
    site = open_site(settings)
    summary = ingest_paths(site, frames)
    assert len(summary.ingest.archived) == len(frames)
    yield site
    site.close()


def _wait_for(path: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _in_background(site: Site, run_id: int, owner: str) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def execute() -> None:
        settings = site.settings.processing
        result.append(execute_run(SiteHost(site), run_id, owner, processing=settings))

    thread = threading.Thread(target=execute)
    thread.start()
    return thread, result


def test_a_running_run_pins_its_inputs_against_a_trim(waiting_site: Site) -> None:
    site = waiting_site
    (run,) = Tracker(site.registry, site.catalog, site.clock).drain()
    record = RunStore(site.catalog).get(run.run_id)
    assert record is not None
    biases = [i for ids in record.inputs.values() for i in ids]
    thread, result = _in_background(site, run.run_id, "test-worker")
    work = site.settings.work / f"run-{run.run_id}"
    _wait_for(work / "waiting")
    site.retriever().trim(0)  # the operator empties the cache while the run reads
    kept = site.catalog.records(biases)
    assert kept and all(not r.virtual for r in kept)
    assert all(site.cache.path(r.cache_path or "").is_file() for r in kept)
    # every other archived file went: the trim did work
    others = [r for r in site.catalog.find(FileQuery(product="ofcam_raw")) if r.id not in biases]
    assert others and all(r.virtual for r in others)
    (work / "go").touch()
    thread.join(60)
    assert result == [RunState.SUCCEEDED]
    # the run is over: its pins are gone, and its inputs may leave the cache now
    site.retriever().trim(0)
    assert all(r.virtual for r in site.catalog.records(biases))


def test_a_run_whose_lease_is_lost_stops_its_steps_and_publishes_nothing(
    waiting_site: Site,
) -> None:
    site = waiting_site
    (run,) = Tracker(site.registry, site.catalog, site.clock).drain()
    runs = RunStore(site.catalog)
    thread, result = _in_background(site, run.run_id, "slow-worker")
    _wait_for(site.settings.work / f"run-{run.run_id}" / "waiting")
    # its lease taken over, as after an expiry and another worker's claim
    later = site.clock() + timedelta(hours=1)
    assert runs.recover(later, max_attempts=5) == ([run.run_id], [])
    assert runs.claim(run.run_id, "other-worker", later, 3600) is not None
    thread.join(30)  # the heartbeat sees the loss within a third of a lease: steps killed
    assert not thread.is_alive() and result == [None]
    assert runs.outputs(run.run_id) == []
    assert runs.get(run.run_id).state is RunState.RUNNING  # type: ignore[union-attr]


class Recording(Executor):
    """An executor that only notes what it is given (the documented seam)."""

    def __init__(self, durable: bool) -> None:
        self.durable = durable
        self.given: list[tuple[int, str | None]] = []

    def submit(self, run_id: int, queue: str | None = None) -> None:
        self.given.append((run_id, queue))

    def close(self, stop: bool = False) -> None:
        return None

    @property
    def in_flight(self) -> int:
        return 0


@pytest.mark.parametrize("durable", [True, False], ids=["broker", "pool"])
def test_each_queued_run_is_handed_to_the_executor_once(waiting_site: Site, durable: bool) -> None:
    site = waiting_site
    executor = Recording(durable)
    loop = TrackerLoop(site, executor)
    loop.recover()
    for _ in range(5):
        loop.once()
    runs = RunStore(site.catalog)
    queued = runs.queued()
    assert len(queued) == 1
    assert executor.given == [(queued[0], site.settings.processing.queue)]
    # a worker claims it and dies: once its lease expires, it is handed over once more
    assert runs.claim(queued[0], "dead", site.clock() - timedelta(hours=1), 1.0)
    loop.recover()
    for _ in range(3):
        loop.once()
    assert executor.given == [(queued[0], "obsflow")] * 2
    # a new daemon: a broker still holds the run; a pool died with the last daemon
    again = Recording(durable)
    TrackerLoop(site, again).recover()
    assert again.given == ([] if durable else [(queued[0], "obsflow")])


def test_a_pipeline_names_the_queue_its_runs_go_to(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    settings = make_site()
    text = WAITING.replace("    profile: stack_bias\n", "    profile: stack_bias\n    queue: gpu\n")
    (settings.registry / "ofcam_pipelines.yaml").write_text(text)
    site = open_site(settings)
    try:
        ingest_paths(site, frames)
        executor = Recording(durable=True)
        loop = TrackerLoop(site, executor)
        loop.recover()
        loop.once()
        assert [queue for _, queue in executor.given] == ["gpu"]
    finally:
        site.close()


def test_the_inline_executor_runs_the_lifecycle_to_the_end(waiting_site: Site) -> None:
    site = waiting_site
    (run,) = Tracker(site.registry, site.catalog, site.clock).drain()
    work = site.settings.work / f"run-{run.run_id}"
    work.mkdir(parents=True)
    done = threading.Event()

    def release_when_waiting() -> None:
        _wait_for(work / "waiting")
        (work / "go").touch()
        done.set()

    helper = threading.Thread(target=release_when_waiting)
    helper.start()
    InlineExecutor(site).submit(run.run_id)
    helper.join(30)
    assert done.is_set()
    record = RunStore(site.catalog).get(run.run_id)
    assert record is not None and record.state is RunState.SUCCEEDED
    assert len(RunStore(site.catalog).outputs(run.run_id)) == 1
    assert not work.exists()  # a successful run's work directory is removed


def test_a_long_step_is_shown_running_and_its_lease_renewed_until_it_ends(
    waiting_site: Site,
) -> None:
    """Short steps are written once, with the run's end; one that lasts is written as
    running within a second, with the run-time profile, and the run keeps its lease for
    as long as it runs (here over two lease lengths of 1.5 s)."""
    site = waiting_site
    (run,) = Tracker(site.registry, site.catalog, site.clock).drain()
    runs = RunStore(site.catalog)
    thread, result = _in_background(site, run.run_id, "patient-worker")
    work = site.settings.work / f"run-{run.run_id}"
    _wait_for(work / "waiting")
    deadline = time.monotonic() + 5
    while not (shown := runs.steps(run.run_id)):
        assert time.monotonic() < deadline, "the running step was never written"
        time.sleep(0.05)
    assert [(s.step, s.state) for s in shown] == [("wait", StepState.RUNNING)]
    record = runs.get(run.run_id)
    assert record is not None and record.profile and record.work_dir == str(work)
    time.sleep(3.2)  # past two lease lengths: only the heartbeat keeps the run its own
    assert runs.recover(site.clock(), max_attempts=5) == ([], [])
    (work / "go").touch()
    thread.join(60)
    assert result == [RunState.SUCCEEDED]
    done = runs.steps(run.run_id)
    assert [(s.step, s.state) for s in done] == [
        ("wait", StepState.SUCCEEDED),
        ("stack", StepState.SUCCEEDED),
    ]


class _RenewingHost:
    """Just what a heartbeat asks of its host: the lease's length, and renewals."""

    lease_seconds = 0.3

    def __init__(self) -> None:
        self.renewed: list[int] = []

    def renew(self, run_id: int, owner: str) -> bool:
        self.renewed.append(run_id)
        return True


def test_a_lease_is_renewed_after_many_runs_that_never_woke_the_heartbeat_thread() -> None:
    """The heartbeat thread is woken only for what falls due before it would look
    anyway; runs shorter than a beat's interval come and go without waking it, and the
    run after them is still renewed every third of its lease."""
    host = _RenewingHost()
    for run_id in range(300):
        with Heartbeat(cast(RunHost, host), run_id, "busy-worker"):
            pass
    with Heartbeat(cast(RunHost, host), 1000, "busy-worker") as beat:
        time.sleep(0.45)  # four intervals of 0.1 s
    assert host.renewed.count(1000) >= 2
    assert set(host.renewed) == {1000}
    assert not beat.lost.is_set()


PRIORITY = """
pipelines:
  - id: toy_priority
    profile: show_priority
    inputs:
      - {product: ofcam_raw, name: biases, where: "frame_type == 'BIAS'", min: 1}
    group: {by: [night]}
profiles:
  - id: show_priority
    steps:
      - name: show
        command: [sh, -c, "nice > {work}/nice.txt; ionice -p $$ > {work}/ionice.txt"]
"""


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_runs_execute_at_the_lower_cpu_and_io_priority_the_settings_give(
    make_site: SiteFactory, frames: list[Path]
) -> None:
    """The local pool's processes (and so every step) run niced and at idle I/O
    priority, while the daemon's own process (here, the test's) keeps its priority."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    settings = make_site(processing={"nice": mine + 7, "ionice": "idle", "keep_work": True})
    (settings.registry / "ofcam_pipelines.yaml").write_text(PRIORITY)
    site = open_site(settings)
    try:
        ingest_paths(site, frames)
        executor = LocalExecutor(site)
        try:
            assert process_until_idle(site, executor, timeout=120)
        finally:
            executor.close()
        (run,) = RunStore(site.catalog).find()
        assert run.state is RunState.SUCCEEDED, run.error
        work = Path(run.work_dir or "")
        assert (work / "nice.txt").read_text().strip() == str(mine + 7)
        assert (work / "ionice.txt").read_text().strip() == "idle"
        assert os.getpriority(os.PRIO_PROCESS, 0) == mine
    finally:
        site.close()

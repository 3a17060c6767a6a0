"""The local executor's batches: a worker process is handed a few runs at once and writes
each run's end with its successor's claim in one transaction; a claim another worker won
is skipped, a long run or a stop ends the batch and hands the rest back unclaimed. On
SQLite and PostgreSQL, with real subprocess steps and a real process pool.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from obsflow.catalog.runs import RunStore
from obsflow.processing.executor import SHORT_RUN, BatchDone, LocalExecutor, execute_batch
from obsflow.processing.sitehost import SiteHost
from obsflow.processing.warm import uses_tools
from obsflow.registry import load_registry
from obsflow.site import Site, open_site
from obsflow.states import RunState, StepState
from tests.conftest import SiteFactory
from tests.test_sitehost import TRUE, queued_runs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "registry"

# one step that outlasts a batch's short run; one that waits for a file the test writes
SLOW = TRUE.replace('command: ["true"]', f'command: [sleep, "{SHORT_RUN + 0.2}"]')
LEAVES = TRUE.replace('command: ["true"]', 'command: [touch, "{work}/left.txt"]')
WAITING = TRUE.replace(
    'command: ["true"]',
    'command: [sh, -c, "touch {work}/waiting; while [ ! -e {work}/go ]; do sleep 0.05; done"]',
)


def site_with(make_site: SiteFactory, pipelines: str) -> Site:
    settings = make_site(processing={"lease_seconds": 60})
    (settings.registry / "ofcam_pipelines.yaml").write_text(pipelines)
    return open_site(settings)


@pytest.fixture
def true_site(make_site: SiteFactory) -> Iterator[Site]:
    site = site_with(make_site, TRUE)
    yield site
    site.close()


def batch(site: Site, run_ids: list[int], stop: threading.Event | None = None) -> BatchDone:
    return execute_batch(
        SiteHost(site), run_ids, "batcher", processing=site.settings.processing, stop=stop
    )


def test_a_batch_books_each_end_with_the_next_claim(true_site: Site) -> None:
    """Each run after the first was claimed in the transaction that wrote its
    predecessor's end: the two moments are one."""
    site = true_site
    run_ids = queued_runs(site, 4)
    done = batch(site, run_ids)
    assert done == BatchDone(tuple((r, RunState.SUCCEEDED) for r in run_ids))
    runs = RunStore(site.catalog)
    records = runs.find(run_ids=run_ids)
    assert [r.state for r in records] == [RunState.SUCCEEDED] * 4
    assert all(r.attempts == 1 for r in records)
    for before, after in itertools.pairwise(records):
        assert after.started == before.finished
    for run_id in run_ids:
        assert [(s.step, s.state) for s in runs.steps(run_id)] == [("run", StepState.SUCCEEDED)]


def test_a_claim_lost_to_another_worker_inside_a_batch_is_skipped(true_site: Site) -> None:
    site = true_site
    first, taken, last = queued_runs(site, 3)
    assert SiteHost(site).claim(taken, "other-worker") is not None
    done = batch(site, [first, taken, last])
    assert done.states == (
        (first, RunState.SUCCEEDED),
        (taken, None),
        (last, RunState.SUCCEEDED),
    )
    record = RunStore(site.catalog).get(taken)
    assert record is not None and record.state is RunState.RUNNING
    assert RunStore(site.catalog).holds(taken, "other-worker", site.clock())


def test_a_long_run_ends_its_batch_and_hands_the_rest_back_unclaimed(
    make_site: SiteFactory,
) -> None:
    site = site_with(make_site, SLOW)
    try:
        slow, *rest = queued_runs(site, 3)
        done = batch(site, [slow, *rest])
        assert done.states == ((slow, RunState.SUCCEEDED),)
        assert done.left == tuple(rest)
        records = RunStore(site.catalog).find(run_ids=rest)
        assert [(r.state, r.attempts) for r in records] == [(RunState.QUEUED, 0)] * 2
    finally:
        site.close()


def test_a_stop_releases_the_run_in_flight_and_hands_the_rest_back(
    make_site: SiteFactory,
) -> None:
    site = site_with(make_site, WAITING)
    try:
        first, second = queued_runs(site, 2)
        stop = threading.Event()

        def stop_when_waiting() -> None:
            waiting = site.settings.work / f"run-{first}" / "waiting"
            deadline = time.monotonic() + 30
            while not waiting.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            stop.set()

        helper = threading.Thread(target=stop_when_waiting)
        helper.start()
        done = batch(site, [first, second], stop)
        helper.join()
        assert done.states == ((first, RunState.QUEUED),)
        assert done.left == (second,)
        records = RunStore(site.catalog).find(run_ids=[first, second])
        assert [(r.state, r.attempts) for r in records] == [(RunState.QUEUED, 0)] * 2
    finally:
        site.close()


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_the_local_pool_executes_many_short_runs_in_batches(true_site: Site) -> None:
    """Every run submitted succeeds once; most were claimed in the transaction that
    ended another (a worker's batch), and the daemon is woken when they end."""
    site = true_site
    run_ids = queued_runs(site, 40)
    woken = threading.Event()
    executor = LocalExecutor(site, on_done=woken)
    try:
        for run_id in run_ids:
            executor.submit(run_id)
            executor.submit(run_id)  # twice: harmless
        assert woken.wait(60)
        # the registry's steps are no Python tools: its workers start no warm zygote
        assert warm_zygotes() == []
        executor.close()  # waits for every run submitted
    finally:
        executor.close()
    assert executor.in_flight == 0 and woken.is_set()
    records = RunStore(site.catalog).find(run_ids=run_ids)
    assert [(r.state, r.attempts) for r in records] == [(RunState.SUCCEEDED, 1)] * 40
    ends = {r.finished for r in records}
    booked_with_an_end = [r for r in records if r.started in ends]
    assert len(booked_with_an_end) >= len(run_ids) // 2


def warm_zygotes() -> list[psutil.Process]:
    """This process's descendants that are warm step runners' zygotes."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "obsflow.processing.zygote" in process.cmdline():
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_zygote_starts_with_a_worker_only_where_steps_are_python_tools(true_site: Site) -> None:
    assert uses_tools(load_registry(EXAMPLES))  # its steps are {python} -m obsflow.tools...
    assert not uses_tools(true_site.registry)
    assert not uses_tools(None)  # a worker over HTTP: its first Python step starts it


def test_a_work_directory_with_files_left_in_it_is_removed(make_site: SiteFactory) -> None:
    site = site_with(make_site, LEAVES)
    try:
        (run_id,) = queued_runs(site, 1)
        done = batch(site, [run_id])
        assert done.states == ((run_id, RunState.SUCCEEDED),)
        assert not (site.settings.work / f"run-{run_id}").exists()
    finally:
        site.close()

"""On-demand reductions on a real Celery worker (Redis broker): the runs a reduction plans
(the archive's missing calibrations, then the user's own run) execute in an
``obsflow worker`` subprocess with shared storage, its results come back to the
requester, and an abort kills the step running on the worker.

The world (registry, frames, tokens, API server) is test_reductions'; the daemon's part
(the tracker's loop, which also follows reductions, and the ingestor) runs in threads of
the test, handing runs to a :class:`~obsflow.processing.celery.CeleryExecutor`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from obsflow.catalog.runs import RunStore
from obsflow.states import RunState
from tests.conftest import SiteFactory
from tests.test_celery import WHO, Broker, Daemon, Workers, broker, sections, workers
from tests.test_daemon import wait_for
from tests.test_reductions import World, _alive, ask, make_world

__all__ = ["broker", "workers"]  # the fixtures, used by name

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True),
    pytest.mark.parametrize("broker", ["redis"], indirect=True),
]


@pytest.fixture
def celery_world(
    make_site: SiteFactory, frames: list[Path], broker: Broker, workers: Workers
) -> Iterator[World]:
    for world in make_world(make_site, frames, **sections(broker, lease_seconds=3)):
        workers.start(world.site.settings, "far")
        workers.wait_ready()
        yield world


def test_a_cold_reduction_runs_on_a_celery_worker(celery_world: World) -> None:
    world = celery_world
    frame = world.science[0].archive_id
    with Daemon(world.site), world.client("alice") as alice:
        response = ask(alice, [frame], label="CATALOG")
        assert response.status_code == 202, response.text
        location = response.headers["location"]
        actions = {step["pipeline"]: step["action"] for step in response.json()["plan"]}
        assert actions == {
            "toy_bias": "run", "toy_flat": "run", "toy_calibrate": "run", "toy_sources": "run",
        }  # fmt: skip

        def finished() -> bool:
            return str(alice.get(location).json()["phase"]) in {"COMPLETED", "ERROR"}

        wait_for(finished, 120, "the reduction on the worker")
        body = alice.get(location).json()
        assert body["phase"] == "COMPLETED", body
        (result,) = body["results"]
        data = alice.get(result["url"])
        assert data.status_code == 200 and len(data.content) == result["size"]
    # no executor here: the plan's runs executed on the worker
    store = RunStore(world.site.catalog)
    planned = [store.get(int(step["run_id"])) for step in body["plan"]]
    assert [r.state if r else None for r in planned] == [RunState.SUCCEEDED] * 4


def test_abort_kills_the_step_running_on_the_worker(celery_world: World) -> None:
    world = celery_world
    frame = world.science[0].archive_id
    pid_file = world.site.settings.site / "step-SOURCES-50.0.pid"
    with Daemon(world.site), world.client("alice") as alice:
        response = ask(alice, [frame], pause=50)
        assert response.status_code == 202, response.text
        location = response.headers["location"]
        wait_for(
            lambda: pid_file.exists() and bool(pid_file.read_text().strip()),
            120,
            "the user's step running on the worker",
        )
        pid = int(pid_file.read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"{WHO}=far".encode() in environ  # started by the worker, not here
        aborted = alice.post(f"{location}/abort")
        assert aborted.status_code == 200 and aborted.json()["phase"] == "ABORTED"
        started = time.monotonic()
        wait_for(lambda: not _alive(pid), 15, "the aborted step's end")
        print(f"the aborted step ended {time.monotonic() - started:.1f} s after the abort")
        assert alice.get(location).json()["phase"] == "ABORTED"
    finals = [r for r in RunStore(world.site.catalog).find() if r.request.startswith("reduction-")]
    assert [r.state for r in finals] == [RunState.FAILED]
    assert "aborted by alice" in (finals[0].error or "")

"""SiteHost.book: the ends and claims of several runs in ONE catalog transaction, on
SQLite and PostgreSQL; a claim inside it is still a compare-and-set, a failure inside it
writes nothing, and a worker killed between two bookings loses and duplicates nothing.
HeldEnds (a Celery worker's runs, one at a time): each end is written with the next
claim, or alone when none comes in time, at a stop, or at close.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text

from obsflow.catalog import NewFile
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.runs import NewRun, RunStore
from obsflow.catalog.steps import StepRow
from obsflow.processing.lifecycle import Finish
from obsflow.processing.sitehost import HeldEnds, SiteHost
from obsflow.site import Site, open_site
from obsflow.states import LedgerEvent, RunState, StepState
from tests.conftest import SiteFactory

# Runs with no inputs (created directly, as the orchestration benchmark does) of a
# pipeline whose one step is `true`.
TRUE = """
pipelines:
  - id: toy_true
    profile: only_true
    inputs: [{product: ofcam_raw, name: frames, where: "frame_type == 'NO SUCH TYPE'"}]
    group: {by: [file]}
profiles:
  - id: only_true
    steps:
      - {name: run, command: ["true"]}
"""


@pytest.fixture
def true_site(make_site: SiteFactory) -> Iterator[Site]:
    settings = make_site(processing={"lease_seconds": 60})
    (settings.registry / "ofcam_pipelines.yaml").write_text(TRUE)
    site = open_site(settings)
    yield site
    site.close()


def queued_runs(site: Site, count: int) -> list[int]:
    runs = RunStore(site.catalog)
    made = []
    for i in range(count):
        key = GroupKey.of("toy_true", {"night": "2026-11-21", "file": f"f{i}"})
        run_id = runs.create(NewRun("toy_true", key, date(2026, 11, 21), {}, "test"), site.clock())
        assert run_id is not None
        made.append(run_id)
    return made


def succeeded(run_id: int, site: Site) -> Finish:
    now = site.clock()
    step = StepRow("run", 0, StepState.SUCCEEDED, 1, ("true",), now, now, exit_status=0)
    return Finish(run_id, RunState.SUCCEEDED, None, (step,))


class Commits:
    """Counts the transactions committed on the site's catalog (engine events)."""

    def __init__(self, site: Site) -> None:
        self.count = 0
        self.engine = site.catalog.engine
        event.listen(self.engine, "commit", self._commit)

    def _commit(self, conn: Any) -> None:
        self.count += 1

    def close(self) -> None:
        event.remove(self.engine, "commit", self._commit)


def test_several_ends_and_claims_are_booked_in_one_transaction(true_site: Site) -> None:
    site = true_site
    a, b, c, d = queued_runs(site, 4)
    host = SiteHost(site)
    assert host.claim(a, "w") is not None and host.claim(b, "w") is not None
    commits = Commits(site)
    try:
        failed = Finish(b, RunState.FAILED, "it broke", ())
        booking = host.book("w", [succeeded(a, site), failed], [c, d])
    finally:
        commits.close()
    assert commits.count == 1
    assert booking.ended == (True, True)
    assert [claim.run_id if claim else None for claim in booking.claims] == [c, d]
    assert all(claim is not None and claim.plan is not None for claim in booking.claims)
    runs = RunStore(site.catalog)
    states = {r.id: (r.state, r.error) for r in runs.find(run_ids=[a, b, c, d])}
    assert states == {
        a: (RunState.SUCCEEDED, None),
        b: (RunState.FAILED, "it broke"),
        c: (RunState.RUNNING, None),
        d: (RunState.RUNNING, None),
    }
    assert [(s.step, s.state, s.exit_status) for s in runs.steps(a)] == [
        ("run", StepState.SUCCEEDED, 0)
    ]


def test_a_claim_lost_to_another_worker_inside_a_booking_is_none(true_site: Site) -> None:
    site = true_site
    a, b, c = queued_runs(site, 3)
    host = SiteHost(site)
    assert host.claim(a, "w") is not None
    assert SiteHost(site).claim(b, "other") is not None  # won first, by another worker
    booking = host.book("w", [succeeded(a, site)], [b, c])
    assert booking.ended == (True,)
    assert booking.claims[0] is None
    assert booking.claims[1] is not None and booking.claims[1].run_id == c
    with site.catalog.read() as conn:
        found = conn.execute(text("SELECT id, lease_owner FROM runs")).all()
    owners = {int(row.id): row.lease_owner for row in found}
    assert owners == {a: None, b: "other", c: "w"}


def test_an_end_whose_lease_was_lost_writes_nothing_and_the_rest_is_booked(
    true_site: Site,
) -> None:
    site = true_site
    a, b = queued_runs(site, 2)
    host = SiteHost(site)
    assert host.claim(a, "w") is not None
    runs = RunStore(site.catalog)
    later = site.clock() + timedelta(hours=1)  # its lease expired, another worker took it
    assert runs.recover(later, max_attempts=5) == ([a], [])
    assert runs.claim(a, "other", later, 3600) is not None
    booking = host.book("w", [succeeded(a, site)], [b])
    assert booking.ended == (False,)
    assert booking.claims[0] is not None
    record = runs.get(a)
    assert record is not None and record.state is RunState.RUNNING and runs.steps(a) == []


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_a_booking_that_fails_inside_its_transaction_writes_nothing(true_site: Site) -> None:
    """The catalog refuses the second claim (a trigger): the first run's end and the
    other claim, written before it in the same transaction, are not kept either."""
    site = true_site
    a, b, c = queued_runs(site, 3)
    host = SiteHost(site)
    assert host.claim(a, "w") is not None
    with site.catalog.write() as conn:
        conn.execute(
            text(
                f"CREATE TRIGGER refuse BEFORE UPDATE OF state ON runs "
                f"WHEN NEW.id = {c} AND NEW.state = 'running' "
                f"BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
        )
    with pytest.raises(Exception, match="refused by the test"):
        host.book("w", [succeeded(a, site)], [b, c])
    runs = RunStore(site.catalog)
    states = {r.id: r.state for r in runs.find(run_ids=[a, b, c])}
    assert states == {a: RunState.RUNNING, b: RunState.QUEUED, c: RunState.QUEUED}
    assert runs.steps(a) == []


# A worker that books its first run's end with its second run's claim, and is killed
# (SIGKILL) before it starts the second: between two bookings.
KILLED_BETWEEN_BOOKINGS = """
import os, signal, sys
from pathlib import Path
from obsflow.processing.lifecycle import Finish
from obsflow.processing.sitehost import HeldEnds, SiteHost
from obsflow.settings import load_settings
from obsflow.site import open_site
from obsflow.states import RunState

first, second = int(sys.argv[2]), int(sys.argv[3])
host = SiteHost(open_site(load_settings(Path(sys.argv[1]))))
assert host.claim(first, "doomed") is not None
booking = host.book("doomed", [Finish(first, RunState.SUCCEEDED, None, ())], [second])
assert booking.ended == (True,) and booking.claims[0] is not None
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_worker_killed_between_bookings_loses_and_duplicates_nothing(
    true_site: Site,
) -> None:
    site = true_site
    first, second = queued_runs(site, 2)
    script = textwrap.dedent(KILLED_BETWEEN_BOOKINGS)
    done = subprocess.run(
        [sys.executable, "-c", script, str(site.settings.site), str(first), str(second)],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    runs = RunStore(site.catalog)
    record = runs.get(first)
    assert record is not None and record.state is RunState.SUCCEEDED
    # the second was claimed and never started: it comes back once its lease expires
    later = site.clock() + timedelta(seconds=site.settings.processing.lease_seconds + 1)
    assert runs.recover(later, max_attempts=5) == ([second], [])
    host = SiteHost(site)
    claim = host.claim(second, "survivor")
    assert claim is not None and claim.plan is not None
    assert host.book("survivor", [succeeded(second, site)], []).ended == (True,)
    states = {r.id: (r.state, r.attempts) for r in runs.find()}
    assert states == {first: (RunState.SUCCEEDED, 1), second: (RunState.SUCCEEDED, 2)}


def state_of(site: Site, run_id: int) -> RunState:
    record = RunStore(site.catalog).get(run_id)
    assert record is not None
    return record.state


def test_held_ends_are_written_with_the_next_claim_in_one_transaction(true_site: Site) -> None:
    site = true_site
    a, b, c = queued_runs(site, 3)
    held = HeldEnds(SiteHost(site), "w", hold=60.0)
    try:
        assert held.claim(a) is not None
        assert held.book(succeeded(a, site)) is True
        assert state_of(site, a) is RunState.RUNNING  # held, not written yet
        commits = Commits(site)
        try:
            claim = held.claim(b)
        finally:
            commits.close()
        assert commits.count == 1 and claim is not None and claim.plan is not None
        assert state_of(site, a) is RunState.SUCCEEDED
        assert held.book(succeeded(b, site)) is True
        assert held.claim(c) is not None
        held.book(Finish(c, RunState.FAILED, "it broke", ()))
    finally:
        held.close()  # writes the last end
    records = RunStore(site.catalog).find(run_ids=[a, b, c])
    assert [(r.state, r.attempts) for r in records] == [
        (RunState.SUCCEEDED, 1),
        (RunState.SUCCEEDED, 1),
        (RunState.FAILED, 1),
    ]
    assert records[1].started == records[0].finished  # one transaction, one moment
    assert records[2].started == records[1].finished
    assert [(s.step, s.state) for s in RunStore(site.catalog).steps(a)] == [
        ("run", StepState.SUCCEEDED)
    ]


def test_a_held_end_no_claim_comes_for_is_written_alone(true_site: Site) -> None:
    site = true_site
    (a,) = queued_runs(site, 1)
    held = HeldEnds(SiteHost(site), "w", hold=0.2)
    try:
        assert held.claim(a) is not None
        held.book(succeeded(a, site))
        deadline = time.monotonic() + 30
        while state_of(site, a) is RunState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state_of(site, a) is RunState.SUCCEEDED
    finally:
        held.close()


def test_a_stopping_worker_writes_its_end_at_once(true_site: Site) -> None:
    site = true_site
    a, b = queued_runs(site, 2)
    stop = threading.Event()
    held = HeldEnds(SiteHost(site), "w", hold=60.0, stop=stop)
    try:
        assert held.claim(a) is not None
        stop.set()
        assert held.book(succeeded(a, site)) is True
        assert state_of(site, a) is RunState.SUCCEEDED
        assert SiteHost(site).claim(a, "other") is None  # ended: nobody claims it again
        assert held.claim(b) is not None  # a lost lease is said by book, as by finish
        later = site.clock() + timedelta(hours=1)
        assert RunStore(site.catalog).recover(later, max_attempts=5) == ([b], [])
        assert held.book(succeeded(b, site)) is False
    finally:
        held.close()


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_a_claim_the_catalog_refuses_keeps_the_held_end_to_write_alone(
    true_site: Site,
) -> None:
    site = true_site
    a, b = queued_runs(site, 2)
    with site.catalog.write() as conn:
        conn.execute(
            text(
                f"CREATE TRIGGER refuse BEFORE UPDATE OF state ON runs "
                f"WHEN NEW.id = {b} AND NEW.state = 'running' "
                f"BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
        )
    held = HeldEnds(SiteHost(site), "w", hold=60.0)
    try:
        assert held.claim(a) is not None
        held.book(succeeded(a, site))
        with pytest.raises(Exception, match="refused by the test"):
            held.claim(b)
        assert state_of(site, a) is RunState.RUNNING  # the transaction wrote nothing
    finally:
        held.close()  # the end was kept: written alone
    assert state_of(site, a) is RunState.SUCCEEDED
    assert state_of(site, b) is RunState.QUEUED


@pytest.mark.parametrize("catalog_url", ["postgresql"], indirect=True)
def test_two_runs_of_one_input_end_in_concurrent_transactions(true_site: Site) -> None:
    """Two flats of one master bias, ending at once on two workers: each stamps the bias
    ``processed`` in its own transaction, neither seeing the other's stamp; the second
    waits for the first and then skips its stamp (it failed with a duplicate key)."""
    site = true_site
    now = site.clock()
    bias = site.catalog.record_cached(
        NewFile(
            product="ofcam_raw",
            instrument="OFCAM",
            level=0,
            original_name="ofc_20261121_0001.fits",
            source_path="/in/ofc_20261121_0001.fits",
            size=1000,
            sha256="1" * 64,
            night=date(2026, 11, 21),
        ),
        make_archive_id=lambda bump: f"OF.0001.{bump:02d}.fits",
        cache_path=lambda aid: f"OFCAM/2026-11-21/{aid}",
        place=lambda aid: None,
        ledger={LedgerEvent.CACHED: now},
        now=now,
    ).file_id
    runs = RunStore(site.catalog)
    made = []
    for name in ("B", "V"):
        key = GroupKey.of("toy_true", {"night": "2026-11-21", "file": name})
        run_id = runs.create(NewRun("toy_true", key, date(2026, 11, 21), {"in": (bias,)}, "t"), now)
        assert run_id is not None and runs.claim(run_id, "w", now, 3600) is not None
        made.append(run_id)
    first, second = made
    errors: list[BaseException] = []
    with site.catalog.engine.connect() as one, site.catalog.engine.connect() as two:
        began = one.begin()
        assert runs.finish(first, "w", RunState.SUCCEEDED, now, None, one)

        def end_second() -> None:
            try:
                with two.begin():  # waits on the first's stamp until it commits
                    assert runs.finish(second, "w", RunState.SUCCEEDED, now, None, two)
            except BaseException as exc:
                errors.append(exc)

        other = threading.Thread(target=end_second)
        other.start()
        time.sleep(0.5)  # the second is inside its transaction, waiting
        began.commit()
        other.join(30)
    assert errors == []
    assert {r.state for r in runs.find(run_ids=made)} == {RunState.SUCCEEDED}
    stamps = [e for e in site.catalog.ledger(bias) if e.event is LedgerEvent.PROCESSED]
    assert len(stamps) == 1

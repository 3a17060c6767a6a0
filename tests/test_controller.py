"""The controller, on real processes only: ``sh -c``, ``sleep``, ``true``, ``python -c``.

Each test builds a run-time profile by hand, runs it in ``tmp_path`` and checks what the
steps left behind (files, timestamps, pid files), the :class:`RunOutcome`, the run log
and what the listener heard. Timings are checked against the steps' own clocks where
the point is ordering, and against generous wall-clock bounds where the point is speed.
"""

from __future__ import annotations

import itertools
import os
import shlex
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from obsflow.errors import RunError
from obsflow.processing.controller import Controller, RunOutcome, StepResult
from obsflow.processing.profile import RuntimeProfile, RuntimeStep
from obsflow.states import StepState

RUN = "r1"


# ------------------------------------------------------------------ helpers


def sh(name: str, script: str, **options: Any) -> RuntimeStep:
    return RuntimeStep(name=name, argv=("sh", "-c", script), **options)


def span(result: StepResult) -> tuple[datetime, datetime]:
    """When the step's last attempt started and finished (it must have run)."""
    assert result.started is not None and result.finished is not None
    return result.started, result.finished


def profile(
    tmp_path: Path, *steps: RuntimeStep, outputs: dict[str, str] | None = None
) -> RuntimeProfile:
    return RuntimeProfile(
        run_id=RUN,
        pipeline="ofcam_bias",
        profile="bias_v1",
        steps=steps,
        parameters={"exptime": 10},
        outputs=outputs or {},
        work=str(tmp_path / "work"),
    )


class Recorder:
    """A listener that records every call and notices calls that overlap."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []
        self.finished: dict[str, StepResult] = {}
        self.overlapped = False
        self._busy = threading.Lock()

    def _enter(self) -> None:
        if not self._busy.acquire(blocking=False):
            self.overlapped = True
            self._busy.acquire()
        time.sleep(0.001)  # widen the window in which an overlap would be seen

    def step_started(
        self, run_id: str, name: str, attempt: int, argv: tuple[str, ...], at: datetime
    ) -> None:
        self._enter()
        assert run_id == RUN and at.tzinfo is not None and argv
        self.events.append(("started", name, attempt))
        self._busy.release()

    def step_finished(self, run_id: str, result: StepResult) -> None:
        self._enter()
        assert run_id == RUN and result.name not in self.finished
        self.finished[result.name] = result
        self.events.append(("finished", result.name, result.state))
        self._busy.release()


def run(
    tmp_path: Path,
    prof: RuntimeProfile,
    *,
    controller: Controller | None = None,
    listener: Recorder | None = None,
    stop: threading.Event | None = None,
) -> RunOutcome:
    return (controller or Controller()).run(
        prof, log_path=tmp_path / "run.log", listener=listener, stop=stop
    )


def by_name(outcome: RunOutcome) -> dict[str, StepResult]:
    return {r.name: r for r in outcome.steps}


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_soon(pid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def read_pid(path: Path) -> int:
    deadline = time.monotonic() + 5
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.01)
    return int(path.read_text())


# ------------------------------------------------------------------ dependency order


def test_linear_chain_passes_data_through_files_in_work(tmp_path: Path) -> None:
    result = tmp_path / "work" / "out" / "result.txt"
    prof = profile(
        tmp_path,
        sh("reduce", "cp out/combined.txt out/result.txt", needs=("combine",)),
        sh("bias", "echo bias frame > bias.txt"),
        sh("combine", "tr a-z A-Z < bias.txt > out/combined.txt", needs=("bias",)),
        outputs={"ofcam_master_bias": str(result)},
    )
    outcome = run(tmp_path, prof)

    assert outcome.succeeded and outcome.error is None and outcome.missing_outputs == ()
    assert result.read_text() == "BIAS FRAME\n"
    assert [r.name for r in outcome.steps] == ["reduce", "bias", "combine"]  # profile order
    steps = by_name(outcome)
    for r in outcome.steps:
        assert (r.state, r.attempts, r.exit_status, r.reason) == (StepState.SUCCEEDED, 1, 0, "")
        assert r.started is not None and r.finished is not None
        assert r.started.tzinfo is not None and r.started <= r.finished
    assert span(steps["bias"])[1] <= span(steps["combine"])[0]
    assert span(steps["combine"])[1] <= span(steps["reduce"])[0]


def test_step_sees_parent_env_plus_its_own_and_runs_in_work(tmp_path: Path) -> None:
    prof = profile(
        tmp_path,
        sh("env", 'echo "$OBSFLOW_NIGHT $PATH" > env.txt; pwd', env={"OBSFLOW_NIGHT": "n1"}),
    )
    outcome = run(tmp_path, prof)

    assert outcome.succeeded
    night, path = (tmp_path / "work" / "env.txt").read_text().split()
    assert night == "n1" and path == os.environ["PATH"]
    assert outcome.steps[0].stdout_tail.strip() == str((tmp_path / "work").resolve())


def test_failure_skips_dependents_and_names_run_step_and_stderr(tmp_path: Path) -> None:
    prof = profile(
        tmp_path,
        sh("debias", "echo reading >&2; echo 'bad frame 7' >&2; echo partial; exit 3"),
        sh("flat", "touch flat.ran", needs=("debias",)),
        sh("stack", "touch stack.ran", needs=("flat",)),
        sh("dark", "sleep 0.2; touch dark.ran"),
    )
    outcome = run(tmp_path, prof)
    steps = by_name(outcome)
    work = tmp_path / "work"

    assert not outcome.succeeded
    assert outcome.error == "run r1 step debias: exit status 3: bad frame 7"
    debias = steps["debias"]
    assert (debias.state, debias.exit_status, debias.attempts) == (StepState.FAILED, 3, 1)
    assert debias.reason == "exit status 3"
    assert debias.stderr_tail == "reading\nbad frame 7\n" and debias.stdout_tail == "partial\n"
    for name in ("flat", "stack"):
        assert steps[name].state is StepState.SKIPPED
        assert steps[name].reason == "needs debias, which failed"
        assert steps[name].attempts == 0 and steps[name].started is None
        assert not (work / f"{name}.ran").exists()
    assert steps["dark"].state is StepState.SUCCEEDED  # an independent branch runs to its end
    assert (work / "dark.ran").exists()


def test_step_killed_by_a_signal_reports_it(tmp_path: Path) -> None:
    outcome = run(tmp_path, profile(tmp_path, sh("crash", "echo dying >&2; kill -KILL $$")))
    step = outcome.steps[0]

    assert (step.state, step.exit_status) == (StepState.FAILED, -9)
    assert step.reason == "killed by signal 9 (Killed)"
    assert outcome.error == "run r1 step crash: killed by signal 9 (Killed): dying"


# ------------------------------------------------------------------ parallelism


def test_parallel_branches_overlap_and_join_waits_for_both(tmp_path: Path) -> None:
    prof = profile(
        tmp_path,
        RuntimeStep(name="left", argv=("sleep", "0.5")),
        RuntimeStep(name="right", argv=("sleep", "0.5")),
        sh("join", "touch joined", needs=("left", "right")),
    )
    began = time.monotonic()
    outcome = run(tmp_path, prof, controller=Controller(parallel=2))
    took = time.monotonic() - began
    steps = by_name(outcome)

    assert outcome.succeeded and (tmp_path / "work" / "joined").exists()
    assert took < 0.9, f"two 0.5 s branches took {took:.2f} s: they did not overlap"
    join_start = span(steps["join"])[0]
    assert span(steps["left"])[1] <= join_start and span(steps["right"])[1] <= join_start


def test_parallel_limit_serializes_branches(tmp_path: Path) -> None:
    script = "date +%s.%N > {0}.start; sleep 0.15; date +%s.%N > {0}.end"
    names = ("a", "b", "c")
    prof = profile(tmp_path, *(sh(n, script.format(n)) for n in names))
    outcome = run(tmp_path, prof, controller=Controller(parallel=1))

    assert outcome.succeeded
    work = tmp_path / "work"
    spans = sorted(
        (float((work / f"{n}.start").read_text()), float((work / f"{n}.end").read_text()))
        for n in names
    )
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"steps overlapped with parallel=1: {spans}"


def test_parallel_two_runs_two_of_three_at_once(tmp_path: Path) -> None:
    script = "date +%s.%N > {0}.start; sleep 0.3; date +%s.%N > {0}.end"
    names = ("a", "b", "c")
    prof = profile(tmp_path, *(sh(n, script.format(n)) for n in names))
    assert run(tmp_path, prof, controller=Controller(parallel=2)).succeeded
    work = tmp_path / "work"
    spans = [
        (float((work / f"{n}.start").read_text()), float((work / f"{n}.end").read_text()))
        for n in names
    ]
    for instant in (s for s, _ in spans):  # at any step's start, at most 2 are running
        assert sum(s <= instant < e for s, e in spans) <= 2
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # a and b overlapped


# ------------------------------------------------------------------ conditions, images


def test_disabled_step_is_skipped_and_its_dependents_still_run(tmp_path: Path) -> None:
    prof = profile(
        tmp_path,
        sh("dark", "touch dark.ran", enabled=False, when="exptime > 30"),
        sh("reduce", "touch reduce.ran", needs=("dark",)),
    )
    outcome = run(tmp_path, prof)
    steps = by_name(outcome)

    assert outcome.succeeded
    assert steps["dark"].state is StepState.SKIPPED and steps["dark"].attempts == 0
    assert steps["dark"].reason == "when false: exptime > 30"
    assert not (tmp_path / "work" / "dark.ran").exists()
    assert steps["reduce"].state is StepState.SUCCEEDED
    assert (tmp_path / "work" / "reduce.ran").exists()


def test_image_step_without_a_container_runner_fails_clearly_without_starting(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    prof = profile(
        tmp_path,
        sh("containerised", "touch ran", image="ghcr.io/lco/banzai:1.9"),
        sh("after", "touch after.ran", needs=("containerised",)),
    )
    outcome = run(tmp_path, prof, listener=recorder)
    step = by_name(outcome)["containerised"]

    assert not outcome.succeeded
    assert step.state is StepState.FAILED and step.attempts == 0 and step.exit_status is None
    assert step.reason == (
        "image 'ghcr.io/lco/banzai:1.9' needs a container engine, and none is configured "
        "(settings: containers.host)"
    )
    assert outcome.error == f"run r1 step containerised: {step.reason}"
    assert not (tmp_path / "work" / "ran").exists()
    assert not (tmp_path / "work" / "after.ran").exists()
    assert [e for e in recorder.events if e[0] == "started"] == []


def test_missing_program_cannot_start(tmp_path: Path) -> None:
    prof = profile(
        tmp_path,
        RuntimeStep(name="calib", argv=("obsflow-no-such-program", "x"), retries=1),
        sh("after", "touch after.ran", needs=("calib",)),
    )
    outcome = run(tmp_path, prof)
    steps = by_name(outcome)

    assert not outcome.succeeded
    calib = steps["calib"]
    assert calib.state is StepState.FAILED and calib.exit_status is None
    assert calib.reason == "cannot start: no program 'obsflow-no-such-program'"
    assert calib.attempts == 2  # cannot start counts as a failure, and is retried
    assert steps["after"].reason == "needs calib, which failed"
    assert outcome.error == "run r1 step calib: cannot start: no program 'obsflow-no-such-program'"


# ------------------------------------------------------------------ timeouts, retries, stop


def test_timeout_kills_the_whole_process_tree(tmp_path: Path) -> None:
    prof = profile(tmp_path, sh("slow", "sleep 30 & echo $! > child.pid; wait", timeout=0.5))
    began = time.monotonic()
    outcome = run(tmp_path, prof, controller=Controller(kill_grace=5))
    took = time.monotonic() - began
    step = outcome.steps[0]

    assert not outcome.succeeded and outcome.error == "run r1 step slow: timed out after 0.5 s"
    assert step.state is StepState.FAILED and step.reason == "timed out after 0.5 s"
    assert step.exit_status is not None and step.exit_status < 0  # ended by a signal
    assert 0.5 <= took < 2.0
    assert gone_soon(read_pid(tmp_path / "work" / "child.pid")), "the child sleep 30 survived"


def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    prof = profile(
        tmp_path, sh("stubborn", "trap '' TERM; echo $$ > me.pid; sleep 30", timeout=0.3)
    )
    began = time.monotonic()
    outcome = run(tmp_path, prof, controller=Controller(kill_grace=0.3))
    took = time.monotonic() - began

    assert outcome.steps[0].exit_status == -9 and outcome.steps[0].reason.startswith("timed out")
    assert 0.6 <= took < 2.0
    assert gone_soon(read_pid(tmp_path / "work" / "me.pid"))


def test_step_leaves_no_background_process_behind(tmp_path: Path) -> None:
    prof = profile(tmp_path, sh("forks", "sleep 30 & echo $! > child.pid"))
    outcome = run(tmp_path, prof)

    assert outcome.succeeded
    assert gone_soon(read_pid(tmp_path / "work" / "child.pid"))


def test_failed_step_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    recorder = Recorder()
    script = "if [ -e marker ]; then echo second; else touch marker; echo first >&2; exit 1; fi"
    prof = profile(tmp_path, sh("flaky", script, retries=2))
    outcome = run(tmp_path, prof, listener=recorder)
    step = outcome.steps[0]

    assert outcome.succeeded
    assert (step.state, step.attempts, step.exit_status) == (StepState.SUCCEEDED, 2, 0)
    assert step.stdout_tail == "second\n" and step.stderr_tail == ""  # of the last attempt
    assert recorder.events == [
        ("started", "flaky", 1),
        ("started", "flaky", 2),
        ("finished", "flaky", StepState.SUCCEEDED),
    ]
    logs = tmp_path / "work" / "logs"
    assert (logs / "flaky.1.err").read_text() == "first\n"
    assert (logs / "flaky.2.out").read_text() == "second\n"


def test_retries_run_out(tmp_path: Path) -> None:
    prof = profile(tmp_path, sh("broken", "echo try >> tries; exit 2", retries=2))
    outcome = run(tmp_path, prof)

    assert not outcome.succeeded and outcome.steps[0].attempts == 3
    assert (tmp_path / "work" / "tries").read_text() == "try\n" * 3


def test_stop_kills_running_steps_and_skips_the_rest(tmp_path: Path) -> None:
    recorder = Recorder()
    stop = threading.Event()
    prof = profile(
        tmp_path,
        sh("long", "sleep 30 & echo $! > child.pid; wait"),
        sh("later", "touch later.ran", needs=("long",)),
    )
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    began = time.monotonic()
    outcome = run(tmp_path, prof, listener=recorder, stop=stop)
    took = time.monotonic() - began
    timer.join()
    steps = by_name(outcome)

    assert took < 1.0, f"stop took {took - 0.3:.2f} s to act"
    assert not outcome.succeeded and outcome.error is not None and "stopped" in outcome.error
    assert steps["long"].state is StepState.FAILED
    assert steps["long"].reason.startswith("stopped:")
    assert steps["later"].state is StepState.SKIPPED
    assert steps["later"].reason.startswith("stopped:")
    assert not (tmp_path / "work" / "later.ran").exists()
    assert gone_soon(read_pid(tmp_path / "work" / "child.pid"))
    assert set(recorder.finished) == {"long", "later"}


def test_stop_before_the_run_starts_nothing(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    outcome = run(tmp_path, profile(tmp_path, sh("a", "touch a.ran")), stop=stop)

    assert not outcome.succeeded and outcome.steps[0].state is StepState.SKIPPED
    assert not (tmp_path / "work" / "a.ran").exists()


# ------------------------------------------------------------------ outputs, log, listener


def test_missing_declared_output_fails_the_run(tmp_path: Path) -> None:
    written = str(tmp_path / "work" / "out" / "bias.fits")
    missing = str(tmp_path / "work" / "out" / "flat.fits")
    prof = profile(
        tmp_path,
        sh("make", "echo data > out/bias.fits"),
        outputs={"bias": written, "flat": missing},
    )
    outcome = run(tmp_path, prof)

    assert not outcome.succeeded
    assert outcome.steps[0].state is StepState.SUCCEEDED
    assert outcome.missing_outputs == (missing,)
    assert outcome.error == f"run r1: output {missing} was not written"


def test_run_log_holds_profile_argv_output_and_outcome(tmp_path: Path) -> None:
    first = sh("talk", "echo to-stdout; echo 'to stderr' >&2")
    prof = profile(
        tmp_path,
        first,
        sh("fail", "echo 'it broke' >&2; exit 4", needs=("talk",)),
        sh("never", "true", needs=("fail",)),
        sh("cond", "true", enabled=False, when="exptime > 30"),
    )
    run(tmp_path, prof)
    run(tmp_path, prof)  # the log is appended to
    text = (tmp_path / "run.log").read_text()

    assert text.count(prof.dumps()) == 2
    assert "pipeline ofcam_bias" in text and "profile bias_v1" in text
    assert shlex.join(first.argv) in text
    assert "to-stdout\n" in text and "to stderr\n" in text and "it broke\n" in text
    assert "exit status 4" in text
    assert "never skipped: needs fail, which failed" in text
    assert "cond skipped: when false: exptime > 30" in text
    assert text.count("run r1 failed: run r1 step fail: exit status 4: it broke\n") == 2


def test_huge_output_is_capped_in_the_log_and_tail_is_the_end(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('x' * 3_000_000 + 'THE END')"
    prof = profile(tmp_path, RuntimeStep(name="big", argv=(sys.executable, "-c", code)))
    outcome = run(tmp_path, prof)

    tail = outcome.steps[0].stdout_tail
    assert len(tail) == 4000 and tail.endswith("THE END")
    log = (tmp_path / "run.log").read_text()
    assert "bytes left out here" in log and len(log) < 1_200_000


def test_listener_hears_each_step_in_a_sane_order(tmp_path: Path) -> None:
    recorder = Recorder()
    prof = profile(
        tmp_path,
        sh("a", "sleep 0.05"),
        sh("b", "sleep 0.05"),
        sh("c", "exit 1", needs=("a",)),
        sh("d", "true", needs=("b", "c")),
        sh("e", "true", enabled=False, when="never"),
    )
    outcome = run(tmp_path, prof, listener=recorder)

    assert not recorder.overlapped
    assert set(recorder.finished) == {"a", "b", "c", "d", "e"}
    assert recorder.finished == by_name(outcome)
    events = recorder.events
    for name in ("a", "b", "c"):
        assert events.index(("started", name, 1)) < events.index(
            ("finished", name, recorder.finished[name].state)
        )
    assert events.index(("finished", "a", StepState.SUCCEEDED)) < events.index(("started", "c", 1))
    assert ("started", "d", 1) not in events and ("started", "e", 1) not in events
    assert recorder.finished["d"].reason == "needs c, which failed"


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((RuntimeStep(name="a", argv=("true",), needs=("nope",)),), "needs 'nope'"),
        (
            (
                RuntimeStep(name="a", argv=("true",), needs=("b",)),
                RuntimeStep(name="b", argv=("true",), needs=("a",)),
            ),
            "cycle",
        ),
        ((RuntimeStep(name="a", argv=("true",)),) * 2, "used twice"),
    ],
)
def test_a_profile_that_is_not_a_graph_is_refused_before_running(
    tmp_path: Path, steps: tuple[RuntimeStep, ...], message: str
) -> None:
    with pytest.raises(RunError, match=message):
        run(tmp_path, profile(tmp_path, *steps))
    assert not (tmp_path / "work").exists()

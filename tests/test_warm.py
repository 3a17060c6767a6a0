"""The warm step runner, on real processes: a zygote, its forks, and the controller.

Each step is ``python -m warmtool ...``, a small tool written into the run's work
directory (``python -m`` finds it there, warm or cold). The zygote of these tests imports
``statistics``: a step that finds it already imported ran warm (a fresh interpreter has
not imported it).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from obsflow.processing.controller import Controller, RunOutcome
from obsflow.processing.profile import RuntimeProfile, RuntimeStep
from obsflow.processing.warm import WarmRunner, _WarmStep, tool_module, warm_runner
from obsflow.settings import Processing
from obsflow.states import StepState

TOOL = """
import os, subprocess, sys, time
warm = "statistics" in sys.modules
import statistics
print(f"warm={warm}")
print(f"touched={getattr(statistics, 'touched', 0)}")
statistics.touched = 1
command = sys.argv[1]
if command == "show":
    print("argv=" + " ".join(sys.argv[1:]))
    print("cwd=" + os.getcwd())
    print("mine=" + os.environ.get("OBSFLOW_STEP_VAR", "-"))
    print("late=" + os.environ.get("OBSFLOW_LATE_VAR", "-"))
    print("path=" + str(sys.path[0] == os.getcwd()))
    open("made.txt", "w").write("made")
elif command == "fail":
    print("some output")
    print("the flat is missing", file=sys.stderr)
    sys.exit(3)
elif command == "raise":
    raise ValueError("bad frame")
elif command == "hang":
    child = subprocess.Popen(["sleep", "30"])
    open("pids.tmp", "w").write(f"{os.getpid()} {child.pid}")
    os.rename("pids.tmp", "pids")
    time.sleep(30)
"""


@pytest.fixture
def warm() -> Iterator[WarmRunner]:
    runner = WarmRunner(("statistics",))
    runner.warm_up()
    yield runner
    runner.close()


def tool(name: str, *args: str, **options: Any) -> RuntimeStep:
    return RuntimeStep(name=name, argv=(sys.executable, "-m", "warmtool", *args), **options)


def run(
    tmp_path: Path,
    *steps: RuntimeStep,
    warm: WarmRunner | None,
    stop: threading.Event | None = None,
    kill_grace: float = 5.0,
) -> RunOutcome:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "warmtool.py").write_text(TOOL)
    prof = RuntimeProfile(run_id="r1", pipeline="p", profile="p", steps=steps, work=str(work))
    controller = Controller(warm=warm, kill_grace=kill_grace)
    return controller.run(prof, log_path=tmp_path / "run.log", stop=stop)


def lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def gone(pid: int) -> bool:
    """``pid`` has ended (no such process, or a zombie nobody reaped yet), within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def pids(work: Path) -> list[int]:
    """The pids a ``hang`` step wrote (the step's and its child's), once it wrote them."""
    deadline = time.monotonic() + 60
    while not (work / "pids").exists():
        assert time.monotonic() < deadline, "the hanging step never started"
        time.sleep(0.05)
    return [int(p) for p in (work / "pids").read_text().split()]


def test_a_warm_step_sees_its_argv_cwd_and_environment(
    tmp_path: Path, warm: WarmRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OBSFLOW_LATE_VAR", "set after the zygote started")
    step = tool("show", "show", "a b", "--x", env={"OBSFLOW_STEP_VAR": "its own"})
    outcome = run(tmp_path, step, warm=warm)

    assert outcome.succeeded, outcome.error
    result = outcome.steps[0]
    seen = lines(result.stdout_tail)
    assert seen["warm"] == "True"  # forked from the zygote, which imported statistics
    assert seen["argv"] == "show a b --x"
    assert seen["cwd"] == str(tmp_path / "work") and seen["path"] == "True"
    assert seen["mine"] == "its own"
    assert seen["late"] == "set after the zygote started"  # the worker's env at the step
    assert (tmp_path / "work" / "made.txt").read_text() == "made"
    assert (tmp_path / "work" / "logs" / "show.1.out").read_text() == result.stdout_tail
    assert result.exit_status == 0 and result.stderr_tail == ""


def test_a_warm_steps_exit_status_and_stderr_tail_reach_the_error(
    tmp_path: Path, warm: WarmRunner
) -> None:
    outcome = run(tmp_path, tool("flat", "fail"), warm=warm)

    step = outcome.steps[0]
    assert (step.state, step.exit_status) == (StepState.FAILED, 3)
    assert lines(step.stdout_tail)["warm"] == "True"
    assert "some output" in step.stdout_tail
    assert step.stderr_tail == "the flat is missing\n"
    assert outcome.error == "run r1 step flat: exit status 3: the flat is missing"


def test_an_uncaught_exception_prints_its_traceback_and_exits_1(
    tmp_path: Path, warm: WarmRunner
) -> None:
    outcome = run(tmp_path, tool("boom", "raise"), warm=warm)

    step = outcome.steps[0]
    assert step.exit_status == 1
    assert "Traceback" in step.stderr_tail and "ValueError: bad frame" in step.stderr_tail
    missing = RuntimeStep(name="none", argv=(sys.executable, "-m", "no_such_tool_here"))
    outcome = run(tmp_path, missing, warm=warm)
    assert outcome.steps[0].exit_status == 1
    assert "No module named no_such_tool_here" in outcome.steps[0].stderr_tail


def test_a_step_whose_pid_and_exit_status_arrive_together_is_seen_to_end() -> None:
    # A step that ends at once (a missing module) has its supervisor send the pid and the
    # exit status back to back. The handle must leave the status on the socket, where the
    # controller's poll sees it: CI once waited 300 s on a status read along with the pid.
    ours, supervisor = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    step = subprocess.Popen(["sleep", "60"], start_new_session=True)  # its own group
    try:
        handle = _WarmStep(ours)
        supervisor.sendall(f"{step.pid}\n1\n".encode())
        assert handle.read_pid(5.0) and handle.pid == step.pid
        assert select.select([handle.fd], [], [], 0)[0] == [handle.fd]
        assert handle.finish() == 1
        assert step.wait(timeout=10) == -signal.SIGKILL  # what was left of the group
    finally:
        step.kill()
        step.wait()
        supervisor.close()


def test_a_module_level_change_in_one_step_is_not_seen_by_the_next(
    tmp_path: Path, warm: WarmRunner
) -> None:
    first = tool("first", "show")
    second = tool("second", "show", needs=("first",))
    outcome = run(tmp_path, first, second, warm=warm)

    assert outcome.succeeded, outcome.error
    for step in outcome.steps:  # each set statistics.touched; neither saw the other's
        assert lines(step.stdout_tail)["touched"] == "0"
        assert lines(step.stdout_tail)["warm"] == "True"


def test_a_timeout_kills_a_warm_step_and_its_children(tmp_path: Path, warm: WarmRunner) -> None:
    found: list[int] = []
    waiter = threading.Thread(target=lambda: found.extend(pids(tmp_path / "work")))
    waiter.start()
    outcome = run(tmp_path, tool("hang", "hang", timeout=3.0), warm=warm, kill_grace=1.0)
    waiter.join()

    step = outcome.steps[0]
    assert step.state is StepState.FAILED and step.reason == "timed out after 3 s"
    assert step.exit_status is not None and step.exit_status < 0
    assert all(gone(pid) for pid in found), "the step or its child survived"


def test_a_stop_kills_a_warm_step_and_its_children(tmp_path: Path, warm: WarmRunner) -> None:
    stop = threading.Event()
    found: list[int] = []

    def cancel() -> None:
        found.extend(pids(tmp_path / "work"))
        stop.set()

    canceller = threading.Thread(target=cancel)
    canceller.start()
    outcome = run(tmp_path, tool("hang", "hang"), warm=warm, stop=stop, kill_grace=1.0)
    canceller.join()

    step = outcome.steps[0]
    assert step.state is StepState.FAILED and step.reason.startswith("stopped")
    assert outcome.error is not None and "stopped" in outcome.error
    assert all(gone(pid) for pid in found), "the step or its child survived"


def test_steps_run_cold_when_warm_is_off_not_python_or_the_zygote_is_gone(
    tmp_path: Path, warm: WarmRunner
) -> None:
    assert warm_runner(Processing(warm=False), now=True) is None
    cold = run(tmp_path, tool("show", "show"), warm=None)
    assert cold.succeeded and lines(cold.steps[0].stdout_tail)["warm"] == "False"

    shell = RuntimeStep(name="sh", argv=("sh", "-c", "echo $0"))
    assert tool_module(shell) is None
    assert run(tmp_path, shell, warm=warm).steps[0].stdout_tail == "sh\n"
    own_python = tool("x", "show", env={"PYTHONPATH": "/elsewhere"})
    assert tool_module(own_python) is None  # it changes how an interpreter starts
    assert tool_module(tool("x", "show")) == "warmtool"

    warm.close()
    assert not warm.alive
    after = run(tmp_path, tool("show", "show"), warm=warm)
    assert after.succeeded and lines(after.steps[0].stdout_tail)["warm"] == "False"


def test_the_settings_name_the_tools_and_default_to_warm() -> None:
    processing = Processing()
    assert processing.warm is True
    assert "obsflow.tools.ccd" in processing.warm_modules
    assert os.path.basename(sys.executable).startswith("python")


def test_a_runner_nobody_closed_ends_its_zygote_when_collected() -> None:
    before = {p.pid for p in psutil.Process().children()}
    runner = WarmRunner(("statistics",))
    runner.warm_up()
    (zygote,) = [p for p in psutil.Process().children() if p.pid not in before]
    del runner  # an executor nobody closed: no zygote left behind, no ResourceWarning
    gc.collect()
    zygote.wait(timeout=10)  # psutil.TimeoutExpired if it lived on
    assert not zygote.is_running()


def test_a_zygote_still_importing_ends_with_its_worker(tmp_path: Path) -> None:
    (tmp_path / "slowimport.py").write_text("import time\ntime.sleep(120)\n")
    worker = (
        "import os, psutil\n"
        "from obsflow.processing.warm import WarmRunner\n"
        "runner = WarmRunner(('slowimport',))\nrunner.warm_up()\n"
        "print(psutil.Process().children()[0].pid, flush=True)\n"
        "os._exit(0)  # dies as a killed worker does: nobody closes anything\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", worker], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert gone(int(done.stdout)), "the zygote lived on, importing, after its worker died"

"""Container steps on a real engine (Podman's API socket), through the controller.

Each test builds a run-time profile from a registry profile whose steps name the test
image (so the paths the placeholders resolve to are the container's), runs it with a
:class:`Controller` holding a :class:`ContainerRunner`, and checks what a user relies on:
outputs on the host, exit statuses and stderr in the result, timeouts, a missing image,
no network, a user who is not root, limits, and no container left behind, ever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from obsflow.processing.container import ContainerRunner, check_images, remove_orphans
from obsflow.processing.controller import Controller, RunOutcome, StepResult, kill_every_step
from obsflow.processing.profile import RuntimeProfile, build_profile
from obsflow.registry import load_registry
from obsflow.registry.specs import PipelineSpec, ProfileSpec
from obsflow.settings import Containers
from obsflow.states import StepState
from tests.containers import HOST, IMAGE, engine, obsflow_containers, runner
from tests.test_registry import INSTRUMENT, PRODUCTS, line_of, only_problem, write

__all__ = ["engine", "runner"]  # fixtures, imported for pytest to find

NOBODY_OR_ME = "65534" if os.geteuid() == 0 else str(os.getuid())


@pytest.fixture
def run_id(engine: docker.APIClient) -> Iterator[str]:
    """A run ID of this test's own; no container of it may be left when the test ends."""
    ident = f"t{uuid.uuid4().hex[:10]}"
    yield ident
    assert obsflow_containers(engine, run=ident) == [], "a container was left behind"


def container_profile(
    tmp_path: Path,
    run_id: str,
    *steps: dict[str, Any],
    inputs: list[Path] | None = None,
    output: bool = False,
) -> RuntimeProfile:
    """The run-time profile of a registry profile whose steps run in :data:`IMAGE`
    (unless a step names another ``image``), on ``inputs`` as ``{inputs.frames}``; with
    ``output``, the run must write ``{outputs.red}``."""
    outputs = [{"product": "red", "name": "red_{night}.fits"}] if output else []
    pipeline = PipelineSpec.model_validate(
        {
            "id": "pipe",
            "profile": "prof",
            "inputs": [{"product": "raw", "name": "frames"}],
            "outputs": outputs,
        }
    )
    profile = ProfileSpec.model_validate(
        {"id": "prof", "steps": [{"image": IMAGE, **step} for step in steps]}
    )
    work = tmp_path / "work"
    return build_profile(
        run_id=run_id,
        pipeline=pipeline,
        profile=profile,
        parameters={"night": "20261121"},
        inputs={"frames": inputs or []},
        work=work,
    )


def run(
    tmp_path: Path, prof: RuntimeProfile, runner: ContainerRunner | None, **options: Any
) -> RunOutcome:
    controller = Controller(containers=runner, **options)
    return controller.run(prof, log_path=tmp_path / "run.log")


def only(outcome: RunOutcome) -> StepResult:
    (step,) = outcome.steps
    return step


def sh(name: str, script: str, *args: str, **options: Any) -> dict[str, Any]:
    """A step running ``script`` in the image's shell; ``args`` are its $0, $1, ..."""
    return {"name": name, "command": ["sh", "-c", script, *args], **options}


def frame(tmp_path: Path, name: str = "a.fits", data: bytes = b"SIMPLE  =  T") -> Path:
    path = tmp_path / "cache" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ what a step does


def test_a_step_reads_its_input_and_writes_its_output_through_the_mounted_paths(
    tmp_path: Path, runner: ContainerRunner, run_id: str
) -> None:
    source = frame(tmp_path, data=b"the frame's bytes")
    prof = container_profile(
        tmp_path,
        run_id,
        sh(
            "copy",
            'cp "$0" "$1" && echo "copied $0 in $(pwd)" && ! echo x 2>/dev/null >>"$0"',
            "{inputs.frames}",
            "{outputs.red}",
        ),
        inputs=[source],
        output=True,
    )
    outcome = run(tmp_path, prof, runner)
    step = only(outcome)

    assert outcome.succeeded, outcome.error
    assert step.state is StepState.SUCCEEDED and step.exit_status == 0
    output = tmp_path / "work" / "out" / "red_20261121.fits"
    assert output.read_bytes() == b"the frame's bytes"  # on the host, where it is published
    assert step.stdout_tail == "copied /inputs/frames/0/a.fits in /work\n"
    assert source.read_bytes() == b"the frame's bytes"  # the input was read-only
    log = (tmp_path / "run.log").read_text()
    assert "copied /inputs/frames/0/a.fits" in log and "run " + run_id + " succeeded" in log


def test_a_failing_step_reports_its_exit_status_and_stderr(
    tmp_path: Path, runner: ContainerRunner, run_id: str
) -> None:
    prof = container_profile(
        tmp_path, run_id, sh("reduce", "echo working; echo 'bias frame is empty' >&2; exit 3")
    )
    outcome = run(tmp_path, prof, runner)
    step = only(outcome)

    assert not outcome.succeeded
    assert step.state is StepState.FAILED and step.exit_status == 3
    assert step.reason == "exit status 3"
    assert step.stdout_tail == "working\n" and step.stderr_tail == "bias frame is empty\n"
    assert outcome.error == f"run {run_id} step reduce: exit status 3: bias frame is empty"
    assert (tmp_path / "work" / "logs" / "reduce.1.err").read_text() == "bias frame is empty\n"


def test_a_step_runs_as_a_user_who_is_not_root(
    tmp_path: Path, runner: ContainerRunner, run_id: str
) -> None:
    prof = container_profile(tmp_path, run_id, sh("who", "id -u; id -g; touch /work/mine"))
    outcome = run(tmp_path, prof, runner)

    assert outcome.succeeded, outcome.error
    uid, gid = only(outcome).stdout_tail.split()
    assert uid != "0" and uid == NOBODY_OR_ME and gid != "0"
    assert (tmp_path / "work" / "mine").stat().st_uid == int(uid)


# ------------------------------------------------------------------ what a step may not do


def test_a_step_has_no_network_unless_it_asks(
    tmp_path: Path, runner: ContainerRunner, run_id: str
) -> None:
    prof = container_profile(
        tmp_path,
        run_id,
        sh("offline", "ls /sys/class/net"),
        sh("online", "ls /sys/class/net", network=True),
    )
    outcome = run(tmp_path, prof, runner)
    steps = {r.name: r for r in outcome.steps}

    assert outcome.succeeded, outcome.error
    assert steps["offline"].stdout_tail.split() == ["lo"]
    online = steps["online"].stdout_tail.split()
    assert "lo" in online and len(online) > 1


def test_cpu_and_memory_limits_are_applied(
    tmp_path: Path, runner: ContainerRunner, run_id: str
) -> None:
    script = (  # cgroup v2, else v1
        "cd /sys/fs/cgroup; cat memory.max 2>/dev/null || cat memory/memory.limit_in_bytes;"
        " cat cpu.max 2>/dev/null || cat cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us"
    )
    prof = container_profile(tmp_path, run_id, sh("limited", script, cpus=0.5, memory="64m"))
    outcome = run(tmp_path, prof, runner)

    assert outcome.succeeded, outcome.error
    assert only(outcome).stdout_tail.split() == [str(64 << 20), "50000", "100000"]


# ------------------------------------------------------------------ how a step ends


def test_a_timeout_kills_and_removes_the_container(
    tmp_path: Path, runner: ContainerRunner, run_id: str
) -> None:
    prof = container_profile(tmp_path, run_id, sh("slow", "echo begun; sleep 30", timeout=1))
    began = time.monotonic()
    outcome = run(tmp_path, prof, runner, kill_grace=60)  # the runner's own grace: 0.5 s
    took = time.monotonic() - began
    step = only(outcome)

    assert step.state is StepState.FAILED and step.reason == "timed out after 1 s"
    assert step.exit_status == -signal.SIGKILL  # PID 1 ignores SIGTERM; SIGKILL ends it
    assert step.stdout_tail == "begun\n"  # what it wrote before is kept
    assert took < 8, took


def test_a_missing_image_is_named(tmp_path: Path, runner: ContainerRunner, run_id: str) -> None:
    missing = "localhost/obsflow-no-such-image:1"
    prof = container_profile(tmp_path, run_id, sh("reduce", "true", image=missing))
    step = only(run(tmp_path, prof, runner))

    assert step.state is StepState.FAILED and step.exit_status is None
    assert step.reason == (
        f"cannot start: image {missing} not found on the container engine at {HOST}: "
        "build or pull it"
    )


def test_an_engine_that_cannot_be_reached_is_named(tmp_path: Path) -> None:
    nowhere = f"unix://{tmp_path}/no-engine.sock"
    unreachable = ContainerRunner(Containers(host=nowhere))
    prof = container_profile(tmp_path, "r1", sh("reduce", "true"))
    step = only(run(tmp_path, prof, unreachable))

    assert step.state is StepState.FAILED
    assert step.reason == f"cannot start: cannot reach the container engine at {nowhere}: " + (
        "no such socket"
    )


def test_a_missing_input_is_not_mounted_as_an_empty_directory(
    tmp_path: Path, runner: ContainerRunner, run_id: str
) -> None:
    gone = frame(tmp_path)
    prof = container_profile(
        tmp_path, run_id, sh("reduce", 'cat "$0"', "{inputs.frames}"), inputs=[gone]
    )
    gone.unlink()
    step = only(run(tmp_path, prof, runner))

    mounted = "/inputs/frames/0/a.fits"
    assert step.reason == f"cannot start: {gone} does not exist (it is mounted at {mounted})"
    assert not gone.exists()


# ------------------------------------------------------------------ nothing left behind


def test_kill_every_step_kills_and_removes_the_containers(
    tmp_path: Path, runner: ContainerRunner, run_id: str, engine: docker.APIClient
) -> None:
    prof = container_profile(tmp_path, run_id, sh("long", "echo ready; sleep 60"))
    outcomes: list[RunOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(run(tmp_path, prof, runner)))
    thread.start()
    stdout = tmp_path / "work" / "logs" / "long.1.out"
    wait_for(lambda: stdout.exists() and stdout.read_text() == "ready\n")  # it runs

    remove_orphans(Containers(host=HOST))
    assert obsflow_containers(engine, run=run_id), "a live process's container is no orphan"
    kill_every_step()
    thread.join(20)

    assert not thread.is_alive()
    step = only(outcomes[0])
    assert step.state is StepState.FAILED
    assert step.reason == "killed by signal 9 (Killed)" or step.reason.startswith(
        "lost container "  # the engine removed it before it told its exit status
    ), step.reason


def test_containers_of_a_killed_process_are_removed_as_orphans(
    tmp_path: Path, run_id: str, engine: docker.APIClient
) -> None:
    prof = container_profile(tmp_path, run_id, sh("long", "sleep 120"))
    script = (
        "import json, sys, pathlib\n"
        "from obsflow.processing.container import ContainerRunner\n"
        "from obsflow.processing.controller import Controller\n"
        "from obsflow.processing.profile import RuntimeProfile\n"
        "from obsflow.settings import Containers\n"
        "prof = RuntimeProfile.from_json(json.loads(sys.argv[1]))\n"
        "runner = ContainerRunner(Containers(host=sys.argv[2]), owner='doomed')\n"
        "Controller(containers=runner).run(prof, log_path=pathlib.Path(sys.argv[3]))\n"
    )
    argv = [sys.executable, "-c", script, json.dumps(prof.to_json()), HOST, str(tmp_path / "l")]
    doomed = subprocess.Popen(argv)
    try:
        wait_for(lambda: obsflow_containers(engine, run=run_id, owner="doomed"))
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()

    assert obsflow_containers(engine, run=run_id), "nobody removed it: it is an orphan"
    assert remove_orphans(Containers(host=HOST)) >= 1
    assert obsflow_containers(engine, run=run_id) == []


# ------------------------------------------------------------------ the registry


def test_network_cpus_and_memory_need_an_image(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    path = write(
        tmp_path,
        "profiles.yaml",
        "profiles:\n  - id: prof\n    steps:\n"
        "      - name: fetch\n        command: [wget, x]\n        network: true\n        cpus: 2\n",
    )
    problem = only_problem(tmp_path)

    assert (problem.file, problem.line) == (path, line_of(path, "- name: fetch"))
    assert "step 'fetch': network, cpus only apply to a container step" in problem.message


def test_registry_check_finds_missing_images(tmp_path: Path, engine: docker.APIClient) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    path = write(
        tmp_path,
        "profiles.yaml",
        f"profiles:\n  - id: good\n    steps:\n"
        f"      - name: a\n        command: ['true']\n        image: {IMAGE}\n"
        f"  - id: bad\n    steps:\n"
        f"      - name: b\n        command: ['true']\n        image: localhost/obsflow-gone:2\n",
    )
    registry = load_registry(tmp_path)

    found = check_images(registry, Containers(host=HOST))
    assert found.found == 1 and found.warnings == ()
    assert found.problems == (
        f"{path}:{line_of(path, '- id: bad')}: profile 'bad' step 'b': image "
        f"localhost/obsflow-gone:2 not found on the container engine at {HOST}: build or pull it",
    )
    unreachable = check_images(registry, Containers(host=f"unix://{tmp_path}/none.sock"))
    assert unreachable.problems == () and len(unreachable.warnings) == 1
    assert "2 container step(s) not checked: cannot reach" in unreachable.warnings[0]


def wait_for(condition: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.05)


def test_a_step_over_its_memory_limit_is_killed(
    tmp_path: Path, runner: ContainerRunner, run_id: str
) -> None:
    hog = "dd if=/dev/zero of=/dev/null bs=64M count=1"  # a buffer of 64 MiB
    prof = container_profile(
        tmp_path, run_id, sh("hog", hog, memory="16m"), sh("fits", hog, memory="128m")
    )
    steps = {r.name: r for r in run(tmp_path, prof, runner).steps}

    assert steps["fits"].state is StepState.SUCCEEDED
    assert steps["hog"].state is StepState.FAILED
    # Docker says why; Podman 4.3 on cgroup v1 does not tell an OOM kill from another
    reason = steps["hog"].reason
    assert reason == "exit status 137" or reason.endswith("going over its memory limit"), reason

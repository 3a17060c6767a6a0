"""What does a container step cost, next to the same command as a subprocess step?

Three ways to run N steps of ``true`` one after another (``--steps``, default 20), in one
run on one machine, each timed ``--repeat`` times (default 3, interleaved) and the best
reported:

1. **container steps**: one run-time profile of N independent steps with ``image:`` (the
   test image, a static busybox, built if absent), run by the :class:`Controller` with a
   :class:`ContainerRunner` and ``parallel=1``: each step is made, attached to, started,
   waited for, its streams copied to ``work/logs``, removed.
2. **floor: the engine's API alone**: the same N containers with nothing of obsflow's:
   ``create_container``, ``start``, wait, ``remove_container`` in a loop through
   docker-py, no output kept; the wait is the engine's quickest (on Podman its own
   ``libpod`` wait polling every 20 ms, as obsflow's; on Docker docker-py's ``wait``).
   Beside it, for reference, the same loop with docker-py's ``wait`` on Podman's
   Docker-compatible endpoint, which polls for up to half a second.
3. **subprocess steps**: the same profile without ``image:``, run by the same
   controller: N process groups.

Prints each one's seconds and milliseconds per step, the per-step overhead of a container
over a subprocess (what choosing ``image:`` costs a step), and the ratios to the floor.
Target: obsflow's container steps ≤ 1.5× the engine's own floor (obsflow adds streams,
labels, a user and a removal that waits; it must not add a second engine's worth). For
reference, on this class of machine, Podman 4.3 starts a container in about 0.15 s.

Needs a Docker Engine API: ``--host`` (default ``$OBSFLOW_TEST_CONTAINER_HOST``, else
Podman's root socket, which ``tools/podman-service`` starts). Without one it says so and
measures nothing (exit status 0: there is nothing to measure, nothing failed). Exit status
1 when a step fails. About 20 s.

Run: ``python benchmarks/containers.py``; ``--steps 50 --repeat 5`` for steadier figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import docker

from obsflow.processing.container import ContainerRunner
from obsflow.processing.controller import Controller
from obsflow.processing.profile import RuntimeProfile, RuntimeStep
from obsflow.settings import Containers
from synthetic import load, machine, verdict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test image's recipe
from tests.containers import HOST, IMAGE, build_image, connect

TARGET = 1.5
REFERENCE = "Podman 4.3 starts a container in about 0.15 s"


def fail(message: str) -> NoReturn:
    print(f"\nFAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def steps_profile(root: Path, steps: int, image: str | None, label: str) -> RuntimeProfile:
    return RuntimeProfile(
        run_id=f"bench-{label}",
        pipeline="bench",
        profile="true",
        steps=tuple(RuntimeStep(name=f"s{i}", argv=("true",), image=image) for i in range(steps)),
        work=str(root / label),
    )


def through_controller(root: Path, steps: int, runner: ContainerRunner | None) -> float:
    """Seconds for the controller to run ``steps`` steps of ``true``, one at a time."""
    label = "container" if runner is not None else "subprocess"
    work = root / label
    shutil.rmtree(work, ignore_errors=True)
    profile = steps_profile(root, steps, IMAGE if runner is not None else None, label)
    controller = Controller(parallel=1, containers=runner)
    start = time.perf_counter()
    outcome = controller.run(profile, log_path=root / f"{label}.log")
    took = time.perf_counter() - start
    if not outcome.succeeded:
        fail(f"{label} steps: {outcome.error}")
    return took


def engine_floor(api: docker.APIClient, steps: int, podman: str | None) -> float:
    """Seconds for the engine's API alone to run ``steps`` containers of ``true``, one at
    a time; with ``podman`` (its libpod API version), waiting through Podman's own wait."""
    host_config = api.create_host_config(network_mode="none")
    start = time.perf_counter()
    for _ in range(steps):
        ident = api.create_container(IMAGE, command=["true"], host_config=host_config)["Id"]
        api.start(ident)
        if podman is None:
            status = int(api.wait(ident)["StatusCode"])
        else:
            url = f"{api.base_url}/v{podman}/libpod/containers/{ident}/wait"
            status = int(api.post(url, params={"interval": "20ms"}, timeout=None).json())
        api.remove_container(ident, force=True)
        if status != 0:
            fail(f"the floor's container exited {status}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of each kind (default 20)")
    parser.add_argument("--repeat", type=int, default=3, help="time each N times, report the best")
    parser.add_argument("--host", default=HOST, help=f"the engine's API (default {HOST})")
    args = parser.parse_args()
    if args.steps < 1 or args.repeat < 1:
        parser.error("--steps and --repeat must be at least 1")

    print(f"{machine()}\n{load()} at the start")
    api = connect(args.host)
    if api is None:
        print(f"\nno container engine answers at {args.host}: nothing measured")
        print("(start one with tools/podman-service, or name one with --host)")
        return
    build_image(api)
    runner = ContainerRunner(Containers(host=args.host), owner="benchmark")
    podman = runner.engine().podman
    print(f"engine at {args.host}: {'Podman ' + podman if podman else 'Docker'}; image {IMAGE}")
    root = Path(tempfile.mkdtemp(prefix="obsflow-containers-"))
    if os.geteuid() == 0:
        root.chmod(0o755)
    kinds = ("container", "floor", "compatible", "subprocess")
    best = dict.fromkeys(kinds, float("inf"))
    try:
        through_controller(root, 2, runner)  # warm: the engine's caches, our connection
        engine_floor(api, 2, podman)
        for _ in range(args.repeat):
            took = {
                "container": through_controller(root, args.steps, runner),
                "floor": engine_floor(api, args.steps, podman),
                "compatible": engine_floor(api, args.steps, None) if podman else float("nan"),
                "subprocess": through_controller(root, args.steps, None),
            }
            best = {kind: min(best[kind], took[kind]) for kind in kinds}
    finally:
        shutil.rmtree(root, ignore_errors=True)
        runner.close()
        api.close()

    n = args.steps
    best_of = f", best of {args.repeat}" if args.repeat > 1 else ""
    print(f"\n{n} steps of true, one at a time{best_of}")
    print(f"  {'':<40} {'seconds':>8} {'ms/step':>8} {'× floor':>8}")
    rows = [
        ("obsflow: container steps (controller)", best["container"]),
        ("floor: the engine's API alone", best["floor"]),
        ("obsflow: subprocess steps (controller)", best["subprocess"]),
    ]
    if podman:
        rows.insert(2, ("(the same, Docker-compatible wait)", best["compatible"]))
    for name, seconds in rows:
        per_step, to_floor = 1e3 * seconds / n, seconds / best["floor"]
        print(f"  {name:<40} {seconds:>8.2f} {per_step:>8.1f} {to_floor:>8.2f}")
    overhead = 1e3 * (best["container"] - best["subprocess"]) / n
    ratio = best["container"] / best["floor"]
    versus = best["container"] / best["subprocess"]
    print(f"  a container step costs {overhead:.0f} ms more than a subprocess step ({versus:.0f}×)")
    ruling = f"container steps / engine floor {ratio:.2f}×, target ≤ {TARGET:g}×: "
    print(f"  {ruling}{verdict(ratio, TARGET)}")
    print(f"  (for reference: {REFERENCE})")
    print(f"\nsummary:\n  {machine()}\n  {load()} at the end")
    print(
        f"  container steps {1e3 * best['container'] / n:.0f} ms/step, engine floor "
        f"{1e3 * best['floor'] / n:.0f} ms, subprocess {1e3 * best['subprocess'] / n:.1f} ms; "
        f"overhead {overhead:.0f} ms/step; {ruling}{verdict(ratio, TARGET)}"
    )


if __name__ == "__main__":
    main()

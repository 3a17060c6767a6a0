"""Container steps: a step with an ``image`` runs in a container, through the Docker
Engine API (docker-py), on Docker or on Podman's Docker-compatible socket.

:class:`ContainerRunner` is the controller's :class:`~obsflow.processing.controller.StepRunner`
for such steps. Making one costs nothing: the engine is reached when the first container
step starts, at ``containers.host``; when that is not set, at ``$DOCKER_HOST`` (read by
docker-py), else at the first standard socket that answers: Docker's
``/var/run/docker.sock``, then Podman's ``/run/podman/podman.sock`` and
``/run/user/UID/podman/podman.sock``.

Each attempt is one container, made from what the run-time profile recorded (see
:mod:`obsflow.processing.profile`):

* the run's work directory bound read-write at ``/work`` (the working directory) and each
  input file read-only at ``/inputs/NAME/N/BASENAME``; a source that does not exist stops
  the start (an engine would make an empty directory of it);
* as a non-root user: ``containers.user``, else the user obsflow runs as, else (obsflow
  runs as root) ``nobody``, 65534:65534, to whom the work directory and its ``out/`` are
  then handed, so the step can write its outputs;
* with no network but loopback unless the step says ``network: true``; with the step's
  CPU (``nano_cpus``) and memory limits;
* labelled ``obsflow=1``, ``obsflow.run``, ``obsflow.step``, ``obsflow.owner``,
  ``obsflow.host``, ``obsflow.pid`` and ``obsflow.pidstart``, so that
  :func:`remove_orphans` can tell the containers of a process that died (SIGKILL, OOM,
  a lost machine) and remove them when the daemon or a worker starts again.

The runner attaches to the container before it starts it; a small thread copies the
container's stdout and stderr, as they come, into the attempt's files under ``work/logs``
(so the run log and the tails are the controller's, as for a subprocess), blocks in the
engine's ``wait`` for the exit status, then closes a pipe: the controller's poll loop
wakes as it does for a process. (On Podman the thread uses Podman's own ``wait``, which
polls every 20 ms where its Docker-compatible one takes up to half a second.) A timeout
or a stop sends SIGTERM to the container, SIGKILL ``containers.stop_seconds`` later (a
command running as PID 1 that installs no handler ignores SIGTERM: SIGKILL ends it). The
container is removed when the attempt ends, whatever the end.

A missing image fails the step, naming the image (it is never pulled behind the
operator's back: what runs is what was built or pulled); so does an engine that cannot be
reached, naming where it was looked for. ``obsflow registry check`` calls
:func:`check_images` to find missing images before any run does.

With rootless Podman, the user obsflow runs as is root inside the container's user
namespace and other users map to subordinate IDs: set ``containers.user: "0"`` there, so
that the step writes the work directory as the user who owns it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import docker
import docker.constants
import docker.errors
import docker.types
import docker.utils
import requests
from docker.utils.socket import STDERR, STDOUT, frames_iter
from requests.exceptions import RequestException

from obsflow.errors import RunError
from obsflow.processing.profile import CONTAINER_WORK, OUTPUT_DIR, Mount, RuntimeStep
from obsflow.registry import Registry
from obsflow.settings import Containers

log = logging.getLogger(__name__)

LABEL: Final = "obsflow"
"""Every container obsflow makes carries ``obsflow=1`` and ``obsflow.*`` labels."""
NOBODY: Final = "65534:65534"
"""Who a container step runs as when obsflow runs as root and ``containers.user`` is unset."""
CONNECT_TIMEOUT: Final = 5
"""Seconds to wait for an engine to answer its first call."""
API_TIMEOUT: Final = 60
"""Seconds one API call may take (not ``wait``, which lasts as long as the step)."""
FINISH_TIMEOUT: Final = 30.0
"""Seconds :meth:`ContainerStep.finish` waits for a container that was sent SIGKILL."""
DEFAULT_VERSION: Final = docker.constants.DEFAULT_DOCKER_API_VERSION
"""The API version asked for until the engine says its own (in its answer to _ping)."""
_ENGINE_ERRORS: Final = (docker.errors.DockerException, RequestException, OSError)
_RAW_SOCKET: Final = "_get_raw_response_socket"
"""docker-py's way to the socket under a response, for each transport (not public)."""
_frames: Callable[[Any, bool], Iterator[tuple[int, bytes]]] = frames_iter
"""(stream, bytes) frames of an attached container's output (typed here: the stubs are not)."""


@dataclass(frozen=True)
class Engine:
    """A connected engine: its client, where it is (for messages), how to reach it again."""

    api: docker.APIClient
    where: str
    kwargs: Mapping[str, Any]
    podman: str | None
    """Podman's own API version (``4.3.1``) when the engine is Podman."""

    def fresh(self, timeout: int) -> docker.APIClient:
        """A client of its own (no shared connection pool), for a signal handler."""
        return docker.APIClient(**self.kwargs, version=self.api.api_version, timeout=timeout)

    def wait(self, ident: str) -> int:
        """Block until the container has ended; its exit status."""
        if self.podman is None:
            return int(self.api.wait(ident)["StatusCode"])
        url = f"{self.api.base_url}/v{self.podman}/libpod/containers/{ident}/wait"
        answer = self.api.post(url, params={"interval": "20ms"}, timeout=None)
        answer.raise_for_status()
        return int(answer.json())


class ContainerRunner:
    """Runs container steps on one engine; one runner may serve many runs and threads.

    ``owner`` is written on each container (``obsflow.owner``): who ran it, e.g. the run
    worker's lease owner.
    """

    def __init__(self, settings: Containers, *, owner: str = "") -> None:
        self.settings = settings
        self.owner = owner
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._user, self._owned_by = _run_as(settings.user)

    def start(
        self, step: RuntimeStep, *, run_id: str, work: Path, stdout: Path, stderr: Path
    ) -> ContainerStep:
        """Make and start the container of one attempt of ``step``; :class:`RunError`
        with the reason when it cannot start (no image, no engine, a missing input)."""
        image = step.image
        if image is None:
            raise RunError(f"step {step.name} names no image; it is not a container step")
        mounts = list(step.mounts)
        if not any(m.target == CONTAINER_WORK for m in mounts):
            mounts.insert(0, _work_mount(work))
        for mount in mounts:
            if not os.path.exists(mount.source):
                raise RunError(f"{mount.source} does not exist (it is mounted at {mount.target})")
        engine = self.engine()
        if self._owned_by is not None:
            _hand_over(work, *self._owned_by)
        for path in (stdout, stderr):  # they exist even if nothing ever comes
            path.write_bytes(b"")
        api = engine.api
        try:
            host_config = api.create_host_config(
                mounts=[
                    docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
                    for m in mounts
                ],
                network_mode=None if step.network else "none",
                nano_cpus=None if step.cpus is None else round(step.cpus * 1e9),
                mem_limit=step.memory,
            )
            created = api.create_container(
                image,
                command=list(step.argv),
                name=_name(run_id, step.name),
                user=self._user,
                working_dir=CONTAINER_WORK,
                environment=dict(step.env),
                labels=self.labels(run_id, step.name),
                host_config=host_config,
                use_config_proxy=False,
            )
        except docker.errors.ImageNotFound:
            raise RunError(
                f"image {image} not found on the container engine at {engine.where}: "
                "build or pull it"
            ) from None
        except _ENGINE_ERRORS as exc:
            raise RunError(f"the container engine at {engine.where}: {_say(exc)}") from None
        ident = str(created["Id"])
        attached: requests.Response | None = None
        try:  # attached before it starts: not a byte of its output is missed
            attached = _attach(api, ident)
            api.start(ident)
        except _ENGINE_ERRORS as exc:
            if attached is not None:
                attached.close()
            _remove(api, ident)
            raise RunError(f"image {image}: {_say(exc)}") from None
        return ContainerStep(engine, ident, attached, stdout, stderr, self.settings.stop_seconds)

    def engine(self) -> Engine:
        """The engine, reached at the first call (:class:`RunError` naming where it was
        looked for if it cannot be); later calls reuse it."""
        with self._lock:
            if self._engine is None:
                self._engine = _connect(self.settings)
            return self._engine

    def labels(self, run_id: str, step: str) -> dict[str, str]:
        return {
            LABEL: "1",
            f"{LABEL}.run": run_id,
            f"{LABEL}.step": step,
            f"{LABEL}.owner": self.owner,
            f"{LABEL}.host": socket.gethostname(),
            f"{LABEL}.pid": str(os.getpid()),
            f"{LABEL}.pidstart": _started(os.getpid()) or "",
        }

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.api.close()
                self._engine = None


@dataclass(eq=False)
class ContainerStep:
    """One started container (a :class:`~obsflow.processing.controller.StepProcess`)."""

    engine: Engine
    id: str
    attached: requests.Response
    """The attached container's output, multiplexed, until it ends."""
    stdout: Path
    stderr: Path
    kill_grace: float | None
    fd: int = -1
    _status: int | None = None
    _error: str = ""
    _signalled: int = 0
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.fd, writable = os.pipe()
        self._thread = threading.Thread(
            target=self._await, args=(writable,), name=f"container-{self.id[:12]}", daemon=True
        )
        self._thread.start()

    def signal(self, sig: signal.Signals) -> None:
        self._signalled = int(sig)
        try:
            self.engine.api.kill(self.id, signal=int(sig))
        except _ENGINE_ERRORS as exc:  # it ended already, or the engine went: wait says
            log.debug("container %s: %s not sent: %s", self.id[:12], sig.name, _say(exc))

    def finish(self) -> int:
        self._thread.join(FINISH_TIMEOUT)
        os.close(self.fd)
        _remove(self.engine.api, self.id)
        if self._thread.is_alive():
            raise RunError(
                f"container {self.id[:12]} did not end within {FINISH_TIMEOUT:g} s "
                f"(the container engine at {self.engine.where} does not answer)"
            )
        if self._error:
            raise RunError(self._error)
        assert self._status is not None
        if self._signalled and self._status == 128 + self._signalled:
            return -self._signalled  # as a subprocess killed by that signal reports it
        return self._status

    def abandon(self) -> None:
        self._signalled = int(signal.SIGKILL)  # what removing it by force does
        try:
            api = self.engine.fresh(timeout=5)
            api.remove_container(self.id, force=True)
            api.close()
        except _ENGINE_ERRORS as exc:
            log.warning("container %s not removed: %s", self.id[:12], _say(exc))

    def _await(self, writable: int) -> None:
        """On its own thread: copy the streams to their files until the container ends,
        get its exit status, wake the controller (the pipe's read end sees end-of-file)."""
        api, short = self.engine.api, self.id[:12]
        try:
            with open(self.stdout, "ab") as out, open(self.stderr, "ab") as err:
                files = {STDOUT: out, STDERR: err}
                raw = getattr(api, _RAW_SOCKET)(self.attached)
                for stream, chunk in _frames(raw, False):
                    if stream in files:
                        files[stream].write(chunk)
                        files[stream].flush()
            self.attached.close()
            status = self.engine.wait(self.id)
            if status == 128 + signal.SIGKILL and api.inspect_container(self.id)["State"].get(
                "OOMKilled"
            ):
                self._error = f"container {short} was killed for going over its memory limit"
            self._status = status
        except (*_ENGINE_ERRORS, KeyError, TypeError, ValueError) as exc:
            if not self._error:
                self._error = (
                    f"lost container {short} on the container engine at "
                    f"{self.engine.where}: {_say(exc)}"
                )
        finally:
            self.attached.close()
            os.close(writable)


def remove_orphans(settings: Containers) -> int:
    """Remove the containers obsflow started on this host for a process that is gone
    (killed before it could remove them); how many were removed. For a daemon or a run
    worker that starts: an engine that cannot be reached is logged, not raised (a site
    may run no container steps at all)."""
    try:
        engine = _connect(settings)
    except RunError as exc:
        log.info("no orphaned containers looked for: %s", exc)
        return 0
    host = socket.gethostname()
    removed = 0
    try:
        found = engine.api.containers(all=True, filters={"label": f"{LABEL}=1"})
        for container in found:
            labels = container.get("Labels") or {}
            if labels.get(f"{LABEL}.host") != host or _alive(labels):
                continue
            ident = str(container["Id"])
            with contextlib.suppress(docker.errors.NotFound):
                engine.api.remove_container(ident, force=True)
                removed += 1
                log.warning(
                    "removed container %s of run %s: its process %s is gone",
                    ident[:12],
                    labels.get(f"{LABEL}.run"),
                    labels.get(f"{LABEL}.pid"),
                )
    except _ENGINE_ERRORS as exc:
        log.warning("orphaned containers at %s: %s", engine.where, _say(exc))
    finally:
        engine.api.close()
    return removed


@dataclass(frozen=True)
class ImageCheck:
    """What :func:`check_images` found."""

    problems: tuple[str, ...]
    """A missing image, with the profile's file:line and step: a run would fail."""
    warnings: tuple[str, ...]
    """The engine could not be reached: nothing was checked."""
    found: int
    """How many distinct images were found on the engine."""


def check_images(registry: Registry, settings: Containers) -> ImageCheck:
    """Whether every image the registry's profiles name is on the configured engine."""
    steps = [
        (profile, step)
        for profile in registry.profiles.values()
        for step in profile.steps
        if step.image is not None
    ]
    if not steps:
        return ImageCheck((), (), 0)
    try:
        engine = _connect(settings)
    except RunError as exc:
        return ImageCheck((), (f"{len(steps)} container step(s) not checked: {exc}",), 0)
    present: dict[str, bool] = {}
    problems: list[str] = []
    inspect: Callable[[str], object] = engine.api.inspect_image
    try:
        for profile, step in steps:
            image = step.image
            assert image is not None
            if image not in present:
                try:
                    inspect(image)
                    present[image] = True
                except docker.errors.ImageNotFound:
                    present[image] = False
            if not present[image]:
                where = profile.source or f"profile {profile.id}"
                problems.append(
                    f"{where}: profile {profile.id!r} step {step.name!r}: image {image} not "
                    f"found on the container engine at {engine.where}: build or pull it"
                )
    except _ENGINE_ERRORS as exc:
        return ImageCheck(tuple(problems), (f"{engine.where}: {_say(exc)}",), sum(present.values()))
    finally:
        engine.api.close()
    return ImageCheck(tuple(problems), (), sum(present.values()))


# -- helpers ---------------------------------------------------------------------------


def standard_sockets() -> tuple[str, ...]:
    """Where an engine listens when nothing says otherwise: Docker, rootful Podman,
    rootless Podman (``$XDG_RUNTIME_DIR`` is ``/run/user/UID`` on systemd machines)."""
    return (
        "unix:///var/run/docker.sock",
        "unix:///run/podman/podman.sock",
        f"unix:///run/user/{os.getuid()}/podman/podman.sock",
    )


def _connect(settings: Containers) -> Engine:
    candidates: list[tuple[str, dict[str, Any]]]
    if settings.host:
        candidates = [(settings.host, {"base_url": settings.host})]
    else:
        from_env = docker.utils.kwargs_from_env()  # $DOCKER_HOST, read by docker-py
        if from_env.get("base_url"):
            candidates = [(f"{from_env['base_url']} ($DOCKER_HOST)", dict(from_env))]
        else:
            candidates = [(url, {"base_url": url}) for url in standard_sockets()]
    tried: list[str] = []
    for where, kwargs in candidates:
        url = str(kwargs["base_url"])
        if url.startswith("unix://") and not os.path.exists(url.removeprefix("unix://")):
            tried.append(f"{where}: no such socket")
            continue
        try:  # _ping, not docker-py's version="auto": Podman takes seconds for /version
            probe = docker.APIClient(**kwargs, version=DEFAULT_VERSION, timeout=CONNECT_TIMEOUT)
            answer = probe.get(f"{probe.base_url}/_ping", timeout=CONNECT_TIMEOUT)
            answer.raise_for_status()
            probe.close()
        except _ENGINE_ERRORS as exc:
            tried.append(f"{where}: {_say(exc)}")
            continue
        version = answer.headers.get("Api-Version") or DEFAULT_VERSION
        api = docker.APIClient(**kwargs, version=version, timeout=API_TIMEOUT, max_pool_size=32)
        return Engine(api, where, kwargs, answer.headers.get("Libpod-Api-Version"))
    if len(candidates) == 1:
        raise RunError(f"cannot reach the container engine at {tried[0]}")
    raise RunError(
        "no container engine: containers.host and $DOCKER_HOST are not set, and no "
        f"standard socket answers ({'; '.join(tried)}); set containers.host"
    )


def _run_as(configured: str | None) -> tuple[str, tuple[int, int] | None]:
    """The user containers run as, and, when obsflow runs as root and that user is not,
    the (uid, gid) to hand the work directory to (gid -1: leave the group)."""
    if configured:
        user = configured
    elif os.geteuid() == 0:
        user = NOBODY
    else:
        user = f"{os.getuid()}:{os.getgid()}"
    uid, _, gid = user.partition(":")
    if os.geteuid() != 0 or int(uid) == 0:
        return user, None
    return user, (int(uid), int(gid) if gid else -1)


def _hand_over(work: Path, uid: int, gid: int) -> None:
    """Give the work directory and its ``out/`` to the containers' user (obsflow is root)."""
    for directory in (work, work / OUTPUT_DIR):
        with contextlib.suppress(FileNotFoundError):
            st = directory.stat()
            if st.st_uid != uid or gid not in (-1, st.st_gid):
                os.chown(directory, uid, gid)


def _work_mount(work: Path) -> Mount:
    return Mount(os.path.abspath(work), CONTAINER_WORK, read_only=False)


def _name(run_id: str, step: str) -> str:
    """A container name an operator can read in ``podman ps``; unique."""
    run = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:40]
    return f"obsflow-{run}-{step}-{uuid.uuid4().hex[:8]}"


def _attach(api: docker.APIClient, ident: str) -> requests.Response:
    """Attach to a container's stdout and stderr: docker-py's ``attach_socket``, but
    keeping the response, which must be closed (docker-py's own leaves its socket open)."""
    url = f"{api.base_url}/v{api.api_version}/containers/{ident}/attach"
    answer = api.post(
        url,
        params={"stdout": 1, "stderr": 1, "stream": 1},
        headers={"Connection": "Upgrade", "Upgrade": "tcp"},
        stream=True,
    )
    try:
        answer.raise_for_status()
    except RequestException:
        answer.close()
        raise
    return answer


def _remove(api: docker.APIClient, ident: str) -> None:
    try:
        api.remove_container(ident, force=True)
    except docker.errors.NotFound:
        pass
    except _ENGINE_ERRORS as exc:  # the sweep at the next start removes it
        log.warning("container %s not removed: %s", ident[:12], _say(exc))


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), to tell a reused PID; None
    if that cannot be known, "" for a zombie (it has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return "" if fields[0] == "Z" else fields[19]


def _alive(labels: Mapping[str, str]) -> bool:
    """Whether the process that labelled a container still runs (the same process: a
    PID reused since then started at another time)."""
    try:
        pid = int(labels.get(f"{LABEL}.pid", ""))
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started, now = labels.get(f"{LABEL}.pidstart"), _started(pid)
    if now is None:
        return True  # no /proc: the PID is taken, so it may be that process
    return now != "" and (not started or now == started)


def _say(exc: BaseException) -> str:
    """An engine error in one line: the engine's own explanation when it gave one."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        text = str(exc.explanation)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]

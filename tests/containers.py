"""Fixtures for tests of container steps, on a real engine (Podman's API socket).

A test module imports the fixtures it uses (``from tests.containers import engine,
runner``). The engine is ``$OBSFLOW_TEST_CONTAINER_HOST``, by default the socket that
``tools/podman-service`` starts as root; when it does not answer, the tests skip (fail
under ``OBSFLOW_REQUIRE_SERVICES=1``).

There is no registry to pull from: the test image is made here, once per machine, by
importing a tar of a tiny root file system holding Debian's static busybox (package
``busybox-static``) and its applets, ``/etc/passwd`` with ``nobody`` and a ``/tmp``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import docker
import docker.errors
import pytest

from obsflow.errors import RunError
from obsflow.processing.container import ContainerRunner
from obsflow.settings import Containers
from tests.conftest import service_missing

HOST: Final = os.environ.get("OBSFLOW_TEST_CONTAINER_HOST", "unix:///run/podman/podman.sock")
IMAGE: Final = "localhost/obsflow-test-busybox:1"
BUSYBOX: Final = Path("/bin/busybox")
APPLETS: Final = (
    "sh", "cat", "cp", "sleep", "echo", "id", "wget", "ping", "ls", "true", "false",
    "mkdir", "touch", "env", "test", "printf", "ps", "kill", "grep", "head", "tail", "wc",
    "dd", "ip", "nproc", "tr",
)  # fmt: skip
PASSWD: Final = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
GROUP: Final = b"root:x:0:\nnogroup:x:65534:\n"


def rootfs() -> bytes:
    """A tar of the test image's root file system; FileNotFoundError without a static
    busybox."""
    head = BUSYBOX.read_bytes()[:4096] if BUSYBOX.is_file() else b""
    if not head.startswith(b"\x7fELF") or b"/ld-linux" in head:  # the interpreter of a dynamic one
        raise FileNotFoundError(
            f"{BUSYBOX} is not a static executable (apt-get install busybox-static)"
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("work", 0o755)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, data in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_image(api: docker.APIClient) -> None:
    """Import the root file system as :data:`IMAGE`, unless it is there already.
    (Podman's import ignores the tag it is given: the image is tagged afterwards.) Also
    used by ``benchmarks/containers.py``."""
    try:
        inspect: Callable[[str], object] = api.inspect_image  # untyped in docker's stubs
        inspect(IMAGE)
        return
    except docker.errors.ImageNotFound:
        pass
    answer = api.import_image_from_data(rootfs())
    ids = [
        value
        for line in str(answer).splitlines()
        if line.strip()
        for value in json.loads(line).values()
        if isinstance(value, str) and value.startswith("sha256:")
    ]
    assert ids, f"no image ID in the engine's answer to an import: {answer!r}"
    repository, tag = IMAGE.rsplit(":", 1)
    api.tag(ids[-1], repository, tag)


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.APIClient]:
    """A client of the test engine, with the test image on it."""
    api = connect()
    if api is None:
        service_missing(f"no container engine answers at {HOST}; run tools/podman-service")
    assert api is not None
    try:
        build_image(api)
    except FileNotFoundError as exc:
        service_missing(str(exc))
    yield api
    api.close()


def connect(host: str = HOST) -> docker.APIClient | None:
    """A client of the engine at ``host`` (reached as the runner reaches it), or None if
    it does not answer."""
    try:
        return ContainerRunner(Containers(host=host)).engine().api
    except RunError:
        return None


@pytest.fixture
def runner(engine: docker.APIClient) -> Iterator[ContainerRunner]:
    """A container runner on the test engine; SIGKILL half a second after SIGTERM."""
    made = ContainerRunner(Containers(host=HOST, stop_seconds=0.5), owner="tests")
    yield made
    made.close()


def obsflow_containers(api: docker.APIClient, **labels: str) -> list[str]:
    """The IDs of the containers (running or not) labelled obsflow and with ``labels``
    (``run="r1"`` stands for ``obsflow.run=r1``)."""
    found = api.containers(all=True, filters={"label": "obsflow=1"})
    return [
        str(c["Id"])
        for c in found
        if all((c.get("Labels") or {}).get(f"obsflow.{k}") == v for k, v in labels.items())
    ]

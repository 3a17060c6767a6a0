"""A run's book-keeping at the archive server, over HTTP: the worker with no shared storage.

:class:`ServerHost` is the :class:`~obsflow.processing.lifecycle.RunHost` of a worker
that has only the server's URL and a token of ``worker`` scope (``obsflow worker
--server URL --token T``): on another machine, as another user, it never reads a path
of the site. What the site's own workers do with the catalog and the cache
(:class:`~obsflow.processing.sitehost.SiteHost`), the server does on its behalf
(:mod:`obsflow.api.workers`); what is left here is the worker's side::

    claim      POST /runs/{n}/claim: the plan, and how long a lease lasts
    stage      each input by archive ID (GET /files/{id}/data), its sha256 checked, into
               the worker's input cache (:mod:`obsflow.processing.inputcache`): a night's
               calibrations cross the network once; each run sees its inputs under their
               own names (hard links into ROOT/staged/run-N)
    steps      in ROOT/work/run-N, the log in ROOT/logs/run-N.log
    publish    each output sent back by the resumable, verified upload of the transfer
               protocol (:func:`obsflow.transfer.client.send_resumable`), then one call
               publishes them all (receipt, the run as provenance, all or none)
    finish     the state, the last steps and the run's log (its end, past
               :data:`LOG_SEND` bytes), kept by the server under the site's logs

The server may refuse a worker that lost its lease (409: :meth:`renew` and
:meth:`finish` say False, :meth:`publish` raises). Any other failure to talk to the
server is a :class:`ServerError` naming the server: the lifecycle fails the run with it,
or, when the server cannot be reached at all, the lease expires and the run is
executed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import httpx

from obsflow.catalog.steps import StepRow
from obsflow.errors import RunError
from obsflow.processing.inputcache import Held, InputCache, Write
from obsflow.processing.lifecycle import Claim, StoredProfile
from obsflow.processing.plan import InputRef, RunPlan
from obsflow.processing.profile import OUTPUT_DIR, ParameterValue
from obsflow.states import RunState
from obsflow.transfer.client import (
    TransferError,
    problem_detail,
    problem_kind,
    send_resumable,
)

log = logging.getLogger(__name__)

CHUNK: Final = 1 << 20
LOG_SEND: Final = 1 << 20
"""The most bytes of a run's log sent to the server (its end)."""
DEFAULT_LEASE: Final = 60.0
"""The lease's length until the server has said it (at the first claim)."""
_OWNER: Final = re.compile(r"[A-Za-z0-9_.@:-]{1,48}", re.ASCII)


class ServerError(RunError):
    """The archive server could not be reached, or refused a worker's call (names the
    server, the run and the call)."""


class ServerHost:
    """The run lifecycle's host over HTTP (see the module). Thread-safe: one per worker
    process, shared by its runs and their heartbeats."""

    def __init__(
        self, server: str, token: str, *, root: Path, cache_bytes: int, timeout: float = 30.0
    ) -> None:
        self.server = server.rstrip("/")
        self.root = root
        self.inputs = InputCache(root / "inputs", cache_bytes)
        self.http = httpx.Client(
            base_url=f"{self.server}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout),
            transport=httpx.HTTPTransport(retries=2),  # (connecting only: always safe)
        )
        self._lease = DEFAULT_LEASE
        self._lock = threading.Lock()
        self._held: dict[int, list[Held]] = {}

    def close(self) -> None:
        with self._lock:
            runs = list(self._held)
        for run_id in runs:
            self._drop(run_id)
        self.http.close()

    def __enter__(self) -> ServerHost:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def lease_seconds(self) -> float:
        return self._lease

    # -- claim --------------------------------------------------------------------------

    def claim(self, run_id: int, owner: str) -> Claim | None:
        response = self._call("POST", f"/runs/{run_id}/claim", run_id, "claim", owner=owner)
        if response.status_code == 409 and problem_kind(response) == "taken":
            return None
        body = self._ok(response, run_id, "claim")
        try:
            claim = Claim.from_json(body["claim"])
            self._lease = float(body["lease_seconds"])
        except (KeyError, TypeError, ValueError) as exc:  # another version's plan, say
            self.release(run_id, owner, [])  # for a worker that can read it
            raise ServerError(
                f"{self.server}: run {run_id}: claim: an answer this worker cannot read "
                f"(released): {exc}"
            ) from exc
        return claim

    def renew(self, run_id: int, owner: str) -> bool:
        response = self._call("POST", f"/runs/{run_id}/lease", run_id, "renew", owner=owner)
        if _lost(response):
            self._drop(run_id)  # the steps are stopped next: their inputs may go
            return False
        self._lease = float(self._ok(response, run_id, "renew")["lease_seconds"])
        return True

    # -- the worker's side ------------------------------------------------------------------

    def stage(self, plan: RunPlan) -> dict[str, list[Path]]:
        """Each input from the input cache (fetched into it first if need be), held
        until the run is over, under its own name in ``ROOT/staged/run-N``."""
        run_id = plan.run_id
        folder = self.root / "staged" / f"run-{run_id}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        staged: dict[str, list[Path]] = {}
        for name, refs in plan.inputs.items():
            paths = staged.setdefault(name, [])
            for ref in refs:
                label = f"run {run_id}: input {ref.archive_id} ({ref.name})"
                held = self.inputs.fetch(ref.sha256, self._downloader(run_id, ref), label=label)
                with self._lock:
                    self._held.setdefault(run_id, []).append(held)
                paths.append(_link(held.path, folder, ref.name))
        return staged

    def local_parameters(self) -> dict[str, ParameterValue]:
        return {"python": sys.executable}

    def work_dir(self, run_id: int) -> Path:
        work = self.root / "work" / f"run-{run_id}"
        shutil.rmtree(work, ignore_errors=True)  # an earlier attempt's leftovers
        (work / OUTPUT_DIR).mkdir(parents=True)
        return work

    def log_path(self, run_id: int) -> Path:
        """This attempt's log (the server keeps every attempt's, one after the other)."""
        path = self.root / "logs" / f"run-{run_id}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        return path

    # -- reports ------------------------------------------------------------------------

    def record_steps(
        self,
        run_id: int,
        owner: str,
        steps: Sequence[StepRow],
        profile: StoredProfile | None = None,
    ) -> None:
        body: dict[str, Any] = {"steps": [s.to_json() for s in steps]}
        if profile is not None:
            body["profile"] = _profile_json(profile)
        response = self._call("POST", f"/runs/{run_id}/steps", run_id, "steps", owner, body)
        self._ok(response, run_id, "steps")

    def publish(self, run_id: int, owner: str, outputs: Mapping[str, Path]) -> None:
        """Send each output (resumable, verified; what the server holds already is not
        sent again), then publish them all at once."""
        sent = [
            {"product": product, "name": path.name, "sha256": self._send(run_id, owner, path)}
            for product, path in sorted(outputs.items())
        ]
        response = self._call(
            "POST", f"/runs/{run_id}/publish", run_id, "publish", owner, {"outputs": sent}
        )
        if _lost(response):
            raise ServerError(
                f"{self.server}: run {run_id}: {owner} no longer holds its lease; not published"
            )
        body = self._ok(response, run_id, "publish")
        log.info("run %d published %s", run_id, ", ".join(body.get("outputs", [])))

    def finish(
        self,
        run_id: int,
        owner: str,
        state: RunState,
        error: str | None,
        steps: Sequence[StepRow],
        log_path: Path | None = None,
        profile: StoredProfile | None = None,
    ) -> bool:
        try:
            body: dict[str, Any] = {
                "state": state.value,
                "error": error,
                "steps": [s.to_json() for s in steps],
            }
            if profile is not None:
                body["profile"] = _profile_json(profile)
            if log_path is not None and log_path.is_file():
                body["log"], body["log_cut"] = _tail(log_path, LOG_SEND)
            response = self._call("POST", f"/runs/{run_id}/finish", run_id, "finish", owner, body)
            if _lost(response):
                return False
            self._ok(response, run_id, "finish")
            return True
        finally:
            self._drop(run_id)

    def release(self, run_id: int, owner: str, steps: Sequence[StepRow]) -> None:
        try:
            body = {"steps": [s.to_json() for s in steps]}
            response = self._call("POST", f"/runs/{run_id}/release", run_id, "release", owner, body)
            if _lost(response):
                log.info("run %d: released after its lease was lost: nothing to do", run_id)
                return
            self._ok(response, run_id, "release")
        finally:
            self._drop(run_id)

    # -- helpers ------------------------------------------------------------------------

    def _downloader(self, run_id: int, ref: InputRef) -> Callable[[Write], None]:
        def download(write: Write) -> None:
            what = f"input {ref.archive_id}"
            try:
                with self.http.stream("GET", f"/files/{ref.archive_id}/data") as response:
                    if response.status_code != 200:
                        response.read()
                        self._ok(response, run_id, what)
                    for chunk in response.iter_bytes(CHUNK):
                        write(chunk)
            except httpx.HTTPError as exc:
                raise self._unreachable(run_id, what, exc) from exc

        return download

    def _send(self, run_id: int, owner: str, path: Path) -> str:
        """Upload one output; its sha256."""
        sha256, size = _digest(path)
        url = f"/runs/{run_id}/outputs/{path.name}"
        what = f"output {path.name}"
        wire = _wire(owner)

        def resume_at() -> int | None:
            query = {"owner": wire, "sha256": sha256}
            response = self._call("GET", url, run_id, what, params=query)
            return _offset(self._answer(response, run_id, what, owner))

        def done(response: httpx.Response) -> bool:
            return _offset(self._answer(response, run_id, what, owner)) is None

        def call(method: str, target: str, **kwargs: Any) -> httpx.Response:
            return self._call(method, target, run_id, what, **kwargs)

        try:
            send_resumable(
                call,
                url,
                path,
                size=size,
                sha256=sha256,
                resume_at=resume_at,
                done=done,
                headers={"Obsflow-Owner": wire},
                label=f"run {run_id}: {what}",
            )
        except TransferError as exc:
            raise ServerError(f"{self.server}: {exc}") from exc
        return sha256

    def _answer(
        self, response: httpx.Response, run_id: int, what: str, owner: str
    ) -> dict[str, Any]:
        if _lost(response):
            raise ServerError(
                f"{self.server}: run {run_id}: {owner} no longer holds its lease; {what} not sent"
            )
        return self._ok(response, run_id, what)

    def _call(
        self,
        method: str,
        url: str,
        run_id: int,
        what: str,
        owner: str | None = None,
        body: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        if owner is not None:
            kwargs["json"] = {"owner": _wire(owner), **(body or {})}
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(run_id, what, exc) from exc

    def _unreachable(self, run_id: int, what: str, exc: Exception) -> ServerError:
        return ServerError(
            f"{self.server}: run {run_id}: {what}: cannot reach the server: "
            f"{type(exc).__name__}: {exc}"
        )

    def _ok(self, response: httpx.Response, run_id: int, what: str) -> dict[str, Any]:
        """The answer's JSON if it is a success; else a :class:`ServerError` saying what
        the server said."""
        if response.is_success:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                return body
            raise ServerError(f"{self.server}: run {run_id}: {what}: an answer not JSON")
        detail = problem_detail(response)
        if response.status_code in (401, 403):
            detail += " (a worker needs a token of worker scope: token create --scope worker)"
        raise ServerError(
            f"{self.server}: run {run_id}: {what}: answered {response.status_code}: {detail}"
        )

    def _drop(self, run_id: int) -> None:
        """The run is over here: its inputs are no longer held, nor staged."""
        with self._lock:
            held = self._held.pop(run_id, [])
        for each in held:
            each.close()
        shutil.rmtree(self.root / "staged" / f"run-{run_id}", ignore_errors=True)


def _profile_json(profile: StoredProfile) -> dict[str, str]:
    text, work, _ = profile  # the log's path is the server's copy
    return {"text": text, "work_dir": work}


def _lost(response: httpx.Response) -> bool:
    return response.status_code == 409 and problem_kind(response) == "lease-lost"


def _offset(state: Mapping[str, Any]) -> int | None:
    """Where to send an output from (None: the server has it whole)."""
    if state.get("state") in ("staged", "published"):
        return None
    return int(state.get("offset") or 0)


def _wire(owner: str) -> str:
    """``owner`` as the server takes it (48 of ``A-Z a-z 0-9 _ . @ : -``): itself if it
    fits, else a readable part and a hash of it (the same owner, the same name)."""
    if _OWNER.fullmatch(owner):
        return owner
    digest = hashlib.sha256(owner.encode("utf-8")).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_.@:-]+", "_", owner)[:35]
    return f"{readable}-{digest}"


def _link(source: Path, folder: Path, name: str) -> Path:
    """``source`` under ``name`` in ``folder`` (a hard link; a copy across file
    systems); a second file of that name goes into a subfolder."""
    target = folder / name
    n = 0
    while target.exists():
        if os.path.samefile(target, source):
            return target
        n += 1
        target = folder / str(n) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def _digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _tail(path: Path, limit: int) -> tuple[str, bool]:
    """The end of a log (from a whole line), and whether its start was left out."""
    with path.open("rb") as src:
        size = src.seek(0, os.SEEK_END)
        src.seek(max(size - limit, 0))
        data = src.read(limit)
    cut = size > limit
    if cut:
        data = data.partition(b"\n")[2]
    return data.decode("utf-8", errors="replace"), cut

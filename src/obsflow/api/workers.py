"""``/api/v1/runs/{n}/…``: a worker without the site's storage runs a pipeline run
through the archive server (:class:`obsflow.processing.serverhost.ServerHost` is its
client). The server does on its behalf what a worker on the site does itself, with the
one implementation of it, :class:`obsflow.processing.sitehost.SiteHost`::

    POST /runs/{n}/claim      queued → running for this worker; the plan (inputs by
                              archive ID and sha256) and the lease's length
    POST /runs/{n}/lease      the heartbeat: the lease renewed
    POST /runs/{n}/steps      step rows as they go, and the run-time profile once
    GET  /runs/{n}/outputs/{name}?owner=O&sha256=H   what the server holds of an output
    PUT  /runs/{n}/outputs/{name}   an output's bytes, resumable and verified
                              (:mod:`obsflow.api.upload`, as the transfers)
    POST /runs/{n}/publish    every output staged is received, the run as provenance,
                              all or none
    POST /runs/{n}/finish     succeeded or failed, with the last steps and the run's log
    POST /runs/{n}/release    queued again (the worker stops): the attempt does not count

The inputs' bytes come through ``GET /files/{id}/data``. Every route needs a token of
``worker`` scope (or admin), which reads every file but may not tag, retry or send
frames (:mod:`obsflow.access`).

A worker names itself (``owner``, in the body; ``Obsflow-Owner`` on a PUT); the server
keeps it as ``OWNER/tTOKEN``, so that a worker may only act on the leases taken with
its own token. Every route but the claim answers 409 ``lease-lost`` to a caller that
no longer holds the run's lease (it expired and the run went to another worker): such
a worker can publish nothing. Hostile callers are kept in mind: an output is a file
*name* (no ``/``, no leading dot) recognised by the registry as a product the run's
pipeline makes, at most one staged file per product; sizes and bodies are bounded; a
step row must name a step of the run's profile. The staging area of a run's outputs
(under the cache's ``.uploads``) is emptied at each claim and at the run's end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Final

import anyio
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError

from obsflow.access import Principal, Scope
from obsflow.api import upload as uploads
from obsflow.api.auth import Caller, denied
from obsflow.api.params import NAME, RowId
from obsflow.api.problems import ProblemError, documented
from obsflow.api.services import Services, json_response, services
from obsflow.api.transfer import UPLOADS
from obsflow.api.upload import FILE_NAME, MAX_SIZE, SHA256
from obsflow.catalog.runs import RunRecord
from obsflow.catalog.steps import StepRow
from obsflow.errors import RecognitionError, RunError
from obsflow.processing.lifecycle import StoredProfile
from obsflow.processing.sitehost import SiteHost
from obsflow.states import RunState, StepState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["workers"])
Svc = Annotated[Services, Depends(services)]
RunId = Annotated[RowId, Path(description="The run's number.")]

OWNER: Final = r"^[A-Za-z0-9_.@:-]{1,48}$"
"""A worker's name for itself (the server appends its token's number)."""
MAX_BODY: Final = 16 << 20
"""The largest JSON body a worker may send (a run's log tail and step rows)."""
MAX_LOG: Final = 4 << 20
"""The most characters of a run's log a worker may send (its end)."""
MAX_TEXT: Final = 1 << 20
"""The most characters of a step's stdout or stderr tail, or a run's error."""
MAX_STEPS: Final = 1000


# ------------------------------------------------------------------ who may


def worker(who: Caller) -> Principal:
    """The caller, who must hold worker scope (a FastAPI dependency)."""
    if not who.may(Scope.WORKER):
        raise denied(who, f"{who.user} has {who.scope.value} scope; this needs worker")
    return who


Worker = Annotated[Principal, Depends(worker)]


def small_body(request: Request) -> None:
    """413 for a JSON body that says it is larger than :data:`MAX_BODY`."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY:
        raise ProblemError(
            413, f"the body is larger than {MAX_BODY} bytes (or unsized)", kind="too-long"
        )


SMALL: Final = [Depends(small_body)]


# ------------------------------------------------------------------ shapes

Owner = Annotated[str, Field(pattern=OWNER, description="The worker's name for itself.")]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


class OwnerIn(BaseModel):
    owner: Owner


class StepIn(BaseModel):
    """One step's row, as :meth:`obsflow.catalog.steps.StepRow.to_json` writes it."""

    step: Annotated[str, Field(pattern=NAME)]
    position: Annotated[int, Field(ge=0, le=MAX_STEPS)]
    state: StepState
    attempts: Annotated[int, Field(ge=0, le=1000)]
    argv: Annotated[list[Annotated[str, Field(max_length=65536)]], Field(max_length=65536)]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_status: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    stdout_tail: Text | None = None
    stderr_tail: Text | None = None
    reason: Text | None = None
    new: bool = True

    def row(self) -> StepRow:
        return StepRow(
            self.step,
            self.position,
            self.state,
            self.attempts,
            tuple(self.argv),
            self.started_at,
            self.finished_at,
            self.exit_status,
            self.stdout_tail,
            self.stderr_tail,
            self.reason,
            self.new,
        )


Steps = Annotated[list[StepIn], Field(max_length=MAX_STEPS)]


class ProfileIn(BaseModel):
    """The run-time profile the worker filled (JSON), and its work directory there."""

    text: Annotated[str, Field(max_length=MAX_BODY)]
    work_dir: Annotated[str, Field(max_length=4096)]


class StepsIn(OwnerIn):
    steps: Steps = []
    profile: ProfileIn | None = None


class OutputIn(BaseModel):
    """An output product's staged file."""

    product: Annotated[str, Field(pattern=NAME)]
    name: Annotated[str, Field(pattern=FILE_NAME)]
    sha256: Annotated[str, Field(pattern=SHA256)]


class PublishIn(OwnerIn):
    outputs: Annotated[list[OutputIn], Field(max_length=64, description="One per product.")]


class FinishIn(OwnerIn):
    state: RunState = Field(description="succeeded or failed.")
    error: Text | None = None
    steps: Steps = []
    profile: ProfileIn | None = Field(
        default=None, description="The run-time profile, if no step report carried it."
    )
    log: Annotated[
        str | None, Field(max_length=MAX_LOG, description="The run's log (its end).")
    ] = None
    log_cut: bool = Field(default=False, description="The log's start stayed on the worker.")


class ReleaseIn(OwnerIn):
    steps: Steps = []


class ClaimOut(BaseModel):
    claim: dict[str, Any] = Field(
        description="obsflow.processing.lifecycle.Claim as JSON: the plan, or the decision."
    )
    lease_seconds: float


class LeaseOut(BaseModel):
    run_id: int
    lease_seconds: float


class RunStateOut(BaseModel):
    run_id: int
    state: RunState


class OutputState(BaseModel):
    name: str
    product: str
    state: str = Field(
        description="absent, partial (resume at offset), staged (whole, to publish) or "
        "published (by this run already)."
    )
    offset: int = 0


class PublishOut(BaseModel):
    run_id: int
    outputs: list[str] = Field(description="The archive IDs of the run's outputs.")


# ------------------------------------------------------------------ the routes


@router.post(
    "/runs/{run_id}/claim",
    response_model=ClaimOut,
    summary="Claim a queued run (a worker)",
    responses=documented(400, 401, 403, 404, 409, 413),
    dependencies=SMALL,
)
def claim_run(run_id: RunId, body: OwnerIn, who: Worker, svc: Svc) -> Response:
    """queued → running for the caller, its inputs pinned; the plan to execute, or the
    server's decision (an earlier attempt published everything; it cannot be planned).
    409 ``taken`` when another worker has it or it is over."""
    run = _run(svc, run_id)
    host = SiteHost(svc.site)
    claim = host.claim(run_id, _owner(who, body.owner))
    if claim is None:
        now = svc.runs.get(run_id) or run
        raise ProblemError(
            409, f"run {run_id} is {now.state.value}: not for this worker", kind="taken"
        )
    shutil.rmtree(_staging(svc, run_id), ignore_errors=True)  # an earlier attempt's
    if claim.plan is None:
        _wake(svc)
    log.info("run %d claimed by %s", run_id, _owner(who, body.owner), extra={"run_id": run_id})
    out = ClaimOut(claim=claim.to_json(), lease_seconds=host.lease_seconds)
    return json_response(out)


@router.post(
    "/runs/{run_id}/lease",
    response_model=LeaseOut,
    summary="Renew a run's lease (a worker's heartbeat)",
    responses=documented(400, 401, 403, 404, 409, 413),
    dependencies=SMALL,
)
def renew_lease(run_id: RunId, body: OwnerIn, who: Worker, svc: Svc) -> Response:
    _run(svc, run_id)
    host = SiteHost(svc.site)
    if not host.renew(run_id, _owner(who, body.owner)):
        raise _lost(run_id)
    return json_response(LeaseOut(run_id=run_id, lease_seconds=host.lease_seconds))


@router.post(
    "/runs/{run_id}/steps",
    response_model=RunStateOut,
    summary="Record a run's steps (and its run-time profile)",
    responses=documented(400, 401, 403, 404, 409, 413),
    dependencies=SMALL,
)
def record_steps(run_id: RunId, body: StepsIn, who: Worker, svc: Svc) -> Response:
    """Step rows as the controller reports them; with ``profile``, the run-time profile
    (its log is the server's copy, under the site's logs)."""
    run, host = _held(svc, who, run_id, body.owner)
    steps = _steps(svc, run, body.steps)
    stored = _stored_profile(run_id, host, body.profile)
    try:
        host.record_steps(run_id, _owner(who, body.owner), steps, stored)
    except IntegrityError:
        raise ProblemError(
            422, f"run {run_id}: a step row said new is there already", kind="invalid-request"
        ) from None
    return json_response(RunStateOut(run_id=run_id, state=run.state))


@router.get(
    "/runs/{run_id}/outputs/{name}",
    response_model=OutputState,
    summary="What the server holds of a run's output",
    responses=documented(401, 403, 404, 409),
)
def output_state(
    run_id: RunId,
    name: Annotated[str, Path(pattern=FILE_NAME, description="The output's file name.")],
    owner: Annotated[str, Query(pattern=OWNER)],
    sha256: Annotated[str, Query(pattern=SHA256)],
    who: Worker,
    svc: Svc,
) -> Response:
    """``staged`` or ``published`` (nothing to send), ``partial`` (send from ``offset``)
    or ``absent``."""
    run, _ = _held(svc, who, run_id, owner)
    product = _product(svc, run, name)
    return json_response(_output_state(svc, run_id, product, name, sha256))


@router.put(
    "/runs/{run_id}/outputs/{name}",
    response_model=OutputState,
    summary="Upload a run's output (resumable)",
    responses=documented(401, 403, 404, 409, 413),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def upload_output(
    run_id: RunId,
    name: Annotated[str, Path(pattern=FILE_NAME, description="The output's file name.")],
    request: Request,
    who: Worker,
    svc: Svc,
    owner: Annotated[str, Header(alias="Obsflow-Owner", pattern=OWNER)],
    sha256: Annotated[str, Header(alias="Obsflow-Sha256", pattern=SHA256)],
    length: Annotated[int, Header(alias="Upload-Length", ge=0, le=MAX_SIZE)],
    offset: Annotated[int, Header(alias="Upload-Offset", ge=0, le=MAX_SIZE)] = 0,
) -> Response:
    """Append the body to what the server holds of this output from ``Upload-Offset``;
    once whole and its sha256 checked, it is staged for :func:`publish_outputs`. The
    same bytes again write nothing."""
    run, _ = await anyio.to_thread.run_sync(_held, svc, who, run_id, owner)
    if offset > length:
        raise ProblemError(422, f"Upload-Offset {offset} is past Upload-Length {length}")
    product = _product(svc, run, name)
    label = f"run {run_id}: output {name}"
    state = await anyio.to_thread.run_sync(_output_state, svc, run_id, product, name, sha256)
    if state.state in ("staged", "published"):
        return json_response(state)
    uploads.check_offset(state.offset, offset, label)
    with uploads.claimed(svc.uploads, f"run-{run_id}/{product}", label):
        part = _partial(svc, run_id, product, sha256)
        if offset == 0:  # one partial upload per output: an earlier one's bytes go
            for other in part.parent.glob("*.part"):
                if other != part:
                    other.unlink(missing_ok=True)
        size, digest = await uploads.append(request, part, offset, length)
        if size < length:
            return json_response(
                OutputState(name=name, product=product, state="partial", offset=size)
            )
        await anyio.to_thread.run_sync(uploads.verify, part, sha256, digest, label)
        await anyio.to_thread.run_sync(_stage, svc, run_id, product, sha256, name, part)
    log.info("%s staged (%d bytes)", label, length, extra={"run_id": run_id})
    return json_response(OutputState(name=name, product=product, state="staged", offset=length))


@router.post(
    "/runs/{run_id}/publish",
    response_model=PublishOut,
    summary="Publish a run's staged outputs (all or none)",
    responses=documented(400, 401, 403, 404, 409, 413),
    dependencies=SMALL,
)
def publish_outputs(run_id: RunId, body: PublishIn, who: Worker, svc: Svc) -> Response:
    """Receive every staged output, with the run as provenance, in one transaction; 409
    ``not-staged`` for an output not uploaded whole, 422 ``refused`` for one receipt
    refuses (it names it). Asked again once done, it answers the same."""
    run, host = _held(svc, who, run_id, body.owner)
    if len({o.product for o in body.outputs}) < len(body.outputs):
        raise ProblemError(422, f"run {run_id}: a product named twice", kind="refused")
    for output in body.outputs:
        recognised = _product(svc, run, output.name)
        if recognised != output.product:
            raise ProblemError(
                422,
                f"run {run_id}: output {output.name} is product {recognised}, not {output.product}",
                kind="refused",
            )
    if _published(svc, run_id, body):
        return json_response(PublishOut(run_id=run_id, outputs=_outputs(svc, run_id)))
    paths: dict[str, FilePath] = {}
    for output in body.outputs:
        product = output.product
        path = _staged(svc, run_id, product, output.sha256) / output.name
        if not path.is_file():
            raise ProblemError(
                409,
                f"run {run_id}: output {output.name} is not uploaded (whole); upload it first",
                kind="not-staged",
            )
        paths[product] = path
    try:
        host.publish(run_id, _owner(who, body.owner), paths)
    except RunError as exc:
        if not host.holds(run_id, _owner(who, body.owner)):
            raise _lost(run_id) from None
        raise ProblemError(422, str(exc), kind="refused") from None
    shutil.rmtree(_staging(svc, run_id), ignore_errors=True)
    _wake(svc)
    return json_response(PublishOut(run_id=run_id, outputs=_outputs(svc, run_id)))


@router.post(
    "/runs/{run_id}/finish",
    response_model=RunStateOut,
    summary="Finish a run: succeeded or failed",
    responses=documented(400, 401, 403, 404, 409, 413),
    dependencies=SMALL,
)
def finish_run(run_id: RunId, body: FinishIn, who: Worker, svc: Svc) -> Response:
    """running → ``state`` with the last step rows, the inputs unpinned; the run's log
    (or its end) kept under the site's logs, where ``runs show`` reads it."""
    run, host = _held(svc, who, run_id, body.owner)
    if body.state not in (RunState.SUCCEEDED, RunState.FAILED):
        raise ProblemError(
            422, f"a run finishes succeeded or failed, not {body.state.value}", kind="invalid"
        )
    steps = _steps(svc, run, body.steps)
    stored = _stored_profile(run_id, host, body.profile)
    owner = _owner(who, body.owner)
    if body.log is not None:
        _write_log(host.log_path(run_id), body.log, body.log_cut, owner)
    if not host.finish(run_id, owner, body.state, body.error, steps, profile=stored):
        raise _lost(run_id)
    shutil.rmtree(_staging(svc, run_id), ignore_errors=True)
    _wake(svc)
    log.info("run %d %s (worker %s)", run_id, body.state.value, owner, extra={"run_id": run_id})
    return json_response(RunStateOut(run_id=run_id, state=body.state))


@router.post(
    "/runs/{run_id}/release",
    response_model=RunStateOut,
    summary="Release a run: queued again, the attempt not counted",
    responses=documented(400, 401, 403, 404, 409, 413),
    dependencies=SMALL,
)
def release_run(run_id: RunId, body: ReleaseIn, who: Worker, svc: Svc) -> Response:
    run, host = _held(svc, who, run_id, body.owner)
    host.release(run_id, _owner(who, body.owner), _steps(svc, run, body.steps))
    shutil.rmtree(_staging(svc, run_id), ignore_errors=True)
    _wake(svc)
    return json_response(RunStateOut(run_id=run_id, state=RunState.QUEUED))


# ------------------------------------------------------------------ the checks


def _owner(who: Principal, owner: str) -> str:
    """The lease's owner as the server keeps it: the worker's name and its token's."""
    return f"{owner}/t{who.token_id if who.token_id is not None else 0}"


def _run(svc: Services, run_id: int) -> RunRecord:
    run = svc.runs.get(run_id)
    if run is None:
        raise ProblemError(404, f"no run {run_id}", kind="no-such-run")
    return run


def _lost(run_id: int) -> ProblemError:
    return ProblemError(
        409,
        f"run {run_id}: this worker no longer holds its lease (it expired, and the run "
        "went back to the queue or to another worker)",
        kind="lease-lost",
    )


def _held(svc: Services, who: Principal, run_id: int, owner: str) -> tuple[RunRecord, SiteHost]:
    """The run, if the caller holds its lease; else 404 or 409 ``lease-lost``."""
    run = _run(svc, run_id)
    host = SiteHost(svc.site)
    if not host.holds(run_id, _owner(who, owner)):
        raise _lost(run_id)
    return run, host


def _steps(svc: Services, run: RunRecord, steps: list[StepIn]) -> list[StepRow]:
    """The rows, each of a step of the run's profile."""
    pipeline = svc.site.registry.pipelines.get(run.pipeline)
    profile = svc.site.registry.profiles.get(pipeline.profile) if pipeline else None
    known = {s.name for s in profile.steps} if profile is not None else set()
    for step in steps:
        if step.step not in known:
            raise ProblemError(
                422,
                f"run {run.id}: no step {step.step!r} in its profile",
                kind="invalid-request",
            )
    return [s.row() for s in steps]


def _stored_profile(run_id: int, host: SiteHost, profile: ProfileIn | None) -> StoredProfile | None:
    """A worker's run-time profile as the run keeps it (its log: the server's copy)."""
    if profile is None:
        return None
    try:
        json.loads(profile.text)
    except ValueError:
        raise ProblemError(
            422, f"run {run_id}: the run-time profile is not JSON", kind="invalid-request"
        ) from None
    return (profile.text, profile.work_dir, str(host.log_path(run_id)))


def _product(svc: Services, run: RunRecord, name: str) -> str:
    """The product ``name`` is, which must be one the run's pipeline makes (422)."""
    pipeline = svc.site.registry.pipelines.get(run.pipeline)
    makes = {o.product for o in pipeline.outputs} if pipeline is not None else set()
    try:
        product = svc.site.registry.recognise(name).product.id
    except RecognitionError as exc:
        raise ProblemError(
            422, f"run {run.id}: output {name}: {exc.detail}", kind="refused"
        ) from None
    if product not in makes:
        raise ProblemError(
            422,
            f"run {run.id}: output {name} is product {product}, which pipeline "
            f"{run.pipeline} does not make",
            kind="refused",
        )
    return product


# ------------------------------------------------------------------ staging


def _staging(svc: Services, run_id: int) -> FilePath:
    """A run's outputs on their way in (under the cache: receipt moves, never copies)."""
    return svc.site.settings.cache / UPLOADS / "runs" / f"run-{run_id}"


def _partial(svc: Services, run_id: int, product: str, sha256: str) -> FilePath:
    return _staging(svc, run_id) / "partial" / product / f"{sha256}.part"


def _staged(svc: Services, run_id: int, product: str, sha256: str) -> FilePath:
    return _staging(svc, run_id) / "staged" / product / sha256


def _output_state(svc: Services, run_id: int, product: str, name: str, sha256: str) -> OutputState:
    if (_staged(svc, run_id, product, sha256) / name).is_file():
        return OutputState(name=name, product=product, state="staged")
    if (name, sha256) in _made(svc, run_id):  # (a worker asking again after a lost answer)
        return OutputState(name=name, product=product, state="published")
    held = uploads.held(_partial(svc, run_id, product, sha256))
    if held is None:
        return OutputState(name=name, product=product, state="absent")
    return OutputState(name=name, product=product, state="partial", offset=held)


def _stage(
    svc: Services, run_id: int, product: str, sha256: str, name: str, part: FilePath
) -> None:
    """The verified ``part`` becomes the product's one staged file, under its name."""
    folder = _staged(svc, run_id, product, sha256)
    shutil.rmtree(folder.parent, ignore_errors=True)  # another file of this product
    folder.mkdir(parents=True)
    os.replace(part, folder / name)


def _made(svc: Services, run_id: int) -> set[tuple[str, str]]:
    """(name, sha256) of each output the run published."""
    return {(r.original_name, r.sha256) for r in svc.site.catalog.records(svc.runs.outputs(run_id))}


def _published(svc: Services, run_id: int, body: PublishIn) -> bool:
    """Every output asked is among the run's outputs already (a retried publish)."""
    have = _made(svc, run_id)
    return bool(body.outputs) and all((o.name, o.sha256) in have for o in body.outputs)


def _outputs(svc: Services, run_id: int) -> list[str]:
    made = svc.site.catalog.records(svc.runs.outputs(run_id))
    return sorted(r.archive_id for r in made if r.archive_id)


def _write_log(path: FilePath, text: str, cut: bool, owner: str) -> None:
    """Append a worker's log of one attempt to the run's log (as a site's worker does)."""
    head = f"==== the log of worker {owner}"
    head += " (its start stayed on the worker)\n" if cut else "\n"
    with path.open("a", encoding="utf-8", errors="replace") as out:
        out.write(head + text + ("" if text.endswith("\n") else "\n"))


def _wake(svc: Services) -> None:
    if svc.wake is not None:
        svc.wake.set()  # the ingestors and the tracker: files cached, runs over

"""UWS 1.1 jobs of the TAP service's ``/tap/async``: their phases, their store, and
their XML.

A job belongs to whoever made it (the token's ID; readers without a token share
one owner, ``anonymous``); nobody else sees it. Jobs live in the server's memory,
at most :data:`MAX_JOBS_PER_OWNER` each, until their destruction time (a day after
they were made, unless the owner moves it): a restarted server forgets them, as a
TAP client expects a job to be able to expire.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final
from xml.sax.saxutils import escape

from obsflow.errors import ObsflowError

__all__ = [
    "LIFETIME",
    "Job",
    "JobStore",
    "Phase",
    "UwsError",
    "format_time",
    "job_xml",
    "jobs_xml",
    "parse_time",
    "part_xml",
]

MAX_JOBS_PER_OWNER: Final = 100
LIFETIME: Final = timedelta(days=1)
UWS_NS: Final = "http://www.ivoa.net/xml/UWS/v1.0"


class UwsError(ObsflowError):
    """A request about a job obsflow cannot do (the message says why)."""


class Phase(StrEnum):
    """UWS 1.1's phases; moves in :data:`MOVES`."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    ABORTED = "ABORTED"
    ARCHIVED = "ARCHIVED"

    @property
    def active(self) -> bool:
        return self in {Phase.PENDING, Phase.QUEUED, Phase.EXECUTING}


MOVES: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.PENDING: frozenset({Phase.QUEUED, Phase.ABORTED}),
    Phase.QUEUED: frozenset({Phase.EXECUTING, Phase.ABORTED}),
    Phase.EXECUTING: frozenset({Phase.COMPLETED, Phase.ERROR, Phase.ABORTED}),
    Phase.COMPLETED: frozenset(),
    Phase.ERROR: frozenset(),
    Phase.ABORTED: frozenset(),
    Phase.ARCHIVED: frozenset(),
}


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    phase: Phase
    parameters: Mapping[str, str]
    created: datetime
    destruction: datetime
    execution_seconds: int
    started: datetime | None = None
    ended: datetime | None = None
    result: bytes | None = None
    media_type: str | None = None
    error: str | None = None
    rows: int | None = None


@dataclass
class JobStore:
    """Every job of one server, thread-safe; ``clock`` gives aware UTC datetimes."""

    clock: Callable[[], datetime]
    execution_seconds: int
    _jobs: dict[str, Job] = field(default_factory=dict)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def _purge(self) -> None:
        now = self.clock()
        for job_id in [j.id for j in self._jobs.values() if j.destruction <= now]:
            del self._jobs[job_id]

    def create(self, owner: str, parameters: Mapping[str, str]) -> Job:
        with self._changed:
            self._purge()
            if sum(1 for j in self._jobs.values() if j.owner == owner) >= MAX_JOBS_PER_OWNER:
                raise UwsError(f"{owner} has {MAX_JOBS_PER_OWNER} jobs already: delete some first")
            now = self.clock()
            job = Job(
                id=secrets.token_hex(8),
                owner=owner,
                phase=Phase.PENDING,
                parameters=dict(parameters),
                created=now,
                destruction=now + LIFETIME,
                execution_seconds=self.execution_seconds,
            )
            self._jobs[job.id] = job
            return job

    def get(self, owner: str, job_id: str) -> Job | None:
        """The job, or None when there is none of this owner's by that ID."""
        with self._changed:
            self._purge()
            job = self._jobs.get(job_id)
            return job if job is not None and job.owner == owner else None

    def of(self, owner: str) -> list[Job]:
        with self._changed:
            self._purge()
            return sorted(
                (j for j in self._jobs.values() if j.owner == owner), key=lambda j: j.created
            )

    def delete(self, owner: str, job_id: str) -> bool:
        with self._changed:
            job = self._jobs.get(job_id)
            if job is None or job.owner != owner:
                return False
            del self._jobs[job_id]
            self._changed.notify_all()
            return True

    def update(self, job_id: str, **changes: object) -> Job | None:
        """Change a job; a phase only along :data:`MOVES` (else the job is unchanged)."""
        with self._changed:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            phase = changes.get("phase")
            if isinstance(phase, Phase) and phase != job.phase and phase not in MOVES[job.phase]:
                return job
            job = replace(job, **changes)  # type: ignore[arg-type]
            self._jobs[job_id] = job
            self._changed.notify_all()
            return job

    def set_parameters(self, owner: str, job_id: str, parameters: Mapping[str, str]) -> Job:
        job = self.get(owner, job_id)
        if job is None:
            raise UwsError(f"no job {job_id!r}")
        if job.phase is not Phase.PENDING:
            raise UwsError(f"job {job_id} is {job.phase.value}: parameters are fixed once it runs")
        updated = self.update(job_id, parameters={**job.parameters, **parameters})
        assert updated is not None
        return updated

    def wait(self, owner: str, job_id: str, seconds: float, phase: Phase | None) -> Job | None:
        """UWS 1.1's blocking GET: wait up to ``seconds`` while the job is active (and,
        given ``phase``, still in it)."""
        with self._changed:
            job = self.get(owner, job_id)
            if job is None:
                return None
            if phase is not None and job.phase is not phase:
                return job

            def moved() -> bool:
                now = self._jobs.get(job_id)
                return (
                    now is None
                    or not now.phase.active
                    or (phase is not None and now.phase is not phase)
                )

            self._changed.wait_for(moved, timeout=max(0.0, seconds))
            return self._jobs.get(job_id)


def format_time(value: datetime | None) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z``, as UWS writes times."""
    return _time(value)


def part_xml(job: Job, base: str, part: str) -> bytes:
    """``<uws:results>`` or ``<uws:parameters>`` of a job, as a document of its own."""
    if part == "results":
        inner = (
            f'  <uws:result id="result" xlink:href="{escape(base)}/results/result"/>\n'
            if job.phase is Phase.COMPLETED
            else ""
        )
    else:
        inner = "".join(
            f'  <uws:parameter id="{escape(k.lower())}">{escape(v)}</uws:parameter>\n'
            for k, v in sorted(job.parameters.items())
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<uws:{part} xmlns:uws="{UWS_NS}" xmlns:xlink="http://www.w3.org/1999/xlink">\n'
        f"{inner}</uws:{part}>\n"
    ).encode()


def _time(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _nil(tag: str, value: datetime | None) -> str:
    if value is None:
        return f'  <uws:{tag} xsi:nil="true"/>\n'
    return f"  <uws:{tag}>{_time(value)}</uws:{tag}>\n"


def job_xml(job: Job, base: str) -> bytes:
    """A job as UWS 1.1's ``<uws:job>``; ``base`` is the job's URL."""
    parameters = "".join(
        f'    <uws:parameter id="{escape(k.lower())}">{escape(v)}</uws:parameter>\n'
        for k, v in sorted(job.parameters.items())
    )
    results = (
        f'    <uws:result id="result" xlink:href="{escape(base)}/results/result"/>\n'
        if job.phase is Phase.COMPLETED
        else ""
    )
    error = (
        '  <uws:errorSummary type="fatal" hasDetail="true">\n'
        f"    <uws:message>{escape(job.error)}</uws:message>\n"
        "  </uws:errorSummary>\n"
        if job.phase is Phase.ERROR and job.error
        else ""
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<uws:job xmlns:uws="{UWS_NS}" xmlns:xlink="http://www.w3.org/1999/xlink"\n'
        '    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="1.1">\n'
        f"  <uws:jobId>{escape(job.id)}</uws:jobId>\n"
        f"  <uws:runId/>\n"
        f"  <uws:ownerId>{escape(job.owner)}</uws:ownerId>\n"
        f"  <uws:phase>{job.phase.value}</uws:phase>\n"
        '  <uws:quote xsi:nil="true"/>\n'
        f"  <uws:creationTime>{_time(job.created)}</uws:creationTime>\n"
        + _nil("startTime", job.started)
        + _nil("endTime", job.ended)
        + f"  <uws:executionDuration>{job.execution_seconds}</uws:executionDuration>\n"
        f"  <uws:destruction>{_time(job.destruction)}</uws:destruction>\n"
        f"  <uws:parameters>\n{parameters}  </uws:parameters>\n"
        f"  <uws:results>\n{results}  </uws:results>\n" + error + "</uws:job>\n"
    ).encode()


def jobs_xml(jobs: list[Job], base: str) -> bytes:
    """The job list, UWS 1.1's ``<uws:jobs>``; ``base`` is the list's URL."""
    refs = "".join(
        f'  <uws:jobref id="{escape(j.id)}" xlink:href="{escape(base)}/{escape(j.id)}">\n'
        f"    <uws:phase>{j.phase.value}</uws:phase>\n"
        f"    <uws:creationTime>{_time(j.created)}</uws:creationTime>\n"
        f"    <uws:ownerId>{escape(j.owner)}</uws:ownerId>\n"
        "  </uws:jobref>\n"
        for j in jobs
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<uws:jobs xmlns:uws="{UWS_NS}" xmlns:xlink="http://www.w3.org/1999/xlink"'
        ' version="1.1">\n' + refs + "</uws:jobs>\n"
    ).encode()


def parse_time(text: str) -> datetime:
    """An ISO 8601 instant (``Z`` or an offset; none: UTC); :class:`UwsError` if not."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UwsError(f"DESTRUCTION {text!r} is not an ISO 8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)

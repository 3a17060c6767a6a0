"""A run's steps as the catalog keeps them: one row per step, its latest attempt.

:class:`StepRow` is what an executor writes (through :class:`obsflow.catalog.runs.RunStore`,
or over HTTP as JSON by a worker without the site); :class:`StepRecord` is what
``runs show`` and the API read back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from obsflow.states import StepState


@dataclass(frozen=True)
class StepRow:
    """One step's row as the executor writes it."""

    step: str
    position: int
    state: StepState
    attempts: int
    argv: Sequence[str]
    started: datetime | None = None
    finished: datetime | None = None
    exit_status: int | None = None
    stdout_tail: str | None = None
    stderr_tail: str | None = None
    reason: str | None = None
    new: bool = True
    """No row for this step yet (insert); else update the one there."""

    def values(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "state": self.state.value,
            "attempts": self.attempts,
            "argv": json.dumps(list(self.argv)),
            "started_at": self.started,
            "finished_at": self.finished,
            "exit_status": self.exit_status,
            "stdout_tail": self.stdout_tail,
            "stderr_tail": self.stderr_tail,
            "reason": self.reason,
        }

    def to_json(self) -> dict[str, Any]:
        """As a worker reports it over HTTP (:meth:`from_json` reads it back)."""
        return {
            "step": self.step,
            **self.values(),
            "argv": list(self.argv),
            "started_at": iso(self.started),
            "finished_at": iso(self.finished),
            "new": self.new,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepRow:
        def moment(value: Any) -> datetime | None:
            return None if value is None else datetime.fromisoformat(str(value))

        return cls(
            step=str(data["step"]),
            position=int(data["position"]),
            state=StepState(data["state"]),
            attempts=int(data["attempts"]),
            argv=tuple(str(a) for a in data["argv"]),
            started=moment(data.get("started_at")),
            finished=moment(data.get("finished_at")),
            exit_status=None if data.get("exit_status") is None else int(data["exit_status"]),
            stdout_tail=data.get("stdout_tail"),
            stderr_tail=data.get("stderr_tail"),
            reason=data.get("reason"),
            new=bool(data.get("new", True)),
        )


@dataclass(frozen=True)
class StepRecord:
    step: str
    position: int
    state: StepState
    attempts: int
    argv: tuple[str, ...]
    started: datetime | None
    finished: datetime | None
    exit_status: int | None
    stdout_tail: str | None
    stderr_tail: str | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "state": self.state.value,
            "attempts": self.attempts,
            "argv": list(self.argv),
            "started": iso(self.started),
            "finished": iso(self.finished),
            "exit_status": self.exit_status,
            "stdout_tail": self.stdout_tail,
            "stderr_tail": self.stderr_tail,
            "reason": self.reason,
        }


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()

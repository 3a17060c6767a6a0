"""May this pipeline run on this group now? One small pure function over plain data.

:func:`readiness` takes a pipeline's spec and, per input name, the candidate files
already found for one group (right product, ``where`` met, right night; see
:mod:`obsflow.processing.tracker.grouping`), and decides:

- **selection**: per input, every candidate, or with ``max`` the newest ``max``
  by file id; ids ascending.
- **met**: an input is met with at least ``min`` candidates. An *optional* input
  is always met: it takes whatever is there (up to ``max``) and never blocks;
  its ``min`` is not used.
- **kickoff ready**: ready as soon as every input is met.
- **kickoff deadline**: the deadline is the night's end (``deadline: night_end``)
  or the latest arrival among all candidates (``deadline: last_input``), plus
  ``after_minutes``. Before it: not ready, look again at the deadline (even when
  everything is met: it waits to collect all it can). At or after it: ready when
  every input is met; else, with ``degraded_ok``, ready and *degraded* when every
  non-optional input has at least one candidate (none needed if its ``min`` is
  0); else not ready, and only a new input can change that.
- A group without any candidate at all is never ready.

``unmet`` names every input short of its ``min`` (e.g. ``biases: 3 of at least 5``),
whatever the decision, so a degraded run says what it ran without.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from obsflow.registry.specs import InputSpec, Kickoff, PipelineSpec


@dataclass(frozen=True)
class Candidate:
    """One file that may serve as an input: its catalog id and when it was cached."""

    file_id: int
    arrived: datetime
    """When the file was cached (aware UTC)."""


@dataclass(frozen=True)
class Decision:
    """What :func:`readiness` decided for one group."""

    ready: bool
    degraded: bool
    """Ready at a deadline with some input short of its ``min``."""
    selected: Mapping[str, tuple[int, ...]]
    """Input name → the file ids chosen, ascending (also when not ready)."""
    unmet: tuple[str, ...]
    """Why not (or what a degraded run lacks), e.g. ``biases: 3 of at least 5``."""
    wait_until: datetime | None
    """Look again at this time (a deadline); None: only a new input changes anything."""


def readiness(
    pipeline: PipelineSpec,
    candidates: Mapping[str, Sequence[Candidate]],
    *,
    now: datetime,
    night_end: datetime | None,
) -> Decision:
    """Decide whether ``pipeline`` may run now on a group with ``candidates``.

    ``candidates`` maps input names to the group's candidates for that input (a
    missing name has none); ``night_end`` is the end of the group's night (aware
    UTC), needed only by ``deadline: night_end``. A name that is not an input of
    the pipeline, a naive ``now``, or a missing ``night_end`` is a ValueError.
    """
    names = {spec.name for spec in pipeline.inputs}
    unknown = set(candidates) - names
    if unknown:
        raise ValueError(
            f"pipeline {pipeline.id!r} has no input(s) {sorted(unknown)}; "
            f"expected some of: {', '.join(sorted(names))}"
        )
    if now.tzinfo is None:
        raise ValueError(f"now must be an aware datetime, not {now}")

    chosen = {spec.name: _select(spec, candidates.get(spec.name, ())) for spec in pipeline.inputs}
    unmet = tuple(
        f"{spec.name}: {len(chosen[spec.name])} of at least {spec.min}"
        for spec in pipeline.inputs
        if not spec.optional and len(chosen[spec.name]) < spec.min
    )
    arrivals = [c.arrived for group in candidates.values() for c in group]
    if not arrivals:
        return Decision(False, False, chosen, unmet or ("no input files",), None)

    kickoff = pipeline.kickoff
    if kickoff.rule is Kickoff.READY:
        return Decision(not unmet, False, chosen, unmet, None)

    if kickoff.deadline == "night_end":
        if night_end is None:
            raise ValueError(f"pipeline {pipeline.id!r} waits for the night's end; pass night_end")
        base = night_end
    else:
        base = max(arrivals)
    deadline = base + timedelta(minutes=kickoff.after_minutes)
    if now < deadline:
        return Decision(False, False, chosen, unmet, deadline)
    if not unmet:
        return Decision(True, False, chosen, (), None)
    some_of_each = all(
        len(chosen[spec.name]) >= min(1, spec.min) for spec in pipeline.inputs if not spec.optional
    )
    if kickoff.degraded_ok and some_of_each:
        return Decision(True, True, chosen, unmet, None)
    return Decision(False, False, chosen, unmet, None)


def _select(spec: InputSpec, candidates: Sequence[Candidate]) -> tuple[int, ...]:
    """Every candidate's id, or the newest ``max`` by id; ascending, each once."""
    ids = sorted({c.file_id for c in candidates})
    if spec.max is not None:
        ids = ids[-spec.max :]
    return tuple(ids)

"""Readiness over plain data: counts, optional inputs, kickoff rules, deadlines, selection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from obsflow.processing.tracker.readiness import Candidate, Decision, readiness
from obsflow.registry.specs import PipelineSpec

NIGHT_END = datetime(2026, 11, 22, 17, 0, tzinfo=UTC)
T0 = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
AN_HOUR_IN = T0 + timedelta(minutes=60)


def at(minutes: float) -> datetime:
    """``minutes`` after T0 (the first arrival)."""
    return T0 + timedelta(minutes=minutes)


def files(*ids: int, arrived: float = 0) -> list[Candidate]:
    return [Candidate(i, at(arrived)) for i in ids]


def spec(inputs: list[dict[str, Any]], kickoff: dict[str, Any] | None = None) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {"id": "p", "profile": "prof", "inputs": inputs, "kickoff": kickoff or {}}
    )


BIASES = {"product": "raw", "name": "biases", "min": 5}
FLATS = {"product": "raw", "name": "flats", "min": 3, "max": 4}
BIAS = {"product": "mbias", "name": "bias"}
DARK = {"product": "mdark", "name": "dark", "optional": True}
DARKS_OPT = {"product": "raw", "name": "darks", "optional": True, "min": 2, "max": 2}
EXTRA = {"product": "raw", "name": "extra", "min": 0}

NIGHT_END_RULE = {"rule": "deadline", "deadline": "night_end", "after_minutes": 10}
NIGHT_END_DEGRADED = {**NIGHT_END_RULE, "degraded_ok": True}
LAST_INPUT_RULE = {"rule": "deadline", "deadline": "last_input", "after_minutes": 30}
LAST_INPUT_DEGRADED = {**LAST_INPUT_RULE, "degraded_ok": True}
AT_NIGHT_DEADLINE = NIGHT_END + timedelta(minutes=10)


@dataclass(frozen=True)
class Case:
    id: str
    inputs: list[dict[str, Any]]
    candidates: Mapping[str, Sequence[Candidate]]
    expected: Decision
    kickoff: dict[str, Any] = field(default_factory=dict)
    now: datetime = AN_HOUR_IN


def decision(
    ready: bool,
    selected: dict[str, tuple[int, ...]],
    unmet: tuple[str, ...] = (),
    wait_until: datetime | None = None,
    degraded: bool = False,
) -> Decision:
    return Decision(ready, degraded, selected, unmet, wait_until)


CASES = [
    # ---------------------------------------------------------- counts, kickoff ready
    Case(
        "min-met",
        [BIASES],
        {"biases": files(1, 2, 3, 4, 5)},
        decision(True, {"biases": (1, 2, 3, 4, 5)}),
    ),
    Case(
        "min-short",
        [BIASES],
        {"biases": files(1, 2, 3)},
        decision(False, {"biases": (1, 2, 3)}, ("biases: 3 of at least 5",)),
    ),
    Case(
        "more-than-min-takes-all-ascending",
        [BIASES],
        {"biases": files(9, 3, 7, 1, 5, 2)},
        decision(True, {"biases": (1, 2, 3, 5, 7, 9)}),
    ),
    Case(
        "duplicate-candidates-count-once",
        [BIASES],
        {"biases": files(1, 1, 2, 2, 3, 4)},
        decision(False, {"biases": (1, 2, 3, 4)}, ("biases: 4 of at least 5",)),
    ),
    Case(
        "max-takes-newest-by-id",
        [FLATS],
        {"flats": files(10, 4, 8, 2, 6, 12)},
        decision(True, {"flats": (6, 8, 10, 12)}),
    ),
    Case(
        "max-newest-by-id-not-by-arrival",
        [FLATS],
        {"flats": [*files(1, 2, 3, arrived=50), *files(7, 8, arrived=0)]},
        decision(True, {"flats": (2, 3, 7, 8)}),
    ),
    Case(
        "two-inputs-one-missing",
        [FLATS, BIAS],
        {"flats": files(1, 2, 3)},
        decision(False, {"flats": (1, 2, 3), "bias": ()}, ("bias: 0 of at least 1",)),
    ),
    Case(
        "two-inputs-both-short-in-input-order",
        [FLATS, BIAS, BIASES],
        {"flats": files(1), "biases": files(2, 3)},
        decision(
            False,
            {"flats": (1,), "bias": (), "biases": (2, 3)},
            ("flats: 1 of at least 3", "bias: 0 of at least 1", "biases: 2 of at least 5"),
        ),
    ),
    Case(
        "min-zero-never-blocks",
        [BIAS, EXTRA],
        {"bias": files(1)},
        decision(True, {"bias": (1,), "extra": ()}),
    ),
    # -------------------------------------------------------------- optional inputs
    Case(
        "optional-missing-does-not-block",
        [BIAS, DARK],
        {"bias": files(1)},
        decision(True, {"bias": (1,), "dark": ()}),
    ),
    Case(
        "optional-present-is-selected",
        [BIAS, DARK],
        {"bias": files(1), "dark": files(4, 3)},
        decision(True, {"bias": (1,), "dark": (3, 4)}),
    ),
    Case(
        "optional-ignores-min-and-keeps-max",
        [BIAS, DARKS_OPT],
        {"bias": files(1), "darks": files(5)},
        decision(True, {"bias": (1,), "darks": (5,)}),
    ),
    Case(
        "optional-newest-up-to-max",
        [BIAS, DARKS_OPT],
        {"bias": files(1), "darks": files(5, 6, 7)},
        decision(True, {"bias": (1,), "darks": (6, 7)}),
    ),
    Case(
        "only-optional-inputs-present",
        [DARK],
        {"dark": files(3)},
        decision(True, {"dark": (3,)}),
    ),
    # ----------------------------------------------------------------- no candidates
    Case(
        "no-candidates-at-all",
        [BIASES],
        {},
        decision(False, {"biases": ()}, ("biases: 0 of at least 5",)),
    ),
    Case(
        "no-candidates-empty-lists",
        [BIASES, BIAS],
        {"biases": [], "bias": []},
        decision(
            False,
            {"biases": (), "bias": ()},
            ("biases: 0 of at least 5", "bias: 0 of at least 1"),
        ),
    ),
    Case(
        "no-candidates-nothing-required",
        [DARK, EXTRA],
        {},
        decision(False, {"dark": (), "extra": ()}, ("no input files",)),
    ),
    Case(
        "no-candidates-at-deadline",
        [BIASES],
        {},
        decision(False, {"biases": ()}, ("biases: 0 of at least 5",)),
        NIGHT_END_DEGRADED,
        AT_NIGHT_DEADLINE,
    ),
    # ------------------------------------------------------------ deadline night_end
    Case(
        "night-end-before-deadline-all-met-waits",
        [BIASES],
        {"biases": files(1, 2, 3, 4, 5)},
        decision(False, {"biases": (1, 2, 3, 4, 5)}, (), AT_NIGHT_DEADLINE),
        NIGHT_END_RULE,
    ),
    Case(
        "night-end-before-deadline-short-waits",
        [BIASES],
        {"biases": files(1, 2)},
        decision(False, {"biases": (1, 2)}, ("biases: 2 of at least 5",), AT_NIGHT_DEADLINE),
        NIGHT_END_DEGRADED,
    ),
    Case(
        "night-end-just-before-deadline",
        [BIASES],
        {"biases": files(1, 2, 3, 4, 5)},
        decision(False, {"biases": (1, 2, 3, 4, 5)}, (), AT_NIGHT_DEADLINE),
        NIGHT_END_RULE,
        AT_NIGHT_DEADLINE - timedelta(microseconds=1),
    ),
    Case(
        "night-end-at-deadline-all-met",
        [BIASES],
        {"biases": files(1, 2, 3, 4, 5)},
        decision(True, {"biases": (1, 2, 3, 4, 5)}),
        NIGHT_END_RULE,
        AT_NIGHT_DEADLINE,
    ),
    Case(
        "night-end-after-deadline-all-met",
        [BIASES],
        {"biases": files(1, 2, 3, 4, 5)},
        decision(True, {"biases": (1, 2, 3, 4, 5)}),
        NIGHT_END_DEGRADED,
        AT_NIGHT_DEADLINE + timedelta(hours=5),
    ),
    Case(
        "night-end-at-deadline-short-not-degraded-ok",
        [BIASES],
        {"biases": files(1, 2, 3)},
        decision(False, {"biases": (1, 2, 3)}, ("biases: 3 of at least 5",)),
        NIGHT_END_RULE,
        AT_NIGHT_DEADLINE,
    ),
    Case(
        "night-end-at-deadline-short-degraded",
        [BIASES],
        {"biases": files(1, 2, 3)},
        decision(True, {"biases": (1, 2, 3)}, ("biases: 3 of at least 5",), degraded=True),
        NIGHT_END_DEGRADED,
        AT_NIGHT_DEADLINE,
    ),
    Case(
        "night-end-degraded-needs-one-of-each-required",
        [FLATS, BIAS],
        {"flats": files(1, 2)},
        decision(
            False,
            {"flats": (1, 2), "bias": ()},
            ("flats: 2 of at least 3", "bias: 0 of at least 1"),
        ),
        NIGHT_END_DEGRADED,
        AT_NIGHT_DEADLINE,
    ),
    Case(
        "night-end-degraded-without-optional-and-min-zero",
        [FLATS, DARK, EXTRA],
        {"flats": files(1)},
        decision(
            True,
            {"flats": (1,), "dark": (), "extra": ()},
            ("flats: 1 of at least 3",),
            degraded=True,
        ),
        NIGHT_END_DEGRADED,
        AT_NIGHT_DEADLINE,
    ),
    Case(
        "night-end-degraded-selection-respects-max",
        [FLATS, BIASES],
        {"flats": files(1, 2, 3, 4, 5, 6), "biases": files(7)},
        decision(
            True,
            {"flats": (3, 4, 5, 6), "biases": (7,)},
            ("biases: 1 of at least 5",),
            degraded=True,
        ),
        NIGHT_END_DEGRADED,
        AT_NIGHT_DEADLINE,
    ),
    # ----------------------------------------------------------- deadline last_input
    Case(
        "last-input-before-deadline-waits-from-latest-arrival",
        [BIASES],
        {"biases": [*files(1, 2, arrived=0), *files(3, 4, 5, arrived=20)]},
        decision(False, {"biases": (1, 2, 3, 4, 5)}, (), at(50)),
        LAST_INPUT_RULE,
        at(49),
    ),
    Case(
        "last-input-latest-arrival-of-any-input",
        [BIASES, DARK],
        {"biases": files(1, 2, 3, 4, 5, arrived=0), "dark": files(6, arrived=40)},
        decision(False, {"biases": (1, 2, 3, 4, 5), "dark": (6,)}, (), at(70)),
        LAST_INPUT_RULE,
        at(50),
    ),
    Case(
        "last-input-at-deadline-all-met",
        [BIASES],
        {"biases": [*files(1, 2, arrived=0), *files(3, 4, 5, arrived=20)]},
        decision(True, {"biases": (1, 2, 3, 4, 5)}),
        LAST_INPUT_RULE,
        at(50),
    ),
    Case(
        "last-input-after-deadline-short",
        [BIASES],
        {"biases": files(1, 2, arrived=20)},
        decision(False, {"biases": (1, 2)}, ("biases: 2 of at least 5",)),
        LAST_INPUT_RULE,
        at(90),
    ),
    Case(
        "last-input-after-deadline-short-degraded",
        [BIASES],
        {"biases": files(1, 2, arrived=20)},
        decision(True, {"biases": (1, 2)}, ("biases: 2 of at least 5",), degraded=True),
        LAST_INPUT_DEGRADED,
        at(90),
    ),
    Case(
        "last-input-zero-minutes-is-at-latest-arrival",
        [BIASES],
        {"biases": files(1, 2, 3, 4, 5, arrived=20)},
        decision(True, {"biases": (1, 2, 3, 4, 5)}),
        {"rule": "deadline", "deadline": "last_input"},
        at(20),
    ),
    # ------------------------------------------------- kickoff ready ignores deadlines
    Case(
        "ready-rule-ignores-deadline-fields",
        [BIASES],
        {"biases": files(1, 2, 3, 4, 5)},
        decision(True, {"biases": (1, 2, 3, 4, 5)}),
        {"rule": "ready", "deadline": "night_end", "after_minutes": 600},
        at(1),
    ),
    Case(
        "ready-rule-never-degrades",
        [BIASES],
        {"biases": files(1, 2)},
        decision(False, {"biases": (1, 2)}, ("biases: 2 of at least 5",)),
        {"rule": "ready", "degraded_ok": True},
        AT_NIGHT_DEADLINE + timedelta(days=3),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_readiness(case: Case) -> None:
    decided = readiness(
        spec(case.inputs, case.kickoff), case.candidates, now=case.now, night_end=NIGHT_END
    )
    assert decided == case.expected


def test_selected_is_keyed_by_every_input_in_order() -> None:
    decided = readiness(spec([FLATS, BIAS, DARK]), {"bias": files(1)}, now=at(0), night_end=None)
    assert list(decided.selected) == ["flats", "bias", "dark"]


def test_ready_rule_needs_no_night_end() -> None:
    decided = readiness(spec([BIAS]), {"bias": files(1)}, now=at(0), night_end=None)
    assert decided.ready


def test_night_end_deadline_needs_night_end() -> None:
    with pytest.raises(ValueError, match="night_end"):
        readiness(spec([BIAS], NIGHT_END_RULE), {"bias": files(1)}, now=at(0), night_end=None)


def test_unknown_input_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no input\(s\) \['biasses'\]"):
        readiness(spec([BIAS]), {"biasses": files(1)}, now=at(0), night_end=NIGHT_END)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        readiness(spec([BIAS]), {"bias": files(1)}, now=datetime(2026, 11, 22), night_end=NIGHT_END)

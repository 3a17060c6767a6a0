"""The group key of a run: which group of files one run of a pipeline works on.

A typed, frozen value from the tracker to the runs table and back: the tracker makes
it (:func:`obsflow.processing.tracker.grouping.group_key`), the catalog stores it as
its canonical text (:meth:`GroupKey.text`) and hands it back parsed
(:meth:`GroupKey.parse`), and the executor reads its dimensions as parameters. The
text form is written and read here only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from obsflow.registry.specs import GroupBy

_DIMENSION = re.compile(r"^[a-z][a-z0-9_.]*$")
_SPECIAL = frozenset("\\,=")


@dataclass(frozen=True)
class GroupKey:
    """The group one run of a pipeline works on: sorted ``(dimension, value)`` pairs.

    ``values`` is sorted by dimension, names each dimension once, always includes
    ``night``; a dimension is a :class:`~obsflow.registry.specs.GroupBy` or any field
    name of ``group.by`` (lower case: ``gratname``);
    build one from a mapping with :meth:`of`. ``str(key)`` is :meth:`text`.
    """

    pipeline: str
    values: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        dims = [dim for dim, _ in self.values]
        if dims != sorted(set(dims)):
            raise ValueError(
                f"group key of {self.pipeline!r}: dimensions {dims} are not sorted and unique"
            )
        bad = [dim for dim in dims if not _DIMENSION.match(dim)]
        if bad:
            raise ValueError(
                f"group key of {self.pipeline!r}: bad dimension name(s) {bad}; "
                "expected lower-case field names"
            )
        if GroupBy.NIGHT.value not in dims:
            raise ValueError(f"group key of {self.pipeline!r} has no night: {self.values}")

    @classmethod
    def of(cls, pipeline: str, values: Mapping[str, str]) -> GroupKey:
        """The key of ``pipeline`` with ``values`` (any order)."""
        return cls(pipeline, tuple(sorted(values.items())))

    def get(self, dim: str) -> str | None:
        """The value of dimension ``dim``, or None when the key does not carry it."""
        for name, value in self.values:
            if name == dim:
                return value
        return None

    @property
    def night(self) -> str:
        """The group's night, ISO date (empty when the primary file had none)."""
        night = self.get(GroupBy.NIGHT.value)
        assert night is not None  # checked in __post_init__
        return night

    def text(self) -> str:
        """The canonical text, e.g. ``filter=R,night=2026-11-21``; :meth:`parse` reads it.

        ``\\``, ``,`` and ``=`` in dimensions and values are escaped with a backslash.
        Stable: it is stored in a unique database constraint.
        """
        return ",".join(f"{_escape(dim)}={_escape(value)}" for dim, value in self.values)

    def __str__(self) -> str:
        return self.text()

    @classmethod
    def parse(cls, pipeline: str, text: str) -> GroupKey:
        """The key whose :meth:`text` is ``text``; ValueError if it is not such a text."""
        pairs: list[tuple[str, str]] = []
        dim: str | None = None
        part: list[str] = []
        chars = iter(text)
        for char in chars:
            if char == "\\":
                escaped = next(chars, None)
                if escaped is None or escaped not in _SPECIAL:
                    raise ValueError(f"group key {text!r}: bad escape '\\{escaped or ''}'")
                part.append(escaped)
            elif char == "=" and dim is None:
                dim, part = "".join(part), []
            elif char == ",":
                if dim is None:
                    raise ValueError(f"group key {text!r}: {''.join(part)!r} has no '='")
                pairs.append((dim, "".join(part)))
                dim, part = None, []
            elif char == "=":
                raise ValueError(f"group key {text!r}: unescaped '=' in the value of {dim!r}")
            else:
                part.append(char)
        if dim is None:
            raise ValueError(f"group key {text!r}: {''.join(part)!r} has no '='")
        pairs.append((dim, "".join(part)))
        return cls(pipeline, tuple(pairs))


def _escape(text: str) -> str:
    return "".join(f"\\{c}" if c in _SPECIAL else c for c in text)

"""Load a YAML file into a frozen pydantic model, with every error at ``file:line``.

PyYAML gives us the node tree with marks; pydantic gives us validation with precise
locations (``('products', 2, 'filename')``). This module joins the two, so that the
settings file and every registry file report problems as::

    registry/ofcam.yaml:14: unknown key 'filenme'; expected one of: id, level, ...

It is hand-written glue (about a hundred lines) because neither library maps a
validation error back to a source line on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from obsflow.errors import Problem

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser where PyYAML has it (the same nodes and marks, ~10× faster: every
command reads the registry and the settings)."""


@dataclass(frozen=True)
class Located:
    """A parsed YAML document and the 1-based line of every key and item in it."""

    file: Path
    data: Any
    lines: dict[Loc, int]

    def line(self, loc: Iterable[str | int]) -> int | None:
        """The line of ``loc``, or of its nearest ancestor that has one."""
        path = tuple(loc)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def problem(self, loc: Iterable[str | int], message: str) -> Problem:
        return Problem(self.file, self.line(loc), message)


def read(path: Path) -> tuple[Located | None, list[Problem]]:
    """Parse one YAML file; return it with its line map, or the problems that stop it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(path, None, f"cannot read the file: {exc}")]
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Located(path, {}, {(): 1}), []
        problems: list[Problem] = []
        lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        _walk(node, (), lines, problems, path)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = exc.problem or exc.context or "malformed YAML"
        return None, [Problem(path, line, f"malformed YAML: {what}")]
    except yaml.YAMLError as exc:
        return None, [Problem(path, None, f"malformed YAML: {exc}")]
    finally:
        loader.dispose()
    return Located(path, data, lines), problems


def _walk(
    node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[Problem], path: Path
) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[object] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    Problem(path, line, f"duplicate key {key!r}; expected each key once")
                )
            seen.add(key)
            lines[(*loc, key)] = line
            _walk(value_node, (*loc, key), lines, problems, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*loc, index)] = item.start_mark.line + 1
            _walk(item, (*loc, index), lines, problems, path)


def validate(model: type[M], doc: Located, loc: Loc = ()) -> tuple[M | None, list[Problem]]:
    """Validate ``doc.data`` at ``loc`` as ``model``; map each pydantic error to its line."""
    data: Any = doc.data
    for part in loc:
        data = data[part]
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = []
        for error in errors:
            if error["type"] == "too_short" and _has_error_below(error["loc"], errors):
                continue  # the items were dropped for their own errors, reported already
            if error["type"] in _SHAPES and _explained_below(error["loc"], errors):
                continue  # one member of a union did not fit; another says why it failed
            where: Loc = (*loc, *error["loc"])
            problems.append(doc.problem(where, _message(model, error, where)))
        return None, problems


_SHAPES = frozenset({"string_type", "model_type", "dict_type", "int_type", "float_type"})


def _explained_below(loc: tuple[Any, ...], errors: list[Any]) -> bool:
    mine = words(loc)
    return any(
        e["type"] not in _SHAPES and words(tuple(e["loc"])).startswith(f"{mine}.") for e in errors
    )


def _has_error_below(loc: tuple[Any, ...], errors: list[Any]) -> bool:
    return any(len(e["loc"]) > len(loc) and tuple(e["loc"][: len(loc)]) == loc for e in errors)


def _message(model: type[BaseModel], error: Any, where: Loc) -> str:
    kind = error["type"]
    field = words(tuple(error["loc"])) or words(where) or "the document"
    if kind == "extra_forbidden":
        owner = _owner(model, error["loc"][:-1])
        fields = sorted(f for f in owner.model_fields if f != "source") if owner else []
        allowed = ", ".join(fields) or "the documented keys"
        return f"unknown key {where[-1]!r}; expected one of: {allowed}"
    if kind == "missing":
        return f"missing required key {field!r}"
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
    if kind == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern", "")
        expected = PATTERNS.get(pattern, f"text matching {pattern}")
        return f"{field}: {value!r} is not {expected}"
    if kind in ("enum", "literal_error"):
        expected = str((error.get("ctx") or {}).get("expected", "")).replace(" or ", ", ")
        return f"{field}: unknown value {value!r}; expected one of: {expected}"
    msg = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}: {msg}{shown}"


PATTERNS = {
    r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$": (
        "an ID; expected a letter, then up to 63 letters, digits, '_', '.' or '-'"
    ),
    r"^[A-Z0-9_-]{1,8}$|^HIERARCH [A-Z0-9_ .-]{1,60}$": (
        "a FITS keyword; expected up to 8 of A-Z, 0-9, '_', '-' (upper case), or 'HIERARCH ...'"
    ),
    r"^[A-Za-z][A-Za-z0-9_ .-]{0,79}$": (
        "a field name; expected a metadata field or a keyword (a letter first)"
    ),
}
"""What the registry's name patterns mean, in words (pydantic shows the regex)."""


def words(loc: Loc) -> str:
    """A location as the YAML says it, from inside its item: ``('pipelines', 0, 'group',
    'by', 1)`` → ``group.by[1]``; ``('instrument', 'keywords', 'ra')`` → ``keywords.ra``.
    """
    parts = list(loc)
    if len(parts) >= 2 and parts[0] in ("products", "pipelines", "profiles"):
        if isinstance(parts[1], int):
            parts = parts[2:]
    elif parts and parts[0] == "instrument":
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union[")) and not _is_union_tag(part):
            out += f".{part}" if out else str(part)
    return out


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "constrained-str", "ValueRule"})


def _is_union_tag(part: object) -> bool:
    # pydantic names the union member it tried in the location: 'str', 'ValueRule' ...
    return isinstance(part, str) and ("[" in part or part in _UNION_TAGS)


def _owner(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``loc`` (to list its allowed keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _innermost_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _innermost_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _innermost_model(arg)
        if found is not None:
            return found
    return None

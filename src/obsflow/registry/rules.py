"""Filename rules: how one product's regex becomes a branch of the combined matcher.

Kept apart from the matcher so that :class:`~obsflow.registry.specs.ProductSpec`
can check, at its own line in the registry, that its rule will work as a branch.
"""

from __future__ import annotations

import re

_GROUP = re.compile(r"\(\?P<([A-Za-z_]\w*)>")
_BACKREF = re.compile(r"\(\?P=([A-Za-z_]\w*)\)")
_CONDITION = re.compile(r"\(\?\(([A-Za-z_]\w*)\)")
_GLOBAL_FLAGS = re.compile(r"^\(\?([aiLmsux]+)\)")
_NUMBERED = re.compile(r"(?<!\\)(?:\\\\)*\\[1-9]|\(\?\(\d+\)")
_META = set(".^$*+?{}[]|()\\")
_QUANTIFIERS = set("*?{+")


def group_names(rule: str) -> list[str]:
    return _GROUP.findall(rule)


def branch(rule: str, tag: str) -> str:
    """``rule`` as the branch ``(?P<tag>...)`` whose named groups are ``tag_NAME``.

    Raises :class:`ValueError` for what cannot be a branch: numbered group
    references (the numbers change once rules are combined).
    """
    if _NUMBERED.search(rule):
        raise ValueError(
            "numbered group references (\\1, (?(1)...)) are not supported; "
            "name the group (?P<name>...) and refer to it as (?P=name)"
        )
    flags = _GLOBAL_FLAGS.match(rule)
    if flags:  # a global flag must be scoped once the rule is one branch among many
        rule = f"(?{flags.group(1)}:{rule[flags.end() :]})"
    rule = _GROUP.sub(f"(?P<{tag}_\\1>", rule)
    rule = _BACKREF.sub(f"(?P={tag}_\\1)", rule)
    rule = _CONDITION.sub(f"(?({tag}_\\1)", rule)
    return f"(?P<{tag}>{rule})"


def check(rule: str) -> None:
    """Raise :class:`ValueError` unless ``rule`` compiles alone and as a branch."""
    try:
        re.compile(rule)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {rule!r}: {exc}") from exc
    try:
        re.compile(branch(rule, "_p0") + "|" + branch(rule, "_p1"))
    except re.error as exc:
        raise ValueError(f"regular expression {rule!r} cannot be combined: {exc}") from exc


def literal_prefix(rule: str) -> str:
    """The text every name matching ``rule`` starts with ('' when unsure)."""
    if _has_top_level_alternation(rule) or rule.startswith("(?"):
        return ""  # flags like (?i) or alternatives: no safe prefix
    out: list[str] = []
    i = 1 if rule.startswith("^") else 0
    while i < len(rule):
        char = rule[i]
        if char == "\\" and i + 1 < len(rule) and not rule[i + 1].isalnum():
            literal, i = rule[i + 1], i + 2
        elif char not in _META:
            literal, i = char, i + 1
        else:
            break
        if i < len(rule) and rule[i] in _QUANTIFIERS:
            break  # this character may be absent or repeated: stop before it
        out.append(literal)
    return "".join(out)


def _has_top_level_alternation(rule: str) -> bool:
    depth, i, in_class = 0, 0, False
    while i < len(rule):
        char = rule[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            return True
        i += 1
    return False

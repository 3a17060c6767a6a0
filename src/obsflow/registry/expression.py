"""A small, safe expression language for ``where:`` and ``when:`` in the registry.

Examples::

    exptime > 30 and filter in ['R', 'I']
    frame_type == 'FLAT' and filter == group.filter
    not (object == 'bias')
    ITIME * COADDS                  (a computed value: :meth:`Expression.value`)

Python's own parser reads the text (so precedence and literals are Python's), and
then a whitelist walk allows only: names and dotted names, string/number/bool/None
literals, lists and tuples of literals, comparisons (``== != < <= > >= in``,
``not in``), ``and``/``or``/``not``, unary minus and arithmetic (``+ - * / // %``;
a missing or non-numeric operand, or a division by zero, gives None). Nothing is ever passed to
``eval``; there are no calls, attributes beyond a dotted name, or subscripts.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_ARITHMETIC: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class ExpressionError(ValueError):
    """The text is not a valid expression of the language (a ValueError for pydantic)."""


@dataclass(frozen=True)
class Expression:
    text: str
    tree: ast.expr
    names: frozenset[str]
    """Every (dotted) name the expression reads, e.g. ``{'filter', 'group.filter'}``."""

    def evaluate(self, values: Mapping[str, object]) -> bool:
        """Evaluate over ``values`` (dotted names as keys). A missing name is ``None``."""
        return bool(_eval(self.tree, values))

    def value(self, values: Mapping[str, object]) -> object:
        """The expression's value over ``values`` (``ITIME * COADDS`` → 20.0); None
        when an operand is missing or of the wrong type."""
        return _eval(self.tree, values)


def parse(text: str) -> Expression:
    """Parse and check ``text``; raise :class:`ExpressionError` saying what is not allowed."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ExpressionError(f"cannot parse expression {text!r}: {exc.msg}") from None
    names: set[str] = set()
    _check(tree, text, names)
    return Expression(text, tree, frozenset(names))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _check(node: ast.expr, text: str, names: set[str]) -> None:
    dotted = _dotted(node)
    if dotted is not None:
        names.add(dotted)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, str | int | float | bool | type(None)):
            raise ExpressionError(f"{text!r}: literal {node.value!r} is not allowed")
    elif isinstance(node, ast.List | ast.Tuple):
        for item in node.elts:
            _check(item, text, names)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, text, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        _check(node.operand, text, names)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _ARITHMETIC:
            raise ExpressionError(f"{text!r}: operator {type(node.op).__name__} is not allowed")
        _check(node.left, text, names)
        _check(node.right, text, names)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE:
                raise ExpressionError(f"{text!r}: operator {type(op).__name__} is not allowed")
        _check(node.left, text, names)
        for comparator in node.comparators:
            _check(comparator, text, names)
    else:
        raise ExpressionError(
            f"{text!r}: {type(node).__name__} is not allowed; expected names, literals, "
            "comparisons (== != < <= > >= in), and/or/not, + - * / // %"
        )


def _eval(node: ast.expr, values: Mapping[str, object]) -> Any:
    dotted = _dotted(node)
    if dotted is not None:
        return values.get(dotted)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List | ast.Tuple):
        return [_eval(item, values) for item in node.elts]
    if isinstance(node, ast.BoolOp):
        results = (_eval(v, values) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp):
        operand = _eval(node.operand, values)
        if isinstance(node.op, ast.Not):
            return not operand
        return -operand if isinstance(operand, int | float) else None
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, values), _eval(node.right, values)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (left, right))
        texts = isinstance(node.op, ast.Add) and isinstance(left, str) and isinstance(right, str)
        if not (numbers or texts):
            return None
        try:
            return _ARITHMETIC[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError):
            return None
    if isinstance(node, ast.Compare):
        left = _eval(node.left, values)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _eval(right_node, values)
            try:
                if not _COMPARE[type(op)](left, right):
                    return False
            except TypeError:  # e.g. None > 30: a missing value never satisfies an order
                return False
            left = right
        return True
    raise ExpressionError(f"cannot evaluate {type(node).__name__}")  # unreachable after parse

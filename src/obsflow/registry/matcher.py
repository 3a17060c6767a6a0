"""Recognition: every product's filename rule compiled into one matcher.

Two ideas keep the cost of recognising a name nearly flat with hundreds of products
(``benchmarks/recognise.py``):

1. *Prefix dispatch.* Most rules start with literal text (``ofc_``, ``KB.``).
   The literal prefix of each rule is read conservatively from its source; a name
   is only tried against the products whose prefix it starts with (a dictionary
   lookup per distinct prefix length) and the products with no literal prefix.
2. *One alternation per candidate set.* The candidates' rules are joined into one
   regex of branches ``(?P<_p7>RULE)`` (named groups renamed ``_p7_NAME``) and
   matched with ``fullmatch``; ``lastgroup`` names the product without a Python
   loop. The same alternation in reverse order finds the *last* matching product:
   if first and last differ, two products claim the name, and it is refused as
   ambiguous, naming both. Compiled alternations are cached per candidate set.

No library offers multi-pattern matching with named groups and ambiguity
detection, hence these ~100 lines.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from obsflow.errors import AmbiguousError, RecognitionError
from obsflow.registry import rules
from obsflow.registry.specs import ProductSpec


@dataclass(frozen=True)
class Recognised:
    product: ProductSpec
    groups: Mapping[str, str]


class Matcher:
    """Recognise a file name as exactly one product. Thread-safe."""

    def __init__(self, products: Sequence[ProductSpec]) -> None:
        self._products = tuple(products)
        self._names = [rules.group_names(p.filename) for p in self._products]
        self._branches = [rules.branch(p.filename, f"_p{i}") for i, p in enumerate(self._products)]
        by_prefix: dict[int, dict[str, list[int]]] = {}
        self._unprefixed: tuple[int, ...] = ()
        unprefixed = []
        for index, product in enumerate(self._products):
            prefix = rules.literal_prefix(product.filename)
            if prefix:
                by_prefix.setdefault(len(prefix), {}).setdefault(prefix, []).append(index)
            else:
                unprefixed.append(index)
        self._unprefixed = tuple(unprefixed)
        self._by_prefix = {n: {p: tuple(ix) for p, ix in d.items()} for n, d in by_prefix.items()}
        self._compiled: dict[tuple[int, ...], tuple[re.Pattern[str], re.Pattern[str]]] = {}
        self._lock = threading.Lock()

    def _candidates(self, name: str) -> tuple[int, ...]:
        found: list[int] = list(self._unprefixed)
        for length, table in self._by_prefix.items():
            found.extend(table.get(name[:length], ()))
        return tuple(sorted(found))

    def _patterns(self, candidates: tuple[int, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
        patterns = self._compiled.get(candidates)
        if patterns is None:
            branches = [self._branches[i] for i in candidates]
            patterns = (re.compile("|".join(branches)), re.compile("|".join(reversed(branches))))
            with self._lock:
                self._compiled[candidates] = patterns
        return patterns

    def recognise(self, name: str) -> Recognised:
        """The one product ``name`` belongs to; raise if none or several match."""
        candidates = self._candidates(name)
        if not candidates:
            raise RecognitionError(name, "the file name matches no registered product")
        forward, backward = self._patterns(candidates)
        first = forward.fullmatch(name)
        if first is None or first.lastgroup is None:
            raise RecognitionError(name, "the file name matches no registered product")
        index = _index(first.lastgroup)
        last = backward.fullmatch(name)
        assert last is not None and last.lastgroup is not None
        other = _index(last.lastgroup)
        if other != index:
            ids = f"{self._products[index].id!r} and {self._products[other].id!r}"
            raise AmbiguousError(name, f"the file name is ambiguous: it matches products {ids}")
        groups = {n: first.group(f"_p{index}_{n}") for n in self._names[index]}
        return Recognised(self._products[index], {k: v for k, v in groups.items() if v is not None})


def _index(group: str) -> int:
    # lastgroup is the group that closed last: the branch's own, outermost _pN group
    return int(group[2:])

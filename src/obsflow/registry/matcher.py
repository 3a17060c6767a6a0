"""Recognition: one compiled regular expression for every product's filename rule.

Each product's rule becomes an optional lookahead at the start of the name,
``(?=(?P<_p7>RULE)\\Z)?``, its named groups renamed ``_p7_NAME``. One ``match``
call therefore tries every product inside the regex engine (C, no Python loop
per product) and still sees *every* product that matches, which is how an
ambiguous name is detected. Building this ourselves is ~50 lines; no library
offers multi-pattern matching with named groups and all-matches semantics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from obsflow.errors import AmbiguousError, RecognitionError
from obsflow.registry.specs import ProductSpec

_GROUP = re.compile(r"\(\?P<([A-Za-z_]\w*)>")
_BACKREF = re.compile(r"\(\?P=([A-Za-z_]\w*)\)")


@dataclass(frozen=True)
class Recognised:
    product: ProductSpec
    groups: Mapping[str, str]


class Matcher:
    """Recognise a file name as exactly one product."""

    def __init__(self, products: Sequence[ProductSpec]) -> None:
        self._products = tuple(products)
        self._names: list[list[str]] = []
        parts = []
        for index, product in enumerate(self._products):
            tag = f"_p{index}"
            names = _GROUP.findall(product.filename)
            self._names.append(names)
            rule = _GROUP.sub(f"(?P<{tag}_\\1>", product.filename)
            rule = _BACKREF.sub(f"(?P={tag}_\\1)", rule)
            parts.append(f"(?=(?P<{tag}>(?:{rule})\\Z))?")
        self._regex = re.compile("".join(parts))

    def recognise(self, name: str) -> Recognised:
        """The one product ``name`` belongs to; raise if none or several match."""
        match = self._regex.match(name)
        found = [
            i for i in range(len(self._products)) if match and match.group(f"_p{i}") is not None
        ]
        if not found:
            raise RecognitionError(name, "the file name matches no registered product")
        if len(found) > 1:
            ids = " and ".join(repr(self._products[i].id) for i in found)
            raise AmbiguousError(name, f"the file name is ambiguous: it matches products {ids}")
        index = found[0]
        assert match is not None
        groups = {n: match.group(f"_p{index}_{n}") for n in self._names[index]}
        return Recognised(self._products[index], {k: v for k, v in groups.items() if v is not None})

"""Recognition cost against the number of registered products.

The registry compiles every product's filename rule into one matcher; this prints
names recognised per second with 10, 100 and 500 products and, as the floor, a
single precompiled regex for the one product that matches (the least any
recogniser must do). Run: ``python benchmarks/recognise.py``.
"""

from __future__ import annotations

import platform
import re
import time

from obsflow.registry.matcher import Matcher
from obsflow.registry.specs import ProductSpec

NAMES = 20_000


def products(n: int) -> list[ProductSpec]:
    """``n`` products of ``n // 10`` instruments, with realistic, mostly distinct rules."""
    out = []
    for i in range(n):
        inst = f"inst{i % max(1, n // 10):03d}"
        rule = rf"{inst}_k{i:04d}_(?P<date>\d{{8}})_(?P<frame>\d{{4,}})\.fits"
        out.append(ProductSpec(id=f"p{i}", level=i % 4, instrument=inst, filename=rule))
    return out


def rate(fn: object, names: list[str]) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for name in names:
            fn(name)
        best = min(best, time.perf_counter() - start)
    return len(names) / best


def main() -> None:
    print(f"recognise: python {platform.python_version()}, {NAMES} names per round, best of 3")
    rates: dict[int, float] = {}
    for n in (10, 100, 500):
        specs = products(n)
        target = specs[n // 2]
        inst = target.instrument
        names = [f"{inst}_k{n // 2:04d}_20261122_{k:04d}.fits" for k in range(NAMES)]
        matcher = Matcher(specs)
        assert matcher.recognise(names[0]).product.id == target.id
        floor_regex = re.compile(target.filename)
        ours = rates[n] = rate(matcher.recognise, names)
        floor = rate(floor_regex.fullmatch, names)
        print(
            f"  {n:4d} products: {ours:10,.0f} names/s   floor (one regex) {floor:10,.0f} names/s"
            f"   ratio {ours / floor:.2f}"
        )
    flat = rates[500] / rates[10]
    verdict = "flat" if flat >= 0.5 else "NOT FLAT"
    print(f"  500 vs 10 products: {flat:.2f} of the rate (target >= 0.5: {verdict})")


if __name__ == "__main__":
    main()

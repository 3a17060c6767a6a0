"""The registry: instruments, products, pipelines and profiles, from a directory of YAML.

:func:`load_registry` reads every ``*.yaml`` under a directory once, validates each
file and every cross-reference, and returns a frozen :class:`Registry`. Every
problem is reported as ``file:line: what is wrong, what was expected``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from obsflow.errors import RegistryError
from obsflow.registry.loader import load_registry_files
from obsflow.registry.matcher import Matcher, Recognised
from obsflow.registry.specs import (
    InstrumentSpec,
    PipelineSpec,
    ProductSpec,
    ProfileSpec,
)

__all__ = [
    "InstrumentSpec",
    "PipelineSpec",
    "ProductSpec",
    "ProfileSpec",
    "Recognised",
    "Registry",
    "RegistryError",
    "load_registry",
]


@dataclass(frozen=True)
class Registry:
    root: Path
    instruments: Mapping[str, InstrumentSpec]
    products: Mapping[str, ProductSpec]
    pipelines: Mapping[str, PipelineSpec]
    profiles: Mapping[str, ProfileSpec]
    matcher: Matcher = field(repr=False)
    consumers: Mapping[str, tuple[PipelineSpec, ...]] = field(repr=False)
    """product ID → the pipelines that take it as an input (the tracker's index)."""

    def recognise(self, name: str) -> Recognised:
        return self.matcher.recognise(name)

    def instrument_of(self, product: ProductSpec) -> InstrumentSpec:
        return self.instruments[product.instrument]


def load_registry(root: Path) -> Registry:
    """Read and check the registry under ``root``; raise :class:`RegistryError`."""
    files = load_registry_files(root)
    consumers: dict[str, list[PipelineSpec]] = {}
    for pipeline in files.pipelines.values():
        for product_id in {i.product for i in pipeline.inputs}:
            consumers.setdefault(product_id, []).append(pipeline)
    return Registry(
        root=root,
        instruments=MappingProxyType(files.instruments),
        products=MappingProxyType(files.products),
        pipelines=MappingProxyType(files.pipelines),
        profiles=MappingProxyType(files.profiles),
        matcher=Matcher(list(files.products.values())),
        consumers=MappingProxyType({k: tuple(v) for k, v in consumers.items()}),
    )

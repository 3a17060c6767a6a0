"""Read every registry file, validate it, and check the references between files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from obsflow.errors import Problem, RegistryError
from obsflow.registry import rules, yamlfile
from obsflow.registry.keywords import METADATA_FIELDS, field_name
from obsflow.registry.specs import (
    GroupBy,
    InstrumentSpec,
    PipelineSpec,
    ProductSpec,
    ProfileSpec,
    RegistryFile,
    Source,
    Spec,
)

S = TypeVar("S", bound=Spec)


@dataclass
class RegistryFiles:
    instruments: dict[str, InstrumentSpec] = field(default_factory=dict)
    products: dict[str, ProductSpec] = field(default_factory=dict)
    pipelines: dict[str, PipelineSpec] = field(default_factory=dict)
    profiles: dict[str, ProfileSpec] = field(default_factory=dict)


def load_registry_files(root: Path) -> RegistryFiles:
    if not root.is_dir():
        raise RegistryError([Problem(root, None, "registry directory does not exist")])
    paths = sorted(p for p in root.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())
    if not paths:
        raise RegistryError([Problem(root, None, "no registry files (*.yaml) found")])
    out = RegistryFiles()
    problems: list[Problem] = []
    where: dict[tuple[str, str], tuple[yamlfile.Located, tuple[str | int, ...]]] = {}
    for path in paths:
        doc, found = yamlfile.read(path)
        problems += found
        if doc is None or found:
            continue
        if doc.data is None or doc.data == {}:
            continue
        if not isinstance(doc.data, dict):
            problems.append(
                doc.problem((), "expected a mapping with instrument/products/pipelines/profiles")
            )
            continue
        parsed, found = yamlfile.validate(RegistryFile, doc)
        problems += found
        if parsed is None:
            continue
        if parsed.instrument is not None:
            spec, found = _item(InstrumentSpec, doc, ("instrument",))
            problems += found
            if spec is not None:
                _add(
                    out.instruments,
                    spec.name,
                    spec,
                    "instrument",
                    doc,
                    ("instrument",),
                    where,
                    problems,
                )
        for index in range(len(parsed.products)):
            _collect(
                ProductSpec, doc, ("products", index), "product", out.products, where, problems
            )
        for index in range(len(parsed.pipelines)):
            _collect(
                PipelineSpec, doc, ("pipelines", index), "pipeline", out.pipelines, where, problems
            )
        for index in range(len(parsed.profiles)):
            _collect(
                ProfileSpec, doc, ("profiles", index), "profile", out.profiles, where, problems
            )
    problems += _cross_check(out, where)
    if problems:
        raise RegistryError(problems)
    return out


Identified = TypeVar("Identified", ProductSpec, PipelineSpec, ProfileSpec)


def _collect(
    model: type[Identified],
    doc: yamlfile.Located,
    loc: tuple[str | int, ...],
    kind: str,
    target: dict[str, Identified],
    where: dict[tuple[str, str], tuple[yamlfile.Located, tuple[str | int, ...]]],
    problems: list[Problem],
) -> None:
    item, found = _item(model, doc, loc)
    problems += found
    if item is not None:
        _add(target, item.id, item, kind, doc, loc, where, problems)


def _item(
    model: type[S], doc: yamlfile.Located, loc: tuple[str | int, ...]
) -> tuple[S | None, list[Problem]]:
    """Validate one spec on its own (so one typo does not hide its neighbours)."""
    raw = doc.data
    for part in loc:
        raw = raw[part]
    if isinstance(raw, dict) and "source" in raw:
        return None, [doc.problem((*loc, "source"), "unknown key 'source'; it is set by obsflow")]
    spec, problems = yamlfile.validate(model, doc, loc)
    if spec is None:
        return None, problems
    return spec.model_copy(update={"source": Source(file=doc.file, line=doc.line(loc))}), []


def _add(
    target: dict[str, S],
    key: str,
    spec: S,
    kind: str,
    doc: yamlfile.Located,
    loc: tuple[str | int, ...],
    where: dict[tuple[str, str], tuple[yamlfile.Located, tuple[str | int, ...]]],
    problems: list[Problem],
) -> None:
    if key in target:
        first_doc, first_loc = where[(kind, key)]
        first = f"{first_doc.file}:{first_doc.line(first_loc)}"
        problems.append(
            doc.problem(
                loc, f"duplicate {kind} ID {key!r}, first defined at {first}; expected each ID once"
            )
        )
        return
    target[key] = spec
    where[(kind, key)] = (doc, loc)


def _cross_check(
    files: RegistryFiles,
    where: dict[tuple[str, str], tuple[yamlfile.Located, tuple[str | int, ...]]],
) -> list[Problem]:
    problems: list[Problem] = []

    def report(kind: str, key: str, sub: tuple[str | int, ...], message: str) -> None:
        doc, loc = where[(kind, key)]
        problems.append(doc.problem((*loc, *sub), message))

    for product in files.products.values():
        if product.instrument not in files.instruments:
            known = ", ".join(sorted(files.instruments)) or "none defined"
            report(
                "product",
                product.id,
                ("instrument",),
                f"product {product.id!r} names instrument {product.instrument!r}, "
                f"which is not registered; expected one of: {known}",
            )
    for pipeline in files.pipelines.values():
        if pipeline.profile not in files.profiles:
            report(
                "pipeline",
                pipeline.id,
                ("profile",),
                f"pipeline {pipeline.id!r} names profile {pipeline.profile!r}, "
                "which is not registered",
            )
        names: set[str] = set()
        for index, spec in enumerate(pipeline.inputs):
            if spec.product not in files.products:
                report(
                    "pipeline",
                    pipeline.id,
                    ("inputs", index, "product"),
                    f"pipeline {pipeline.id!r} takes product {spec.product!r}, "
                    "which is not registered",
                )
            if spec.name in names:
                report(
                    "pipeline",
                    pipeline.id,
                    ("inputs", index, "name"),
                    f"input name {spec.name!r} is used twice; expected unique names",
                )
            names.add(spec.name)
        primary = files.products.get(pipeline.inputs[0].product)
        if primary is not None:
            fields = _group_fields(primary)
            for index, dim in enumerate(pipeline.group.by):
                if dim not in fields:
                    report(
                        "pipeline",
                        pipeline.id,
                        ("group", "by", index),
                        f"group.by: unknown field {dim!r}; expected a metadata field or an "
                        f"archived keyword of {primary.id}: {', '.join(fields)}",
                    )
        for index, out in enumerate(pipeline.outputs):
            if out.product not in files.products:
                report(
                    "pipeline",
                    pipeline.id,
                    ("outputs", index, "product"),
                    f"pipeline {pipeline.id!r} outputs product {out.product!r}, "
                    "which is not registered",
                )
    for profile in files.profiles.values():
        problems += _check_steps(profile, where)
    return problems


def _group_fields(product: ProductSpec) -> list[str]:
    """What a pipeline whose primary input is ``product`` may group by."""
    fields = [*(g.value for g in GroupBy), *METADATA_FIELDS]
    fields += [field_name(k) for k in product.keywords]
    fields += rules.group_names(product.filename)
    return list(dict.fromkeys(fields))


def _check_steps(
    profile: ProfileSpec,
    where: dict[tuple[str, str], tuple[yamlfile.Located, tuple[str | int, ...]]],
) -> list[Problem]:
    doc, loc = where[("profile", profile.id)]
    problems = []
    index_of: dict[str, int] = {}
    for index, step in enumerate(profile.steps):
        if step.name in index_of:
            problems.append(
                doc.problem(
                    (*loc, "steps", index, "name"),
                    f"step name {step.name!r} is used twice in profile "
                    f"{profile.id!r}; expected unique step names",
                )
            )
        index_of.setdefault(step.name, index)
    for index, step in enumerate(profile.steps):
        for need in step.needs:
            if need not in index_of:
                problems.append(
                    doc.problem(
                        (*loc, "steps", index, "needs"),
                        f"step {step.name!r} needs {need!r}, which is not a "
                        f"step of profile {profile.id!r}",
                    )
                )
    if not problems:
        cycle = _find_cycle({s.name: s.needs for s in profile.steps})
        if cycle:
            problems.append(
                doc.problem(
                    (*loc, "steps"),
                    f"profile {profile.id!r} has a dependency cycle: "
                    f"{' -> '.join(cycle)}; expected 'needs' to form a DAG",
                )
            )
    return problems


def _find_cycle(needs: dict[str, tuple[str, ...]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in needs.get(node, ()):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for name in needs:
        if name not in state and (found := visit(name)):
            return found
    return None

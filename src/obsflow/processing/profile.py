"""Run-time profiles: a registry profile with every parameter filled for one run.

The builder (:func:`build_profile`) takes a pipeline, its profile template and a run's
context (parameters, input paths, output names, the work directory) and produces a
:class:`RuntimeProfile`: every step's argv is final, every ``when`` has been decided, every
input path is resolved. It is stored with the run as provenance, and it is all the
controller needs, so a run can execute on another machine.

Templating, in each argv item of a step's ``command``:

* ``{name}`` is a parameter: the pipeline's ``parameters``, the group key (``night``,
  ``filter``, ...), the primary input's metadata (``exptime``, ``object``, its filename
  groups such as ``date`` and ``frame``), ``nightid`` (the night as ``20261121``),
  ``object_slug`` (the object, safe in a file name), ``archive_stem`` (the primary
  input's archive ID without its extension), ``site`` (the site directory),
  ``python`` (the interpreter obsflow runs on), and reprocessing overrides;
* ``{work}`` is the run's work directory; ``{run_id}`` the run's ID;
* ``{inputs.NAME}`` is the path of input NAME; when NAME holds several files and the item
  is exactly ``{inputs.NAME}``, it becomes one argv item per file;
* ``{outputs.PRODUCT}`` is where the step writes that output (inside ``{work}/out``);
  the controller publishes it only if the whole run succeeds.

A step with an ``image`` runs in a container, where the host's paths mean nothing: for
it, ``{work}`` is ``/work`` (the run's work directory, mounted read-write),
``{inputs.NAME}`` is ``/inputs/NAME/N/BASENAME`` (the N-th file of NAME, counted from 0,
mounted read-only by itself: two inputs with one base name cannot collide) and
``{outputs.PRODUCT}`` is ``/work/out/NAME``. The step records those mounts (host path,
container path, read-only), so what it sees is part of the stored provenance, with its
network switch and its CPU and memory limits.

A ``{`` or ``}`` meant literally is written twice, as in Python's ``str.format``.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from obsflow.errors import ProfileError
from obsflow.registry import expression
from obsflow.registry.specs import PipelineSpec, ProfileSpec

ParameterValue = str | int | float | bool | None
OUTPUT_DIR: Final = "out"
"""Outputs are written under ``{work}/out`` and published from there."""
CONTAINER_WORK: Final = "/work"
"""Where a container step finds the run's work directory (read-write, its working directory)."""
CONTAINER_INPUTS: Final = "/inputs"
"""Under which a container step finds its inputs, read-only: ``/inputs/NAME/N/BASENAME``."""
_UNITS: Final = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(frozen=True)
class Mount:
    """A host path bound into a container step's file system."""

    source: str
    """The path on the machine that runs the step."""
    target: str
    """The path inside the container."""
    read_only: bool = True


@dataclass(frozen=True)
class RuntimeStep:
    name: str
    argv: tuple[str, ...]
    needs: tuple[str, ...] = ()
    enabled: bool = True
    """False when the step's ``when`` was false for this run: it is skipped (and logged)."""
    when: str | None = None
    """The condition as written, kept for the log."""
    timeout: float = 3600.0
    retries: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    image: str | None = None
    """A container image to run ``argv`` in; None: ``argv`` runs as a subprocess."""
    mounts: tuple[Mount, ...] = ()
    """A container step's bind mounts: the work directory, then each input file."""
    network: bool = False
    """Whether a container step may reach the network (else it has only loopback)."""
    cpus: float | None = None
    """A container step's CPU limit, in CPUs; None: no limit."""
    memory: int | None = None
    """A container step's memory limit in bytes; None: no limit."""


@dataclass(frozen=True)
class RuntimeProfile:
    run_id: str
    pipeline: str
    profile: str
    steps: tuple[RuntimeStep, ...]
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    inputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Input name → absolute paths, as resolved for this run."""
    outputs: Mapping[str, str] = field(default_factory=dict)
    """Output product → absolute path under the work directory's ``out/``."""
    work: str = ""

    def step(self, name: str) -> RuntimeStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "profile": self.profile,
            "work": self.work,
            "parameters": dict(self.parameters),
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "outputs": dict(self.outputs),
            "steps": [
                {
                    "name": s.name,
                    "argv": list(s.argv),
                    "needs": list(s.needs),
                    "enabled": s.enabled,
                    "when": s.when,
                    "timeout": s.timeout,
                    "retries": s.retries,
                    "env": dict(s.env),
                    "image": s.image,
                    **_container_json(s),
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuntimeProfile:
        return cls(
            run_id=data["run_id"],
            pipeline=data["pipeline"],
            profile=data["profile"],
            work=data.get("work", ""),
            parameters=dict(data.get("parameters", {})),
            inputs={k: tuple(v) for k, v in data.get("inputs", {}).items()},
            outputs=dict(data.get("outputs", {})),
            steps=tuple(
                RuntimeStep(
                    name=s["name"],
                    argv=tuple(s["argv"]),
                    needs=tuple(s.get("needs", ())),
                    enabled=bool(s.get("enabled", True)),
                    when=s.get("when"),
                    timeout=float(s.get("timeout", 3600.0)),
                    retries=int(s.get("retries", 0)),
                    env=dict(s.get("env", {})),
                    image=s.get("image"),
                    mounts=tuple(
                        Mount(m["source"], m["target"], bool(m.get("read_only", True)))
                        for m in s.get("mounts", ())
                    ),
                    network=bool(s.get("network", False)),
                    cpus=None if s.get("cpus") is None else float(s["cpus"]),
                    memory=None if s.get("memory") is None else int(s["memory"]),
                )
                for s in data["steps"]
            ),
        )

    def dumps(self) -> str:
        """The profile as JSON (made once: the run's log and its catalog row both show it)."""
        return self._text

    @cached_property
    def _text(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)


def _container_json(step: RuntimeStep) -> dict[str, Any]:
    """A container step's own fields; none for a subprocess step, whose JSON stays what
    it was before containers ran."""
    if step.image is None:
        return {}
    return {
        "mounts": [
            {"source": m.source, "target": m.target, "read_only": m.read_only} for m in step.mounts
        ],
        "network": step.network,
        "cpus": step.cpus,
        "memory": step.memory,
    }


def output_names(
    pipeline: PipelineSpec, parameters: Mapping[str, ParameterValue], run_id: str
) -> dict[str, str]:
    """Each output product's file name, from the pipeline's naming rule."""
    names: dict[str, str] = {}
    for output in pipeline.outputs:
        names[output.product] = _fill(
            output.name, parameters, _NOWHERE, run_id, f"pipeline {pipeline.id} output"
        )
    return names


def build_profile(
    *,
    run_id: str,
    pipeline: PipelineSpec,
    profile: ProfileSpec,
    parameters: Mapping[str, ParameterValue],
    inputs: Mapping[str, Sequence[Path]],
    work: Path,
) -> RuntimeProfile:
    """Fill ``profile`` for one run; raise :class:`ProfileError` naming the run, step and
    placeholder when something cannot be filled."""
    names = output_names(pipeline, parameters, run_id)
    outputs = {product: str(work / OUTPUT_DIR / name) for product, name in names.items()}
    paths = {name: tuple(str(p) for p in files) for name, files in inputs.items()}
    inside = _Places(
        work=CONTAINER_WORK,
        inputs={
            name: tuple(
                f"{CONTAINER_INPUTS}/{name}/{n}/{Path(p).name}" for n, p in enumerate(files)
            )
            for name, files in paths.items()
        },
        outputs={p: f"{CONTAINER_WORK}/{OUTPUT_DIR}/{name}" for p, name in names.items()},
    )
    outside = _Places(work=str(work), inputs=paths, outputs=outputs)
    steps: list[RuntimeStep] = []
    for spec in profile.steps:
        where = f"run {run_id} step {spec.name}"
        places = outside if spec.image is None else inside
        argv: list[str] = []
        for item in spec.command:
            whole = _whole_input(item)
            if whole is not None and whole in places.inputs:
                argv.extend(places.inputs[whole])  # one argv item per file
            else:
                argv.append(_fill(item, parameters, places, run_id, where))
        enabled = True
        if spec.when is not None:
            enabled = expression.parse(spec.when).evaluate(dict(parameters))
        mounts: tuple[Mount, ...] = ()
        if spec.image is not None:
            mounts = (
                Mount(os.path.abspath(work), CONTAINER_WORK, read_only=False),
                *(
                    Mount(os.path.abspath(host), container, read_only=True)
                    for name, files in paths.items()
                    for host, container in zip(files, inside.inputs[name], strict=True)
                ),
            )
        steps.append(
            RuntimeStep(
                name=spec.name,
                argv=tuple(argv),
                needs=spec.needs,
                enabled=enabled,
                when=spec.when,
                timeout=spec.timeout,
                retries=spec.retries,
                env={k: _fill(v, parameters, places, run_id, where) for k, v in spec.env.items()},
                image=spec.image,
                mounts=mounts,
                network=spec.network,
                cpus=spec.cpus,
                memory=None if spec.memory is None else _bytes(spec.memory),
            )
        )
    return RuntimeProfile(
        run_id=run_id,
        pipeline=pipeline.id,
        profile=profile.id,
        steps=tuple(steps),
        parameters=dict(parameters),
        inputs=paths,
        outputs=outputs,
        work=str(work),
    )


@dataclass(frozen=True)
class _Places:
    """What ``{work}``, ``{inputs.NAME}`` and ``{outputs.PRODUCT}`` become for one step:
    the host's paths, or the container's."""

    work: str
    inputs: Mapping[str, tuple[str, ...]]
    outputs: Mapping[str, str]


_NOWHERE: Final = _Places(work="", inputs={}, outputs={})


def _bytes(size: str) -> int:
    """``512m`` → bytes (the registry's MemorySize: a number, then b, k, m or g)."""
    unit = size[-1].lower()
    if unit in _UNITS:
        return int(size[:-1]) * _UNITS[unit]
    return int(size)


def _whole_input(item: str) -> str | None:
    """``NAME`` if the argv item is exactly ``{inputs.NAME}``, else None."""
    if item.startswith("{inputs.") and item.endswith("}") and item.count("{") == 1:
        return item[len("{inputs.") : -1]
    return None


def _fill(
    template: str,
    parameters: Mapping[str, ParameterValue],
    places: _Places,
    run_id: str,
    where: str,
) -> str:
    parts: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ProfileError(f"{where}: bad template {template!r}: {exc}") from None
    for literal, name, spec, conversion in parsed:
        parts.append(literal)
        if name is None:
            continue
        if conversion or spec:
            raise ProfileError(f"{where}: {{{name}}} in {template!r}: no ! or : allowed")
        parts.append(_value(name, parameters, places, run_id, where, template))
    return "".join(parts)


def _value(
    name: str,
    parameters: Mapping[str, ParameterValue],
    places: _Places,
    run_id: str,
    where: str,
    template: str,
) -> str:
    inputs, outputs = places.inputs, places.outputs
    if name == "work" and places.work:
        return places.work
    if name == "run_id":
        return run_id
    if name.startswith("inputs."):
        key = name[len("inputs.") :]
        if key not in inputs:
            raise ProfileError(f"{where}: {{{name}}} in {template!r}: no input named {key!r}")
        files = inputs[key]
        if len(files) != 1:
            raise ProfileError(
                f"{where}: {{{name}}} in {template!r} holds {len(files)} files; "
                "use it alone as one argv item to pass them all"
            )
        return files[0]
    if name.startswith("outputs."):
        key = name[len("outputs.") :]
        if key not in outputs:
            raise ProfileError(f"{where}: {{{name}}} in {template!r}: no output {key!r}")
        return outputs[key]
    if name in parameters and parameters[name] is not None:
        return str(parameters[name])
    raise ProfileError(f"{where}: {{{name}}} in {template!r}: no such parameter")


def parameter_names(pipeline: PipelineSpec, profile: ProfileSpec) -> frozenset[str]:
    """The parameters a run of ``pipeline`` reads, so may be overridden: its declared
    ``parameters`` and every name its profile's steps and its output names use (in
    ``command``, ``env`` and ``when``), but not ``work``, ``run_id``, ``inputs.*`` nor
    ``outputs.*``, which the run itself fills."""
    names = set(pipeline.parameters)
    templates = [output.name for output in pipeline.outputs]
    for step in profile.steps:
        templates += [*step.command, *step.env.values()]
        if step.when:
            names.update(expression.parse(step.when).names)
    for template in templates:
        try:
            names.update(name for _, name, _, _ in string.Formatter().parse(template) if name)
        except ValueError:
            continue  # a bad template is the builder's to report, with its place
    own = ("work", "run_id")
    return frozenset(n for n in names if n not in own and not n.startswith(("inputs.", "outputs.")))

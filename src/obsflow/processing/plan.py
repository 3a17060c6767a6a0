"""A run's plan: everything a worker needs to execute a claimed run, wherever it is.

:func:`plan_run` is made where the catalog and the registry are (the site, or the
archive server for a worker over HTTP); it holds the pipeline and profile specs, the
parameters (the primary input's recorded facts, the group key, the pipeline's
parameters, reprocessing overrides) and each input as a reference by archive ID and
sha256. A worker turns it into a run-time profile with its own paths
(:func:`obsflow.processing.profile.build_profile`): the cache's paths when it shares
the site's storage, its own input cache when it fetched the inputs over HTTP. A plan is
plain data and crosses HTTP as JSON (:meth:`RunPlan.to_json`, :meth:`RunPlan.from_json`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from obsflow.catalog import Catalog
from obsflow.catalog.runs import RunRecord
from obsflow.errors import RecognitionError, RunError
from obsflow.processing.inputs import values_of
from obsflow.processing.profile import ParameterValue
from obsflow.registry import Registry
from obsflow.registry.specs import PipelineSpec, ProfileSpec


@dataclass(frozen=True)
class InputRef:
    """One input file of a run, as a worker fetches and checks it."""

    file_id: int
    archive_id: str
    name: str
    """Its original file name (the name a step sees)."""
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "file_id": self.file_id,
            "archive_id": self.archive_id,
            "name": self.name,
            "sha256": self.sha256,
            "size": self.size,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InputRef:
        return cls(
            file_id=int(data["file_id"]),
            archive_id=str(data["archive_id"]),
            name=str(data["name"]),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
        )


@dataclass(frozen=True)
class RunPlan:
    run_id: int
    attempt: int
    pipeline: PipelineSpec
    profile: ProfileSpec
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    """Every parameter but the worker's own (``python``, and ``site`` on a site's
    worker) and the overrides."""
    inputs: Mapping[str, tuple[InputRef, ...]] = field(default_factory=dict)
    """Input name → its files, in the run's order."""
    overrides: Mapping[str, ParameterValue] = field(default_factory=dict)
    """A reprocessing request's parameters: they win over every other."""

    def parameters_with(self, local: Mapping[str, ParameterValue]) -> dict[str, ParameterValue]:
        """The run's parameters with the worker's own ``local`` ones (``python``,
        ``site``), which win over all but the overrides."""
        return {**self.parameters, **local, **self.overrides}

    @property
    def input_files(self) -> tuple[InputRef, ...]:
        return tuple(ref for refs in self.inputs.values() for ref in refs)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "attempt": self.attempt,
            "pipeline": self.pipeline.model_dump(
                mode="json", exclude={"source"}, exclude_unset=True
            ),
            "profile": self.profile.model_dump(mode="json", exclude={"source"}, exclude_unset=True),
            "parameters": dict(self.parameters),
            "inputs": {k: [r.to_json() for r in v] for k, v in self.inputs.items()},
            "overrides": dict(self.overrides),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunPlan:
        return cls(
            run_id=int(data["run_id"]),
            attempt=int(data["attempt"]),
            pipeline=PipelineSpec.model_validate(data["pipeline"]),
            profile=ProfileSpec.model_validate(data["profile"]),
            parameters=dict(data.get("parameters", {})),
            inputs={
                k: tuple(InputRef.from_json(r) for r in v)
                for k, v in dict(data.get("inputs", {})).items()
            },
            overrides=dict(data.get("overrides", {})),
        )


def plan_run(
    catalog: Catalog, registry: Registry, run: RunRecord, conn: Connection | None = None
) -> RunPlan:
    """The plan of claimed run ``run`` (its inputs read in ``conn``'s transaction if
    given); :class:`RunError` naming the run and the cause when it cannot be planned (its
    pipeline left the registry, an input lost)."""
    pipeline = registry.pipelines.get(run.pipeline)
    if pipeline is None:
        raise RunError(f"run {run.id}: pipeline {run.pipeline!r} is no longer in the registry")
    profile = registry.profiles[pipeline.profile]
    wanted = [i for ids in run.inputs.values() for i in ids]
    records = {r.id: r for r in catalog.records(wanted, conn)}
    inputs: dict[str, tuple[InputRef, ...]] = {}
    for spec in pipeline.inputs:
        refs: list[InputRef] = []
        for file_id in run.inputs.get(spec.name, ()):
            record = records.get(file_id)
            if record is None:
                raise RunError(f"run {run.id}: input file {file_id} is no longer in the catalog")
            if record.archive_id is None:
                raise RunError(f"run {run.id}: input {record.original_name} has no archive ID")
            refs.append(
                InputRef(
                    file_id, record.archive_id, record.original_name, record.sha256, record.size
                )
            )
        inputs[spec.name] = tuple(refs)
    parameters: dict[str, ParameterValue] = {}
    primary_ids = run.inputs.get(pipeline.inputs[0].name, ())
    if primary_ids:
        primary = records[primary_ids[0]]
        try:
            values = values_of(primary, registry)  # the facts receipt recorded
        except RecognitionError as exc:
            raise RunError(f"run {run.id}: input {exc}") from exc
        for name, value in values.items():
            if isinstance(value, str | int | float | bool) or value is None:
                parameters[name] = value
    parameters.update(dict(run.group_key.values))
    parameters.update(name_parts(parameters))
    parameters.update(pipeline.defaults)
    return RunPlan(run.id, run.attempts, pipeline, profile, parameters, inputs, dict(run.overrides))


def queue_of(registry: Registry, pipeline_id: str, default: str) -> str:
    """The executor queue of ``pipeline_id``'s runs: the pipeline's, else its profile's,
    else ``default`` (``processing.queue``)."""
    pipeline = registry.pipelines.get(pipeline_id)
    if pipeline is None:
        return default
    if pipeline.queue:
        return pipeline.queue
    profile = registry.profiles.get(pipeline.profile)
    return profile.queue if profile is not None and profile.queue else default


def name_parts(parameters: Mapping[str, ParameterValue]) -> dict[str, ParameterValue]:
    """Parameters made to go into file names: ``nightid`` (``20261121``),
    ``object_slug`` (the object with every run of other characters than letters and
    digits made one ``_``) and ``archive_stem`` (the primary input's archive ID without
    its extension: a derived product named as its raw frame's ID plus a suffix)."""
    parts: dict[str, ParameterValue] = {}
    archive_id = parameters.get("archive_id")
    if isinstance(archive_id, str) and archive_id:
        parts["archive_stem"] = re.sub(r"(\.fits?|\.fts)?(\.gz|\.fz|\.bz2)?$", "", archive_id)
    night, name = parameters.get("night"), parameters.get("object")
    if isinstance(night, str) and night:
        parts["nightid"] = night.replace("-", "")
    if isinstance(name, str) and name:
        parts["object_slug"] = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "object"
    return parts

"""The registry's typed, frozen specs: what a YAML file may say, and nothing more.

A registry file is a mapping with any of these sections::

    instrument: {...}        # one InstrumentSpec
    products:   [{...}, ...] # ProductSpec
    pipelines:  [{...}, ...] # PipelineSpec
    profiles:   [{...}, ...] # ProfileSpec

Unknown keys are errors. Cross-references (a product's instrument, a pipeline's
products and profile, a step's ``needs``) are checked by the loader, which knows
every file.
"""

from __future__ import annotations

import difflib
import math
import string
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from obsflow.registry import expression, rules
from obsflow.registry.keywords import Keyword, KeywordMap, field_name

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(BaseModel):
    """Where a spec was written: its file and the line it starts on."""

    model_config = ConfigDict(frozen=True)
    file: Path
    line: int | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else str(self.file)


# ------------------------------------------------------------------- obscore


class DataproductType(StrEnum):
    """ObsCore 1.1's ``dataproduct_type`` vocabulary."""

    IMAGE = "image"
    CUBE = "cube"
    SPECTRUM = "spectrum"
    SED = "sed"
    TIMESERIES = "timeseries"
    VISIBILITY = "visibility"
    EVENT = "event"
    MEASUREMENTS = "measurements"


class ObsCoreInstrumentSpec(Spec):
    """What ObsCore needs of an instrument that its frames' headers do not say
    (``instrument: {obscore: {...}}``; all optional: an unknown value is NULL)."""

    facility: str | None = Field(default=None, max_length=128)
    """``facility_name`` (the telescope); None: the frame's TELESCOP value."""
    fov_deg: float | None = Field(default=None, gt=0, le=360)
    """``s_fov``: the diameter of the field of view, degrees."""
    resolution_arcsec: float | None = Field(default=None, gt=0)
    """``s_resolution``: the typical angular resolution (seeing, or the pixel scale)."""
    pixels: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None
    """``s_xel1, s_xel2``: the image's size in pixels (NAXIS1, NAXIS2)."""
    wavelength_nm: dict[
        Annotated[str, Field(min_length=1, max_length=32)],
        tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]],
    ] = {}
    """``em_min, em_max`` of each filter (the FILTER value), in nanometres."""

    @field_validator("wavelength_nm")
    @classmethod
    def _ranges(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (low, high) in value.items():
            if low >= high:
                raise ValueError(
                    f"filter {name!r}: the shortest wavelength {low:g} nm must be "
                    f"below the longest {high:g} nm"
                )
        return value


class ObsCoreProductSpec(Spec):
    """What ObsCore needs of a product (``products: [{obscore: {...}}]``)."""

    dataproduct_type: DataproductType = DataproductType.IMAGE
    o_ucd: str = Field(default="phot.count", pattern=r"^[A-Za-z0-9_.;:-]{1,64}$")
    """The UCD of the observable (e.g. ``phot.count``, ``phot.flux.density``)."""
    calib_level: int | None = Field(default=None, ge=0, le=4)
    """ObsCore's ``calib_level``; None: the product's level + 1 (a raw FITS frame of
    level 0 is calib_level 1, a calibrated one of level 1 is 2, ...; at most 4)."""


# ---------------------------------------------------------------- instrument


ARCHIVE_ID_FIELDS = {
    "prefix": "OF",
    "instrument": "OFCAM",
    "yyyymmdd": "20261122",
    "yyyy": 2026,
    "mm": 11,
    "dd": 22,
    "hh": 5,
    "mi": 0,
    "ss": 0,
    "seconds_of_day": 18000,
    "hundredths": 0,
    "night": "20261121",
}


class WatchTriggerSpec(Spec):
    """Watch a directory for files closed after writing or moved into it."""

    kind: Literal["watch"]
    directory: Path = Path("incoming")
    """Relative to the site directory, or absolute."""
    recursive: bool = False
    polling: bool = False
    """Poll instead of kernel events (network file systems where inotify never fires)."""
    poll_seconds: float = Field(default=1.0, gt=0, le=3600)


class EpicsTriggerSpec(Spec):
    """Monitor an EPICS Channel Access PV holding the last written file name."""

    kind: Literal["epics"]
    pv: Annotated[str, Field(pattern=r"^[A-Za-z0-9_:.\-\[\]<>;]{1,128}$")]
    directory: Path = Path("incoming")
    """Where relative file names published on the PV are found (relative to the site)."""
    heartbeat_pv: Annotated[str, Field(pattern=r"^[A-Za-z0-9_:.\-\[\]<>;]{1,128}$")] | None = None
    heartbeat_stale_seconds: float = Field(default=30.0, gt=0)
    """The heartbeat PV not updated for this long shows as an alarm in ``obsflow status``."""


TriggerSpec = Annotated[WatchTriggerSpec | EpicsTriggerSpec, Field(discriminator="kind")]


class InstrumentSpec(Spec):
    name: Identifier
    description: str = ""
    keywords: KeywordMap = KeywordMap()
    required: tuple[Keyword, ...] = ()
    """Header keywords a frame must carry; one missing sends the frame to quarantine."""
    archive_id: str = "{prefix}.{yyyymmdd}.{seconds_of_day:05d}.{hundredths:02d}.fits"
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,16}$")]
    proprietary_months: int = Field(default=18, ge=0, le=1200)
    program_proprietary_months: dict[str, Annotated[int, Field(ge=0, le=1200)]] = {}
    """Per-program exceptions to ``proprietary_months`` (e.g. ``ENG: 0``)."""
    utc_offset_hours: float = Field(default=0.0, ge=-14, le=14)
    """The site's offset from UTC; the night is the local date on which it began."""
    triggers: tuple[TriggerSpec, ...] = ()
    """How ``obsflow run`` notices this instrument's new files."""
    timezone: str | None = None
    """The site's IANA time zone (``America/Santiago``: daylight saving included); it
    names nights and places ``night_end``. Instead of ``utc_offset_hours``."""
    night_end: time = time(7, 0)
    """The local time the night ends, the next morning (``deadline: night_end``)."""
    obscore: ObsCoreInstrumentSpec = ObsCoreInstrumentSpec()
    """What the IVOA ObsCore table says of its frames beyond their headers."""
    source: Source | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            close = difflib.get_close_matches(value, sorted(available_timezones()), n=3)
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            raise ValueError(
                f"unknown time zone {value!r}; expected an IANA name such as "
                f"America/Santiago or Pacific/Honolulu{hint}"
            ) from None
        return value

    @field_validator("night_end", mode="before")
    @classmethod
    def _clock_time(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted 07:00 as the base-60 number 420: take it as hh:mm;
        # a number below 24 is hours (7, 6.5)
        if isinstance(value, int | float) and not isinstance(value, bool):
            hours = value if value < 24 else value / 60
            if not 0 <= hours < 24:
                raise ValueError(f"night_end {value!r} is not a time of day; expected hh:mm")
            minutes = round(hours * 60)
            return time(minutes // 60, minutes % 60)
        return value

    @model_validator(mode="after")
    def _one_zone(self) -> InstrumentSpec:
        if self.timezone is not None and "utc_offset_hours" in self.model_fields_set:
            raise ValueError(
                "give either timezone (an IANA name) or utc_offset_hours (fixed), not both"
            )
        if self.night_end.tzinfo is not None:
            raise ValueError("night_end is a local time of day; expected hh:mm without a zone")
        return self

    @property
    def zone(self) -> tzinfo:
        """The site's time zone: the IANA zone, else the fixed ``utc_offset_hours``."""
        if self.timezone is not None:
            return ZoneInfo(self.timezone)
        return timezone(timedelta(hours=self.utc_offset_hours))

    @field_validator("archive_id")
    @classmethod
    def _archive_id_template(cls, value: str) -> str:
        return check_archive_id(value, {}, moment=True)


def check_archive_id(value: str, groups: dict[str, str], *, moment: bool) -> str:
    """Check an ``archive_id`` template: known fields only (``groups``: a product's file
    name groups, as text), and ``{hundredths}`` in an instrument's (``moment``), so two
    frames of one second differ."""
    names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    known = {**groups, **ARCHIVE_ID_FIELDS}
    unknown = names - set(known)
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(unknown)} in archive_id; "
            f"expected some of: {', '.join(known)}"
        )
    if moment and "hundredths" not in names:
        raise ValueError(
            "archive_id must contain {hundredths...} so two frames of one second differ"
        )
    try:
        value.format(**known)
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(
            f"archive_id {value!r} cannot be filled: {exc} (file name groups are text)"
        ) from None
    if "/" in value or "\\" in value or value.startswith("."):
        raise ValueError("archive_id must be a plain file name (no '/', no leading '.')")
    return value


# ------------------------------------------------------------------- product


class TimeFrom(StrEnum):
    EXPOSURE = "exposure"  # start = the instrument's date_obs; stop = start + exptime
    HEADER = "header"  # start and stop from named header keywords
    FILENAME = "filename"  # start (and stop) from the filename's named groups
    MTIME = "mtime"  # the file's modification time: for catch-all products of untimed files


class TimeRule(Spec):
    """How to get a product's start and stop time."""

    from_: TimeFrom = Field(default=TimeFrom.EXPOSURE, alias="from")
    start: str | None = None
    """HEADER: a keyword. FILENAME: a template over the groups, e.g. ``{date}{time}``."""
    stop: str | None = None
    format: str | None = None
    """FILENAME: the strptime format of the filled template, e.g. ``%Y%m%d%H%M%S``."""
    start_time: Keyword | None = None
    """HEADER: the keyword holding the time of day when ``start`` holds only a date."""
    stop_time: Keyword | None = None
    """HEADER: the keyword holding the time of day when ``stop`` holds only a date."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _complete(self) -> TimeRule:
        if self.from_ is TimeFrom.EXPOSURE and (
            self.start or self.stop or self.format or self.start_time or self.stop_time
        ):
            raise ValueError(
                "'from: exposure' takes no start, stop or format (it reads the instrument's "
                "keywords.date_obs and keywords.time_obs)"
            )
        if self.from_ is TimeFrom.MTIME and (self.start or self.stop or self.format):
            raise ValueError("'from: mtime' takes no start, stop or format")
        if self.from_ is not TimeFrom.HEADER and (self.start_time or self.stop_time):
            raise ValueError("start_time and stop_time go with 'from: header'")
        if self.stop_time and not self.stop:
            raise ValueError("'stop_time' needs 'stop: KEYWORD' (the date)")
        if self.from_ is TimeFrom.HEADER and not self.start:
            raise ValueError("'from: header' needs 'start: KEYWORD'")
        if self.from_ is TimeFrom.FILENAME and not (self.start and self.format):
            raise ValueError("'from: filename' needs 'start: {group}...' and 'format: %Y...'")
        if self.format:
            try:
                datetime.now(UTC).strftime(self.format)
            except ValueError as exc:
                raise ValueError(f"bad time format {self.format!r}: {exc}") from exc
        return self


class SameName(StrEnum):
    """What a file whose name an earlier file of its product already had is."""

    VERSION = "version"  # the product re-made (a pipeline's output): it supersedes the older
    DISTINCT = "distinct"  # another exposure (frame counters restart): a file of its own


class ProductSpec(Spec):
    id: Identifier
    level: int = Field(ge=0, le=3)
    instrument: Identifier
    filename: str
    """A regular expression the whole file name must match; named groups are kept."""
    description: str = ""
    time: TimeRule = TimeRule()
    keywords: tuple[Keyword, ...] = ()
    """Header keywords archived as searchable metadata for this product."""
    tags: tuple[Annotated[str, Field(pattern=r"^[\w.:-]{1,64}$")], ...] = ()
    archive_id: str | None = None
    """This product's own archive ID template (default: the instrument's): the
    instrument's fields and the file name's named groups (``{prefix}.{night}.arc_{grating}
    .fits``, or a raw ID plus a suffix). Without ``{hundredths}`` it is the same for the
    same name, so a pipeline's outputs get the same IDs on every run; a taken one gets
    ``.2``, ``.3`` ... before its extension."""
    required: tuple[Keyword, ...] | None = None
    """Header keywords a file of this product must carry; None: the instrument's
    ``required`` for raw frames (level 0), none for pipeline products."""
    same_name: SameName | None = None
    """A new file with an earlier file's name and other bytes: ``version`` (it supersedes
    the older) or ``distinct`` (both stay current); None: ``version`` for pipeline products
    (level 1 and up), ``distinct`` for raw frames, which are never superseded."""
    obscore: ObsCoreProductSpec = ObsCoreProductSpec()
    """Its kind in the IVOA ObsCore table (dataproduct_type, UCD, calib_level)."""
    source: Source | None = None

    def required_keywords(self, instrument: InstrumentSpec) -> tuple[str, ...]:
        """The keywords a file of this product must carry (see ``required``)."""
        if self.required is not None:
            return self.required
        return instrument.required if self.level == 0 else ()

    @property
    def versions_by_name(self) -> bool:
        """Whether a file of this product with an earlier one's name is its new version."""
        if self.same_name is None:
            return self.level >= 1
        return self.same_name is SameName.VERSION

    @field_validator("filename")
    @classmethod
    def _regex(cls, value: str) -> str:
        rules.check(value)
        return value

    @model_validator(mode="after")
    def _own_archive_id(self) -> ProductSpec:
        if self.archive_id is not None:
            groups = dict.fromkeys(rules.group_names(self.filename), "x")
            check_archive_id(self.archive_id, groups, moment=False)
        return self


# ------------------------------------------------------------------ pipeline


class GroupBy(StrEnum):
    """The group dimensions with a meaning of their own; ``group.by`` may also name any
    metadata field, any keyword the primary input's product archives, or a named group
    of its file name (see :data:`METADATA_FIELDS` and :func:`field_name`)."""

    FILE = "file"
    OBSERVATION = "observation"
    NIGHT = "night"
    FILTER = "filter"
    PROGRAM = "program"
    OBJECT = "object"
    FRAME_TYPE = "frame_type"
    WINDOW = "window"


GroupField = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_ .-]{0,79}$")]


def _check_expression(value: str | None) -> str | None:
    if value is not None:
        expression.parse(value)
    return value


class InputSpec(Spec):
    product: Identifier
    name: Identifier
    """The parameter name the profile uses for these inputs."""
    where: str | None = None
    """A condition each input must meet, e.g. ``frame_type == 'FLAT'``."""
    min: int = Field(default=1, ge=0)
    max: int | None = Field(default=None, ge=1)
    optional: bool = False

    _where = field_validator("where")(_check_expression)

    @model_validator(mode="after")
    def _counts(self) -> InputSpec:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is smaller than min ({self.min})")
        return self


class GroupSpec(Spec):
    by: tuple[GroupField, ...] = (GroupBy.FILE.value,)
    """A :class:`GroupBy` dimension, a metadata field, an archived keyword of the
    primary input's product (``GRATNAME`` or ``gratname``) or a named group of its
    file name; the loader checks each against that product."""
    window_seconds: float | None = Field(default=None, gt=0)

    @field_validator("by")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(field_name(v) for v in value)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named twice; expected each field once")
        return names

    @model_validator(mode="after")
    def _window(self) -> GroupSpec:
        if (GroupBy.WINDOW in self.by) != (self.window_seconds is not None):
            raise ValueError("'by: [window]' and 'window_seconds' go together")
        return self


class Kickoff(StrEnum):
    READY = "ready"  # as soon as every required input is present
    DEADLINE = "deadline"  # at the deadline, with what is there (flagged degraded)


class KickoffSpec(Spec):
    rule: Kickoff = Kickoff.READY
    deadline: Literal["night_end", "last_input"] | None = None
    after_minutes: float = Field(default=0, ge=0)
    degraded_ok: bool = False
    """At the deadline, run with the inputs present even if counts are short."""

    @model_validator(mode="after")
    def _deadline(self) -> KickoffSpec:
        if self.rule is Kickoff.DEADLINE and self.deadline is None:
            raise ValueError("'rule: deadline' needs 'deadline: night_end|last_input'")
        return self


class OutputSpec(Spec):
    product: Identifier
    name: str
    """The output file name template, e.g. ``ofc_{night}_mbias_{filter}.fits``."""


class OnNewInput(StrEnum):
    IGNORE = "ignore"
    RERUN = "rerun"


class ParameterType(StrEnum):
    FLOAT = "float"
    INT = "int"
    STR = "str"
    BOOL = "bool"


Scalar = str | int | float | bool


class ParameterSpec(Spec):
    """A pipeline parameter: its default and what a caller may set it to.

    Written in full (``threshold_sigma: {default: 5.0, min: 1, max: 100}``) or as its
    default alone (``threshold_sigma: 5.0``); the type is the default's unless given.
    """

    default: Scalar
    type: ParameterType | None = None
    """float, int, str or bool; None: the default's."""
    min: float | None = None
    max: float | None = None
    choices: tuple[Scalar, ...] = ()
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ParameterSpec:
        if (self.min is not None or self.max is not None) and self.kind not in (
            ParameterType.FLOAT,
            ParameterType.INT,
        ):
            raise ValueError(f"min and max apply to numbers, not to a {self.kind.value}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        self.check(self.default, what="the default")
        for choice in self.choices:
            self.check(choice, what="a choice", choosing=False)
        return self

    @property
    def kind(self) -> ParameterType:
        return self.type or _type_of(self.default)

    def check(self, value: object, *, what: str = "the value", choosing: bool = True) -> Scalar:
        """``value`` as this parameter takes it (an int for a float is a float); a
        ValueError saying what was expected otherwise."""
        kind = self.kind
        ok: Scalar
        if kind is ParameterType.BOOL:
            if not isinstance(value, bool):
                raise ValueError(f"{what} {value!r} is not true or false")
            ok = value
        elif kind is ParameterType.INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{what} {value!r} is not a whole number")
            ok = value
        elif kind is ParameterType.FLOAT:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{what} {value!r} is not a number")
            ok = float(value)
            if not math.isfinite(ok):
                raise ValueError(f"{what} {value!r} is not a finite number")
        else:
            if not isinstance(value, str):
                raise ValueError(f"{what} {value!r} is not a string")
            ok = value
        if isinstance(ok, int | float) and not isinstance(ok, bool):
            if self.min is not None and ok < self.min:
                raise ValueError(f"{what} {value!r} is below the minimum {self.min:g}")
            if self.max is not None and ok > self.max:
                raise ValueError(f"{what} {value!r} is above the maximum {self.max:g}")
        if choosing and self.choices and ok not in self.choices:
            raise ValueError(f"{what} {value!r} is not one of {', '.join(map(repr, self.choices))}")
        return ok


def _type_of(value: Scalar) -> ParameterType:
    if isinstance(value, bool):
        return ParameterType.BOOL
    if isinstance(value, int):
        return ParameterType.INT
    if isinstance(value, float):
        return ParameterType.FLOAT
    return ParameterType.STR


class PipelineSpec(Spec):
    id: Identifier
    description: str = ""
    profile: Identifier
    inputs: tuple[InputSpec, ...] = Field(min_length=1)
    group: GroupSpec = GroupSpec()
    kickoff: KickoffSpec = KickoffSpec()
    outputs: tuple[OutputSpec, ...] = ()
    on_new_input: OnNewInput = OnNewInput.IGNORE
    parameters: dict[Identifier, ParameterSpec] = {}
    """The parameters a profile's steps may use, with their defaults, types and bounds
    (what a reprocessing or an on-demand reduction may set)."""
    on_demand: bool = True
    """Users may ask for reductions with this pipeline (``POST /api/v1/reductions``)."""
    queue: Identifier | None = None
    """The executor's queue for this pipeline's runs (Celery: workers started with
    ``--queues`` naming it, e.g. ``gpu``); None: the profile's, else ``processing.queue``."""
    source: Source | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _declared(cls, value: object) -> object:
        """A bare value is the default of a parameter of its type."""
        if isinstance(value, dict):
            return {
                name: spec if isinstance(spec, dict | ParameterSpec) else {"default": spec}
                for name, spec in value.items()
            }
        return value

    @property
    def defaults(self) -> dict[str, Scalar]:
        """Each parameter's default, by name."""
        return {name: spec.default for name, spec in self.parameters.items()}


# ------------------------------------------------------------------- profile

ImageName = Annotated[
    str, Field(pattern=r"^[a-z0-9][a-z0-9._/:@-]{0,254}$", description="a container image")
]
MemorySize = Annotated[
    str, Field(pattern=r"^[1-9][0-9]*[bkmg]?$", description="bytes, or a number with k, m, g")
]


class StepSpec(Spec):
    name: Identifier
    command: tuple[str, ...] = Field(min_length=1)
    """argv; ``{parameter}`` placeholders are filled by the builder."""
    image: ImageName | None = None
    """A container image to run ``command`` in, through the Docker Engine API
    (``containers.host``); the inputs are mounted read-only, the work directory
    read-write."""
    network: bool = False
    """A container step reaches the network only if this is true."""
    cpus: float | None = Field(default=None, gt=0, le=1024)
    """A container step's CPU limit (1.5: one and a half CPUs); None: no limit."""
    memory: MemorySize | None = None
    """A container step's memory limit (``512m``, ``2g``); None: no limit."""
    needs: tuple[Identifier, ...] = ()
    when: str | None = None
    timeout: float = Field(default=3600, gt=0)
    retries: int = Field(default=0, ge=0, le=10)
    env: dict[str, str] = {}
    outputs: tuple[str, ...] = ()

    _when = field_validator("when")(_check_expression)

    @model_validator(mode="after")
    def _container_only(self) -> StepSpec:
        """network, cpus and memory act on a container: on a subprocess step they would
        be silently ignored, so they are refused where they were written."""
        if self.image is None:
            given = [k for k in ("network", "cpus", "memory") if k in self.model_fields_set]
            if given:
                raise ValueError(
                    f"step {self.name!r}: {', '.join(given)} only apply to a container step; "
                    "add 'image: ...' or remove them"
                )
        return self


class ProfileSpec(Spec):
    id: Identifier
    description: str = ""
    steps: tuple[StepSpec, ...] = Field(min_length=1)
    queue: Identifier | None = None
    """The executor's queue for runs of this profile, unless their pipeline names one."""
    source: Source | None = None


class RegistryFile(Spec):
    """The sections one registry file may hold; the loader validates each item on its own."""

    instrument: dict[str, Any] | None = None
    products: tuple[Any, ...] = ()
    pipelines: tuple[Any, ...] = ()
    profiles: tuple[Any, ...] = ()

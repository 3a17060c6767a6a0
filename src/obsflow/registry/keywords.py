"""An instrument's keywords: which header keyword holds each piece of standard metadata,
value maps and computed values, and the names a ``where`` or ``group.by`` reads.

Part of the registry's specs (:mod:`obsflow.registry.specs` imports them from here).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from obsflow.registry import expression

KEYWORD_PATTERN = r"^[A-Z0-9_-]{1,8}$|^HIERARCH [A-Z0-9_ .-]{1,60}$"
Keyword = Annotated[str, Field(pattern=KEYWORD_PATTERN)]

_KEYWORD = re.compile(KEYWORD_PATTERN)


class ValueRule(BaseModel):
    """A piece of metadata made from the header, when no one keyword holds it as is.

    ``keyword`` with a ``map`` translates an instrument's words into shared ones
    (``{keyword: OBSTYPE, map: {Bias: BIAS, Arc: ARC}}``: pipelines can be shared between
    instruments); a value the map does not name is kept as it is. ``value`` computes it
    with the registry's safe expression language over the header's keywords, by name or
    by ``where`` name (``"ITIME * COADDS"``, ``"date_obs + 'T' + ut"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    keyword: Keyword | None = None
    value: str | None = None
    map: dict[str, str | int | float] = {}
    """Header value (as text; matched exactly, else ignoring case and outer spaces) →
    the metadata value."""

    @field_validator("value")
    @classmethod
    def _expression(cls, value: str | None) -> str | None:
        if value is not None:
            expression.parse(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ValueRule:
        if (self.keyword is None) == (self.value is None):
            raise ValueError("give either 'keyword: KEY' or 'value: EXPRESSION', not both")
        if self.map and self.keyword is None:
            raise ValueError("'map' translates a 'keyword''s values; add 'keyword: KEY'")
        return self

    @property
    def label(self) -> str:
        """How errors name it: the keyword, or the expression."""
        return self.keyword or repr(self.value)


MappedKeyword = Keyword | ValueRule


class KeywordMap(BaseModel):
    """Which header keyword holds each standard piece of metadata, for one instrument.

    ``time_obs`` is for instruments whose DATE-OBS holds only the date and another
    keyword (e.g. ``UTC`` or ``UT``) the time of day. Every field but those two may
    also be a :class:`ValueRule` (a value map, or a computed value); a text that is
    not a keyword name is taken as an expression (``exptime: "ITIME * COADDS"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    date_obs: Keyword = "DATE-OBS"
    time_obs: Keyword | None = None
    exptime: MappedKeyword | None = "EXPTIME"
    ra: MappedKeyword | None = "RA"
    dec: MappedKeyword | None = "DEC"
    object: MappedKeyword | None = "OBJECT"
    frame_type: MappedKeyword | None = "IMAGETYP"
    filter: MappedKeyword | None = "FILTER"
    program: MappedKeyword | None = None
    observer: MappedKeyword | None = "OBSERVER"
    telescope: MappedKeyword | None = "TELESCOP"

    @model_validator(mode="before")
    @classmethod
    def _expressions(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            name: (
                {"value": value}
                if isinstance(value, str)
                and name not in ("date_obs", "time_obs")
                and not _KEYWORD.match(value)
                else value
            )
            for name, value in data.items()
        }


METADATA_FIELDS = (
    "product",
    "level",
    "instrument",
    "archive_id",
    "original_name",
    "night",
    "exptime",
    "filter",
    "object",
    "frame_type",
    "program",
    "observer",
    "telescope",
    "ra",
    "dec",
    "start",
    "stop",
    "version",
)
"""The standard metadata a ``where`` (and ``group.by``) reads by name, for every file."""


def field_name(keyword: str) -> str:
    """The name a ``where`` or ``group.by`` reads a header keyword by: lower case, ``-``
    and `` `` as ``_`` (``DATE-OBS`` → ``date_obs``, ``HIERARCH ESO INS GRAT`` →
    ``hierarch_eso_ins_grat``)."""
    return keyword.lower().replace("-", "_").replace(" ", "_")

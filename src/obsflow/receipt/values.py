"""Whether a header's values are sane: a broken instrument's frame is quarantined, not
a traceback.

:mod:`obsflow.receipt.metadata` calls these on each value it maps, before it computes
anything from it (a stop time, the night, the release date), so an absurd value is
refused with a :class:`~obsflow.errors.MetadataError` naming the keyword and the value
(the frame goes to quarantine with that reason, once: it is not offered again at every
scan), never an ``OverflowError`` halfway through:

- a moment (DATE-OBS, a start or stop keyword, a time from the file name) between the
  years :data:`FIRST_YEAR` and :data:`LAST_YEAR`;
- an exposure time finite, not negative, at most :data:`MAX_EXPTIME` seconds;
- RA within [0, 360] degrees and DEC within [-90, 90], both finite;
- a stop not before its start.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Final

from obsflow.errors import MetadataError

FIRST_YEAR: Final = 1800
"""No astronomical frame, photographic plates digitised included, is older."""
LAST_YEAR: Final = 2200
"""A moment later than this is a broken clock or a typo, not an observation."""
MAX_EXPTIME: Final = 10 * 86400.0
"""Ten days in seconds: longer is a broken value, not an exposure."""


def moment(value: datetime, key: str, path: Path) -> datetime:
    """``value`` (the time ``key`` gives), if its year is plausible."""
    if not FIRST_YEAR <= value.year <= LAST_YEAR:
        raise MetadataError(
            path,
            f"{key} = {value.isoformat()} is outside the years {FIRST_YEAR}-{LAST_YEAR}",
        )
    return value


def exposure(value: float | None, key: str | None, path: Path) -> float | None:
    """An exposure time in seconds: finite, not negative, not absurd (None: none)."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or value > MAX_EXPTIME:
        raise MetadataError(
            path,
            f"{key} = {value!r} is not an exposure time; expected 0 to {MAX_EXPTIME:g} seconds",
        )
    return value


def angle(
    value: float | None, key: str | None, path: Path, *, low: float, high: float
) -> float | None:
    """An angle in degrees within [``low``, ``high``] (None: none)."""
    if value is None:
        return None
    if not math.isfinite(value) or not low <= value <= high:
        raise MetadataError(
            path, f"{key} = {value!r} is out of range; expected {low:g} to {high:g} degrees"
        )
    return value


def interval(start: datetime, stop: datetime, path: Path) -> tuple[datetime, datetime]:
    """A start and a stop, each plausible, the stop not before the start."""
    moment(start, "the start", path)
    moment(stop, "the stop", path)
    if stop < start:
        raise MetadataError(
            path, f"the stop {stop.isoformat()} is before the start {start.isoformat()}"
        )
    return start, stop

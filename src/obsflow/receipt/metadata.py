"""From one header to standard metadata, through the instrument's keyword map.

Nothing here knows a keyword name: the instrument spec says which keyword holds
DATE-OBS, the exposure time, the filter and so on. This module also computes the
product's start and stop time, the night and the proprietary release date (the
archive IDs a frame may take are :class:`obsflow.catalog.batch.ArchiveIdScheme`).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from obsflow.errors import MetadataError
from obsflow.receipt import values
from obsflow.receipt.header import HeaderValue
from obsflow.registry.specs import InstrumentSpec, ProductSpec, TimeFrom

MJD_EPOCH = datetime(1858, 11, 17, tzinfo=UTC)


@dataclass(frozen=True)
class Metadata:
    """The standard metadata of one file; every time is timezone-aware UTC."""

    date_obs: datetime
    start: datetime
    stop: datetime
    night: date
    exptime: float | None
    ra: float | None
    dec: float | None
    object: str | None
    frame_type: str | None
    filter: str | None
    program: str | None
    observer: str | None
    telescope: str | None
    proprietary_until: datetime
    keywords: Mapping[str, HeaderValue]
    """The product's archived keywords that the header carries."""


def extract(
    header: Mapping[str, HeaderValue],
    product: ProductSpec,
    instrument: InstrumentSpec,
    groups: Mapping[str, str],
    path: Path,
) -> Metadata:
    """Map ``header`` to :class:`Metadata`; raise :class:`MetadataError` naming the keyword."""
    missing = [k for k in instrument.required if k not in header]
    if missing:
        raise MetadataError(
            path,
            f"required keyword(s) {', '.join(missing)} missing for instrument {instrument.name}",
        )
    keys = instrument.keywords
    date_obs = values.moment(
        _date_obs(header, keys.date_obs, keys.time_obs, path), keys.date_obs, path
    )
    exptime = values.exposure(
        _number(header, keys.exptime, path, required=keys.exptime in instrument.required),
        keys.exptime,
        path,
    )
    start, stop = values.interval(*_times(header, product, groups, date_obs, exptime, path), path)
    ra = _angle(header, keys.ra, path, hours=True, required=keys.ra in instrument.required)
    dec = _angle(header, keys.dec, path, hours=False, required=keys.dec in instrument.required)
    program = _text(header, keys.program)
    months = instrument.program_proprietary_months.get(program or "", instrument.proprietary_months)
    return Metadata(
        date_obs=date_obs,
        start=start,
        stop=stop,
        night=night_of(start, instrument.utc_offset_hours),
        exptime=exptime,
        ra=values.angle(ra, keys.ra, path, low=0.0, high=360.0),
        dec=values.angle(dec, keys.dec, path, low=-90.0, high=90.0),
        object=_text(header, keys.object),
        frame_type=_text(header, keys.frame_type),
        filter=_text(header, keys.filter),
        program=program,
        observer=_text(header, keys.observer),
        telescope=_text(header, keys.telescope),
        proprietary_until=add_months(date_obs, months),
        keywords={k: header[k] for k in product.keywords if k in header},
    )


def parse_time(value: str) -> datetime:
    """An ISO-8601 date-time (``Z`` or no zone meaning UTC) as an aware UTC datetime."""
    text = value.strip()
    parsed = datetime.fromisoformat(text[:-1] if text.endswith("Z") else text)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _date_obs(
    header: Mapping[str, HeaderValue], key: str, time_key: str | None, path: Path
) -> datetime:
    value = header.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MetadataError(path, f"{key} is missing or empty; expected an ISO date-time")
    text = value.strip()
    if time_key and "T" not in text:
        time_value = header.get(time_key)
        if not isinstance(time_value, str):
            raise MetadataError(path, f"{time_key} is missing; expected the time of {key}")
        text = f"{text}T{time_value.strip()}"
    try:
        return parse_time(text)
    except ValueError:
        raise MetadataError(
            path, f"{key} = {value!r} cannot be parsed; expected YYYY-MM-DDThh:mm:ss[.ss]"
        ) from None


def _times(
    header: Mapping[str, HeaderValue],
    product: ProductSpec,
    groups: Mapping[str, str],
    date_obs: datetime,
    exptime: float | None,
    path: Path,
) -> tuple[datetime, datetime]:
    rule = product.time
    if rule.from_ is TimeFrom.EXPOSURE:
        return date_obs, date_obs + timedelta(seconds=exptime or 0.0)
    if rule.from_ is TimeFrom.HEADER:
        assert rule.start is not None
        start = _date_obs(header, rule.start, None, path)
        stop = (
            _date_obs(header, rule.stop, None, path) if rule.stop and rule.stop in header else start
        )
        return start, stop  # (values.interval refuses a stop before the start)
    assert rule.start is not None and rule.format is not None
    start = _from_groups(rule.start, rule.format, groups, product, path)
    stop = _from_groups(rule.stop, rule.format, groups, product, path) if rule.stop else start
    return start, stop


def _from_groups(
    template: str, fmt: str, groups: Mapping[str, str], product: ProductSpec, path: Path
) -> datetime:
    try:
        text = template.format(**groups)
        return datetime.strptime(text, fmt).replace(tzinfo=UTC)
    except (KeyError, ValueError) as exc:
        raise MetadataError(
            path, f"product {product.id}: time {template!r} from the file name: {exc}"
        ) from None


def _text(header: Mapping[str, HeaderValue], key: str | None) -> str | None:
    if key is None:
        return None
    value = header.get(key)
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _number(
    header: Mapping[str, HeaderValue], key: str | None, path: Path, *, required: bool
) -> float | None:
    if key is None or header.get(key) is None:
        return None
    value = header[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        if required:
            raise MetadataError(path, f"{key} = {value!r} is not a number") from None
        return None


_SEXAGESIMAL = re.compile(r"^\s*([+-]?)(\d{1,3})[:\s](\d{1,2})[:\s](\d{1,2}(?:\.\d*)?)\s*$")


def _angle(
    header: Mapping[str, HeaderValue], key: str | None, path: Path, *, hours: bool, required: bool
) -> float | None:
    """Degrees from a number of degrees or a sexagesimal string (hours for RA)."""
    if key is None or header.get(key) is None:
        return None
    value = header[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value)
    match = _SEXAGESIMAL.match(text)
    if match:
        sign, a, b, c = match.groups()
        degrees = int(a) + int(b) / 60 + float(c) / 3600
        degrees *= 15 if hours else 1
        return -degrees if sign == "-" else degrees
    try:
        return float(text)
    except ValueError:
        if required:
            raise MetadataError(path, f"{key} = {value!r} is not an angle") from None
        return None


def night_of(moment: datetime, utc_offset_hours: float) -> date:
    """The local date on which the night containing ``moment`` began (noon to noon)."""
    return (moment + timedelta(hours=utc_offset_hours - 12)).date()


def add_months(moment: datetime, months: int) -> datetime:
    month0 = moment.month - 1 + months
    year, month = moment.year + month0 // 12, month0 % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def mjd(moment: datetime) -> float:
    return (moment - MJD_EPOCH).total_seconds() / 86400.0

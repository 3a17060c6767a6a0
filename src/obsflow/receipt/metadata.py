"""From one header to standard metadata, through the instrument's keyword map.

Nothing here knows a keyword name: the instrument spec says which keyword holds
DATE-OBS, the exposure time, the filter and so on. This module also computes the
product's start and stop time, the night and the proprietary release date (the
archive IDs a frame may take are :class:`obsflow.catalog.batch.ArchiveIdScheme`).
"""

from __future__ import annotations

import calendar
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from pathlib import Path

from obsflow.errors import MetadataError
from obsflow.receipt import values
from obsflow.receipt.header import HeaderValue
from obsflow.registry import expression
from obsflow.registry.keywords import MappedKeyword, ValueRule, field_name
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
    written: datetime | None = None,
) -> Metadata:
    """Map ``header`` to :class:`Metadata`; raise :class:`MetadataError` naming the keyword.

    The keywords the product requires (its own ``required``, else the instrument's for
    raw frames) must be present. The time comes from the product's ``time`` rule: only
    ``from: exposure`` reads the instrument's DATE-OBS; a product timed by its file
    name, other keywords or ``written`` (``from: mtime``: the file's modification time)
    needs none.
    """
    required = product.required_keywords(instrument)
    missing = [k for k in required if k not in header]
    if missing:
        whose = (
            f"product {product.id}"
            if product.required is not None
            else (f"instrument {instrument.name}")
        )
        raise MetadataError(path, f"required keyword(s) {', '.join(missing)} missing for {whose}")
    keys = instrument.keywords
    exptime = values.exposure(
        _number(header, keys.exptime, path, required=_needed(keys.exptime, required)),
        _named(keys.exptime),
        path,
    )
    if product.time.from_ is TimeFrom.EXPOSURE:
        date_obs = values.moment(
            header_time(header, keys.date_obs, keys.time_obs, path), keys.date_obs, path
        )
        start, stop = date_obs, date_obs + timedelta(seconds=exptime or 0.0)
    elif product.time.from_ is TimeFrom.MTIME:
        if written is None:
            raise MetadataError(path, f"product {product.id}: the file's time is not known")
        start = stop = values.moment(written.astimezone(UTC), "the file's time", path)
        date_obs = start
    else:
        start, stop = values.interval(*_times(header, product, groups, path), path)
        date_obs = (  # the archive ID's moment: DATE-OBS if the file carries one
            values.moment(
                header_time(header, keys.date_obs, keys.time_obs, path), keys.date_obs, path
            )
            if header.get(keys.date_obs) not in (None, "")
            else start
        )
    ra = _angle(header, keys.ra, path, hours=True, required=_needed(keys.ra, required))
    dec = _angle(header, keys.dec, path, hours=False, required=_needed(keys.dec, required))
    program = _text(header, keys.program)
    months = instrument.program_proprietary_months.get(program or "", instrument.proprietary_months)
    return Metadata(
        date_obs=date_obs,
        start=start,
        stop=stop,
        night=night_of(start, instrument.zone),
        exptime=exptime,
        ra=values.angle(ra, _named(keys.ra), path, low=0.0, high=360.0),
        dec=values.angle(dec, _named(keys.dec), path, low=-90.0, high=90.0),
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
    text = text[:-1] if text.endswith("Z") else text
    # Python before 3.12 takes 3 or 6 decimals only; archives write any number
    text = _FRACTION.sub(lambda m: f"{m.group(1)}.{(m.group(2) + '000000')[:6]}", text, 1)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


_OLD_DATE = re.compile(r"^(\d{2})/(\d{2})/(\d{2})$")  # FITS before 2000: DD/MM/YY, 19YY
_FRACTION = re.compile(r"(\d{2}:\d{2}:\d{2})\.(\d+)")
_FORMS = (
    "expected an ISO date-time (YYYY-MM-DDThh:mm:ss[.s]), an ISO or DD/MM/YY date with "
    "its time in another keyword, or a modified Julian date"
)


def header_time(
    header: Mapping[str, HeaderValue], key: str, time_key: str | None, path: Path
) -> datetime:
    """The moment keyword ``key`` holds, as aware UTC, in any form real archives hold.

    An ISO date-time (``Z`` or no zone: UTC; any number of decimals); an ISO date, or the
    pre-2000 FITS ``DD/MM/YY`` (19YY), whose time of day is in ``time_key`` (``hh:mm:ss``;
    midnight when no such keyword is named); a number (or ``MJD…`` keyword) is a modified
    Julian date, a ``JD…`` keyword a Julian date (through astropy.time, UTC).
    """
    value = header.get(key)
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        where = f" (needed by {time_key})" if time_key else ""
        raise MetadataError(path, f"{key} is missing or empty{where}; {_FORMS}")
    if isinstance(value, int | float) or (_is_number(value) and "JD" in key.upper()):
        return _julian(float(value), key, path)
    text = str(value).strip()
    old = _OLD_DATE.match(text)
    if old:
        day, month, year = (int(g) for g in old.groups())
        text = f"{1900 + year:04d}-{month:02d}-{day:02d}"
    if time_key and "T" not in text and " " not in text:
        time_value = header.get(time_key)
        if not isinstance(time_value, str) or not time_value.strip():
            raise MetadataError(
                path, f"{time_key} is missing or not a text; expected the time of day of {key}"
            )
        text = f"{text}T{time_value.strip()}"
    try:
        return parse_time(text)
    except ValueError:
        shown = repr(value) if not time_key else f"{value!r} with {time_key}"
        raise MetadataError(path, f"{key} = {shown} cannot be parsed; {_FORMS}") from None


def _is_number(value: object) -> bool:
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _julian(value: float, key: str, path: Path) -> datetime:
    from astropy.time import Time  # imported by the few products that need it

    jd = "JD" in key.upper() and "MJD" not in key.upper()
    # the plausible years first: ERFA only warns of a "dubious year" and converts it
    mjd = value - 2400000.5 if jd else value
    first = (datetime(values.FIRST_YEAR, 1, 1, tzinfo=UTC) - MJD_EPOCH).days
    last = (datetime(values.LAST_YEAR + 1, 1, 1, tzinfo=UTC) - MJD_EPOCH).days
    if not first <= mjd < last:  # (NaN too)
        raise MetadataError(
            path,
            f"{key} = {value!r} is outside the years {values.FIRST_YEAR}-{values.LAST_YEAR}",
        )
    try:
        moment = Time(value, format="jd" if jd else "mjd", scale="utc").to_datetime(timezone=UTC)
    except (ValueError, OverflowError) as exc:
        raise MetadataError(path, f"{key} = {value!r} is not a usable Julian date: {exc}") from None
    assert isinstance(moment, datetime)
    return moment


def _times(
    header: Mapping[str, HeaderValue],
    product: ProductSpec,
    groups: Mapping[str, str],
    path: Path,
) -> tuple[datetime, datetime]:
    """Start and stop by a ``from: header`` or ``from: filename`` rule."""
    rule = product.time
    if rule.from_ is TimeFrom.HEADER:
        assert rule.start is not None
        start = header_time(header, rule.start, rule.start_time, path)
        stop = (
            header_time(header, rule.stop, rule.stop_time, path)
            if rule.stop and rule.stop in header
            else start
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


def _needed(rule: MappedKeyword | None, required: tuple[str, ...]) -> bool:
    keyword = rule.keyword if isinstance(rule, ValueRule) else rule
    return keyword is not None and keyword in required


def _value(header: Mapping[str, HeaderValue], rule: MappedKeyword | None) -> object:
    """The header's value for ``rule``: a keyword's, through its map, or computed."""
    if rule is None:
        return None
    if isinstance(rule, str):
        return header.get(rule)
    if rule.keyword is not None:
        value = header.get(rule.keyword)
        if value is None or not rule.map:
            return value
        text = str(value)
        if text in rule.map:
            return rule.map[text]
        folded = {k.strip().casefold(): v for k, v in rule.map.items()}
        return folded.get(text.strip().casefold(), value)
    assert rule.value is not None
    names: dict[str, object] = {}
    for key, value in header.items():
        names[field_name(key)] = value
        names[key] = value
    return _compiled(rule.value).value(names)


@functools.lru_cache(maxsize=256)
def _compiled(text: str) -> expression.Expression:
    return expression.parse(text)


def _label(rule: MappedKeyword) -> str:
    return rule if isinstance(rule, str) else rule.label


def _named(rule: MappedKeyword | None) -> str | None:
    """The words naming where a value came from, for an error (None: nowhere)."""
    return None if rule is None else _label(rule)


def _text(header: Mapping[str, HeaderValue], rule: MappedKeyword | None) -> str | None:
    value = _value(header, rule)
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _number(
    header: Mapping[str, HeaderValue], rule: MappedKeyword | None, path: Path, *, required: bool
) -> float | None:
    value = _value(header, rule)
    if value is None or rule is None:
        return None
    key = _label(rule)
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
    header: Mapping[str, HeaderValue],
    rule: MappedKeyword | None,
    path: Path,
    *,
    hours: bool,
    required: bool,
) -> float | None:
    """Degrees from a number of degrees or a sexagesimal string (hours for RA)."""
    value = _value(header, rule)
    if value is None or rule is None:
        return None
    key = _label(rule)
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


def night_of(moment: datetime, zone: tzinfo | float) -> date:
    """The local date on which the night containing ``moment`` began (noon to noon, local
    time in ``zone``: an IANA zone with its daylight saving, or a fixed offset in hours)."""
    if not isinstance(zone, tzinfo):
        zone = timezone(timedelta(hours=zone))
    return (moment.astimezone(zone) - timedelta(hours=12)).date()


def add_months(moment: datetime, months: int) -> datetime:
    month0 = moment.month - 1 + months
    year, month = moment.year + month0 // 12, month0 % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def mjd(moment: datetime) -> float:
    return (moment - MJD_EPOCH).total_seconds() / 86400.0

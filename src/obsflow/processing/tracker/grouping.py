"""Which group a file belongs to, and which files a group takes: pure, no database.

A pipeline runs once per *group*. The group key comes from the pipeline's
**primary input** (the first of its ``inputs``): for each ``group.by`` dimension,
the primary file's value:

============  ==============================================================
dimension     value
============  ==============================================================
night         the night, ISO date (``2026-11-21``)
filter        the filter
program       the program
object        the object
frame_type    the frame type
file          the file's archive ID
observation   ``{night}/{object}/{program}``
window        the start time floored to ``window_seconds`` (counted from the
              Unix epoch), ISO UTC (``2026-11-22T05:00:00+00:00``)
(any other)   a metadata field (``exptime``, ``telescope`` ...), else an archived
              keyword of the file by its ``where`` name (``gratname`` for
              ``GRATNAME``), else a named group of its file name: as text
============  ==============================================================

The key always carries ``night`` as well, even when ``by`` does not name it: a
per-file group still belongs to a night. A dimension the file has no value for is
the empty string.

The key is a :class:`~obsflow.catalog.groupkey.GroupKey` (its text form lives with it).
A candidate file is judged by :func:`matches` over plain values: the file's own
(:func:`obsflow.processing.inputs.file_values`) and the group's ``group.*`` names
(:func:`group_values`).
Secondary inputs (every input but the first) belong to a group by night: a file
of the same night that meets the input's ``where``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo

from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.records import FileRecord
from obsflow.registry import expression
from obsflow.registry.keywords import METADATA_FIELDS, field_name
from obsflow.registry.specs import GroupBy, InputSpec, PipelineSpec

GROUP = "group."
"""The prefix of the names a ``where`` reads about the group, e.g. ``group.filter``."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def window_start(moment: datetime, window_seconds: float) -> datetime:
    """``moment`` floored to a multiple of ``window_seconds`` since the Unix epoch, UTC.

    A naive ``moment`` is taken as UTC. Whole microseconds, so no float rounding.
    """
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    step = round(window_seconds * 1_000_000)
    if step <= 0:
        raise ValueError(f"window_seconds must be at least a microsecond, not {window_seconds}")
    since = (aware - _EPOCH) // _MICROSECOND
    return _EPOCH + (since - since % step) * _MICROSECOND


def _dimension(dim: str, primary: FileRecord, window_seconds: float | None) -> str:
    night = primary.night.isoformat() if primary.night else ""
    if dim == GroupBy.NIGHT:
        return night
    if dim == GroupBy.FILE:
        return primary.archive_id or ""
    if dim == GroupBy.OBSERVATION:
        return f"{night}/{primary.object or ''}/{primary.program or ''}"
    if dim == GroupBy.WINDOW:
        if primary.start is None or window_seconds is None:
            return ""
        return window_start(primary.start, window_seconds).isoformat()
    return _text(_field(dim, primary))


def _field(name: str, primary: FileRecord) -> object:
    """A metadata field, else an archived keyword (by its ``where`` name), else a name
    group of ``primary``; None when it has none of them."""
    if name in METADATA_FIELDS:
        return getattr(primary, name)
    for keyword, value in primary.keywords.items():
        if field_name(keyword) == name:
            return value
    return (primary.name_groups or {}).get(name)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 30.0 and 30 are one group
    return str(value).strip()


def group_key(pipeline: PipelineSpec, primary: FileRecord) -> GroupKey:
    """The key of the group of ``pipeline`` that the primary-input file ``primary`` makes."""
    dims = {*pipeline.group.by, GroupBy.NIGHT.value}
    return GroupKey.of(
        pipeline.id,
        {str(d): _dimension(d, primary, pipeline.group.window_seconds) for d in dims},
    )


def group_values(key: GroupKey, primary_values: Mapping[str, object]) -> dict[str, object]:
    """The ``group.*`` names a ``where`` reads: the primary file's values, then the key's.

    ``primary_values`` is :func:`~obsflow.processing.inputs.file_values` of the file
    that made the group; the key's dimensions win over fields of the same name (they
    agree for ``night`` and ``filter`` etc. anyway). Only the key's dimensions are the
    same for every file of the group; another ``group.<field>`` is the value of the
    file that made it.
    """
    values = {f"{GROUP}{name}": value for name, value in primary_values.items()}
    values.update({f"{GROUP}{dim}": value for dim, value in key.values})
    return values


@functools.lru_cache(maxsize=512)
def _compiled(text: str) -> expression.Expression:
    return expression.parse(text)


def matches(
    spec: InputSpec,
    values: Mapping[str, object],
    group: Mapping[str, object],
    *,
    primary: bool,
) -> bool:
    """Whether a file with ``values`` is a candidate for input ``spec`` of a group.

    ``values`` is :func:`~obsflow.processing.inputs.file_values` of the file,
    ``group`` is :func:`group_values` of the group. A secondary input
    (``primary=False``) must be of the group's night (a group without a night takes no
    secondary inputs); every input must meet its ``where``. The product is the
    caller's to check. For the primary input the caller picks the files whose
    :func:`group_key` is the group's key, which already implies the night.
    """
    if not primary:
        night = group.get(f"{GROUP}{GroupBy.NIGHT.value}")
        if not night or values.get("night") != night:
            return False
    if spec.where is None:
        return True
    return _compiled(spec.where).evaluate({**values, **group})


def night_end(night: date, zone: tzinfo | float, local_end: time = time(7, 0)) -> datetime:
    """The end of ``night``: the next morning at ``local_end`` site time, as aware UTC.

    ``zone`` is the site's time zone (an IANA zone: the offset of that morning, daylight
    saving included) or a fixed offset in hours. With OFCAM's offset of -10 h the night
    of 2026-11-21 ends at 2026-11-22 07:00 local, which is 2026-11-22 17:00 UTC.
    """
    if local_end.tzinfo is not None:
        raise ValueError(f"local_end must be a naive local time, not {local_end}")
    if not isinstance(zone, tzinfo):
        zone = timezone(timedelta(hours=zone))
    local = datetime.combine(night + timedelta(days=1), local_end, tzinfo=zone)
    return local.astimezone(UTC)

"""What a file is, as a pipeline sees it: the values its ``where`` and its parameters read.

Shared by the tracker (which matches candidate files against an input's ``where``) and
the executor (which fills a run's parameters from its primary input): both read the
facts receipt recorded on the file's catalog row, and nothing here recognises a name
again, except for rows recorded before the catalog kept name groups (see
:func:`name_groups`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from obsflow.catalog.records import FileRecord
from obsflow.errors import RecognitionError
from obsflow.registry import Registry
from obsflow.registry.keywords import field_name

keyword_name = field_name
"""The name a ``where`` reads a header keyword by (``AIRMASS`` → ``airmass``)."""


def name_groups(record: FileRecord, registry: Registry) -> Mapping[str, str]:
    """The named regex groups of ``record``'s file name, as receipt recorded them.

    A row recorded before the catalog kept them (schema 0007) has none stored
    (``name_groups`` NULL: a migration cannot run the registry to fill them in); for
    such a row only, the name is recognised again with today's registry. If today's
    registry no longer recognises it, that is an error naming the file
    (:class:`~obsflow.errors.RecognitionError`), never an empty mapping.
    """
    if record.name_groups is not None:
        return record.name_groups
    try:
        return registry.recognise(record.original_name).groups
    except RecognitionError as exc:
        raise type(exc)(
            record.original_name,
            f"file {record.archive_id or record.id}: recorded without its name groups, and "
            f"the registry no longer recognises its name: {exc.detail}",
        ) from exc


def file_values(record: FileRecord, filename_groups: Mapping[str, str]) -> dict[str, object]:
    """The values a ``where`` sees for ``record``.

    Its archived keywords (by :func:`keyword_name`), then its filename's named
    regex groups (e.g. ``date``, ``frame``), then its metadata: ``product, level,
    instrument, archive_id, original_name, night`` (ISO date), ``exptime, filter,
    object, frame_type, program, observer, telescope, ra, dec, start, stop`` (ISO
    UTC) and ``version``. A later source wins a name over an earlier one, so a
    keyword or a group named ``filter`` never hides the metadata.
    """
    values: dict[str, object] = {keyword_name(k): v for k, v in record.keywords.items()}
    values.update(filename_groups)
    values.update(
        product=record.product,
        level=record.level,
        instrument=record.instrument,
        archive_id=record.archive_id,
        original_name=record.original_name,
        night=record.night.isoformat() if record.night else None,
        exptime=record.exptime,
        filter=record.filter,
        object=record.object,
        frame_type=record.frame_type,
        program=record.program,
        observer=record.observer,
        telescope=record.telescope,
        ra=record.ra,
        dec=record.dec,
        start=_iso(record.start),
        stop=_iso(record.stop),
        version=record.version,
    )
    return values


def values_of(record: FileRecord, registry: Registry) -> dict[str, object]:
    """:func:`file_values` of ``record`` with its recorded :func:`name_groups`."""
    return file_values(record, name_groups(record, registry))


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()

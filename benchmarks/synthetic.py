"""Synthetic catalogs for the benchmarks, and the machine they ran on.

:func:`fill` gives a catalog its history: ``total`` file rows, :data:`FRAMES_PER_NIGHT` a
night from :data:`FIRST_NIGHT` on, IDs 1 to ``total``, with their tags, keywords, ledger
stamps and the tracker's groups, all of them tracked. The rows are made
in Python (:func:`night_rows`) and inserted in bulk on the driver (:func:`insert_rows`),
each value converted by its column's type, so they are stored exactly as obsflow stores
them at a fraction of the cost of obsflow's own writes. No bytes are written anywhere:
the rows only say where files would be.

Two flavours of night:

- **raw frames** (the default): ``count`` ``ofcam_raw`` frames 40 s apart from 05:00 UTC
  (2 % BIAS, 3 % FLAT, the rest OBJECT; filters B/V/R), each 8.4 MB, tagged ``raw`` with
  4 keywords and its ``cached`` stamp; ``archived`` ones are in the archive only (no
  cache path), with the tracker's groups for them.
- **an archive night** (``in_cache=True, derived=True``): archived files still in the
  cache (cache path and archive path, ``cached`` and ``archived`` stamps), 2/5 of them
  raw frames spread over the night (05:00–15:00 UTC), the rest what the pipelines made
  of them: the night's master bias and flats (L1), calibrated frames (L1) and their
  source lists (L2), and one catalog per field (L3); each with its product's tag from
  the example registry, and the few tags operators add, common to rare
  (:data:`EXTRA_TAGS`).

``python benchmarks/synthetic.py`` measures nothing: it is a helper of ``catalog.py``
and ``orchestration.py``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Table

from obsflow.catalog import Catalog, schema
from obsflow.catalog.groupkey import GroupKey
from obsflow.states import FileState, LedgerEvent

FRAMES_PER_NIGHT = 500
CHUNK = 50_000
"""Files inserted per transaction."""
FIRST_NIGHT = date(2020, 1, 1)
FILTERS = ("B", "V", "R")
FIELDS = 10
RAW_SIZE = 8_409_600
"""A raw frame: 2048 × 2048 16-bit pixels and its header."""
REDUCED_SIZE = 16_819_200
"""A calibrated frame or a master: the same pixels as 32-bit floats."""
NIGHT_SECONDS = 36_000
"""An archive night's raw frames are spread over 05:00–15:00 UTC (a night in Hawaii)."""
EXTRA_TAGS = {
    "standard": "raw OBJECT frames of FIELD-0 (about 4 % of the files)",
    "qa:bad-seeing": "raw frames whose ID is a multiple of 97 (about 0.4 %)",
    "paper:2023-017": "calibrated frames of FIELD-3, every 40th night (about 0.07 %)",
    "ticket:4711": "raw OBJECT frames of FIELD-7 of the 8th night (about 20 files)",
}
"""The tags operators add, on archive nights, and which files have them."""

Rows = dict[str, list[dict[str, Any]]]
"""Table name → rows to insert."""
TABLES: dict[str, Table] = {
    t.name: t
    for t in (schema.files, schema.tags, schema.keywords, schema.ledger, schema.tracker_groups)
}


def frame_kind(index: int, per_night: int) -> tuple[str, str]:
    """(frame type, filter) of the ``index``-th frame of a night of ``per_night``."""
    biases = max(1, per_night // 50)
    flats = max(3, 3 * per_night // 100)
    if index < biases:
        return "BIAS", ""
    if index < biases + flats:
        return "FLAT", FILTERS[(index - biases) % 3]
    return "OBJECT", FILTERS[index % 3]


def group_row(
    pipeline: str, by: dict[str, str], night: date, file_id: int, at: datetime
) -> dict[str, Any]:
    """A row of the tracker's groups: the group of ``pipeline`` with key values ``by``."""
    key = GroupKey.of(pipeline, by).text()
    return {"pipeline": pipeline, "group_key": key, "night": night,
            "primary_file_id": file_id, "due_at": None, "updated_at": at}  # fmt: skip


def night_rows(
    first_id: int,
    night: date,
    count: int,
    *,
    archived: bool,
    in_cache: bool = False,
    derived: bool = False,
) -> Rows:
    """``count`` files of ``night`` with IDs from ``first_id``: ``archived`` ones (the
    catalog's history) with the tracker's groups, else just cached (new arrivals).

    ``in_cache``: archived files keep their cached copy (and get an ``archived`` stamp).
    ``derived``: an archive night, 2/5 raw frames and the products made of them (see the
    module's docstring); else ``count`` raw frames 40 s apart."""
    rows: Rows = {name: [] for name in TABLES}
    raws = max(1, count * 2 // 5) if derived else count
    cadence = max(40, NIGHT_SECONDS // raws) if derived else 40
    night_ = _Night(night, rows, archived=archived, in_cache=in_cache)
    for k in range(raws):
        kind, band = frame_kind(k, raws)
        start = night_.evening + timedelta(seconds=cadence * k)
        exptime = {"BIAS": 0.0, "FLAT": 5.0}.get(kind, 60.0)
        field = f"FIELD-{k % FIELDS}"
        file_id = night_.add(
            first_id + k, "ofcam_raw", 0, f"ofc_{night_.day}_{k + 1:04d}.fits",
            f"/data/incoming/ofc_{night_.day}_{k + 1:04d}.fits", 18000 + cadence * k, 0,
            start, start + timedelta(seconds=exptime), RAW_SIZE,
            exptime=exptime, ra=10.0 + k % FIELDS,
            object={"BIAS": "bias", "FLAT": "dome flat"}.get(kind, field),
            frame_type=kind, filter=band or None,
        )  # fmt: skip
        tags = ["raw"]
        if derived and kind == "OBJECT":
            if field == "FIELD-0":
                tags.append("standard")
            if field == "FIELD-7" and night_.ordinal == 7:
                tags.append("ticket:4711")
        if derived and file_id % 97 == 0:
            tags.append("qa:bad-seeing")
        night_.tag(file_id, tags)
        for word, value in (("AIRMASS", 1.2), ("GAIN", 1.8), ("RDNOISE", 4.2), ("FRAMENUM", k)):
            night_.keyword(file_id, word, value)
        cached = start + timedelta(seconds=exptime + 3)
        night_.stamp(file_id, cached)
        if archived and kind == "OBJECT":
            by = {"file": night_.archive_id(18000 + cadence * k, 0), "night": night_.iso}
            rows["tracker_groups"].append(group_row("ofcam_calibrate", by, night, file_id, cached))
    if archived:  # the night's master bias and master flats ran long ago
        groups = [("ofcam_masterbias", {"night": night_.iso})]
        groups += [("ofcam_masterflat", {"filter": f, "night": night_.iso}) for f in FILTERS]
        for pipeline, by in groups:
            rows["tracker_groups"].append(group_row(pipeline, by, night, first_id, night_.evening))
    if derived:
        for make in _derived(night_, raws, cadence)[: count - raws]:
            make(first_id + len(rows["files"]))
    return rows


class _Night:
    """Adds the rows of one night's files to ``rows``, all alike."""

    def __init__(self, night: date, rows: Rows, *, archived: bool, in_cache: bool) -> None:
        self.night = night
        self.rows = rows
        self.archived = archived
        self.in_cache = in_cache
        self.day, self.iso = night.strftime("%Y%m%d"), night.isoformat()
        self.evening = datetime(night.year, night.month, night.day, 5, tzinfo=UTC)
        self.morning = self.evening + timedelta(seconds=NIGHT_SECONDS)
        self.ordinal = (night - FIRST_NIGHT).days
        self.starts: dict[int, datetime] = {}

    def archive_id(self, seconds_of_day: int, hundredths: int) -> str:
        return f"OF.{self.day}.{seconds_of_day:05d}.{hundredths:02d}.fits"

    def add(
        self,
        file_id: int,
        product: str,
        level: int,
        name: str,
        source: str,
        seconds_of_day: int,
        hundredths: int,
        start: datetime,
        stop: datetime,
        size: int,
        **fields: Any,
    ) -> int:
        archive_id = self.archive_id(seconds_of_day, hundredths)
        path = f"OFCAM/{self.iso}/{archive_id}"
        cached = self.in_cache or not self.archived
        values = {
            "id": file_id, "archive_id": archive_id, "product": product,
            "instrument": "OFCAM", "level": level, "original_name": name,
            "source_path": source, "size": size,
            "sha256": hashlib.sha256(file_id.to_bytes(8, "little")).hexdigest(),
            "state": (FileState.ARCHIVED if self.archived else FileState.CACHED).value,
            "start_utc": start, "stop_utc": stop,
            "start_mjd": 40587 + start.timestamp() / 86400,
            "stop_mjd": 40587 + stop.timestamp() / 86400,
            "night": self.night, "exptime": None, "ra": None, "dec": 20.0,
            "object": None, "frame_type": None, "filter": None, "program": "P2026B-001",
            "observer": "Observer", "telescope": "OBSFLOW 1.0m",
            "proprietary_until": start + timedelta(days=548),
            "cache_path": path if cached else None,
            "archive_path": path if self.archived else None,
            "version": 1, "tracked": self.archived,
        }  # fmt: skip
        unknown = set(fields) - set(values)
        if unknown:
            raise ValueError(f"not columns of the files rows: {sorted(unknown)}")
        values.update(fields)
        self.rows["files"].append(values)
        self.starts[file_id] = start
        return file_id

    def tag(self, file_id: int, tags: list[str]) -> None:
        start = self.starts[file_id]
        self.rows["tags"] += [{"file_id": file_id, "tag": t, "start_utc": start} for t in tags]

    def keyword(self, file_id: int, word: str, value: float) -> None:
        code = "i" if isinstance(value, int) else "f"
        row = {"file_id": file_id, "name": word, "kind": code, "value_num": float(value)}
        self.rows["keywords"].append({**row, "value_text": str(value)})

    def stamp(self, file_id: int, cached: datetime) -> None:
        """The ledger: cached at ``cached``; archived a minute later (if in the cache)."""
        ledger = self.rows["ledger"]
        ledger.append({"file_id": file_id, "event": LedgerEvent.CACHED.value, "at": cached})
        if self.archived and self.in_cache:
            archived = cached + timedelta(seconds=60)
            ledger.append({"file_id": file_id, "event": LedgerEvent.ARCHIVED.value, "at": archived})


def _derived(night: _Night, raws: int, cadence: int) -> list[Callable[[int], None]]:
    """What the pipelines made of a night's ``raws`` frames, in the order they made it:
    each a function adding one file with the ID given."""
    made = night.morning + timedelta(minutes=20)
    work = f"/data/work/{night.iso}"
    biases = max(1, raws // 50)
    flats = max(3, 3 * raws // 100)

    def master(filter_: str | None) -> Callable[[int], None]:
        def add(file_id: int) -> None:
            first, frames = (0, biases) if filter_ is None else (biases, flats)
            start = night.evening + timedelta(seconds=cadence * first)
            stop = start + timedelta(seconds=cadence * frames)
            name = f"ofc_{night.day}_mbias.fits" if filter_ is None else (
                f"ofc_{night.day}_mflat_{filter_}.fits"
            )  # fmt: skip
            product = "ofcam_masterbias" if filter_ is None else "ofcam_masterflat"
            hundredths = 10 if filter_ is None else 11 + FILTERS.index(filter_)
            night.add(
                file_id, product, 1, name, f"{work}/{name}", 18000 + cadence * first,
                hundredths, start, stop, REDUCED_SIZE, frame_type=product[6:].upper(),
                filter=filter_,
            )  # fmt: skip
            night.tag(file_id, ["calibration"])
            night.keyword(file_id, "NCOMBINE", frames)
            night.stamp(file_id, made)

        return add

    def reduced(k: int, product: str) -> Callable[[int], None]:
        def add(file_id: int) -> None:
            start = night.evening + timedelta(seconds=cadence * k)
            field = f"FIELD-{k % FIELDS}"
            suffix, hundredths, level = {
                "ofcam_calibrated": ("cal", 1, 1),
                "ofcam_sources": ("src", 2, 2),
            }[product]
            name = f"ofc_{night.day}_{k + 1:04d}_{suffix}.fits"
            size = REDUCED_SIZE if level == 1 else 200_000 + file_id * 7919 % 400_000
            night.add(
                file_id, product, level, name, f"{work}/{name}", 18000 + cadence * k,
                hundredths, start, start + timedelta(seconds=60), size, exptime=60.0,
                ra=10.0 + k % FIELDS, object=field, frame_type="OBJECT",
                filter=FILTERS[k % 3],
            )  # fmt: skip
            tags = ["science-ready"] if level == 1 else ["catalog"]
            if level == 1 and field == "FIELD-3" and night.ordinal % 40 == 0:
                tags.append("paper:2023-017")
            night.tag(file_id, tags)
            if level == 1:
                night.keyword(file_id, "AIRMASS", 1.2)
                night.keyword(file_id, "NCOSMIC", k % 50)
            night.stamp(file_id, made + timedelta(seconds=5 * k))

        return add

    def catalog(field: int) -> Callable[[int], None]:
        def add(file_id: int) -> None:
            name = f"ofc_{night.day}_FIELD_{field}_cat.fits"
            night.add(
                file_id, "ofcam_nightcat", 3, name, f"{work}/{name}",
                18000 + NIGHT_SECONDS, 20 + field, night.evening, night.morning,
                2_000_000 + 100_000 * field, object=f"FIELD-{field}",
            )  # fmt: skip
            night.tag(file_id, ["catalog"])
            night.stamp(file_id, made + timedelta(hours=2))

        return add

    made_of: list[Callable[[int], None]] = [master(None), *(master(f) for f in FILTERS)]
    made_of += [catalog(field) for field in range(FIELDS)]
    for k in range(biases + flats, raws):  # the OBJECT frames
        made_of += [reduced(k, "ofcam_calibrated"), reduced(k, "ofcam_sources")]
    return made_of


def insert_rows(catalog: Catalog, rows: Rows) -> None:
    """Insert ``rows`` in one transaction, by executemany on the driver: each value is
    converted by its column type's own bind processor for the catalog's dialect, so it is
    stored exactly as obsflow stores it (times as ``2020-01-01 05:00:03.000000``), without
    the per-row cost of SQLAlchemy's statement machinery."""
    dialect = catalog.engine.dialect
    with catalog.write() as conn:
        for name, values in rows.items():
            if not values:
                continue
            table, columns = TABLES[name], list(values[0])
            by_column = []
            for column in columns:
                convert = table.c[column].type.dialect_impl(dialect).bind_processor(dialect)
                given = [row[column] for row in values]
                if convert is not None:
                    given = [None if v is None else convert(v) for v in given]
                by_column.append(given)
            marks = ", ".join("?" for _ in columns)
            conn.exec_driver_sql(
                f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({marks})",
                list(zip(*by_column, strict=True)),
            )
        spans = [(f["product"], f["start_utc"], f["stop_utc"]) for f in rows["files"]]
        widened = catalog.spans.widen(conn, spans)  # as obsflow's recorder does
    catalog.spans.remember(widened)


def fill(
    catalog: Catalog,
    total: int,
    *,
    in_cache: bool = False,
    derived: bool = False,
    progress: Callable[[int], object] | None = None,
) -> date:
    """The catalog's history: ``total`` archived files, ``FRAMES_PER_NIGHT`` a night, IDs
    1 to ``total`` (raw frames; ``in_cache`` and ``derived``: see :func:`night_rows`), all
    tracked; returns the last night. ``progress`` is told how many
    files are in after each transaction."""
    pending: Rows = {name: [] for name in TABLES}
    night, first = FIRST_NIGHT - timedelta(days=1), 1
    while first <= total:
        night += timedelta(days=1)
        count = min(FRAMES_PER_NIGHT, total - first + 1)
        made = night_rows(first, night, count, archived=True, in_cache=in_cache, derived=derived)
        for name, values in made.items():
            pending[name] += values
        first += count
        if len(pending["files"]) >= CHUNK or first > total:
            insert_rows(catalog, pending)
            pending = {name: [] for name in TABLES}
            if progress is not None:
                progress(first - 1)
    return night


# ---------------------------------------------------------------- the report


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {usable} CPU(s) usable ({os.cpu_count()} online), {model}; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()} "
        f"({sys.executable})"
    )


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def verdict(ratio: float, target: float) -> str:
    return "MET" if ratio <= target else "NOT MET"


if __name__ == "__main__":
    print("synthetic.py measures nothing: it is a helper of catalog.py and orchestration.py")

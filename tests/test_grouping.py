"""Group keys, the values a ``where`` sees, candidate matching and the night's end."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

import pytest

from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.records import FileRecord
from obsflow.processing.inputs import file_values
from obsflow.processing.tracker.grouping import (
    group_key,
    group_values,
    matches,
    night_end,
    window_start,
)
from obsflow.registry.specs import InputSpec, PipelineSpec
from obsflow.states import FileState

START = datetime(2026, 11, 22, 5, 17, 42, 250000, tzinfo=UTC)


def record(**changes: Any) -> FileRecord:
    """An OFCAM raw flat of the night of 2026-11-21, with ``changes``."""
    base = FileRecord(
        id=7,
        archive_id="OF.20261122.19062.25.fits",
        product="ofcam_raw",
        instrument="OFCAM",
        level=0,
        original_name="ofc_20261122_0042.fits",
        source_path="/incoming/ofc_20261122_0042.fits",
        size=2880,
        sha256="0" * 64,
        state=FileState.CACHED,
        reason=None,
        start=START,
        stop=START + timedelta(seconds=30),
        start_mjd=61366.22,
        stop_mjd=61366.22,
        night=date(2026, 11, 21),
        exptime=30.0,
        ra=10.5,
        dec=-20.25,
        object="M31",
        frame_type="FLAT",
        filter="R",
        program="P042",
        observer="Ada",
        telescope="OF1",
        proprietary_until=None,
        cache_path=None,
        archive_path=None,
        quarantine_path=None,
        version=1,
        superseded_by=None,
        keywords={"AIRMASS": 1.25, "DATE-OBS": "2026-11-22T05:17:42.25"},
    )
    return replace(base, **changes)


def pipeline(by: list[str], window_seconds: float | None = None, **extra: Any) -> PipelineSpec:
    group: dict[str, Any] = {"by": by}
    if window_seconds is not None:
        group["window_seconds"] = window_seconds
    return PipelineSpec.model_validate(
        {
            "id": "p",
            "profile": "prof",
            "inputs": [{"product": "ofcam_raw", "name": "frames"}],
            "group": group,
            **extra,
        }
    )


# ------------------------------------------------------------------ group keys


@pytest.mark.parametrize(
    ("by", "window_seconds", "changes", "expected"),
    [
        (["night"], None, {}, {"night": "2026-11-21"}),
        (["filter"], None, {}, {"filter": "R", "night": "2026-11-21"}),
        (["night", "filter"], None, {}, {"filter": "R", "night": "2026-11-21"}),
        (["program"], None, {}, {"program": "P042", "night": "2026-11-21"}),
        (["object"], None, {}, {"object": "M31", "night": "2026-11-21"}),
        (["frame_type"], None, {}, {"frame_type": "FLAT", "night": "2026-11-21"}),
        (["file"], None, {}, {"file": "OF.20261122.19062.25.fits", "night": "2026-11-21"}),
        (
            ["observation"],
            None,
            {},
            {"observation": "2026-11-21/M31/P042", "night": "2026-11-21"},
        ),
        (
            ["observation"],
            None,
            {"program": None},
            {"observation": "2026-11-21/M31/", "night": "2026-11-21"},
        ),
        (
            ["window"],
            600,
            {},
            {"window": "2026-11-22T05:10:00+00:00", "night": "2026-11-21"},
        ),
        (
            ["window"],
            3600,
            {},
            {"window": "2026-11-22T05:00:00+00:00", "night": "2026-11-21"},
        ),
        (
            ["window"],
            0.5,
            {},
            {"window": "2026-11-22T05:17:42+00:00", "night": "2026-11-21"},
        ),
        (["window"], 600, {"start": None}, {"window": "", "night": "2026-11-21"}),
        (["filter"], None, {"filter": None}, {"filter": "", "night": "2026-11-21"}),
        (["file"], None, {"archive_id": None}, {"file": "", "night": "2026-11-21"}),
        (["filter"], None, {"night": None}, {"filter": "R", "night": ""}),
        (
            ["object", "filter", "program"],
            None,
            {},
            {"filter": "R", "night": "2026-11-21", "object": "M31", "program": "P042"},
        ),
    ],
    ids=[
        "night",
        "filter-adds-night",
        "night-and-filter",
        "program",
        "object",
        "frame_type",
        "file-is-archive-id",
        "observation",
        "observation-no-program",
        "window-10min",
        "window-1h",
        "window-half-second",
        "window-no-start",
        "missing-filter-is-empty",
        "missing-archive-id-is-empty",
        "missing-night-is-empty",
        "three-dimensions",
    ],
)
def test_group_key_per_dimension(
    by: list[str], window_seconds: float | None, changes: dict[str, Any], expected: dict[str, str]
) -> None:
    key = group_key(pipeline(by, window_seconds), record(**changes))
    assert key.pipeline == "p"
    assert dict(key.values) == expected
    assert [dim for dim, _ in key.values] == sorted(expected)


def test_window_start_of_naive_time_is_utc_and_exact() -> None:
    naive = datetime(2026, 11, 22, 5, 17, 42, 999999)
    assert window_start(naive, 60) == datetime(2026, 11, 22, 5, 17, tzinfo=UTC)
    other_zone = datetime(2026, 11, 21, 19, 17, 42, tzinfo=timezone(timedelta(hours=-10)))
    assert window_start(other_zone, 60) == datetime(2026, 11, 22, 5, 17, tzinfo=UTC)
    with pytest.raises(ValueError, match="microsecond"):
        window_start(naive, 1e-9)


def test_group_key_get_and_night() -> None:
    key = group_key(pipeline(["filter"]), record())
    assert key.get("filter") == "R"
    assert key.get("object") is None
    assert key.night == "2026-11-21"


def test_two_files_of_one_group_share_its_key_and_others_do_not() -> None:
    flats = pipeline(["night", "filter"])
    assert group_key(flats, record(id=1)) == group_key(flats, record(id=2, exptime=5.0))
    assert group_key(flats, record()) != group_key(flats, record(filter="V"))
    assert group_key(flats, record()) != group_key(flats, record(night=date(2026, 11, 22)))


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ({"night": "2026-11-21"}, "night=2026-11-21"),
        ({"night": "2026-11-21", "filter": "R"}, "filter=R,night=2026-11-21"),
        ({"night": "", "filter": ""}, "filter=,night="),
        ({"night": "2026-11-21", "object": "a,b"}, "night=2026-11-21,object=a\\,b"),
        ({"night": "2026-11-21", "object": "x=y"}, "night=2026-11-21,object=x\\=y"),
        ({"night": "2026-11-21", "object": "C:\\new"}, "night=2026-11-21,object=C:\\\\new"),
    ],
    ids=["night-only", "sorted", "empty-values", "comma", "equals", "backslash"],
)
def test_text_is_canonical(values: dict[str, str], text: str) -> None:
    key = GroupKey.of("p", values)
    assert key.text() == text
    assert GroupKey.parse("p", text) == key
    assert str(key) == text  # what a log line or a table shows


AWKWARD = [
    "",
    ",",
    "=",
    "\\",
    "\\,",
    "a,b=c\\d",
    "==,,\\\\",
    "trailing\\",
    "Ærø ☃ 漢字",
    "NGC 224 / M31",
    " spaced ",
    "new\nline",
    "\\=",
    "x=",
    ",night=2026-11-21",
]


@pytest.mark.parametrize("value", AWKWARD, ids=[repr(v) for v in AWKWARD])
def test_text_parse_round_trip_with_awkward_values(value: str) -> None:
    key = GroupKey.of(
        "ofcam_masterflat",
        {"night": value, "object": value, "observation": f"{value}/{value}/{value}"},
    )
    text = key.text()
    assert GroupKey.parse("ofcam_masterflat", text) == key
    assert GroupKey.parse("ofcam_masterflat", text).text() == text


def test_text_of_different_keys_differ() -> None:
    seen = {GroupKey.of("p", {"night": a, "object": b}).text() for a in AWKWARD for b in AWKWARD}
    assert len(seen) == len(AWKWARD) ** 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no '='"),
        ("night", "has no '='"),
        ("filter=R,night", "has no '='"),
        ("night=a=b", "unescaped '='"),
        ("night=a\\", "bad escape"),
        ("night=a\\n", "bad escape"),
        ("filter=R", "has no night"),
        ("night=x,filter=R", "not sorted"),
        ("night=x,night=y", "not sorted and unique"),
        ("Colour=R,night=x", "bad dimension"),
    ],
    ids=[
        "empty",
        "no-equals",
        "last-no-equals",
        "bare-equals",
        "dangling-escape",
        "unknown-escape",
        "no-night",
        "unsorted",
        "duplicate",
        "bad-dimension-name",
    ],
)
def test_parse_refuses_what_text_never_writes(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GroupKey.parse("p", text)


# ----------------------------------------------------------------- file values


def test_file_values_has_metadata_keywords_and_filename_groups() -> None:
    values = file_values(record(), {"date": "20261122", "frame": "0042"})
    assert values == {
        "airmass": 1.25,
        "date_obs": "2026-11-22T05:17:42.25",
        "date": "20261122",
        "frame": "0042",
        "product": "ofcam_raw",
        "level": 0,
        "instrument": "OFCAM",
        "archive_id": "OF.20261122.19062.25.fits",
        "original_name": "ofc_20261122_0042.fits",
        "night": "2026-11-21",
        "exptime": 30.0,
        "filter": "R",
        "object": "M31",
        "frame_type": "FLAT",
        "program": "P042",
        "observer": "Ada",
        "telescope": "OF1",
        "ra": 10.5,
        "dec": -20.25,
        "start": "2026-11-22T05:17:42.250000+00:00",
        "stop": "2026-11-22T05:18:12.250000+00:00",
        "version": 1,
    }


def test_file_values_metadata_wins_over_keywords_and_groups() -> None:
    rec = record(keywords={"FILTER": "r'", "HIERARCH ESO DET DIT": 2.5, "OBJECT": "m31"})
    values = file_values(rec, {"filter": "from-name", "frame": "0042"})
    assert values["filter"] == "R"
    assert values["object"] == "M31"
    assert values["hierarch_eso_det_dit"] == 2.5
    assert values["frame"] == "0042"


def test_file_values_times_are_iso_utc_even_when_naive() -> None:
    naive = datetime(2026, 11, 22, 5, 17, 42)
    values = file_values(record(start=naive, stop=naive + timedelta(seconds=30)), {})
    assert values["start"] == "2026-11-22T05:17:42+00:00"
    assert values["stop"] == "2026-11-22T05:18:12+00:00"


def test_file_values_of_missing_metadata_are_none() -> None:
    values = file_values(record(night=None, start=None, stop=None, filter=None), {})
    assert values["night"] is None
    assert values["start"] is None
    assert values["stop"] is None
    assert values["filter"] is None


def test_group_values_prefix_primary_values_and_key_wins() -> None:
    primary = record()
    key = GroupKey.of("p", {"night": "2026-11-21", "observation": "2026-11-21/M31/P042"})
    group = group_values(key, {**file_values(primary, {"frame": "0042"}), "filter": "R"})
    assert group["group.filter"] == "R"
    assert group["group.frame"] == "0042"
    assert group["group.airmass"] == 1.25
    assert group["group.observation"] == "2026-11-21/M31/P042"
    assert group["group.night"] == "2026-11-21"
    assert all(name.startswith("group.") for name in group)
    overridden = group_values(GroupKey.of("p", {"night": "2026-11-22"}), file_values(primary, {}))
    assert overridden["group.night"] == "2026-11-22"


# --------------------------------------------------------------------- matches


FLAT = InputSpec(product="ofcam_raw", name="flat", where="filter == group.filter")
BIAS = InputSpec(product="ofcam_masterbias", name="bias")
AIRMASS = InputSpec(product="ofcam_raw", name="frames", where="airmass < 1.5 and frame == '0042'")


def _group_of(primary: FileRecord, by: list[str]) -> dict[str, object]:
    return group_values(group_key(pipeline(by), primary), file_values(primary, {}))


@pytest.mark.parametrize(
    ("spec", "candidate", "groups", "primary", "expected"),
    [
        (FLAT, record(), {}, False, True),
        (FLAT, record(filter="V"), {}, False, False),
        (FLAT, record(filter=None), {}, False, False),
        (FLAT, record(night=date(2026, 11, 20)), {}, False, False),
        (FLAT, record(night=None), {}, False, False),
        (BIAS, record(product="ofcam_masterbias"), {}, False, True),
        (BIAS, record(night=date(2026, 11, 22)), {}, False, False),
        (BIAS, record(night=date(2026, 11, 22)), {}, True, True),
        (AIRMASS, record(), {"frame": "0042"}, True, True),
        (AIRMASS, record(keywords={"AIRMASS": 1.8}), {"frame": "0042"}, True, False),
        (AIRMASS, record(keywords={}), {"frame": "0042"}, True, False),
        (AIRMASS, record(), {"frame": "0043"}, True, False),
    ],
    ids=[
        "same-filter-same-night",
        "other-filter",
        "no-filter",
        "other-night",
        "no-night",
        "no-where-same-night",
        "secondary-other-night",
        "primary-skips-night-rule",
        "keyword-and-filename-group",
        "keyword-fails",
        "keyword-missing",
        "filename-group-fails",
    ],
)
def test_matches(
    spec: InputSpec,
    candidate: FileRecord,
    groups: dict[str, str],
    primary: bool,
    expected: bool,
) -> None:
    group = _group_of(record(id=1, archive_id="OF.first.fits"), ["file"])
    assert matches(spec, file_values(candidate, groups), group, primary=primary) is expected


def test_group_without_night_takes_no_secondary_inputs() -> None:
    group = _group_of(record(night=None), ["file"])
    assert group["group.night"] == ""
    assert not matches(BIAS, file_values(record(night=None), {}), group, primary=False)
    assert not matches(BIAS, {"night": ""}, group, primary=False)
    assert matches(BIAS, file_values(record(night=None), {}), group, primary=True)


def test_where_reads_group_key_dimensions() -> None:
    spec = InputSpec(product="ofcam_raw", name="frames", where="group.observation == 'x/M31/P'")
    key = GroupKey.of("p", {"night": "2026-11-21", "observation": "x/M31/P"})
    values = file_values(record(), {})
    assert matches(spec, values, group_values(key, values), primary=True)
    other = GroupKey.of("p", {"night": "2026-11-21", "observation": "y/M31/P"})
    assert not matches(spec, values, group_values(other, values), primary=True)


# ------------------------------------------------------- group by any field


def test_group_by_an_archived_keyword_a_metadata_field_or_a_name_group() -> None:
    """A spectrograph groups arcs by grating and slit, which are no fixed dimension."""
    arc = record(
        keywords={"GRATNAME": "600/4000", "SLITNAME": "1.0 arcsec", "BINNING": "2,2"},
        name_groups={"frame": "0042"},
    )
    by = ["night", "GRATNAME", "slitname", "exptime", "frame"]
    key = group_key(pipeline(by), arc)
    assert dict(key.values) == {
        "night": "2026-11-21",
        "gratname": "600/4000",
        "slitname": "1.0 arcsec",
        "exptime": "30",
        "frame": "0042",
    }
    assert GroupKey.parse("p", key.text()) == key
    other = replace(arc, keywords={**arc.keywords, "GRATNAME": "1200/5000"})
    assert group_key(pipeline(by), other) != key
    assert group_key(pipeline(["binning"]), arc).get("binning") == "2,2"
    assert group_key(pipeline(["binning"]), record()).get("binning") == ""


def test_where_reads_a_keyword_dimension_of_the_group() -> None:
    arc = record(keywords={"GRATNAME": "600/4000"})
    group = group_values(group_key(pipeline(["night", "gratname"]), arc), file_values(arc, {}))
    flat = InputSpec(product="ofcam_raw", name="flats", where="gratname == group.gratname")
    same = record(id=9, keywords={"GRATNAME": "600/4000"})
    other = record(id=10, keywords={"GRATNAME": "1200/5000"})
    assert matches(flat, file_values(same, {}), group, primary=False)
    assert not matches(flat, file_values(other, {}), group, primary=False)


def test_group_by_names_each_field_once() -> None:
    with pytest.raises(ValueError, match="gratname named twice"):
        pipeline(["GRATNAME", "gratname"])


# ------------------------------------------------------------------- night end


@pytest.mark.parametrize(
    ("night", "offset", "local_end", "expected"),
    [
        (date(2026, 11, 21), -10, time(7), datetime(2026, 11, 22, 17, 0, tzinfo=UTC)),
        (date(2026, 11, 21), 0, time(7), datetime(2026, 11, 22, 7, 0, tzinfo=UTC)),
        (date(2026, 11, 21), 9.5, time(7), datetime(2026, 11, 21, 21, 30, tzinfo=UTC)),
        (date(2026, 12, 31), -10, time(6, 30), datetime(2027, 1, 1, 16, 30, tzinfo=UTC)),
        (date(2026, 11, 21), -4, time(20), datetime(2026, 11, 23, 0, 0, tzinfo=UTC)),
    ],
    ids=["ofcam-hawaii", "utc", "half-hour-east", "new-year-custom-end", "crosses-utc-day"],
)
def test_night_end(night: date, offset: float, local_end: time, expected: datetime) -> None:
    end = night_end(night, offset, local_end)
    assert end == expected
    assert end.tzinfo is UTC


def test_night_end_defaults_to_seven_local() -> None:
    assert night_end(date(2026, 11, 21), -10) == datetime(2026, 11, 22, 17, tzinfo=UTC)


def test_night_end_refuses_an_aware_local_time() -> None:
    with pytest.raises(ValueError, match="naive local time"):
        night_end(date(2026, 11, 21), -10, time(7, tzinfo=UTC))

"""Keywords → metadata: required keywords per product, every form of time real archives
hold, nights in IANA time zones, the night's end per instrument.

Each test loads a real registry from YAML (as a site would) and maps real header
values through :func:`obsflow.receipt.metadata.extract`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from pathlib import Path

import pytest

from obsflow.errors import MetadataError, RegistryError
from obsflow.processing.tracker.grouping import night_end
from obsflow.receipt.header import HeaderValue
from obsflow.receipt.metadata import Metadata, extract
from obsflow.registry import Registry, load_registry

INSTRUMENT = """\
instrument:
  name: SPEC
  prefix: SP
  required: [DATE-OBS, EXPTIME, OBSTYPE]
  keywords: {frame_type: OBSTYPE}
"""


def registry(root: Path, instrument: str = INSTRUMENT, products: str = "") -> Registry:
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(
        instrument
        + """\
products:
  - id: spec_raw
    level: 0
    instrument: SPEC
    filename: 'sp_(?P<frame>\\d{4})\\.fits'
"""
        + products
    )
    return load_registry(root)


def meta(reg: Registry, name: str, header: Mapping[str, HeaderValue]) -> Metadata:
    recognised = reg.recognise(name)
    product = recognised.product
    return extract(header, product, reg.instrument_of(product), recognised.groups, Path(name))


# ------------------------------------------------------------- required


def test_a_pipeline_product_is_not_held_to_the_raw_frames_required_keywords(
    tmp_path: Path,
) -> None:
    reg = registry(
        tmp_path,
        products="""\
  - id: spec_wavecal
    level: 1
    instrument: SPEC
    filename: 'sp_(?P<night>\\d{8})_wave\\.fits'
    time: {from: header, start: DATE-BEG}
""",
    )
    made = meta(reg, "sp_20261121_wave.fits", {"DATE-BEG": "2026-11-22T06:00:00"})
    assert made.start == datetime(2026, 11, 22, 6, tzinfo=UTC)
    with pytest.raises(MetadataError, match="OBSTYPE missing for instrument SPEC"):
        meta(reg, "sp_0001.fits", {"DATE-OBS": "2026-11-22T05:00:00", "EXPTIME": 1.0})


def test_a_product_declares_its_own_required_keywords(tmp_path: Path) -> None:
    reg = registry(
        tmp_path,
        products="""\
  - id: spec_arcsol
    level: 1
    instrument: SPEC
    filename: 'sp_(?P<night>\\d{8})_arcsol\\.fits'
    time: {from: header, start: DATE-BEG}
    required: [DATE-BEG, WAVERMS]
""",
    )
    good: dict[str, HeaderValue] = {"DATE-BEG": "2026-11-22T06:00:00", "WAVERMS": 0.02}
    assert meta(reg, "sp_20261121_arcsol.fits", good).start.hour == 6
    with pytest.raises(MetadataError) as caught:
        meta(reg, "sp_20261121_arcsol.fits", {"DATE-BEG": "2026-11-22T06:00:00"})
    assert "WAVERMS missing for product spec_arcsol" in str(caught.value)


# ------------------------------------------------------------------ time


def test_a_product_timed_by_its_file_name_needs_no_date_obs(tmp_path: Path) -> None:
    reg = registry(
        tmp_path,
        products="""\
  - id: spec_log
    level: 1
    instrument: SPEC
    filename: 'splog_(?P<stamp>\\d{8}_\\d{6})\\.fits'
    time: {from: filename, start: '{stamp}', format: '%Y%m%d_%H%M%S'}
""",
    )
    made = meta(reg, "splog_20261122_053012.fits", {})
    assert made.start == made.date_obs == datetime(2026, 11, 22, 5, 30, 12, tzinfo=UTC)
    assert made.night == date(2026, 11, 21)


@pytest.mark.parametrize(
    ("keywords", "time_rule", "header", "start", "stop"),
    [
        pytest.param(
            "{date_obs: DATE-OBS}",
            "",
            {"DATE-OBS": "2026-11-22T05:01:36.123456789Z", "EXPTIME": 2.0},
            datetime(2026, 11, 22, 5, 1, 36, 123456, tzinfo=UTC),
            datetime(2026, 11, 22, 5, 1, 38, 123456, tzinfo=UTC),
            id="iso-nine-decimals",
        ),
        pytest.param(
            "{date_obs: DATE-OBS, time_obs: UT}",
            "",
            {"DATE-OBS": "2026-11-22", "UT": "05:01:36.5", "EXPTIME": 1.0},
            datetime(2026, 11, 22, 5, 1, 36, 500000, tzinfo=UTC),
            datetime(2026, 11, 22, 5, 1, 37, 500000, tzinfo=UTC),
            id="date-and-time-keyword",
        ),
        pytest.param(
            "{date_obs: DATE-OBS, time_obs: TIME-OBS}",
            "",
            {"DATE-OBS": "14/03/94", "TIME-OBS": "23:10:05", "EXPTIME": 0.0},
            datetime(1994, 3, 14, 23, 10, 5, tzinfo=UTC),
            datetime(1994, 3, 14, 23, 10, 5, tzinfo=UTC),
            id="pre-2000-dd-mm-yy",
        ),
        pytest.param(
            "{date_obs: MJD-OBS}",
            "",
            {"MJD-OBS": 61001.25, "EXPTIME": 60.0},
            datetime(2025, 11, 22, 6, tzinfo=UTC),
            datetime(2025, 11, 22, 6, 1, tzinfo=UTC),
            id="mjd-obs",
        ),
        pytest.param(
            "{}",
            "    time: {from: header, start: DATE-BEG, stop: DATE-END}\n",
            {"DATE-BEG": "2026-11-22T05:00:00", "DATE-END": "2026-11-22T05:10:00.5"},
            datetime(2026, 11, 22, 5, tzinfo=UTC),
            datetime(2026, 11, 22, 5, 10, 0, 500000, tzinfo=UTC),
            id="date-beg-date-end",
        ),
        pytest.param(
            "{}",
            "    time: {from: header, start: UTDATE, start_time: UTSTART, "
            "stop: UTDATE, stop_time: UTEND}\n",
            {"UTDATE": "2026-11-22", "UTSTART": "05:00:00", "UTEND": "05:20:00"},
            datetime(2026, 11, 22, 5, tzinfo=UTC),
            datetime(2026, 11, 22, 5, 20, tzinfo=UTC),
            id="header-date-plus-time-keywords",
        ),
        pytest.param(
            "{}",
            "    time: {from: header, start: MJD-BEG, stop: MJD-END}\n",
            {"MJD-BEG": "61001.5", "MJD-END": "61001.75"},
            datetime(2025, 11, 22, 12, tzinfo=UTC),
            datetime(2025, 11, 22, 18, tzinfo=UTC),
            id="mjd-as-text",
        ),
    ],
)
def test_times_in_every_form_real_archives_hold(
    tmp_path: Path,
    keywords: str,
    time_rule: str,
    header: dict[str, HeaderValue],
    start: datetime,
    stop: datetime,
) -> None:
    instrument = f"instrument:\n  name: SPEC\n  prefix: SP\n  keywords: {keywords}\n"
    reg = registry(
        tmp_path,
        instrument,
        products=f"""\
  - id: spec_any
    level: 0
    instrument: SPEC
    filename: 'any_\\d+\\.fits'
{time_rule}""",
    )
    made = meta(reg, "any_1.fits", header)
    assert abs((made.start - start).total_seconds()) < 1e-3
    assert abs((made.stop - stop).total_seconds()) < 1e-3


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"EXPTIME": 1.0}, "DATE-OBS is missing"),
        ({"DATE-OBS": "2026-11-22", "EXPTIME": 1.0}, "UT is missing"),
        ({"DATE-OBS": "22.11.2026", "UT": "05:00", "EXPTIME": 1.0}, "'22.11.2026' with UT"),
    ],
)
def test_a_time_that_is_still_missing_or_unreadable_is_named(
    tmp_path: Path, header: dict[str, HeaderValue], words: str
) -> None:
    instrument = "instrument:\n  name: SPEC\n  prefix: SP\n  keywords: {time_obs: UT}\n"
    reg = registry(tmp_path, instrument)
    with pytest.raises(MetadataError) as caught:
        meta(reg, "sp_0001.fits", header)
    assert words in str(caught.value)
    assert "expected an ISO date-time" in str(caught.value) or "time of day" in str(caught.value)


# ---------------------------------------------------------- zones, nights


SANTIAGO = """\
instrument:
  name: SPEC
  prefix: SP
  timezone: America/Santiago
  night_end: 06:30
"""


@pytest.mark.parametrize(
    ("moment", "night"),
    [
        # January: Chilean summer time, UTC-3; local noon is 15:00 UTC
        (datetime(2026, 1, 15, 14, 59, tzinfo=UTC), date(2026, 1, 14)),
        (datetime(2026, 1, 15, 15, 1, tzinfo=UTC), date(2026, 1, 15)),
        # July: standard time, UTC-4; local noon is 16:00 UTC
        (datetime(2026, 7, 15, 15, 59, tzinfo=UTC), date(2026, 7, 14)),
        (datetime(2026, 7, 15, 16, 1, tzinfo=UTC), date(2026, 7, 15)),
    ],
)
def test_nights_follow_an_iana_zone_with_daylight_saving(
    tmp_path: Path, moment: datetime, night: date
) -> None:
    reg = registry(tmp_path, SANTIAGO)
    header: dict[str, HeaderValue] = {"DATE-OBS": moment.isoformat(), "EXPTIME": 1.0}
    assert meta(reg, "sp_0001.fits", header).night == night


def test_the_night_end_is_per_instrument_in_its_zone(tmp_path: Path) -> None:
    instrument = registry(tmp_path, SANTIAGO).instruments["SPEC"]
    assert instrument.night_end == time(6, 30)  # unquoted 06:30 in YAML 1.1 is 390
    summer = night_end(date(2026, 1, 14), instrument.zone, instrument.night_end)
    winter = night_end(date(2026, 7, 14), instrument.zone, instrument.night_end)
    assert summer == datetime(2026, 1, 15, 9, 30, tzinfo=UTC)
    assert winter == datetime(2026, 7, 15, 10, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ("  timezone: America/Santiagu\n", "unknown time zone 'America/Santiagu'"),
        ("  timezone: UTC\n  utc_offset_hours: -4\n", "either timezone"),
        ("  night_end: '25:00'\n", "night_end"),
    ],
)
def test_a_bad_zone_or_night_end_is_a_registry_error_at_its_line(
    tmp_path: Path, lines: str, words: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        registry(tmp_path, "instrument:\n  name: SPEC\n  prefix: SP\n" + lines)
    assert words in str(caught.value)
    assert "spec.yaml:" in str(caught.value)


# ------------------------------------------------- value maps, computed values

MAPPED = """\
instrument:
  name: SPEC
  prefix: SP
  keywords:
    frame_type: {keyword: OBSTYPE, map: {Bias: BIAS, Arc: ARC, Object: OBJECT, Dome Flat: FLAT}}
    exptime: "ITIME * COADDS"
    object: TARGNAME
    filter: "grating + '/' + slit_w"
"""


@pytest.mark.parametrize(
    ("obstype", "frame_type"),
    [("Arc", "ARC"), ("Bias", "BIAS"), ("  dome flat ", "FLAT"), ("Twilight", "Twilight")],
)
def test_a_value_map_gives_shared_words_and_keeps_unknown_ones(
    tmp_path: Path, obstype: str, frame_type: str
) -> None:
    reg = registry(tmp_path, MAPPED)
    header: dict[str, HeaderValue] = {
        "DATE-OBS": "2026-11-22T05:00:00",
        "OBSTYPE": obstype,
        "ITIME": 2.5,
        "COADDS": 4,
        "GRATING": "600/4000",
        "SLIT-W": "1.0",
    }
    made = meta(reg, "sp_0001.fits", header)
    assert made.frame_type == frame_type
    assert made.exptime == 10.0
    assert made.stop == made.start.replace(second=10)
    assert made.filter == "600/4000/1.0"


def test_a_computed_value_with_a_missing_operand_is_none(tmp_path: Path) -> None:
    reg = registry(tmp_path, MAPPED)
    made = meta(reg, "sp_0001.fits", {"DATE-OBS": "2026-11-22T05:00:00", "ITIME": 2.5})
    assert made.exptime is None and made.filter is None and made.frame_type is None


@pytest.mark.parametrize(
    ("keywords", "words"),
    [
        ("{exptime: 'ITIME ** 2'}", "Pow is not allowed"),
        ("{exptime: 'open(x)'}", "Call is not allowed"),
        ("{frame_type: {keyword: OBSTYPE, value: 'A'}}", "either 'keyword"),
        ("{frame_type: {value: 'A', map: {a: b}}}", "'map' translates"),
    ],
)
def test_a_bad_value_rule_is_a_registry_error(tmp_path: Path, keywords: str, words: str) -> None:
    with pytest.raises(RegistryError) as caught:
        registry(tmp_path, f"instrument:\n  name: SPEC\n  prefix: SP\n  keywords: {keywords}\n")
    assert words in str(caught.value)
    assert "spec.yaml:4" in str(caught.value)

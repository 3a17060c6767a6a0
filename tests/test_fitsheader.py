"""obsflow.receipt.header against astropy on real files, and on every kind of broken input."""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from obsflow.errors import FitsError
from obsflow.receipt.header import BLOCK, Header, HeaderValue, parse_header, walk_hdus

# --- helpers ---------------------------------------------------------------------------------


def raw_header(*cards: str, end: bool = True) -> bytes:
    """Header bytes from card texts (each padded to 80), END appended, padded to a block."""
    text = "".join(c.ljust(80) for c in (*cards, "END") if c != "END" or end)
    text += " " * (-len(text) % BLOCK)
    return text.encode("latin-1")  # latin-1: lets tests put any byte in a card


MINIMAL = ("SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =    0")


def astropy_values(header: fits.Header) -> dict[str, HeaderValue]:
    """Keyword -> value as astropy reads it, first occurrence, no commentary cards."""
    values: dict[str, HeaderValue] = {}
    for card in header.cards:
        key = card.keyword.upper()
        if key not in ("", "COMMENT", "HISTORY") and key not in values:
            values[key] = header[card.keyword]
    return values


def assert_same_as_astropy(ours: Header, theirs: fits.Header) -> None:
    expected = astropy_values(theirs)
    assert set(ours.cards) == set(expected)
    for key, value in expected.items():
        assert (key, type(ours[key]), ours[key]) == (key, type(value), value)


def walk(path: Path) -> list[tuple[int, Header]]:
    with path.open("rb") as f:
        return walk_hdus(f, path.stat().st_size, name=path)


def read_head(path: Path, chunk: int = 4 * BLOCK) -> Header:
    """Parse the primary header the way receipt does: from chunks read in one pass."""
    with path.open("rb") as f:
        buf = f.read(chunk)
        while (header := parse_header(buf, name=path)) is None:
            more = f.read(chunk)
            assert more, "no END card"
            buf += more
    return header


def assert_refused(path: Path, *needles: str) -> FitsError:
    with pytest.raises(FitsError) as info:
        walk(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    return info.value


# --- files written by astropy ----------------------------------------------------------------


def rich_header() -> fits.Header:
    h = fits.Header()
    h["OBJECT"] = ("NGC 1234", "target name")
    h["OBSERVER"] = "O'Brien and D'Arcy"
    h["LEADSP"] = "   three leading blanks"
    h["TRAILSP"] = "trailing blanks    "
    h["EMPTYSTR"] = ""
    h["BLANKSTR"] = "     "
    h["SLASHES"] = ("a/b // c", "comment / with slash")
    h["QUOTES"] = ("''", "only quotes")
    h["DATE-OBS"] = "2024-03-01T22:13:05.123"
    h["EXPTIME"] = (300.0, "[s] exposure time")
    h["RA"] = 123.456789012345
    h["DEC"] = -45.000001
    h["TINY"] = 1.234e-300
    h["HUGE"] = 6.02214076e23
    h["NEGZERO"] = -0.0
    h["NEGINT"] = -42
    h["BIGINT"] = 2**62
    h["FLAG"] = True
    h["NOFLAG"] = False
    h["UNDEF"] = (None, "no value on purpose")
    h["LONGSTR"] = "a long string, " * 12 + "it's done"
    h["LONGCOM"] = ("another long string & more " * 5, "with a comment too")
    h["HIERARCH ESO DET DIT"] = (1.5, "[s] integration")
    h["HIERARCH ESO OBS NAME"] = "survey field 12"
    h["HIERARCH ESO TEL AIRM START"] = 1.234
    h["HIERARCH ESO INS FILT1 ID"] = 7
    h["HIERARCH ESO SEQ FLAG"] = True
    h.add_comment("a comment = with an equals sign")
    h.add_history("reduced by nobody")
    h.add_history("x" * 150)  # long HISTORY is split over several cards
    h.add_blank("")
    for i in range(40):  # bring the header to a realistic ~90 cards
        h[f"KEY{i:03d}"] = (i * 1.5 if i % 2 else f"value {i}", f"comment {i}")
    return h


DTYPES = [np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64, np.uint16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_primary_image_matches_astropy(tmp_path: Path, dtype: type) -> None:
    path = tmp_path / "image.fits"
    cube: np.ndarray[Any, Any] = (np.arange(7 * 13 * 3) % 100).astype(dtype).reshape(3, 13, 7)
    fits.PrimaryHDU(cube, header=rich_header()).writeto(path)
    ours = read_head(path)
    assert_same_as_astropy(ours, fits.getheader(path))
    with fits.open(path) as hdul:
        info = hdul.fileinfo(0)
    assert (ours.size, ours.data_size) == (info["datLoc"], info["datSpan"])
    assert ours["BITPIX"] == np.dtype(dtype).itemsize * 8 * (-1 if dtype in DTYPES[4:6] else 1)
    if dtype is np.uint16:
        assert ours["BZERO"] == 32768
    assert [offset for offset, _ in walk(path)] == [0]


def test_values_of_rich_header(tmp_path: Path) -> None:
    path = tmp_path / "rich.fits"
    fits.PrimaryHDU(header=rich_header()).writeto(path)
    h = read_head(path, chunk=BLOCK)
    assert h["OBSERVER"] == "O'Brien and D'Arcy"
    assert h["LEADSP"] == "   three leading blanks"
    assert h["TRAILSP"] == "trailing blanks"
    assert h["QUOTES"] == "''"
    assert h["LONGSTR"] == "a long string, " * 12 + "it's done"
    assert h["UNDEF"] is None and "UNDEF" in h
    assert h["HIERARCH ESO DET DIT"] == h["eso det dit"] == 1.5
    assert h.get("MISSING", 5) == 5 and "MISSING" not in h and not h.__contains__(3)
    assert "COMMENT" not in h and "HISTORY" not in h
    assert h.data_size == 0
    assert pickle.loads(pickle.dumps(h)) == h  # headers can go to worker processes


def multi_extension(path: Path) -> None:
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column("id", "J", array=np.arange(5)),
            fits.Column("name", "10A", array=[f"star{i}" for i in range(5)]),
            fits.Column("spec", "PE()", array=[np.ones(i + 3, np.float32) for i in range(5)]),
        ],
        name="CATALOG",
    )
    ascii_table = fits.TableHDU.from_columns([fits.Column("x", "E15.7", array=[1.0, 2.0])])
    fits.HDUList(
        [
            fits.PrimaryHDU(header=rich_header()),
            fits.ImageHDU(np.ones((13, 7), np.float32), name="SCI"),
            fits.ImageHDU(np.ones((3, 5), np.int16), name="DQ"),
            table,
            ascii_table,
            fits.ImageHDU(name="EMPTY"),
        ]
    ).writeto(path)


def test_walk_matches_astropy(tmp_path: Path) -> None:
    path = tmp_path / "mef.fits"
    multi_extension(path)
    hdus = walk(path)
    with fits.open(path) as hdul:
        infos = [hdul.fileinfo(i) for i in range(len(hdul))]
    assert len(hdus) == len(infos) == 6
    for i, ((offset, header), info) in enumerate(zip(hdus, infos, strict=True)):
        assert offset == info["hdrLoc"]
        assert offset + header.size == info["datLoc"]
        assert header.data_size == info["datSpan"]
        assert_same_as_astropy(header, fits.getheader(path, ext=i))
    assert hdus[3][1]["PCOUNT"] != 0  # the variable-length column lives in the heap
    assert hdus[0][1]["NAXIS"] == 0


def test_parse_extension_at_offset(tmp_path: Path) -> None:
    path = tmp_path / "mef.fits"
    multi_extension(path)
    data = path.read_bytes()
    for offset, header in walk(path):
        assert parse_header(memoryview(data), name=path, offset=offset) == header
        assert parse_header(bytearray(data), name=path, offset=offset) == header


def test_random_groups(tmp_path: Path) -> None:
    path = tmp_path / "groups.fits"
    data = fits.GroupData(
        np.ones((10, 1, 2, 3), np.float32),
        parnames=["UU", "VV"],
        pardata=[np.zeros(10, np.float32), np.ones(10, np.float32)],
        bitpix=-32,
    )
    fits.GroupsHDU(data).writeto(path)
    [(_, header)] = walk(path)
    with fits.open(path) as hdul:
        assert header.data_size == hdul.fileinfo(0)["datSpan"]
    assert header.data_size == BLOCK  # 10 groups * (2 + 6) * 4 bytes, padded


def test_streaming_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "rich.fits"
    fits.PrimaryHDU(np.zeros((50, 50), np.int16), header=rich_header()).writeto(path)
    data = path.read_bytes()
    full = parse_header(data, name=path)
    assert full is not None and full.size == 3 * BLOCK
    end_card = data.index(b"END" + b" " * 77)
    for n in (1, 9, 10, 79, 80, 81, BLOCK, end_card + 7):
        assert parse_header(data[:n], name=path) is None
    for n in (end_card + 8, end_card + 80, full.size, len(data)):
        assert parse_header(data[:n], name=path) == full


# --- hand-written cards: the value grammar ---------------------------------------------------

ODD_CARDS = [
    "DEXP    =               1.5D3 / Fortran exponent",
    "DEXPNEG =             -2.25D-2",
    "LOWEXP  =              1.5e+03",
    "DOT     =                   .5",
    "TRAIL   =                   5.",
    "PLUS    =                 +007",
    "FREEINT = 12",
    "FREEBOOL= F / free format",
    "QUOTE   = 'it''s' / c",
    "SLASH   = 'a/b'/no blank before the comment",
    "LEAD    = '  lead  '",
    "ONLYQ   = ''''",
    "UNDEF   =",
    "UNDEF2  =                      / only a comment",
    "DUP     =                    1",
    "DUP     =                    2",
    "LONG    = 'abc&'",
    "CONTINUE  'def &'  / first part",
    "CONTINUE  'ghi''s&'",
    "CONTINUE  '' / a comment only",
    "NOTLONG = 'ends with &'",
    "HIERARCH ESO DET DIT = 1.0 / dit",
    "HIERARCH ESO OBS TARG NAME = 'M31'",
    "COMMENT   anything = 'here' is ignored",
    "COMMENT = 'commentary even with a value indicator'",
    "HISTORY   also ignored",
    "",
    "BIGINT  = 123456789012345678901234567890",
]


def test_odd_cards_match_astropy() -> None:
    raw = raw_header(*MINIMAL, *ODD_CARDS)
    ours = parse_header(raw)
    assert ours is not None
    assert_same_as_astropy(ours, fits.Header.fromstring(raw.decode()))
    assert ours["LONG"] == "abcdef ghi's"
    assert ours["NOTLONG"] == "ends with &"
    assert ours["DUP"] == 1
    assert ours["ESO OBS TARG NAME"] == "M31"
    assert "COMMENT" not in ours


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("12abc", "12abc"),
        ("'unterminated", "'unterminated"),
        ("'x' junk", "'x' junk"),
        ("(1.0, 2.0) / complex", "(1.0, 2.0)"),
        ("INF", "INF"),
        ("nan", "nan"),
        ("1_000", "1_000"),
        ("1.5E", "1.5E"),
        ("t", "t"),
        ("+", "+"),
    ],
)
def test_malformed_values_are_kept_raw(field: str, value: str) -> None:
    header = parse_header(raw_header(*MINIMAL, f"ODD     = {field}"))
    assert header is not None and header["ODD"] == value


def test_record_valued_card_is_a_plain_string() -> None:
    raw = raw_header(*MINIMAL, "DP1     = 'AXIS.1: 1'", "DP1     = 'AXIS.2: 2.5'")
    ours = parse_header(raw)
    assert ours is not None
    assert ours["DP1"] == fits.Header.fromstring(raw.decode())["DP1"] == "AXIS.1: 1"


def test_card_without_value_indicator_is_text_like_astropy() -> None:
    header = parse_header(raw_header(*MINIMAL, "NOEQ     hello world"))
    assert header is not None and header["NOEQ"] == " hello world"


# --- refusals --------------------------------------------------------------------------------


def write(tmp_path: Path, data: bytes, name: str = "bad.fits") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def good_file(tmp_path: Path, data: np.ndarray | None = None) -> Path:
    path = tmp_path / "good.fits"
    fits.PrimaryHDU(data).writeto(path)
    return path


def test_empty(tmp_path: Path) -> None:
    path = write(tmp_path, b"")
    assert_refused(path, "empty file")
    with pytest.raises(FitsError, match="empty file"):
        parse_header(b"", name=path)


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + bytes(BLOCK),
        b"hello, this is a text file\n" * 200,
        raw_header("SIMPLE  =                    F", *MINIMAL[1:]),
        raw_header("XTENSION= 'IMAGE   '", *MINIMAL[1:]),
        b"SIMPLEX",
    ],
    ids=["png", "text", "simple-false", "xtension-first", "short"],
)
def test_not_fits(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data)
    assert_refused(path, "not a FITS file: first card is not SIMPLE = T")
    if len(data) > 10:  # refused from the first card, without waiting for END
        with pytest.raises(FitsError, match="not a FITS file"):
            parse_header(data[:80], name=path)


def test_no_end(tmp_path: Path) -> None:
    data = raw_header(*MINIMAL, end=False) + raw_header("BLANK   = 1", end=False)
    path = write(tmp_path, data)
    assert_refused(path, "header has no END card")
    assert parse_header(data, name=path) is None


def test_truncated_data(tmp_path: Path) -> None:
    path = good_file(tmp_path, np.zeros((100, 100), np.float64))
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:40000])
    assert_refused(path, "truncated", f"{size:,}", "40,000")


def test_truncated_in_header(tmp_path: Path) -> None:
    path = tmp_path / "rich.fits"
    fits.PrimaryHDU(header=rich_header()).writeto(path)
    path.write_bytes(path.read_bytes()[:4000])  # the header takes three blocks
    assert_refused(path, "header has no END card", "4,000")


def test_truncated_in_header_padding(tmp_path: Path) -> None:
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])  # END is there, the padding is not
    assert_refused(path, "truncated", "2,880", "1,000")


def test_truncated_padding(tmp_path: Path) -> None:
    path = good_file(tmp_path, np.zeros(10, np.uint8))
    path.write_bytes(path.read_bytes()[: BLOCK + 10])
    assert_refused(path, "truncated", "5,760", "2,890")


def test_truncated_extension(tmp_path: Path) -> None:
    path = tmp_path / "mef.fits"
    multi_extension(path)
    hdus = walk(path)
    cut = hdus[2][0] + hdus[2][1].size + 100
    path.write_bytes(path.read_bytes()[:cut])
    assert_refused(path, "truncated", "extension 2", f"{hdus[2][0]:,}", f"{cut:,}")


@pytest.mark.parametrize(
    ("card", "needle"),
    [
        ("OBSERVER= 'Ren\xe9'", "0xe9"),
        ("OBSERVER= 'tab\there'", "0x09"),
        ("OBSERVER= 'nul\x00'", "0x00"),
    ],
)
def test_non_printable(tmp_path: Path, card: str, needle: str) -> None:
    path = write(tmp_path, raw_header(*MINIMAL, card))
    assert_refused(path, "non-printable", needle, "card 4")


def test_non_ascii_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, raw_header(*MINIMAL, "OBSERVER= 'Ren\xc3\xa9'"))  # UTF-8 bytes
    assert_refused(path, "non-printable", "0xc3")


@pytest.mark.parametrize(
    ("tail", "needles"),
    [
        (bytes(100), ("incomplete", "100 stray bytes", "not a multiple of 2880")),
        (b" " * BLOCK, ("extension 1 at byte 2,880", "not a FITS extension")),
        (b"x" * BLOCK, ("extension 1 at byte 2,880", "not a FITS extension")),
        (bytes(BLOCK) + b"\x01" + bytes(BLOCK - 1), ("extension 1", "not a FITS extension")),
        (bytes(BLOCK + 10), ("extension 1", "not a FITS extension")),
    ],
    ids=["partial-zeros", "blank-block", "garbage-block", "zeros-then-garbage", "zeros-partial"],
)
def test_trailing_bytes(tmp_path: Path, tail: bytes, needles: tuple[str, ...]) -> None:
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes() + tail)
    assert_refused(path, *needles)


def test_trailing_zero_blocks_are_accepted_like_astropy(tmp_path: Path) -> None:
    path = good_file(tmp_path, np.ones(5, np.int16))
    path.write_bytes(path.read_bytes() + bytes(2 * BLOCK))
    assert [offset for offset, _ in walk(path)] == [0]


def test_bad_extension_header(tmp_path: Path) -> None:
    path = tmp_path / "mef.fits"
    multi_extension(path)
    offset = walk(path)[1][0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"YTENSION"
    path.write_bytes(bytes(data))
    assert_refused(path, f"extension 1 at byte {offset:,}", "not a FITS extension")


@pytest.mark.parametrize(
    ("cards", "needle"),
    [
        (("BITPIX  = 'abc'", "NAXIS   = 0"), "malformed BITPIX value 'abc'"),
        (("BITPIX  = 12", "NAXIS   = 0"), "malformed BITPIX value 12"),
        (("BITPIX  = T", "NAXIS   = 0"), "malformed BITPIX value True"),
        (("NAXIS   = 0",), "missing required keyword BITPIX"),
        (("BITPIX  = 8", "NAXIS   = 1.5"), "malformed NAXIS value 1.5"),
        (("BITPIX  = 8", "NAXIS   = 1000"), "malformed NAXIS value 1000"),
        (("BITPIX  = 8", "NAXIS   = 2", "NAXIS1  = 10"), "missing required keyword NAXIS2"),
        (("BITPIX  = 8", "NAXIS   = 1", "NAXIS1  = -10"), "malformed NAXIS1 value -10"),
        (("BITPIX  = 8", "NAXIS   = 1", "NAXIS1  = 12abc"), "malformed NAXIS1 value '12abc'"),
        (("BITPIX  = 8", "NAXIS   = 1", "NAXIS1  ="), "malformed NAXIS1 value None"),
        (("BITPIX  = 8", "NAXIS   = 1", "NAXIS1  = 1", "GCOUNT  = 'x'"), "malformed GCOUNT"),
    ],
)
def test_bad_structural_keyword(tmp_path: Path, cards: tuple[str, ...], needle: str) -> None:
    path = write(tmp_path, raw_header("SIMPLE  =                    T", *cards))
    assert_refused(path, needle)
    with pytest.raises(FitsError, match=r"malformed|missing"):
        parse_header(path.read_bytes(), name=path)


def test_walk_names_the_file_given(tmp_path: Path) -> None:
    with pytest.raises(FitsError) as info:
        walk_hdus(io.BytesIO(b"junk" * 1000), 4000, name="incoming/frame-0001.fits")
    assert str(info.value).startswith("incoming/frame-0001.fits: not a FITS file")
    assert info.value.path == Path("incoming/frame-0001.fits")


def test_header_written_by_cfitsio(tmp_path: Path) -> None:
    fitsio = pytest.importorskip("fitsio")
    path = tmp_path / "cfitsio.fits"
    records = [
        {"name": "OBJECT", "value": "M 31", "comment": "target"},
        {"name": "EXPTIME", "value": 12.5},
        {"name": "NCOMBINE", "value": 3},
        {"name": "FLAG", "value": True},
        {"name": "QUOTE", "value": "it's"},
        {"name": "TINY", "value": 1.5e-200},
        {"name": "LONGSTR", "value": "y" * 150},
    ]
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(np.ones((4, 6), np.float32), header=records)
        f.write(np.arange(10, dtype=np.int32), extname="SCI")
    hdus = walk(path)
    assert len(hdus) == 2
    for i, (_, header) in enumerate(hdus):
        assert_same_as_astropy(header, fits.getheader(path, ext=i))


def test_corrupted_bytes_give_fits_error_or_a_header(tmp_path: Path) -> None:
    """Random damage anywhere in the headers never escapes as anything but FitsError."""
    path = tmp_path / "mef.fits"
    multi_extension(path)
    pristine = path.read_bytes()
    header_bytes = [i for offset, h in walk(path) for i in range(offset, offset + h.size)]
    rng = np.random.default_rng(7)
    for _ in range(300):
        data = bytearray(pristine)
        for i in rng.choice(header_bytes, size=int(rng.integers(1, 4))):
            data[i] = int(rng.choice([0, 32, 39, 47, 61, 65, 126, 200, *b"0123456789'/&=TF"]))
        cut = int(rng.integers(0, len(data) + 1)) if rng.random() < 0.2 else len(data)
        damaged = write(tmp_path, bytes(data[:cut]), "damaged.fits")
        try:
            walk(damaged)
        except FitsError as e:
            assert str(damaged) in str(e)
        with contextlib.suppress(FitsError):
            parse_header(bytes(data[:cut]), name=damaged)


def test_walk_hdus_with_the_primary_already_parsed_agrees_and_still_finds_truncation(
    tmp_path: Path,
) -> None:
    path = tmp_path / "two.fits"
    fits.HDUList(
        [fits.PrimaryHDU(np.zeros((4, 4), dtype=np.int16)), fits.ImageHDU(np.ones((8, 8)))]
    ).writeto(path)
    data = path.read_bytes()
    primary = parse_header(data, name=path)
    assert primary is not None
    with path.open("rb") as f:
        assert walk_hdus(f, len(data), name=path, primary=primary) == walk_hdus(
            f, len(data), name=path
        )
    cut = tmp_path / "cut.fits"
    cut.write_bytes(data[: len(data) - 2880])
    with cut.open("rb") as f, pytest.raises(FitsError, match="truncated"):
        walk_hdus(f, len(data) - 2880, name=cut, primary=primary)

"""Read FITS headers from raw bytes, and check that a FITS file is structurally complete.

Two entry points:

* :func:`parse_header` parses one header from a bytes buffer. Receipt reads each incoming
  file once, as a stream: it calls this on the first chunk(s), gets ``None`` back while the
  END card has not arrived yet, and keeps streaming the rest of the file through sha256.
* :func:`walk_hdus` seeks from header to header through an open file and proves that every
  HDU is complete (header and data inside the file, no stray trailing bytes). It reads only
  headers, never data.

Why hand-written rather than ``astropy.io.fits``: this runs once per received file on the
hot path, on bytes already in memory. Astropy builds a ``Card`` object per card and parses
each value with regular expressions when it is read: reading every value of an 80-card
header costs it ~12x more than this parser, and even its lazy ``getheader`` is ~4x slower
(``benchmarks/header.py``; ``fitsio.read_header`` is slower still and a C dependency). A
FITS header is a simple fixed-format structure, so one pass of string slicing gives the same
values: the tests check every keyword against ``astropy.io.fits.getheader``.

Values follow astropy: ``T``/``F`` -> bool; integers -> int; reals (``E`` or Fortran ``D``
exponent) -> float; quoted strings with ``''`` unescaped, trailing blanks dropped and
leading blanks kept; an empty value field -> ``None``; a card without the ``= `` value
indicator -> its text after column 8 (as astropy). CONTINUE long strings are joined (the
``&`` convention), ``HIERARCH A B C = v`` gives key ``A B C``. Unlike astropy, complex values,
non-standard numbers (``1.5 E3``) and any malformed value are kept as the raw value text
rather than raising; record-valued cards (``DP1 = 'AXIS.1: 1'``) are plain strings. Only the
structural keywords (BITPIX, NAXIS, NAXISn, PCOUNT, GCOUNT) must be well formed. Keys are
upper-cased; the first occurrence of a keyword wins; COMMENT, HISTORY and blank keywords are
not kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from obsflow.errors import FitsError

HeaderValue = str | int | float | bool | None

BLOCK = 2880
_CARD = 80
_END = b"END     "
_PRINTABLE = bytes(range(32, 127))
_COMMENTARY = frozenset({"", "COMMENT", "HISTORY"})
_BITPIX = frozenset({8, 16, 32, 64, -32, -64})
_SIMPLE = b"SIMPLE  = "
_XTENSION = b"XTENSION= "
MAX_HEADER = 4 << 20
"""The most bytes one header may take before its END card (``receipt.max_header_bytes``):
26,000 cards, more than any instrument writes; past it, the file is refused without
being read further or held in memory."""


@dataclass(frozen=True)
class Header(Mapping[str, HeaderValue]):
    """One parsed FITS header: its keyword values and the bytes it and its data occupy.

    A read-only mapping whose lookups ignore case and a ``HIERARCH`` prefix, so a
    registry may name ``HIERARCH ESO DET DIT`` or ``ESO DET DIT`` alike.
    """

    cards: Mapping[str, HeaderValue]
    size: int  # bytes of the header in the file, padding to BLOCK included
    data_size: int  # bytes of the data unit that follows, padding to BLOCK included

    def get(self, key: str, default: HeaderValue = None) -> HeaderValue:  # type: ignore[override]
        return self.cards.get(_norm(key), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and _norm(key) in self.cards

    def __getitem__(self, key: str) -> HeaderValue:
        return self.cards[_norm(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.cards)

    def __len__(self) -> int:
        return len(self.cards)


def _norm(key: str) -> str:
    key = key.strip().upper()
    return key[9:].strip() if key.startswith("HIERARCH ") else key


def parse_header(
    buf: bytes | bytearray | memoryview,
    *,
    name: Path | str = "<buffer>",
    offset: int = 0,
    scanned: int = 0,
    limit: int = MAX_HEADER,
) -> Header | None:
    """Parse the header starting at ``buf[offset:]``.

    Return None if the END card is not within ``buf`` yet (the caller reads more and calls
    again, with ``scanned``: the whole blocks of the header it passed before, which were
    checked already, so that reading a header costs time linear in its size). At offset 0
    the header must be a primary header (``SIMPLE = T``); at any other offset it must be an
    extension header (``XTENSION``). The data unit starts at ``offset + header.size``.
    Raise FitsError naming ``name`` when the bytes cannot be a FITS header; this is
    detected as early as possible (first card, non-printable bytes), before END arrives,
    and when ``limit`` bytes hold no END card.
    """
    if len(buf) == 0:
        raise FitsError(name, "empty file")
    mv = memoryview(buf).cast("B")
    return _parse(mv, offset, name, primary=offset == 0, where="", scanned=scanned, limit=limit)


def walk_hdus(
    f: BinaryIO,
    size: int,
    *,
    name: Path | str,
    primary: Header | None = None,
    limit: int = MAX_HEADER,
) -> list[tuple[int, Header]]:
    """Walk every HDU of the open file ``f`` of ``size`` bytes by seeking.

    ``primary``, when the caller has parsed the primary header already, is used rather
    than read and parsed again (receipt reads each header once).

    Return ``(offset, header)`` for each HDU. Raise FitsError if a header is malformed or has
    no END card, if an HDU's header or data runs past ``size`` (truncated), or if bytes follow
    the last HDU that are not a complete extension. The only trailing bytes accepted are whole
    2880-byte blocks of zero bytes, which astropy also accepts (with a warning).
    """
    if size <= 0:
        raise FitsError(name, "empty file")
    hdus: list[tuple[int, Header]] = []
    offset = 0
    while offset < size:
        where = f"extension {len(hdus)} at byte {offset:,}: " if hdus else ""
        if hdus and size - offset < BLOCK:
            raise FitsError(
                name,
                f"incomplete: {size - offset:,} stray bytes after the last HDU (which ends at "
                f"byte {offset:,}); the file size {size:,} is not a multiple of {BLOCK}",
            )
        try:
            if primary is not None and not hdus:
                header = primary
            else:
                header = _read_header(f, offset, size, name, where, primary=not hdus, limit=limit)
        except FitsError:
            if hdus and _all_zero(f, offset, size):
                break  # trailing zero blocks: astropy reads such files too
            raise
        end = offset + header.size + header.data_size
        if end > size:
            raise FitsError(
                name,
                f"truncated: {where}header declares {end - offset:,} bytes (header "
                f"{header.size:,} + data {header.data_size:,}) ending at byte {end:,}, "
                f"file has {size:,}",
            )
        hdus.append((offset, header))
        offset = end
    return hdus


def _read_header(
    f: BinaryIO, offset: int, size: int, name: Path | str, where: str, *, primary: bool, limit: int
) -> Header:
    """Read the header at ``offset``, a block more at a time (a bigger read once past the
    first: most headers fit one block); each block is scanned once."""
    f.seek(offset)
    buf = bytearray()
    step = BLOCK
    while True:
        scanned = len(buf)
        chunk = f.read(min(step, size - offset - len(buf), limit + BLOCK - len(buf)))
        buf += chunk
        step = 16 * BLOCK
        mv = memoryview(buf)
        try:
            header = _parse(mv, 0, name, primary=primary, where=where, scanned=scanned, limit=limit)
        finally:
            mv.release()
        if header is not None:
            return header
        if not chunk or offset + len(buf) >= size:
            raise FitsError(name, f"{where}header has no END card (the file ends at byte {size:,})")


def _all_zero(f: BinaryIO, offset: int, size: int) -> bool:
    """Whether ``f[offset:size]`` is all zero bytes and a whole number of blocks."""
    if (size - offset) % BLOCK:
        return False
    f.seek(offset)
    step = BLOCK  # look at one block before reading further
    while offset < size:
        chunk = f.read(min(step, size - offset))
        if not chunk or chunk.count(0) != len(chunk):
            return False
        offset += len(chunk)
        step = 1 << 20
    return True


def _parse(
    mv: memoryview,
    offset: int,
    name: Path | str,
    *,
    primary: bool,
    where: str,
    scanned: int = 0,
    limit: int = MAX_HEADER,
) -> Header | None:
    # The first card tells FITS from anything else; check it before looking for END.
    first = bytes(mv[offset : offset + _CARD])
    expect = _SIMPLE if primary else _XTENSION
    if first[:10] != expect[: len(first[:10])]:
        detail = (
            "not a FITS file: first card is not SIMPLE = T"
            if primary
            else "not a FITS extension: first card is not XTENSION (stray bytes after an HDU?)"
        )
        raise FitsError(name, where + detail)
    # Find the END card block by block (cards never straddle a block), checking every byte of
    # the header area is printable ASCII (FITS 4.0, section 4.1.1).
    pos = offset + scanned // BLOCK * BLOCK  # (the blocks before were scanned already)
    end = -1
    while end < 0 and pos < len(mv):
        block = bytes(mv[pos : pos + BLOCK])
        if block.translate(None, _PRINTABLE):
            bad = next(i for i, b in enumerate(block) if not 32 <= b < 127)
            raise FitsError(
                name,
                f"{where}non-printable byte 0x{block[bad]:02x} in the header at byte "
                f"{pos + bad:,} (card {(pos + bad - offset) // _CARD + 1}); "
                "a FITS header holds ASCII text only",
            )
        hit = block.find(_END)
        while hit > 0 and hit % _CARD:
            hit = block.find(_END, hit + 1)
        end = hit if hit < 0 else pos + hit
        pos += BLOCK
    if len(first) < _CARD:
        return None
    kind = first[10:].decode().strip()
    if primary and _scalar(kind) is not True:
        raise FitsError(name, "not a FITS file: first card is not SIMPLE = T")
    if not primary and _string(kind) is None:
        raise FitsError(name, f"{where}malformed XTENSION value {kind!r}")
    if (end < 0 and len(mv) - offset >= limit) or end + _CARD - offset > limit:
        raise FitsError(
            name,
            f"{where}header has no END card in its first {limit:,} bytes "
            "(receipt.max_header_bytes)",
        )
    if end < 0:
        return None
    cards = _cards(bytes(mv[offset:end]).decode("ascii"))
    data = _data_size(cards, name, where, primary=primary)
    size = (end + _CARD - offset + BLOCK - 1) // BLOCK * BLOCK
    return Header(cards, size, data)  # a plain dict, typed read-only: Header pickles


def _cards(text: str) -> dict[str, HeaderValue]:
    cards: dict[str, HeaderValue] = {}
    long_key: str | None = None  # key of the last string value, which CONTINUE may extend
    long_parts: list[str] = []
    for i in range(0, len(text), _CARD):
        card = text[i : i + _CARD]
        key = card[:8].rstrip().upper()
        if key in _COMMENTARY:
            long_key = None
            continue
        if key == "CONTINUE":
            rest = card[8:].strip()
            piece = "" if not rest or rest[0] == "/" else _string(rest)
            if long_key is None or piece is None:
                long_key = None
                continue
            if len(long_parts) == 1 and long_parts[0].endswith("&"):
                long_parts[0] = long_parts[0][:-1]
            long_parts.append(piece[:-1] if piece.endswith("&") else piece)
            cards[long_key] = "".join(long_parts).rstrip()
            continue
        long_key = None
        if card[8:10] == "= ":
            field = card[10:]
        elif key == "HIERARCH" and (eq := card.find("=", 9)) > 0:
            key = card[9:eq].strip().upper()
            field = card[eq + 1 :]
        else:  # no value indicator: astropy keeps the text as the value
            cards.setdefault(key, card[8:].rstrip())
            continue
        if key in cards:
            continue
        s = field.strip()
        if s[:1] == "'":
            string = _string(s)
            cards[key] = s if string is None else string  # unterminated: keep the raw text
            if string is not None:
                long_key, long_parts = key, [string]
        else:
            cards[key] = _scalar(s)
    return cards


def _scalar(s: str) -> HeaderValue:
    """The value of a stripped value field that is not a string."""
    slash = s.find("/")
    if slash >= 0:
        s = s[:slash].rstrip()
    if s.isdigit():
        return int(s)
    if not s:
        return None
    if s == "T":
        return True
    if s == "F":
        return False
    if s[0] in "+-" and s[1:].isdigit():
        return int(s)
    if s[-1] in "0123456789." and "_" not in s:  # float() also takes inf, nan, 1_0
        try:
            return float(s)
        except ValueError:
            try:
                return float(s.replace("D", "E").replace("d", "e"))  # Fortran exponent
            except ValueError:
                pass
    return s  # complex, or malformed: keep the raw text


def _string(s: str) -> str | None:
    """The FITS string that ``s`` starts with, or None if ``s`` is not one string + comment."""
    if not s.startswith("'"):
        return None
    i = 1
    while True:
        j = s.find("'", i)
        if j < 0:
            return None
        if not s.startswith("'", j + 1):
            break
        i = j + 2
    rest = s[j + 1 :].lstrip()
    if rest and rest[0] != "/":
        return None
    return s[1:j].replace("''", "'").rstrip()


def _data_size(
    cards: Mapping[str, HeaderValue], name: Path | str, where: str, *, primary: bool
) -> int:
    """Bytes of the data unit, padding included (FITS 4.0, equations 1 and 2)."""

    def need(key: str, default: int | None, low: int, high: int) -> int:
        value = cards.get(key, default)
        if value is None and key not in cards:
            raise FitsError(name, f"{where}missing required keyword {key}")
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise FitsError(name, f"{where}malformed {key} value {value!r} in the header")
        return value

    bitpix = need("BITPIX", None, -64, 64)
    if bitpix not in _BITPIX:
        raise FitsError(name, f"{where}malformed BITPIX value {bitpix!r} in the header")
    naxis = need("NAXIS", None, 0, 999)
    if naxis == 0:
        return 0
    axes = [need(f"NAXIS{i}", None, 0, 2**62) for i in range(1, naxis + 1)]
    if primary and axes[0] == 0 and cards.get("GROUPS") is True:
        axes = axes[1:]  # random groups: NAXIS1 = 0 is not an axis
    count = 1
    for n in axes:
        count *= n
    pcount = need("PCOUNT", 0, 0, 2**62)
    gcount = need("GCOUNT", 1, 0, 2**62)
    nbytes = abs(bitpix) // 8 * gcount * (pcount + count)
    return (nbytes + BLOCK - 1) // BLOCK * BLOCK

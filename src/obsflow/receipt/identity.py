"""Whether a delivered file is what its sender says: the server decides identities.

A file that comes from another site (an agent's ``PUT /api/v1/transfers/{id}``) is
received like any file: the server recognises its name with its own registry, reads
its header and maps it. Then its sender's claims are held to what the server found
(:func:`refusal`); any that does not hold refuses the file, and nothing is kept:

- **the archive ID**: the one the server's registry gives the file (the product's or instrument's
  template filled from the header). Only the collision suffix may differ (a frame of
  the same hundredth of a second as others), and only to the first ID not taken by
  other bytes: so no sender can squat the ID of a frame it did not take.
- **the instrument**: the header's ``INSTRUME``, when it has one, names the product's
  instrument (case and punctuation aside), so a frame renamed into another
  instrument's name pattern is refused.
- **the program**: a sender limited to programs delivers only their frames.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from obsflow.catalog.holdings import Holding

if TYPE_CHECKING:
    from obsflow.receipt.receiver import Delivery, Prepared
    from obsflow.registry import InstrumentSpec

INSTRUMENT_KEYWORD: Final = "INSTRUME"
"""The FITS standard keyword naming the instrument that wrote a frame."""
MAX_BUMPS: Final = 10_000  # as many as the catalog tries (catalog.batch._free_id)


def same_instrument(said: str, name: str) -> bool:
    """Whether a header's instrument value names the registry's instrument ``name``."""

    def plain(text: str) -> str:
        return re.sub(r"[^0-9a-z]", "", text.casefold())

    return plain(said) == plain(name)


def refusal(
    prepared: Prepared, delivery: Delivery, held: Callable[[str], Holding | None]
) -> str | None:
    """Why the server does not take ``prepared`` as ``delivery`` says (None: it does).
    ``held`` answers what the catalog holds under an archive ID."""
    instrument = prepared.instrument.name
    said = prepared.said_instrument
    if said is not None and not same_instrument(said, instrument):
        return (
            f"its header's {INSTRUMENT_KEYWORD} = {said!r} is not {instrument}, the "
            f"instrument of product {prepared.product.id}"
        )
    programs = delivery.programs
    if programs is not None and prepared.meta.program not in programs:
        program = prepared.meta.program or "(none)"
        return (
            f"it is a frame of program {program}; the sender may deliver only "
            f"{', '.join(sorted(programs)) or 'no program'}'s"
        )
    scheme = prepared.scheme()
    given = delivery.archive_id
    for bump in range(MAX_BUMPS):
        candidate = scheme(bump)
        if candidate == given:
            return None
        holding = held(candidate)
        if holding is None:
            break  # the first free ID: the only one it may take
        if holding.sha256 == delivery.sha256:
            return None  # these very bytes are here already: a duplicate, nothing written
    expected = scheme(0)
    return f"{given} is not the archive ID this server gives it: its header makes it {expected}" + (
        f" (or the next free one, {candidate})" if candidate != expected else ""
    )


def instruments_of(archive_id: str, instruments: Iterable[InstrumentSpec]) -> list[str]:
    """The instruments whose ``archive_id`` template could give ``archive_id`` (who may
    ask about an ID no file holds yet: :mod:`obsflow.api.transfer`)."""
    return [i.name for i in instruments if _template_pattern(i).fullmatch(archive_id)]


def _template_pattern(instrument: InstrumentSpec) -> re.Pattern[str]:
    """The IDs an instrument's template gives: its prefix and name as they are, every
    other field (dates, seconds, hundredths) digits."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(instrument.archive_id):
        parts.append(re.escape(literal))
        if field == "prefix":
            parts.append(re.escape(instrument.prefix))
        elif field == "instrument":
            parts.append(re.escape(instrument.name))
        elif field is not None:
            parts.append(r"\d+")
    return re.compile("".join(parts))

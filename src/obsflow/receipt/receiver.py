"""Receipt: one path in, one outcome out; the file is cached, refused, or left alone.

The way of one file through receipt::

    recognise the name (registry) → wait until complete (size and mtime settled)
    → read the primary header once, walk the HDUs (complete, valid FITS)
    → map header keywords to metadata (instrument) → stream the bytes through
    sha256 into a cache temp file → ONE catalog transaction: archive ID, file row,
    tags, keywords, ledger, ingest request, and the move into the cache.

A refused file is copied to ``quarantine/`` with a ``.reason.json`` beside it and
recorded ``rejected``; the source is never removed before it is safely in the
cache or in quarantine (and only when ``receipt.remove_source`` says so).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.exc import SQLAlchemyError

from obsflow.archive.cache import Cache
from obsflow.catalog import CacheEntry, Catalog, NewFile, Recorded
from obsflow.catalog.batch import ArchiveIdScheme, GivenArchiveId
from obsflow.catalog.holdings import Holdings
from obsflow.errors import (
    AmbiguousError,
    CatalogError,
    FitsError,
    MetadataError,
    ReceiptError,
    RecognitionError,
    StorageError,
    VanishedError,
)
from obsflow.receipt import admission, identity, metadata
from obsflow.receipt import header as fitsheader
from obsflow.receipt.metadata import Metadata
from obsflow.registry import InstrumentSpec, ProductSpec, Recognised, Registry
from obsflow.settings import Settings
from obsflow.states import LedgerEvent

log = logging.getLogger(__name__)
CHUNK = 1 << 20
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Outcome(StrEnum):
    CACHED = "cached"  # new: in the cache, queued for the archive
    DUPLICATE = "duplicate"  # these bytes were received before; nothing written
    REJECTED = "rejected"  # refused: in quarantine with its reason
    IGNORED = "ignored"  # the name matches no product (and the site ignores such files)
    VANISHED = "vanished"  # gone, or still changing; a later trigger or scan retries it
    ERROR = "error"  # the site could not take it (cache, catalog); the source is untouched
    REFUSED = "refused"  # not taken, nothing kept: a special file, a symlink out of bounds, a
    # delivery whose claims (ID, instrument, program) fail


@dataclass(frozen=True)
class Received:
    path: Path
    outcome: Outcome
    archive_id: str | None = None
    file_id: int | None = None
    product: str | None = None
    reason: str | None = None
    superseded: str | None = None
    """CACHED: the archive ID of the older version (same name) this file replaced."""
    same_name_as: str | None = None
    """CACHED: a current file with this file's name and other bytes, which it does not
    replace (another exposure: its product is not versioned by name)."""
    size: int = 0


@dataclass(frozen=True)
class Delivery:
    """What the site that received a file first (an observatory agent) says of it: the
    archive server keeps its archive ID, and its moments acquired and received, so that
    the ledger spans the way from the telescope to the archive."""

    archive_id: str
    sha256: str
    acquired: datetime | None = None
    received: datetime | None = None
    verified: bool = False
    """The file's bytes were checked to have ``sha256`` (by the server, as they came in),
    and the file is the site's to take: it is moved into the cache, not copied and hashed
    again (it must be on the cache's file system)."""
    programs: frozenset[str] | None = None
    """The programs whose frames the sender may deliver (None: any); another program's
    frame is refused (:mod:`obsflow.receipt.identity`)."""


@dataclass(frozen=True)
class Prepared:
    """A file read, validated and copied to a cache temp file, waiting to be recorded."""

    path: Path
    product: ProductSpec
    instrument: InstrumentSpec
    meta: Metadata
    new: NewFile
    temp: Path
    acquired: datetime
    received: datetime
    validated: datetime
    archive_id: str | None = None  # given (a delivery); else made from the header
    said_instrument: str | None = None  # the header's INSTRUME, if any (a string)

    def scheme(self) -> ArchiveIdScheme:
        """The archive IDs this site's registry gives this file (bump 0, 1, ...)."""
        return ArchiveIdScheme(
            template=self.product.archive_id or self.instrument.archive_id,
            prefix=self.instrument.prefix,
            instrument=self.instrument.name,
            date_obs=self.meta.date_obs,
            night=self.meta.night,
            groups=dict(self.new.name_groups or {}),
        )

    def entry(self, cache: Cache, now: datetime) -> CacheEntry:
        """What the catalog needs to record this file and move it into the cache: plain
        values (the archive IDs it may take, its temp file, the cache)."""
        archive_ids: ArchiveIdScheme | GivenArchiveId = self.scheme()
        if self.archive_id is not None:
            archive_ids = GivenArchiveId(self.archive_id)
        return CacheEntry.of(
            self.new,
            archive_ids,
            self.temp,
            cache,
            ledger={
                LedgerEvent.ACQUIRED: self.acquired,
                LedgerEvent.RECEIVED: self.received,
                LedgerEvent.VALIDATED: self.validated,
                LedgerEvent.CACHED: now,
            },
            versions_by_name=self.product.versions_by_name,
        )


_SITE_ERRORS = (OSError, CatalogError, StorageError, SQLAlchemyError)
SETTLE_POLL_SECONDS = 0.005
"""How often receipt looks at a file still being written (a stat; its headers are walked
again only when it changed): a frame is taken at most this long after its last byte
lands. Each look costs microseconds; the 20 ms it was cost a frame 10 ms on average."""


class Receiver:
    """Receives files for one site. Thread-safe: workers may call :meth:`receive` at once."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        catalog: Catalog,
        cache: Cache,
        *,
        clock: Clock = utcnow,
        sleep: Callable[[float], None] = time.sleep,
        roots: Sequence[Path] = (),
    ) -> None:
        """``roots``: the directories besides the site's incoming that files are offered
        from (the watched ones), into which a symbolic link may point when
        ``receipt.follow_symlinks`` is on (:mod:`obsflow.receipt.admission`)."""
        self.roots: tuple[Path, ...] = tuple(dict.fromkeys([settings.incoming, *roots]))
        self.settings = settings
        self.registry = registry
        self.catalog = catalog
        self.cache = cache
        self.clock = clock
        self.sleep = sleep

    def within(self, roots: Sequence[Path]) -> Receiver:
        """This receiver, for files offered from ``roots`` too (``obsflow ingest DIR``)."""
        other = copy.copy(self)
        other.roots = tuple(dict.fromkeys([*self.roots, *roots]))
        return other

    def receive(self, path: Path, delivery: Delivery | None = None) -> Received:
        """Receive one file; never raises for a bad file (it is quarantined instead).
        ``delivery``: the file comes from another site, which said this of it."""
        prepared = self.prepare(path, delivery)
        return prepared if isinstance(prepared, Received) else self.commit([prepared])[0]

    def prepare(self, path: Path, delivery: Delivery | None = None) -> Prepared | Received:
        """Everything but recording: recognise, settle, validate, map, copy to a cache temp
        file. A refused file is quarantined here; its :class:`Received` says so."""
        received_at = self.clock()
        follow = self.settings.receipt.follow_symlinks
        refused = admission.refusal(path, self.roots, follow_symlinks=follow)
        if refused is not None:  # never opened: a FIFO would block, a link could leak
            log.warning("refused %s: it %s", path, refused)
            return Received(path, Outcome.REFUSED, reason=f"special-file: {path} {refused}")
        try:
            recognised = self.registry.recognise(path.name)
        except AmbiguousError as exc:
            return self._quarantine(path, exc, None, received_at)
        except RecognitionError as exc:
            if self.settings.receipt.unmatched == "quarantine":
                return self._quarantine(path, exc, None, received_at)
            log.info("ignored %s: %s", path, exc.detail)
            return Received(path, Outcome.IGNORED, reason=exc.detail)
        try:
            stat = self._settle(path)
            adopt = delivery.sha256 if delivery is not None and delivery.verified else None
            prepared = self._prepare(path, recognised, stat, received_at, adopt=adopt)
        except _SITE_ERRORS as exc:
            # the site, not the file, is at fault (cache full, catalog down): the source is
            # untouched and a later trigger or scan will offer it again
            log.error("could not receive %s: %s", path, exc)
            return Received(path, Outcome.ERROR, product=recognised.product.id, reason=str(exc))
        except VanishedError as exc:
            log.warning("%s", exc)
            return Received(
                path, Outcome.VANISHED, product=recognised.product.id, reason=exc.detail
            )
        except ReceiptError as exc:
            return self._quarantine(path, exc, recognised, received_at)
        if delivery is None:
            return prepared
        if prepared.new.sha256 != delivery.sha256:  # (the server checked it on the way in)
            prepared.temp.unlink(missing_ok=True)
            reason = f"sha256 {prepared.new.sha256[:12]}…, expected {delivery.sha256[:12]}…"
            log.error("could not receive %s: %s", path, reason)
            return Received(path, Outcome.ERROR, product=prepared.product.id, reason=reason)
        refusal = identity.refusal(prepared, delivery, Holdings(self.catalog).of)
        if refusal is not None:  # the server decides identities, not the sender
            prepared.temp.unlink(missing_ok=True)
            log.warning("refused %s under %s: %s", path.name, delivery.archive_id, refusal)
            return Received(path, Outcome.REFUSED, product=prepared.product.id, reason=refusal)
        return replace(
            prepared,
            archive_id=delivery.archive_id,
            acquired=delivery.acquired or prepared.acquired,
            received=delivery.received or prepared.received,
        )

    def commit(self, batch: Sequence[Prepared]) -> list[Received]:
        """Record prepared files in one catalog transaction; each with its ingest request
        and its move into the cache. A site error isolates the file that caused it."""
        now = self.clock()
        entries = [p.entry(self.cache, now) for p in batch]
        try:
            recorded = self.catalog.record_cached_many(entries, now)
        except _SITE_ERRORS as exc:
            if len(batch) > 1:
                return [result for p in batch for result in self.commit([p])]
            log.error("could not record %s: %s", batch[0].path, exc)
            batch[0].temp.unlink(missing_ok=True)
            return [
                Received(batch[0].path, Outcome.ERROR, product=batch[0].product.id, reason=str(exc))
            ]
        results = []
        for prepared, done in zip(batch, recorded, strict=True):
            if done.duplicate:  # otherwise the temp file became the cached file
                prepared.temp.unlink(missing_ok=True)
            results.append(self._outcome(prepared, done))
        return results

    def _outcome(self, prepared: Prepared, recorded: Recorded) -> Received:
        path, product = prepared.path, prepared.product
        self._remove_source(path)  # cached, or the same bytes were already: safe either way
        if recorded.duplicate:
            log.info("duplicate %s: same bytes as %s", path, recorded.archive_id)
            return Received(
                path,
                Outcome.DUPLICATE,
                recorded.archive_id,
                recorded.file_id,
                product.id,
                reason=f"same bytes as {recorded.archive_id}",
                size=prepared.new.size,
            )
        log.info(
            "cached %s as %s",
            path.name,
            recorded.archive_id,
            extra={"archive_id": recorded.archive_id, "product": product.id},
        )
        if recorded.superseded:
            log.info("%s supersedes %s (same name)", recorded.archive_id, recorded.superseded)
        if recorded.same_name_as:
            log.warning(
                "%s has the name of %s but other bytes; both kept: %s is not versioned by name",
                recorded.archive_id,
                recorded.same_name_as,
                product.id,
            )
        return Received(
            path,
            Outcome.CACHED,
            recorded.archive_id,
            recorded.file_id,
            product.id,
            superseded=recorded.superseded,
            same_name_as=recorded.same_name_as,
            size=prepared.new.size,
        )

    # ---------------------------------------------------------------- steps

    def _settle(self, path: Path) -> os.stat_result:
        """Wait until the file is complete; return its stat.

        Complete means unchanged for ``settle_seconds`` or, sooner, already a whole
        FITS file (every HDU's header and data present): a frame being written is
        taken the moment its last byte lands, and one still growing is never taken
        truncated. Quiet time is measured on this machine's monotonic clock from the
        last change seen, so an instrument whose clock runs ahead (a future mtime)
        cannot stall it; an mtime already older than the settle time counts as quiet.
        """
        settle = self.settings.receipt.settle_seconds
        limit = self.settings.receipt.max_header_bytes
        give_up = time.monotonic() + self.settings.receipt.max_wait_seconds
        stat = _stat(path)
        age = time.time() - stat.st_mtime
        quiet_since = time.monotonic() - (min(age, settle) if age > 0 else 0.0)
        whole = _whole_fits(path, stat, limit)
        while True:
            quiet = time.monotonic() - quiet_since
            if whole or quiet >= settle:
                return stat
            if time.monotonic() > give_up:
                raise VanishedError(
                    path, f"still changing after {self.settings.receipt.max_wait_seconds:g} s"
                )
            self.sleep(min(settle - quiet, SETTLE_POLL_SECONDS))
            again = _stat(path)
            if (again.st_size, again.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                stat, quiet_since = again, time.monotonic()
                whole = _whole_fits(path, stat, limit)  # (unchanged, it stays what it was)

    def _prepare(
        self,
        path: Path,
        recognised: Recognised,
        stat: os.stat_result,
        received_at: datetime,
        *,
        adopt: str | None = None,
    ) -> Prepared:
        """``adopt``: the sha256 the file is known to have; it is moved into the cache
        temp file instead of copied and hashed."""
        product = recognised.product
        instrument = self.registry.instrument_of(product)
        temp = self.cache.temp_file()
        try:
            try:
                src = path.open("rb")
            except FileNotFoundError:
                raise VanishedError(path, "the file disappeared before it could be read") from None
            with src:
                size = os.fstat(src.fileno()).st_size
                if size != stat.st_size:
                    raise VanishedError(path, "the file changed size while being received")
                limit = self.settings.receipt.max_header_bytes
                first, header = _read_primary_header(src, size, path, limit)
                fitsheader.walk_hdus(src, size, name=path, primary=header, limit=limit)
                try:
                    written = datetime.fromtimestamp(stat.st_mtime, UTC)
                    meta = metadata.extract(
                        header, product, instrument, recognised.groups, path, written
                    )
                except (ArithmeticError, ValueError) as exc:  # a value no check foresaw
                    raise MetadataError(path, f"a header value cannot be used: {exc}") from None
                validated_at = self.clock()
                # Durability: while the source stays, it is the durable copy; the cache copy
                # is flushed to disk before the source may be removed.
                if adopt is None:
                    sync = self.settings.receipt.remove_source
                    sha256 = _stream_to(src, first, temp, sync=sync)
            if adopt is not None:
                sha256 = adopt
                os.replace(path, temp)
            else:
                after = _stat(path)
                if (after.st_size, after.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                    raise VanishedError(path, "the file changed while being received")
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        new = NewFile(
            product=product.id,
            instrument=instrument.name,
            level=product.level,
            original_name=path.name,
            source_path=str(path),
            size=size,
            sha256=sha256,
            start=meta.start,
            stop=meta.stop,
            start_mjd=metadata.mjd(meta.start),
            stop_mjd=metadata.mjd(meta.stop),
            night=meta.night,
            exptime=meta.exptime,
            ra=meta.ra,
            dec=meta.dec,
            object=meta.object,
            frame_type=meta.frame_type,
            filter=meta.filter,
            program=meta.program,
            observer=meta.observer,
            telescope=meta.telescope,
            proprietary_until=meta.proprietary_until,
            tags=product.tags,
            keywords=meta.keywords,
            name_groups=dict(recognised.groups),
        )
        return Prepared(
            path=path,
            product=product,
            instrument=instrument,
            meta=meta,
            new=new,
            temp=temp,
            acquired=datetime.fromtimestamp(stat.st_mtime, UTC),
            received=received_at,
            validated=validated_at,
            said_instrument=_said_instrument(header),
        )

    def _quarantine(
        self, path: Path, error: ReceiptError, recognised: Recognised | None, received_at: datetime
    ) -> Received:
        """Copy a refused file to quarantine with its reason, and record it ``rejected``.

        Safe when several workers quarantine files of one name at once: each copies to
        its own temp file, claims a free name with an exclusive link, and the catalog's
        unique (sha256, name) index for rejected rows lets only one record the same file.
        """
        product = recognised.product if recognised else None
        product_id = product.id if product else None
        reason = f"{error.reason}: {error.detail}"
        log.warning("rejected %s: %s", path, error.detail)
        folder = self.settings.quarantine / received_at.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".{uuid.uuid4().hex}.part"
        try:
            try:
                with path.open("rb") as src:
                    sha256 = _stream_to(src, b"", temp, sync=self.settings.receipt.remove_source)
            except OSError as exc:
                log.warning("cannot quarantine %s: %s", path, exc)
                return Received(
                    path,
                    Outcome.VANISHED,
                    product=product_id,
                    reason=f"{reason} (and it could not be read: {exc})",
                )
            size = temp.stat().st_size
            rejected = Received(
                path, Outcome.REJECTED, product=product_id, reason=reason, size=size
            )
            if self.catalog.rejected_before(sha256, path.name) is not None:
                self._remove_source(path)
                return rejected
            target = _claim(temp, folder / path.name)
        finally:
            temp.unlink(missing_ok=True)
        note = target.with_name(target.name + ".reason.json")
        note.write_text(
            json.dumps(
                {
                    "file": str(path),
                    "reason": error.reason,
                    "detail": error.detail,
                    "product": product_id,
                    "sha256": sha256,
                    "size": size,
                    "received_at": received_at.isoformat(),
                },
                indent=2,
            )
            + "\n"
        )
        recorded = self.catalog.record_rejected(
            NewFile(
                product=product_id,
                instrument=product.instrument if product else None,
                level=product.level if product else None,
                original_name=path.name,
                source_path=str(path),
                size=size,
                sha256=sha256,
                name_groups=dict(recognised.groups) if recognised else None,
            ),
            reason,
            str(target.relative_to(self.settings.quarantine)),
            {LedgerEvent.RECEIVED: received_at, LedgerEvent.REJECTED: self.clock()},
        )
        if recorded is None:  # another worker recorded these very bytes first
            target.unlink(missing_ok=True)
            note.unlink(missing_ok=True)
        self._remove_source(path)
        return rejected

    def _remove_source(self, path: Path) -> None:
        if self.settings.receipt.remove_source:
            path.unlink(missing_ok=True)


def _said_instrument(header: fitsheader.Header) -> str | None:
    value = header.get(identity.INSTRUMENT_KEYWORD)
    return value.strip() or None if isinstance(value, str) else None


def _whole_fits(path: Path, stat: os.stat_result, limit: int) -> bool:
    """Whether ``path`` (as of ``stat``) is already a complete FITS file. Never raises."""
    if stat.st_size == 0 or stat.st_size % fitsheader.BLOCK:
        return False
    try:
        with path.open("rb") as f:
            fitsheader.walk_hdus(f, stat.st_size, name=path, limit=limit)
            return os.fstat(f.fileno()).st_size == stat.st_size
    except (OSError, FitsError):
        return False


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise VanishedError(path, "the file disappeared before it could be received") from None


def _read_primary_header(
    src: BinaryIO, size: int, path: Path, limit: int
) -> tuple[bytes, fitsheader.Header]:
    """Read from the start until the primary header's END card; return the bytes read.
    Each byte is scanned once, and at most ``limit`` bytes (and a chunk) are held."""
    if size == 0:
        raise FitsError(path, "empty file (0 bytes)")
    buf = bytearray()
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            raise FitsError(path, "header has no END card")
        scanned = len(buf)
        buf += chunk
        header = fitsheader.parse_header(buf, name=path, scanned=scanned, limit=limit)
        if header is not None:
            return bytes(buf), header


def _stream_to(src: BinaryIO, first: bytes, temp: Path, *, sync: bool) -> str:
    """Copy the whole file into ``temp`` (already-read ``first`` bytes, then the rest)."""
    digest = hashlib.sha256(first)
    src.seek(len(first))
    with temp.open("wb") as dst:
        dst.write(first)
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
        if sync:
            dst.flush()
            os.fsync(dst.fileno())
    return digest.hexdigest()


def _claim(temp: Path, wanted: Path) -> Path:
    """Give ``temp`` the first free name of ``wanted``, ``wanted.1``, ...; exclusively."""
    for n in range(100_000):
        candidate = wanted if n == 0 else wanted.with_name(f"{wanted.name}.{n}")
        try:
            os.link(temp, candidate)
        except FileExistsError:
            continue
        return candidate
    raise FitsError(wanted, "too many quarantined files of this name")

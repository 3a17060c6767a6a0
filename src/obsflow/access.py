"""Who may see what: API tokens, scopes, and the proprietary period.

The policy is a few pure functions over plain data (a :class:`Principal` and a
:class:`~obsflow.catalog.records.FileRecord`), so that every service asks the same
question the same way and the rules are tested without a server:

- **Scopes**: ``admin`` ⊃ ``write`` ⊃ ``read``, and beside them ``worker`` ⊃ ``read``
  (:data:`GRANTS`). Write endpoints need :attr:`Scope.WRITE` (``who.may(Scope.WRITE)``).
  A ``worker`` token is what ``obsflow worker --server`` holds on a machine without the
  site's storage: it reads every file's bytes (proprietary ones too: it reduces them),
  claims runs, reports their steps and sends their outputs (:mod:`obsflow.api.workers`),
  and nothing else: no tags, no retries, no paths, no transfers. Admin may do all of it.
- **The proprietary period**: receipt sets each file's ``proprietary_until`` from its
  instrument's ``proprietary_months`` (or the program's exception in
  ``program_proprietary_months``). Until then, a file's bytes and its non-public
  metadata go only to tokens of its program, or of admin or worker scope
  (:func:`may_read_data`); from then on, to anyone. The rule is written once,
  :class:`ReadRule`, in its two forms side by side: over a record in Python, and as
  the SQL condition the catalog filters with (``FileQuery(readable_by=...)``); a test
  holds them to the same answer on both engines.
- **Anonymous readers** (:data:`ANONYMOUS`) hold read scope and no program: they see
  released data, and the :data:`PUBLIC_FIELDS` of the rest.
- **Paths** (:data:`ADMIN_FIELDS`) are the site's business: only admin tokens see
  them, whatever the release date.

:class:`TokenStore` keeps the tokens in the catalog's ``tokens`` table (through
:mod:`obsflow.catalog.tokens`). A secret is shown once, when it is made; only its
SHA-256 is stored, so a copy of the catalog gives no one a usable token.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import ColumnElement, or_, true

from obsflow.catalog import Catalog
from obsflow.catalog.records import FileRecord
from obsflow.catalog.tokens import TokenRow, Tokens
from obsflow.errors import ObsflowError

log = logging.getLogger(__name__)

__all__ = [
    "ADMIN_FIELDS",
    "ALL_DATA",
    "ANONYMOUS",
    "GRANTS",
    "PUBLIC_FIELDS",
    "AccessError",
    "Principal",
    "ReadRule",
    "Scope",
    "TokenInfo",
    "TokenStore",
    "check_instrument",
    "check_program",
    "check_user",
    "may_read_data",
    "parse_scope",
    "released",
    "visible_fields",
]


class AccessError(ObsflowError):
    """A token request is wrong: a bad user name, program ID or scope (names the value)."""


class Scope(StrEnum):
    """What a token may do (:data:`GRANTS` says which scopes each one includes)."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
    WORKER = "worker"
    """A remote worker's: every file's bytes, runs claimed and reported, outputs sent."""

    @property
    def grants(self) -> frozenset[Scope]:
        """The scopes a token of this scope holds (itself among them)."""
        return GRANTS[self]


GRANTS: Final[dict[Scope, frozenset[Scope]]] = {
    Scope.READ: frozenset({Scope.READ}),
    Scope.WRITE: frozenset({Scope.READ, Scope.WRITE}),
    Scope.WORKER: frozenset({Scope.READ, Scope.WORKER}),
    Scope.ADMIN: frozenset(Scope),
}
"""What each scope includes: not a line but a small tree, since a worker may neither
write (tag, retry, transfer) nor be written for, and a writer may not act as a worker."""

ALL_DATA: Final = frozenset({Scope.ADMIN, Scope.WORKER})
"""The scopes that read every file's bytes and non-public metadata before its release
(a worker reduces proprietary frames; paths stay admin's alone)."""


def parse_scope(text: str) -> Scope:
    """``read``, ``write``, ``admin`` or ``worker`` as a :class:`Scope`; else
    :class:`AccessError`."""
    try:
        return Scope(text)
    except ValueError:
        known = ", ".join(s.value for s in Scope)
        raise AccessError(f"unknown scope {text!r}: expected one of {known}") from None


# ASCII only: a user name or program ID that looks like another (a Cyrillic "а" for a
# Latin "a") must not be a different name.
_USER = re.compile(r"[\w.@-]{1,64}", re.ASCII)
_PROGRAM = re.compile(r"[\w-]{1,64}", re.ASCII)  # the files table's program column: 64
RESERVED_USERS: Final = frozenset({"anonymous"})


def check_user(name: str) -> str:
    """``name`` if it is a valid user name (1–64 of ``A-Z a-z 0-9 _ . @ -``)."""
    if not isinstance(name, str) or not _USER.fullmatch(name):
        raise AccessError(
            f"bad user name {name!r}: expected 1-64 characters of letters, digits, _ . @ -"
        )
    if name in RESERVED_USERS:
        raise AccessError(f"user name {name!r} is reserved for readers without a token")
    return name


def check_instrument(name: str) -> str:
    """``name`` if it is a valid instrument name (1–64 of ``A-Z a-z 0-9 _ -``)."""
    if not isinstance(name, str) or not _PROGRAM.fullmatch(name):
        raise AccessError(
            f"bad instrument name {name!r}: expected 1-64 characters of letters, digits, _ -"
        )
    return name


def check_program(program: str) -> str:
    """``program`` if it is a valid program ID (1–64 of ``A-Z a-z 0-9 _ -``)."""
    if not isinstance(program, str) or not _PROGRAM.fullmatch(program):
        raise AccessError(
            f"bad program ID {program!r}: expected 1-64 characters of letters, digits, _ -"
        )
    return program


@dataclass(frozen=True)
class Principal:
    """Who is asking: a token's user, scope and programs, or :data:`ANONYMOUS`."""

    user: str
    scope: Scope
    programs: frozenset[str]
    token_id: int | None
    """The token this principal was verified from; None for :data:`ANONYMOUS`."""
    instruments: frozenset[str] = frozenset()
    """The instruments whose frames the token may send (transfers); empty: any."""

    def may(self, scope: Scope) -> bool:
        """Whether this principal holds ``scope`` (admin may write, write may read, a
        worker may read; :data:`GRANTS`)."""
        return scope in self.scope.grants

    @property
    def reads_all(self) -> bool:
        """Whether this principal may read every file's data, released or not (admin, a
        worker)."""
        return self.scope in ALL_DATA

    def may_send(self, instrument: str) -> bool:
        """Whether this principal may transfer frames of ``instrument`` to the archive."""
        if not self.may(Scope.WRITE):
            return False
        return not self.instruments or instrument in self.instruments or self.may(Scope.ADMIN)

    @property
    def anonymous(self) -> bool:
        return self.token_id is None


ANONYMOUS: Final = Principal(
    user="anonymous", scope=Scope.READ, programs=frozenset(), token_id=None
)
"""A reader without a token: public data only."""

PUBLIC_FIELDS: Final = frozenset(
    {
        # what the file is and where it stands: enough to find it and to know when
        # it will be released, as public archive indexes (KOA, ESO, CADC) show
        "id",
        "archive_id",
        "product",
        "instrument",
        "level",
        "state",
        "size",
        "version",
        "superseded_by",
        "made_by_run",
        "virtual",
        "tags",
        # when, how long, how: the observing log of the telescope is public
        "start",
        "stop",
        "start_mjd",
        "stop_mjd",
        "night",
        "exptime",
        "frame_type",
        "filter",
        "telescope",
        # whose and until when: the program ID tells a reader whom to ask (KOA shows
        # program IDs; the release date, which is public, depends on it anyway)
        "program",
        "proprietary_until",
    }
)
"""The :class:`FileRecord` fields anyone may see, even before the file's release.

Withheld until release (the science of the program): ``object``, ``ra``, ``dec``,
``observer``, ``keywords`` (header values), ``original_name`` (observers' file names
often carry the target's name), ``sha256`` (it would confirm a guess of the bytes).
"""

ADMIN_FIELDS: Final = frozenset(
    {
        "source_path",
        "cache_path",
        "archive_path",
        "quarantine_path",
        "reason",
        "last_access",
    }
)
"""The :class:`FileRecord` fields only admin tokens see, whatever the release date:
the site's file system layout (paths), the operator's messages (``reason`` quotes
paths and header values), and cache bookkeeping (``last_access``, which tells when
somebody last read the file, i.e. other readers' activity)."""

PROPRIETARY_MARKER: Final = "proprietary"
"""The key :func:`visible_fields` adds (true) when it withholds a file's metadata."""


@dataclass(frozen=True)
class ReadRule:
    """The proprietary rule for one reader at one instant, in both forms it is asked in:
    a file's bytes and non-public metadata go, once it is released (no
    ``proprietary_until``, or that instant has come), to anyone; before, to admin and
    worker tokens (:attr:`Principal.reads_all`) and to tokens of the file's program. A
    file without a program is theirs alone until its release.

    :meth:`accepts` asks it of a record in Python, :meth:`sql` of a row in SQL (for
    :attr:`obsflow.catalog.records.FileQuery.readable_by`); they read the same two
    fields and must say the same: keep them side by side, and change both or neither
    (``tests/test_access.py`` compares them on SQLite and PostgreSQL).
    """

    programs: frozenset[str]
    everything: bool
    """The reader reads every file (admin, a worker)."""
    now: datetime

    @classmethod
    def of(cls, who: Principal, now: datetime) -> ReadRule:
        return cls(frozenset(who.programs), who.reads_all, now)

    def accepts(self, record: FileRecord) -> bool:
        """Whether the reader may read ``record``'s data."""
        if self.everything or released(record, self.now):
            return True
        return record.program is not None and record.program in self.programs

    def sql(
        self, proprietary_until: ColumnElement[Any], program: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        """The same, as a condition over a file's ``proprietary_until`` and ``program``
        columns (SQL's ``program IN (...)`` is not true for a NULL program either)."""
        if self.everything:
            return true()
        mine = [program.in_(sorted(self.programs))] if self.programs else []
        return or_(proprietary_until.is_(None), proprietary_until <= self.now, *mine)


def released(record: FileRecord, now: datetime) -> bool:
    """Whether the file's proprietary period is over (or it never had one)."""
    return record.proprietary_until is None or record.proprietary_until <= now


def may_read_data(who: Principal, record: FileRecord, now: datetime) -> bool:
    """Whether ``who`` may have the file's bytes and its non-public metadata
    (:class:`ReadRule`)."""
    return ReadRule.of(who, now).accepts(record)


def visible_fields(who: Principal, record: FileRecord, now: datetime) -> dict[str, Any]:
    """The part of ``record.to_json()`` that ``who`` may see.

    Everything but :data:`ADMIN_FIELDS` (unless admin) when :func:`may_read_data`;
    else only :data:`PUBLIC_FIELDS`, with ``"proprietary": true`` to say that the
    rest is withheld until ``proprietary_until``.
    """
    data = record.to_json()
    if not may_read_data(who, record, now):
        shown = {k: v for k, v in data.items() if k in PUBLIC_FIELDS}
        shown[PROPRIETARY_MARKER] = True
        return shown
    if who.may(Scope.ADMIN):
        return data
    return {k: v for k, v in data.items() if k not in ADMIN_FIELDS}


# ------------------------------------------------------------------ tokens

SECRET_PREFIX: Final = "obf_"
_SECRET_BYTES: Final = 32
# the only shape create() makes: the prefix and 43 URL-safe base64 characters
_SECRET = re.compile(r"obf_[A-Za-z0-9_-]{43}", re.ASCII)
_MAX_SECRET: Final = 256  # longer input is refused before the pattern even looks at it


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A token as ``obsflow token list`` shows it: never its secret, nor its hash."""

    id: int
    user: str
    scope: Scope
    programs: tuple[str, ...]
    created: datetime
    revoked: datetime | None
    instruments: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "scope": self.scope.value,
            "programs": list(self.programs),
            "instruments": list(self.instruments),
            "created": self.created.isoformat(),
            "revoked": self.revoked.isoformat() if self.revoked else None,
        }


class TokenStore:
    """API tokens, stored in the catalog as SHA-256 of the secret
    (:class:`obsflow.catalog.tokens.Tokens`)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._rows = Tokens(catalog)

    def create(
        self,
        user: str,
        scope: Scope,
        programs: Iterable[str],
        now: datetime,
        *,
        instruments: Iterable[str] = (),
    ) -> tuple[str, Principal]:
        """Make a token; return its secret (to show once, never stored) and principal.
        ``instruments``: the only ones whose frames it may transfer (none: any).

        Raises :class:`AccessError` naming a bad user name, scope, program or instrument.
        """
        check_user(user)
        scope = parse_scope(scope)
        wanted = sorted({check_program(p) for p in programs})
        senders = sorted({check_instrument(i) for i in instruments})
        secret = SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        assert _SECRET.fullmatch(secret), "the secret's shape changed; update _SECRET"
        token_id = self._rows.add(user, scope.value, wanted, senders, _hash(secret), now)
        log.info("token %d created for %s (scope %s)", token_id, user, scope.value)
        return secret, Principal(user, scope, frozenset(wanted), token_id, frozenset(senders))

    def verify(self, secret: str) -> Principal | None:
        """The principal of an active token, or None: unknown, revoked, or not a secret
        at all (empty, too long, wrong shape, not text) -- never an exception for that.

        The lookup compares hashes in the database, not secrets: how long a comparison
        takes can tell an attacker at most how much of a SHA-256 they guessed, which
        does not bring them closer to a secret with that hash. So no constant-time
        comparison is needed beyond hashing first. Database failures do raise: an
        outage is not a bad token.
        """
        if not isinstance(secret, str) or len(secret) > _MAX_SECRET:
            return None
        if not _SECRET.fullmatch(secret):
            return None
        try:  # a row edited by hand is refused, loudly
            row = self._rows.active(_hash(secret))
        except ValueError as exc:
            log.error("%s: unreadable, refused", exc)
            return None
        if row is None:
            return None
        try:
            scope = Scope(row.scope)
        except ValueError:
            log.error("token %d has an unknown scope %r: refused", row.id, row.scope)
            return None
        programs, senders = frozenset(row.programs), frozenset(row.instruments)
        return Principal(row.user, scope, programs, row.id, senders)

    def revoke(self, token_id: int, now: datetime) -> bool:
        """Revoke a token; False if there is no such token or it was revoked already."""
        done = self._rows.revoke(token_id, now)
        if done:
            log.info("token %d revoked", token_id)
        return done

    def get(self, token_id: int) -> TokenInfo | None:
        """One token (revoked or not), or None."""
        found = self._rows.rows(token_id)
        return _info(found[0]) if found else None

    def list(self) -> builtins.list[TokenInfo]:
        """Every token, revoked ones too, in the order they were made."""
        return [_info(r) for r in self._rows.rows()]


def _info(row: TokenRow) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        user=row.user,
        scope=Scope(row.scope),
        programs=row.programs,
        created=row.created,
        revoked=row.revoked,
        instruments=row.instruments,
    )

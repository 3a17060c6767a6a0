"""API tokens in the catalog's ``tokens`` table: what is stored, and how it is read back.

The policy is :mod:`obsflow.access`'s (:class:`~obsflow.access.TokenStore`): what a user
name, scope, program or instrument may be, how a secret is made, and that only its
SHA-256 is stored. This module keeps rows: it is given the hash, never the secret, and
it hands out no hash (a listing shows none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, insert, select, update

from obsflow.catalog import Catalog, schema

tokens = schema.tokens


@dataclass(frozen=True)
class TokenRow:
    """One token as stored, without its hash."""

    id: int
    user: str
    scope: str
    programs: tuple[str, ...]
    instruments: tuple[str, ...]
    """The instruments whose frames it may transfer; empty: any."""
    created: datetime
    revoked: datetime | None


class Tokens:
    """The tokens table of one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def add(
        self,
        user: str,
        scope: str,
        programs: Sequence[str],
        instruments: Sequence[str],
        token_hash: str,
        now: datetime,
    ) -> int:
        """Store a new token (checked by the caller); return its ID."""
        with self.catalog.write() as conn:
            key = conn.execute(
                insert(tokens).values(
                    user=user,
                    scope=scope,
                    programs=json.dumps(list(programs)),
                    instruments=json.dumps(list(instruments)),
                    token_hash=token_hash,
                    created_at=now,
                )
            ).inserted_primary_key
        assert key is not None
        return int(key[0])

    def active(self, token_hash: str) -> TokenRow | None:
        """The unrevoked token with this hash, or None. A row whose program or
        instrument list is not a JSON list of strings (edited by hand) raises
        :class:`ValueError` naming the token."""
        with self.catalog.read() as conn:
            row = conn.execute(
                select(tokens).where(
                    tokens.c.token_hash == token_hash, tokens.c.revoked_at.is_(None)
                )
            ).first()
        return None if row is None else _token(row)

    def revoke(self, token_id: int, now: datetime) -> bool:
        """Revoke a token; False if there is no such token or it was revoked already."""
        with self.catalog.write() as conn:
            done = conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            ).rowcount
        return bool(done)

    def rows(self, token_id: int | None = None) -> list[TokenRow]:
        """Every token (or the one with ``token_id``), revoked ones too, in the order they
        were made."""
        stmt = select(tokens).order_by(tokens.c.id)
        if token_id is not None:
            stmt = stmt.where(tokens.c.id == token_id)
        with self.catalog.read() as conn:
            return [_token(r) for r in conn.execute(stmt)]


def _token(row: Row[Any]) -> TokenRow:
    return TokenRow(
        id=int(row.id),
        user=row.user,
        scope=row.scope,
        programs=_names(row.id, "programs", row.programs),
        instruments=_names(row.id, "instruments", row.instruments),
        created=row.created_at,
        revoked=row.revoked_at,
    )


def _names(token_id: int, column: str, text: str) -> tuple[str, ...]:
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"token {token_id}: {column} {text!r} is not a JSON list of strings")
    return tuple(names)

"""Who is looking at the dashboard: a session cookie made from an API token, and the
CSRF token that every change must carry.

Signing in (``POST /login`` with a form field ``token``) checks the token with the
API's own :class:`~obsflow.access.TokenStore` and sets :data:`COOKIE` to it:
``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends
it), ``Secure`` when the page came over HTTPS, for the browser's session only. Each
request verifies it again, so a revoked token signs its sessions out at once; signing
out clears it (the token itself stays valid: it is the user's API token).

A change (a button that POSTs) needs, besides the cookie, the session's CSRF token in
the form field :data:`CSRF_FIELD` or the header :data:`CSRF_HEADER`: an HMAC-SHA256 of
a fixed label keyed by the token's secret, which only a page obsflow served to this
session holds. A POST without it, or with another, is refused (403) before anything
happens. Anonymous visitors change nothing, so they need neither.

The API (``/api/v1``) never reads this cookie: it takes bearer tokens only, so the
cookie cannot be used to call the API from another page.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from fastapi import Request, Response

from obsflow.access import ANONYMOUS, Principal, Scope
from obsflow.api.services import Services

COOKIE: Final = "obsflow_session"
CSRF_FIELD: Final = "csrf"
CSRF_HEADER: Final = "X-CSRF-Token"
_LABEL: Final = b"obsflow dashboard csrf v1"


@dataclass(frozen=True)
class Session:
    """The visitor: a principal, and (signed in) the CSRF token of their session."""

    who: Principal
    csrf: str | None
    """None for an anonymous visitor (who may change nothing)."""

    @property
    def signed_in(self) -> bool:
        return self.csrf is not None

    def may(self, scope: Scope) -> bool:
        return self.signed_in and self.who.may(scope)


ANONYMOUS_SESSION: Final = Session(ANONYMOUS, None)


def csrf_token(secret: str) -> str:
    """The CSRF token of the session of API token ``secret``."""
    return hmac.new(secret.encode(), _LABEL, hashlib.sha256).hexdigest()


def session_of(request: Request, svc: Services) -> Session:
    """The visitor of ``request``: the cookie's token if it is valid, else anonymous."""
    secret = request.cookies.get(COOKIE)
    if not secret:
        return ANONYMOUS_SESSION
    who = svc.tokens.verify(secret)
    if who is None:
        return ANONYMOUS_SESSION
    return Session(who, csrf_token(secret))


def csrf_ok(request: Request, session: Session, submitted: str | None) -> bool:
    """Whether ``request`` carries ``session``'s CSRF token (in the form, as
    ``submitted``, or in the :data:`CSRF_HEADER` header)."""
    if session.csrf is None:
        return False
    given = submitted or request.headers.get(CSRF_HEADER) or ""
    return hmac.compare_digest(given.encode(), session.csrf.encode())


def same_origin(request: Request) -> bool:
    """Whether a form post came from this server's own pages: its ``Origin`` (sent by
    every current browser with a POST) names this host, or it has none (a script, not a
    browser). Sign-in has no session to carry a CSRF token yet; this check keeps another
    site from signing a visitor in with the other site's token (login CSRF)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc == host


def sign_in(response: Response, request: Request, secret: str) -> None:
    response.set_cookie(
        COOKIE,
        secret,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def sign_out(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
    )

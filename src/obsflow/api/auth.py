"""Who is asking: ``Authorization: Bearer <token>`` → a :class:`~obsflow.access.Principal`.

No header: :data:`~obsflow.access.ANONYMOUS` (public data only). A header that is
not a bearer token, or a token that is unknown or revoked: ``401``. A principal
without the scope a route needs: ``401`` when anonymous (a token may help),
``403`` when it has a token (this token never will).
"""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from obsflow.access import ANONYMOUS, Principal, Scope
from obsflow.api.problems import ProblemError
from obsflow.api.services import Services, services

CHALLENGE: Final = 'Bearer realm="obsflow"'

bearer = HTTPBearer(
    auto_error=False,
    description="An API token ('obsflow token create'). Without one, public data only.",
)


def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    svc: Annotated[Services, Depends(services)],
) -> Principal:
    """The caller (a FastAPI dependency)."""
    if request.headers.get("authorization") is None:
        return ANONYMOUS
    if credentials is None:
        raise ProblemError(
            401,
            "expected 'Authorization: Bearer <token>'",
            kind="unauthenticated",
            headers={"WWW-Authenticate": CHALLENGE},
        )
    who = svc.tokens.verify(credentials.credentials)
    if who is None:
        raise ProblemError(
            401,
            "the token is unknown or revoked",
            kind="unauthenticated",
            headers={"WWW-Authenticate": f'{CHALLENGE}, error="invalid_token"'},
        )
    return who


Caller = Annotated[Principal, Depends(principal)]


def denied(who: Principal, detail: str, kind: str = "forbidden") -> ProblemError:
    """The problem for a caller who may not do something: 401 without a token, else 403."""
    if who.anonymous:
        return ProblemError(
            401,
            f"{detail}; this needs a token",
            kind="unauthenticated",
            headers={"WWW-Authenticate": CHALLENGE},
        )
    return ProblemError(403, detail, kind=kind)


def writer(who: Caller) -> Principal:
    """The caller, who must hold write scope (a FastAPI dependency)."""
    if not who.may(Scope.WRITE):
        raise denied(who, f"{who.user} has {who.scope.value} scope; this needs write")
    return who


Writer = Annotated[Principal, Depends(writer)]

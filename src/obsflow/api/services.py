"""What the API's handlers work with: one :class:`Services` per app, made by
:func:`obsflow.api.create_app` from the site and passed to handlers as a dependency
(no globals: a test may build many apps)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from fastapi import Request, Response
from pydantic import BaseModel

from obsflow.access import TokenStore
from obsflow.archive.retrieval import Retriever
from obsflow.catalog.runs import RunStore
from obsflow.receipt.intake import Wakeable
from obsflow.site import Site

if TYPE_CHECKING:
    from obsflow.api.metrics import Metrics


class Uploads:
    """The archive IDs being uploaded right now (one upload per ID at a time)."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, archive_id: str) -> bool:
        with self._lock:
            if archive_id in self._busy:
                return False
            self._busy.add(archive_id)
            return True

    def release(self, archive_id: str) -> None:
        with self._lock:
            self._busy.discard(archive_id)


@dataclass(frozen=True)
class Services:
    site: Site
    tokens: TokenStore
    runs: RunStore
    retriever: Retriever
    metrics: Metrics
    page_limit: int
    """The most items one page of a listing holds (``settings.api.page_limit``)."""
    uploads: Uploads
    wake: Wakeable | None = None
    """Set when an upload is cached (the daemon's ingestors and tracker)."""

    def now(self) -> datetime:
        return self.site.clock()


def services(request: Request) -> Services:
    """The app's services (a FastAPI dependency)."""
    found = request.app.state.services
    assert isinstance(found, Services)
    return found


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """``model`` as JSON, leaving out the fields never set (a withheld field is absent,
    not null). Handlers return this rather than the model, so that FastAPI does not
    validate every page twice; the route's ``response_model`` documents the shape."""
    return Response(
        model.model_dump_json(exclude_unset=True),
        status_code=status_code,
        media_type="application/json",
    )

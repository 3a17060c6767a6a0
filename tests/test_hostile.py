"""Hostile input at receipt: the corpus of broken frames in ``tests/hostile/`` (written by
``tests/hostile/make.py``, with the reason each must get in ``expected.json``), received
directly and through the transfer endpoint. Each is quarantined once with its reason;
none raises, none is offered again as new, none is a 500."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from obsflow.access import Scope, TokenStore
from obsflow.api import ApiServer
from obsflow.catalog import FileQuery
from obsflow.receipt.receiver import Outcome
from obsflow.site import Site, open_site
from obsflow.states import FileState
from tests.conftest import SiteFactory

CORPUS = Path(__file__).parent / "hostile"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())


def test_the_corpus_on_disk_is_the_one_its_script_writes() -> None:
    assert sorted(p.name for p in CORPUS.glob("ofc_*.fits")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_hostile_frame_is_quarantined_once_with_its_reason(site: Site, name: str) -> None:
    source = site.settings.incoming / name
    shutil.copyfile(CORPUS / name, source)
    expected = EXPECTED[name]
    first = site.receiver.receive(source)
    assert first.outcome is Outcome.REJECTED, first
    assert first.reason is not None and first.reason.startswith(f"{expected['reason']}: ")
    for word in expected["detail"]:
        assert word in first.reason, (word, first.reason)
    again = site.receiver.receive(source)  # the next scan offers it again: nothing new
    assert again.outcome is Outcome.REJECTED and again.reason == first.reason
    (row,) = site.catalog.find(FileQuery())
    assert row.state is FileState.REJECTED and row.reason == first.reason
    assert len(list(site.settings.quarantine.rglob(name))) == 1


@pytest.fixture
def server(make_site: SiteFactory) -> Iterator[tuple[Site, str, str]]:
    site = open_site(make_site("server"))
    api = ApiServer(site).start()
    token, _ = TokenStore(site.catalog).create("agent", Scope.WRITE, [], site.clock())
    try:
        yield site, api.url, token
    finally:
        api.stop()
        site.close()


def test_every_hostile_frame_sent_to_the_transfer_endpoint_is_a_422_problem(
    server: tuple[Site, str, str],
) -> None:
    site, url, token = server
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as http:
        for name, expected in EXPECTED.items():
            data = (CORPUS / name).read_bytes()
            answer = http.put(
                "/transfers/OF.20261122.18000.00.fits",
                content=data,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Upload-Length": str(len(data)),
                    "Obsflow-Sha256": hashlib.sha256(data).hexdigest(),
                    "Obsflow-Name": name,
                },
            )
            assert answer.status_code == 422, (name, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            for word in expected["detail"]:
                assert word in answer.json()["detail"], (name, word, answer.text)
    assert site.catalog.find(FileQuery(state=FileState.CACHED)) == []

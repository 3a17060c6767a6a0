"""Hostile clients of the REST API (a real uvicorn server on a site with frames, on
SQLite and PostgreSQL): extreme parameters answer 200 or 422, never 500; a wrong method
is told every method of its route; what no client can learn or grow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import Case, GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.result import Ok
from sqlalchemy import insert, update

from obsflow.access import Scope, TokenStore
from obsflow.api import OPENAPI_URL, ApiServer
from obsflow.catalog import FileQuery, schema
from obsflow.catalog.groupkey import GroupKey
from obsflow.catalog.runs import NewRun, RunStore
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import RunState, StepState
from tests.conftest import SiteFactory
from tests.test_api import by_content


@dataclass
class Server:
    site: Site
    url: str
    tokens: dict[str, str]
    """Role → secret: reader (program U017), writer (any instrument), admin."""

    def client(self, role: str = "anonymous") -> httpx.Client:
        token = self.tokens.get(role)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def server(make_site: SiteFactory, frames: list[Path]) -> Iterator[Server]:
    site = open_site(make_site())
    ingest_paths(site, frames[:4])
    store = TokenStore(site.catalog)
    now = site.clock()
    tokens = {
        role: store.create(role, scope, programs, now)[0]
        for role, scope, programs in (
            ("reader", Scope.READ, ["2026B-U017"]),
            ("writer", Scope.WRITE, []),
            ("admin", Scope.ADMIN, []),
        )
    }
    api = ApiServer(site).start()
    try:
        yield Server(site, api.url, tokens)
    finally:
        api.stop()
        site.close()


EXTREMES: dict[str, list[str]] = {
    "date-time": [
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999Z",
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59-23:59",
    ],
    "date": ["0001-01-01", "9999-12-31"],
    "integer": ["0", "-1", str(2**31), str(2**63), "9" * 19, "-" + "9" * 19],
    "number": ["0", "-1", "1e308", "1e309", "-1e309", "nan", "inf"],
}


def extreme_requests(doc: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(path, query parameter, value) for every date, time or number parameter of every
    GET of the document, each at its extremes."""
    for template, operations in doc["paths"].items():
        get = operations.get("get")
        if get is None:
            continue
        path = template
        for param in get.get("parameters", []):
            if param["in"] == "path":
                path = path.replace("{" + param["name"] + "}", "1")
        for param in get.get("parameters", []):
            if param["in"] != "query":
                continue
            for shape in param["schema"].get("anyOf", [param["schema"]]):
                kind = shape.get("format", shape.get("type"))
                for value in EXTREMES.get(kind, []):
                    yield path, param["name"], value


@pytest.mark.parametrize("role", ["anonymous", "reader"])
def test_every_date_and_number_parameter_at_its_extremes_is_200_or_422(
    server: Server, role: str
) -> None:
    with server.client(role) as client:
        requests = list(extreme_requests(client.get(OPENAPI_URL).json()))
        assert ("/api/v1/files", "since", "0001-01-01T00:00:00Z") in requests
        for path, name, value in requests:
            answer = client.get(path, params={name: value})
            assert answer.status_code < 500, (path, name, value, answer.text)
            if answer.status_code == 422:
                assert answer.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/api/v1/transfers/OF.20261122.18000.00.fits", "GET, PUT"),
        ("POST", "/api/v1/files/OF.20261122.18000.00.fits/tags/good", "PUT, DELETE"),
        ("DELETE", "/api/v1/files", "GET"),
    ],
)
def test_a_wrong_method_is_told_every_method_of_its_route(
    server: Server, method: str, path: str, allowed: str
) -> None:
    with server.client() as client:
        answer = client.request(method, path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allowed
    assert answer.headers["content-type"] == "application/problem+json"
    assert allowed in answer.json()["detail"]


def test_made_up_methods_and_paths_cannot_grow_the_metrics(server: Server) -> None:
    """Labels come from closed sets: a stream of made-up methods and paths adds no series."""
    with server.client() as client:
        client.get("/metrics")
        before = client.get("/metrics").text.count("obsflow_api_requests_total{")
        for n in range(40):
            client.request(f"X{n}YZ", "/api/v1/files")
            client.get(f"/made/up/{n}")
            client.request(f"BREW{n}", f"/made/up/{n}")
        page = client.get("/metrics").text
    series = [line for line in page.splitlines() if line.startswith("obsflow_api_requests_total{")]
    assert len(series) <= before + 4, series  # other × (files, other) × (405, 404)
    assert "X1YZ" not in page and "BREW" not in page and "/made/up" not in page
    assert 'method="other",route="other",status="404"' in page
    assert 'method="GET",route="other",status="404"' in page


def test_run_details_show_site_paths_only_to_admin(server: Server) -> None:
    site = server.site
    inputs = site.catalog.find(FileQuery())[:2]
    program = inputs[0].program
    assert program is not None
    reader, _ = TokenStore(site.catalog).create("mine", Scope.READ, [program], site.clock())
    store = RunStore(site.catalog)
    now = site.clock()
    run_id = store.create(
        NewRun(
            pipeline="ofcam_masterbias",
            group_key=GroupKey.of("ofcam_masterbias", {"night": str(inputs[0].night)}),
            night=inputs[0].night,
            inputs={"bias": tuple(r.id for r in inputs)},
            reason="test",
        ),
        now,
    )
    assert run_id is not None
    work = site.settings.work / str(run_id)
    cached = site.settings.cache / "OFCAM" / "x.fits"
    log = site.settings.logs / "runs" / f"{run_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"cd {work}\nreading {cached}\nwrote {work}/out.fits\n")
    with site.catalog.write() as conn:
        conn.execute(
            update(schema.runs)
            .where(schema.runs.c.id == run_id)
            .values(
                state=RunState.FAILED.value,
                attempts=1,
                started_at=now,
                finished_at=now,
                error=f"step combine failed: see {log}",
                profile=f"steps:\n- argv: [combine, {cached}, {work}/out.fits]\n",
                work_dir=str(work),
                log_path=str(log),
            )
        )
        conn.execute(
            insert(schema.run_steps).values(
                run_id=run_id,
                step="combine",
                position=0,
                state=StepState.FAILED.value,
                attempts=1,
                argv=json.dumps(["combine", str(cached), f"{work}/out.fits"]),
                started_at=now,
                finished_at=now,
                exit_status=3,
                stderr_tail=f"cannot write {work}/out.fits",
            )
        )
    site_root = str(site.settings.site)
    with server.client("admin") as admin:
        shown = admin.get(f"/api/v1/runs/{run_id}").json()
    assert shown["steps"][0]["argv"][1] == str(cached) and shown["work_dir"] == str(work)
    server.tokens["mine"] = reader
    with server.client("mine") as client:
        detail = client.get(f"/api/v1/runs/{run_id}")
        listed = client.get("/api/v1/runs")
    assert detail.status_code == 200 and "proprietary" not in detail.json()
    for text in (detail.text, listed.text):
        assert site_root not in text and str(site.settings.site.resolve()) not in text
    shown = detail.json()
    assert shown["steps"][0]["argv"] == ["combine", "<cache>/OFCAM/x.fits", "./out.fits"]
    assert shown["steps"][0]["stderr_tail"] == "cannot write ./out.fits"
    assert "reading <cache>/OFCAM/x.fits" in shown["log"]
    assert shown["error"] == f"step combine failed: see <logs>/runs/{run_id}.log"
    assert "work_dir" not in shown and "log_path" not in shown


@pytest.fixture
def hypothesis_home(tmp_path: Path) -> Iterator[None]:
    """Hypothesis keeps its caches here, not in the work tree's ``.hypothesis``."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    set_hypothesis_home_dir(None)


@pytest.mark.usefixtures("hypothesis_home")
@pytest.mark.parametrize("role", ["anonymous", "writer"])
def test_schemathesis_without_a_token_and_with_a_write_token_finds_no_server_error(
    server: Server, role: str
) -> None:
    """Schemathesis, as a caller without a token (what anyone on the network can send)
    and with a write token: valid and invalid cases of every operation; every answer
    conforms to the document (a 405 names the route's methods) and none is a 5xx.
    ``tests/test_api.py`` runs it as admin."""
    api = schemathesis.openapi.from_url(server.url + OPENAPI_URL)
    token = server.tokens.get(role)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    checked = 0
    for result in api.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        takes = [*operation.path_parameters, *operation.query]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 2 if takes else 1]:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=10,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Case[Any]) -> None:
                for framing in ("content-length", "transfer-encoding", "host"):
                    for name in [h for h in case.headers or {} if h.lower() == framing]:
                        del case.headers[name]  # the HTTP client's to set, not the API's
                response = case.call(base_url=server.url, headers=auth)
                assert response.status_code < 500, case.as_curl_command()
                excluded = [positive_data_acceptance] if by_content(case.path) else []
                case.validate_response(response, headers=auth, excluded_checks=excluded)

            check()
        checked += 1
    assert checked > 20

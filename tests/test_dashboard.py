"""The operator's dashboard against a real server: its pages over HTTP (who sees what,
sign-in cookies, CSRF), then a real headless Chromium (Playwright) that signs in, sees a
frame received while the page is open appear without a reload, retries a run that
failed for real, follows a file's provenance and checks the pages with axe-core.

The site: the example instrument with toy pipelines (``tests/tools/stack.py``) whose
calibration step fails while a marker file exists (the cause an operator fixes before
pressing Retry); the OBJECT frames belong to program A, proprietary for a year.
Screenshots go to ``tests/artifacts/`` (ignored by git).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from obsflow.access import Scope, TokenStore
from obsflow.api import OPENAPI_URL, ApiServer
from obsflow.catalog import schema
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.catalog.runs import RunStore
from obsflow.dashboard.session import COOKIE, CSRF_HEADER, csrf_token
from obsflow.processing.executor import InlineExecutor
from obsflow.processing.tracker.loop import process_until_idle
from obsflow.sim.simulate import simulate_night
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import RunState
from tests.conftest import SiteFactory, service_missing
from tests.test_processing import STACK, toy_pipelines

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
AXE = Path(__file__).parent / "tools" / "axe.min.js"
"""axe-core 4.14.1 (MPL-2.0), from the npm registry (``npm pack axe-core``), unchanged."""


@dataclass
class Dash:
    site: Site
    url: str
    tokens: dict[str, str]
    """admin, writer (program A), reader (program A), other (program B)."""
    marker: Path
    """While it exists, toy_calibrate's step fails."""
    secret: list[FileRecord]
    """Program A's OBJECT frames, proprietary for a year."""

    def client(self, role: str | None = None) -> httpx.Client:
        cookies = {COOKIE: self.tokens[role]} if role else {}
        return httpx.Client(base_url=self.url, cookies=cookies, timeout=30)

    def failed_run(self) -> int:
        failed = RunStore(self.site.catalog).find(pipeline="toy_calibrate")
        assert failed, "no run of toy_calibrate"
        assert failed[0].state is RunState.FAILED, failed[0]
        return failed[0].id


def failing_pipelines(marker: Path) -> str:
    """The toy pipelines, with toy_calibrate's step failing (exit 3, a message on stderr)
    while ``marker`` exists."""
    text = toy_pipelines()
    guard = (
        f"if [ -e {marker} ]; then echo 'calibrate: the flat field is missing; "
        'refusing\' >&2; exit 3; fi; exec "$0" "$@"'
    )
    start = text.index("        command: ['{python}'")
    end = text.index("\n", start)
    argv = [
        "sh",
        "-c",
        guard,
        "{python}",
        str(STACK),
        "--imagetyp",
        "OBJECT",
        "--out",
        "{outputs.ofcam_calibrated}",
        "{inputs.frame}",
        "{inputs.flat}",
    ]
    return text[:start] + f"        command: {json.dumps(argv)}" + text[end:]


@pytest.fixture
def dash(make_site: SiteFactory, frames: list[Path], tmp_path: Path) -> Iterator[Dash]:
    marker = tmp_path / "flat-field-missing"
    marker.touch()
    settings = make_site(processing={"lease_seconds": 30})
    (settings.registry / "ofcam_pipelines.yaml").write_text(failing_pipelines(marker))
    site = open_site(settings)
    summary = ingest_paths(site, frames)
    assert len(summary.ingest.archived) == len(frames)
    assert process_until_idle(site, InlineExecutor(site), timeout=120)
    now = site.clock()
    every = site.catalog.find(FileQuery())
    objects = [r for r in every if r.frame_type == "OBJECT"]
    with site.catalog.write() as conn:  # setup: all program A's; its science proprietary
        conn.execute(
            update(schema.files)
            .where(schema.files.c.id.in_([r.id for r in every]))
            .values(program="A", proprietary_until=None)
        )
        conn.execute(
            update(schema.files)
            .where(schema.files.c.id.in_([r.id for r in objects]))
            .values(proprietary_until=now + timedelta(days=365))
        )
    store = TokenStore(site.catalog)
    tokens = {
        role: store.create(user, scope, programs, now)[0]
        for role, user, scope, programs in (
            ("admin", "root", Scope.ADMIN, []),
            ("writer", "wanda", Scope.WRITE, ["A"]),
            ("reader", "alice", Scope.READ, ["A"]),
            ("other", "bob", Scope.WRITE, ["B"]),
        )
    }
    server = ApiServer(site).start()
    try:
        secret = site.catalog.records([r.id for r in objects])
        yield Dash(site, server.url, tokens, marker, secret)
    finally:
        server.stop()
        site.close()


def proprietary_strings(dash: Dash) -> list[str]:
    """What an anonymous page must never hold: program A's object names, positions,
    original names, and every site path."""
    found: list[str] = [str(dash.site.settings.site)]
    for r in dash.secret:
        assert r.object and r.ra is not None and r.dec is not None
        found += [r.object, r.original_name, f"{r.ra:.5f}", f"{r.dec:.5f}"]
    return found


# ------------------------------------------------------------------ over HTTP


def test_anonymous_pages_show_only_public_data(dash: Dash) -> None:
    secret = dash.secret[0]
    with dash.client() as anonymous:
        pages = {
            "/": anonymous.get("/"),
            "/ui/trouble": anonymous.get("/ui/trouble"),
            "/ui/runs": anonymous.get("/ui/runs"),
            "/ui/files": anonymous.get("/ui/files", params={"product": "ofcam_raw"}),
            "file": anonymous.get(f"/ui/files/{secret.archive_id}"),
            "run": anonymous.get(f"/ui/runs/{dash.failed_run()}"),
        }
        for name, page in pages.items():
            assert page.status_code == 200, (name, page.text)
            assert page.headers["content-type"].startswith("text/html")
            for hidden in proprietary_strings(dash):
                assert hidden not in page.text, (name, hidden)
        assert "proprietary" in pages["file"].text
        assert "Retry" not in pages["run"].text  # no buttons for the anonymous
        preview = anonymous.get(f"/ui/files/{secret.archive_id}/preview.png")
        assert preview.status_code == 403
        assert anonymous.get(f"/ui/files/{secret.archive_id}/data").status_code == 401
        # every asset is served here; nothing names another host
        for asset in ("htmx.min.js", "htmx-ext-sse.min.js", "style.css"):
            assert anonymous.get(f"/ui/static/{asset}").status_code == 200
        assert "http" not in pages["/"].text.replace(dash.url, "").split("<body")[0]
        # the dashboard stays out of the API's document
        paths = anonymous.get(OPENAPI_URL).json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith(("/ui", "/login"))]
        # an empty form field is no filter (the API's known-parameter rule still holds)
        empty = anonymous.get("/ui/files", params={"product": "", "night": "", "cone": ""})
        assert empty.status_code == 200 and "archive ID" in empty.text
        assert anonymous.get("/ui/runs", params={"bogus": "1"}).status_code == 422


def test_signing_in_sets_a_strict_http_only_cookie_and_reads_as_the_token(dash: Dash) -> None:
    secret = dash.secret[0]
    with dash.client() as browser:
        wrong = browser.post("/login", data={"token": "obf_" + "x" * 43})
        assert wrong.status_code == 401 and "unknown or revoked" in wrong.text
        elsewhere = browser.post(  # another site's page signing the visitor in (login CSRF)
            "/login",
            data={"token": dash.tokens["reader"]},
            headers={"Origin": "https://evil.example"},
        )
        assert elsewhere.status_code == 403 and "set-cookie" not in elsewhere.headers
        signed = browser.post("/login", data={"token": dash.tokens["reader"]})
        assert signed.status_code == 303
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        page = browser.get(f"/ui/files/{secret.archive_id}")
        assert secret.object and secret.object in page.text  # program A's reader sees it
        assert str(dash.site.settings.site) not in page.text  # paths are admins' only
        png = browser.get(f"/ui/files/{secret.archive_id}/preview.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        data = browser.get(f"/ui/files/{secret.archive_id}/data")
        assert data.status_code == 200 and data.content.startswith(b"SIMPLE  =")
        assert browser.get("/api/v1/files/" + str(secret.archive_id)).json()["proprietary"]
        out = browser.post("/logout", data={"csrf": csrf_token(dash.tokens["reader"])})
        assert out.status_code == 303 and COOKIE in out.headers["set-cookie"]
        assert secret.object not in browser.get(f"/ui/files/{secret.archive_id}").text


def test_a_change_needs_write_scope_and_the_session_csrf_token(dash: Dash) -> None:
    run_id = dash.failed_run()
    retry = f"/ui/runs/{run_id}/retry"
    with dash.client() as anonymous:
        assert anonymous.post(retry).status_code == 403
    with dash.client("writer") as writer:
        assert writer.post(retry).status_code == 403  # no token at all
        assert writer.post(retry, data={"csrf": "0" * 64}).status_code == 403
        other = csrf_token(dash.tokens["other"])  # another session's token
        assert writer.post(retry, headers={CSRF_HEADER: other}).status_code == 403
        assert RunStore(dash.site.catalog).get(run_id).state is RunState.FAILED  # type: ignore[union-attr]
    with dash.client("reader") as reader:  # read scope: the API's 403
        mine = csrf_token(dash.tokens["reader"])
        assert reader.post(retry, data={"csrf": mine}).status_code == 403
    with dash.client("other") as other_program:  # program B may not touch A's run
        mine = csrf_token(dash.tokens["other"])
        assert other_program.post(retry, data={"csrf": mine}).status_code == 403
    with dash.client("writer") as writer:
        mine = csrf_token(dash.tokens["writer"])
        done = writer.post(retry, data={"csrf": mine})
        assert done.status_code == 303, done.text
        assert done.headers["location"].endswith("said=retried")
    assert RunStore(dash.site.catalog).get(run_id).state is RunState.QUEUED  # type: ignore[union-attr]


def test_reprocess_queues_a_new_version_through_the_api_and_the_dashboard(dash: Dash) -> None:
    bias = RunStore(dash.site.catalog).find(pipeline="toy_bias")[0]
    admin = {"Authorization": f"Bearer {dash.tokens['admin']}"}
    with httpx.Client(base_url=dash.url, headers=admin, timeout=30) as api:
        answer = api.post(f"/api/v1/runs/{bias.id}/reprocess")
        assert answer.status_code == 202, answer.text
        queued = answer.json()["queued"]
        assert len(queued) == 1
    with dash.client("admin") as browser:
        csrf = csrf_token(dash.tokens["admin"])
        again = browser.post(f"/ui/runs/{bias.id}/reprocess", data={"csrf": csrf})
        assert again.status_code == 303
        newest = int(again.headers["location"].split("/")[-1].split("?")[0])
        assert newest > queued[0]
        shown = browser.get(again.headers["location"])
        assert "Queued as a new version" in shown.text
    versions = [r.version for r in RunStore(dash.site.catalog).find(pipeline="toy_bias")]
    assert versions == [1, 2, 3]


# ------------------------------------------------------------------ in a browser


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium (Debian's), through Playwright's sync API."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_missing("Playwright for Python is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        service_missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's WCAG 2 A and AA violations on the page (labels, alt text, contrast...)."""
    page.add_script_tag(path=str(AXE))
    result: dict[str, Any] = page.evaluate(
        "async () => await axe.run(document, {runOnly: "
        "{type: 'tag', values: ['wcag2a', 'wcag2aa']}})"
    )
    return [
        {"id": v["id"], "nodes": [n["target"] for n in v["nodes"]][:3]}
        for v in result["violations"]
    ]


@pytest.mark.slow
def test_an_operator_watches_the_night_retries_a_run_and_follows_provenance(
    dash: Dash, browser: Any, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    # sign in through the form
    page.goto(dash.url + "/login")
    page.get_by_label("Token").fill(dash.tokens["admin"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(dash.url + "/")
    assert "root (admin)" in page.inner_text("header")
    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # a frame received while the page is open appears without a reload
    acquired = page.locator('#frames tr[data-instrument="OFCAM"] td.acquired')
    assert acquired.inner_text() == "12"
    page.wait_for_function("() => document.querySelector('#tonight').dataset !== undefined")
    page.evaluate("() => { window.sameDocument = true; }")
    new = simulate_night(tmp_path / "late", 1, seed=99, shape=(64, 64), start_number=13)
    received = ingest_paths(dash.site, [new[0].path])
    assert len(received.ingest.archived) == 1
    page.wait_for_function(
        "() => document.querySelector("
        "'#frames tr[data-instrument=\"OFCAM\"] td.acquired').textContent === '13'",
        timeout=15_000,
    )
    assert page.evaluate("() => window.sameDocument") is True  # no reload happened
    assert "p99" in page.inner_text("#tonight") and page.locator("svg.plot").count() == 1
    assert axe_violations(page) == []
    shot(page, "tonight")

    # the failed run, with the failing step's log, retried after its cause is fixed
    run_id = dash.failed_run()
    page.get_by_role("link", name="Stuck & failed").click()
    card = page.locator(f"#failed-{run_id}")
    assert "the flat field is missing" in card.inner_text()
    assert axe_violations(page) == []
    shot(page, "trouble")
    card.get_by_role("link", name=f"Run {run_id}").click()
    assert page.inner_text("#run-state") == "failed"
    dash.marker.unlink()  # the operator fixes the cause
    page.get_by_role("button", name=f"Retry run {run_id}").click()
    page.wait_for_url(f"**/ui/runs/{run_id}?said=retried")
    assert page.inner_text("#run-state") == "queued"
    assert process_until_idle(dash.site, InlineExecutor(dash.site), timeout=120)
    page.reload()
    assert page.inner_text("#run-state") == "succeeded"
    assert axe_violations(page) == []
    shot(page, "run")

    # provenance: the calibrated frame ← its flat ← the master bias ← the biases
    outputs = page.locator("h2:has-text('Outputs') + ul a")
    outputs.first.click()
    page.wait_for_url("**/ui/files/**")
    made_from = page.locator("#made-from")
    assert "toy_calibrate" in made_from.inner_text(), made_from.inner_text()
    assert page.locator("img.preview").evaluate("img => img.complete && img.naturalWidth > 0")
    flat = made_from.locator('a[data-product="ofcam_masterflat"]').first
    flat_id = flat.inner_text()
    flat.click()
    page.wait_for_url(f"**/ui/files/{flat_id}")
    assert "toy_flat" in page.inner_text("#made-from")
    bias = page.locator('#made-from a[data-product="ofcam_masterbias"]').first
    bias_id = bias.inner_text()
    bias.click()
    page.wait_for_url(f"**/ui/files/{bias_id}")
    assert "toy_bias" in page.inner_text("#made-from")
    assert axe_violations(page) == []
    shot(page, "file")
    page.close()


@pytest.mark.slow
def test_the_anonymous_browser_sees_no_proprietary_data(dash: Dash, browser: Any) -> None:
    page = browser.new_page()
    secret = dash.secret[0]
    for path in ("/", f"/ui/files/{secret.archive_id}", "/ui/files?product=ofcam_raw"):
        page.goto(dash.url + path)
        html = page.content()
        for hidden in proprietary_strings(dash):
            assert hidden not in html, (path, hidden)
        assert axe_violations(page) == []
    shot(page, "anonymous-search")
    page.goto(dash.url + f"/ui/files/{secret.archive_id}")
    assert "proprietary" in page.inner_text("main")
    page.close()

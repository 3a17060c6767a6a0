"""``obsflow reduce`` and ``obsflow reductions``: on-demand reductions
(:mod:`obsflow.processing.reductions`), on a site or through an archive server's API.

On a site (``--site``), the command acts as the site's operator (every file readable);
through a server (``--server URL --token T``), as the token's user, with the server's
checks (the proprietary rule, quotas). ``--wait`` follows the reduction to its end,
printing each change of phase and step; on a site without a running daemon, it
executes the reduction's runs in this process.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from obsflow.access import Principal, Scope
from obsflow.cli import JsonOption, SiteOption, _site, app, err, out
from obsflow.cli.runs import _parameter
from obsflow.site import Site

if TYPE_CHECKING:
    import httpx  # (imported when a server is asked: every command would pay ~30 ms)

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="OBSFLOW_SERVER_URL",
        help="An archive server's URL: ask it, instead of a site.",
        show_default=False,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="OBSFLOW_TOKEN", help="With --server: your API token."),
]
POLL_SECONDS = 1.0


@app.command()
def reduce(
    pipeline: Annotated[str, typer.Option(help="The registry pipeline to reduce with.")],
    inputs: Annotated[
        list[str],
        typer.Option("--input", help="An archive ID to reduce (repeatable)."),
    ],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="A parameter of the pipeline: NAME=VALUE (repeatable)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print the plan; run nothing.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it to its end.")] = False,
    download: Annotated[
        Path | None,
        typer.Option(help="With --wait: save the results in this directory.", show_default=False),
    ] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """Ask for an on-demand reduction: the plan reuses the archive's products and runs
    only what is missing; the results are yours, not the archive's."""
    parameters = dict(_parameter(p) for p in param or [])
    body = {"pipeline": pipeline, "inputs": inputs, "parameters": parameters}
    with _Asker(server, token, site) as asker:
        if dry_run:
            plan = asker.plan(body)
            if as_json:
                print(json.dumps(plan, indent=1))
            else:
                _print_plan(plan["plan"])
            return
        reduction = asker.submit(body)
        say = err.print if as_json else out.print  # (--json: stdout is the JSON alone)
        say(f"reduction {reduction['reduction_id']}: {reduction['phase']}")
        if not as_json:
            _print_plan(reduction["plan"])
        if wait or download:
            reduction = asker.follow(reduction["reduction_id"], say)
        if as_json:
            print(json.dumps(reduction, indent=1, default=str))
        else:
            _print_end(reduction)
        if download and reduction["phase"] == "COMPLETED":
            download.mkdir(parents=True, exist_ok=True)
            for result in reduction["results"]:
                target = asker.download(result, download)
                say(f"  saved {target}")
        if reduction["phase"] in ("ERROR", "ABORTED"):
            raise typer.Exit(1)


@app.command()
def reductions(
    mine: Annotated[bool, typer.Option("--mine", help="Only your own.")] = False,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """On-demand reductions: yours (an admin's or the site's operator: everyone's)."""
    with _Asker(server, token, site) as asker:
        items = asker.list(mine)
    if as_json:
        print(json.dumps(items, indent=1, default=str))
        return
    table = Table("id", "owner", "pipeline", "phase", "inputs", "results", "created")
    for r in items:
        table.add_row(
            str(r["reduction_id"]),
            r["owner"],
            r["pipeline"],
            r["phase"] + (" (expired)" if r.get("expired") else ""),
            str(len(r["inputs"])),
            str(len(r["results"])),
            str(r["created"])[:19],
        )
    out.print(table)


# ---------------------------------------------------------------------------- asking


class _Asker:
    """The same questions, to a site (in process) or to a server (its REST API)."""

    def __init__(self, server: str | None, token: str | None, site: Path | None) -> None:
        if server and site:
            raise typer.BadParameter("give a site (--site) or a server (--server), not both")
        if server and not token:
            raise typer.BadParameter("a server needs your token (--token)", param_hint="--token")
        self.server = server.rstrip("/") if server else None
        self.token = token
        self.site_path = site
        self._site: Any = None
        self._client: httpx.Client | None = None

    def __enter__(self) -> _Asker:
        if self.server:
            import httpx

            self._client = httpx.Client(
                base_url=self.server,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=60,
            )
        else:
            self._site = _site(self.site_path)
            self.site: Site = self._site.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
        if self._site is not None:
            self._site.__exit__(None, None, None)

    # -- the questions

    def plan(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._client is not None:
            return self._answer(self._client.post("/api/v1/reductions?dry_run=true", json=body))
        service, asked = self._local(body)
        checked = self._call(lambda: service.check(self._operator(), asked))
        actions = self._call(lambda: service.dry_run(self._operator(), asked))
        return {
            "pipeline": body["pipeline"],
            "parameters": checked.effective,
            "inputs": body["inputs"],
            "plan": [a.to_json() for a in actions],
        }

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._client is not None:
            return self._answer(self._client.post("/api/v1/reductions", json=body))
        service, asked = self._local(body)
        record, _ = self._call(lambda: service.submit(self._operator(), asked))
        return self._view(record.id)

    def get(self, reduction_id: int) -> dict[str, Any]:
        if self._client is not None:
            return self._answer(self._client.get(f"/api/v1/reductions/{reduction_id}"))
        return self._view(reduction_id)

    def list(self, mine: bool) -> list[dict[str, Any]]:
        if self._client is not None:
            items: list[dict[str, Any]] = []
            cursor: str | None = None
            while True:
                params: dict[str, Any] = {"mine": str(mine).lower()}
                if cursor:
                    params["cursor"] = cursor
                page = self._answer(self._client.get("/api/v1/reductions", params=params))
                items += page["items"]
                cursor = page.get("next")
                if not cursor:
                    return items
        from obsflow.processing.reductions import Reductions

        service = Reductions(self.site)
        owner = getpass.getuser() if mine else None
        found: list[dict[str, Any]] = []
        after: int | None = None
        while batch := service.store.page(owner, after, 500):
            found += [self._view(r.id) for r in batch]
            after = batch[-1].id
        return found

    def follow(self, reduction_id: int, say: Callable[[str], None]) -> dict[str, Any]:
        """The reduction at its end, printing each change on the way."""
        if self._client is None:
            self._execute_here(reduction_id)
        seen: tuple[Any, ...] = ()
        while True:
            reduction = self.get(reduction_id)
            now = (
                reduction["phase"],
                tuple(
                    (p["run_id"], p["state"], tuple(p["steps"].items()))
                    for p in reduction["progress"]
                ),
            )
            if now != seen:
                seen = now
                steps = ", ".join(f"{p['pipeline']} {p['state']}" for p in reduction["progress"])
                say(f"  {reduction['phase']}" + (f": {steps}" if steps else ""))
            if reduction["phase"] in ("COMPLETED", "ERROR", "ABORTED"):
                return reduction
            time.sleep(POLL_SECONDS)

    def download(self, result: dict[str, Any], directory: Path) -> Path:
        target = directory / Path(result["name"]).name
        if self._client is not None:
            with self._client.stream("GET", result["url"]) as response:
                if response.status_code != 200:
                    err.print(f"[red]cannot download {result['name']}[/]: {response.status_code}")
                    raise typer.Exit(1)
                with target.open("wb") as sink:
                    for chunk in response.iter_bytes():
                        sink.write(chunk)
            return target
        import shutil

        from obsflow.processing.reductions import Reductions

        service = Reductions(self.site)
        reduction_id = int(result["url"].split("/")[4]) if "/reductions/" in result["url"] else 0
        record = service.store.get(reduction_id)
        found = service.result_file(record, result["name"]) if record else None
        if found is None and result.get("archive_id"):
            shutil.copyfile(self.site.retriever().fetch(result["archive_id"]), target)
            return target
        if found is None:
            err.print(f"[red]cannot download {result['name']}[/]: gone")
            raise typer.Exit(1)
        shutil.copyfile(found[1], target)
        return target

    # -- on a site

    def _operator(self) -> Principal:
        return Principal(
            user=getpass.getuser(), scope=Scope.ADMIN, programs=frozenset(), token_id=None
        )

    def _local(self, body: dict[str, Any]) -> tuple[Any, Any]:
        from obsflow.processing.reductions import Reductions, Request

        asked = Request(body["pipeline"], tuple(body["inputs"]), body["parameters"])
        return Reductions(self.site), asked

    def _call(self, ask: Any) -> Any:
        from obsflow.processing.reductions import ReductionError

        try:
            return ask()
        except ReductionError as exc:
            err.print(f"[red]cannot reduce[/]: {exc}")
            raise typer.Exit(2 if exc.kind == "invalid" else 1) from None

    def _view(self, reduction_id: int) -> dict[str, Any]:
        from obsflow.api.reductions import _out
        from obsflow.processing.reductions import Reductions

        service = Reductions(self.site)
        return _out(service, service.refresh(reduction_id)).model_dump(mode="json")

    def _execute_here(self, reduction_id: int) -> None:
        """Execute the reduction's runs in this process, unless a daemon runs them."""
        from obsflow.daemon import read_status
        from obsflow.processing.executor import make_executor
        from obsflow.processing.reductions import Reductions
        from obsflow.processing.tracker.loop import process_until_idle

        status = read_status(self.site.settings.site, self.site.clock())
        if status is not None and status.get("alive"):
            return
        store = Reductions(self.site).store
        executor = make_executor(self.site)

        def ended() -> bool:
            record = store.get(reduction_id)
            return record is None or record.phase.finished

        try:
            process_until_idle(self.site, executor, timeout=24 * 3600, until=ended)
        finally:
            executor.close()

    # -- through a server

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            err.print(f"[red]{response.status_code}[/]: {detail}")
            raise typer.Exit(2 if response.status_code == 422 else 1)
        answer: dict[str, Any] = response.json()
        return answer


def _print_plan(plan: list[dict[str, Any]]) -> None:
    table = Table("pipeline", "action", "group", "products", "run")
    for action in plan:
        table.add_row(
            action["pipeline"] + (" (asked)" if action["final"] else ""),
            action["action"],
            action["group"],
            "\n".join(action["products"]),
            "" if action["run_id"] is None else str(action["run_id"]),
        )
    out.print(table)


def _print_end(reduction: dict[str, Any]) -> None:
    out.print(f"reduction {reduction['reduction_id']}: {reduction['phase']}")
    if reduction.get("error"):
        err.print(reduction["error"])
    for result in reduction.get("results", []):
        out.print(f"  {result['name']}  {result['size']} bytes  sha256 {result['sha256']}")

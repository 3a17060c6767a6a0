"""The API token commands: ``token create``, ``token list``, ``token revoke``.
Registered on the main app by :mod:`obsflow.cli`; the policy is :mod:`obsflow.access`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from obsflow.access import (
    AccessError,
    Scope,
    TokenStore,
    check_instrument,
    check_program,
    check_user,
)
from obsflow.cli import JsonOption, SiteOption, _site, app, choice, choices, err, out

token_app = typer.Typer(
    help="API tokens: create one (its secret is shown once), list them, revoke one.",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option(help="Whose token it is (letters, digits, _ . @ -).")],
    scope: Annotated[
        str,
        typer.Option(
            metavar=choices(Scope),
            help="read: data; write: also tags, retries, transfers; admin: everything; "
            "worker: for 'obsflow worker --server' (every file's bytes, runs claimed and "
            "reported, outputs sent; nothing else).",
        ),
    ],
    program: Annotated[
        list[str] | None,
        typer.Option(
            "--program",
            help="A program whose proprietary data the token may read (repeatable).",
            show_default=False,
        ),
    ] = None,
    instrument: Annotated[
        list[str] | None,
        typer.Option(
            "--instrument",
            help="With write scope: the only instrument whose frames it may transfer to "
            "this archive (repeatable; default any).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (with the secret) instead.")
    ] = False,
    site: SiteOption = None,
) -> None:
    """Make a token and print its secret, once: only its hash is kept."""
    the_scope = choice(scope, Scope, "scope", "--scope")
    assert the_scope is not None  # a required option
    programs, instruments = program or [], instrument or []
    for hint, check, values in (
        ("--user", check_user, [user]),
        ("--program", check_program, programs),
        ("--instrument", check_instrument, instruments),
    ):
        try:
            for value in values:
                check(value)
        except AccessError as exc:
            raise typer.BadParameter(str(exc), param_hint=hint) from None
    with _site(site) as s:
        secret, who = TokenStore(s.catalog).create(
            user, the_scope, programs, s.clock(), instruments=instruments
        )
    if as_json:
        data = {
            "id": who.token_id,
            "user": who.user,
            "scope": who.scope.value,
            "programs": sorted(who.programs),
            "instruments": sorted(who.instruments),
            "token": secret,
        }
        print(json.dumps(data, indent=1))
    else:
        print(secret)  # plain print: nothing to wrap, style or highlight in the secret
    err.print(
        f"token {who.token_id} for {who.user} (scope {who.scope.value}"
        + (f", programs {', '.join(sorted(who.programs))}" if who.programs else "")
        + (f", instruments {', '.join(sorted(who.instruments))}" if who.instruments else "")
        + "): the secret is shown this once; keep it now, it cannot be shown again",
        highlight=False,
        markup=False,
    )


@token_app.command("list")
def token_list(as_json: JsonOption = False, site: SiteOption = None) -> None:
    """Every token, revoked ones too (never their secrets)."""
    with _site(site) as s:
        found = TokenStore(s.catalog).list()
    if as_json:
        print(json.dumps([t.to_json() for t in found], indent=1))
        return
    table = Table(title=f"tokens ({len(found)})")
    for column in ("id", "user", "scope", "programs", "created", "revoked"):
        table.add_column(column)
    for t in found:
        table.add_row(
            str(t.id),
            t.user,
            t.scope.value,
            ", ".join(t.programs),
            t.created.isoformat(timespec="seconds"),
            f"[red]{t.revoked.isoformat(timespec='seconds')}[/]" if t.revoked else "",
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(metavar="ID", help="The token's number.")],
    site: SiteOption = None,
) -> None:
    """Revoke a token: it stops working at once. Revoking it again changes nothing."""
    with _site(site) as s:
        store = TokenStore(s.catalog)
        if store.revoke(token_id, s.clock()):
            out.print(f"token {token_id} revoked", highlight=False)
            return
        info = store.get(token_id)
    if info is None:
        err.print(f"[red]no token[/] {token_id}", highlight=False)
        raise typer.Exit(1)
    assert info.revoked is not None
    out.print(
        f"token {token_id} was already revoked at {info.revoked.isoformat(timespec='seconds')}",
        highlight=False,
    )

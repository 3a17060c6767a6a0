"""The cache commands: ``cache status|trim|pin|unpin``, ``fetch`` and ``tag add|rm``.
Registered on the main app by :mod:`obsflow.cli`; the policy is :mod:`obsflow.archive.retrieval`."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from obsflow.archive.retrieval import InvalidTagError, NotFoundError, Retriever, check_tag
from obsflow.cli import JsonOption, SiteOption, _site, app, err, out
from obsflow.cli.files import lookup

cache_app = typer.Typer(
    help="The cache: its size and budget, trimming it, pinning files in it.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")
tag_app = typer.Typer(help="Tag files (find them with 'obsflow find --tag').", no_args_is_help=True)
app.add_typer(tag_app, name="tag")

OPERATOR = "operator"
"""Who holds a pin made with ``obsflow cache pin`` (a run's pins are ``run:ID``)."""
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGTP]?)(?:I?B)?", re.IGNORECASE)

IdArgument = Annotated[
    str, typer.Argument(metavar="ID", help="The file's archive ID.", show_default=False)
]


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``500M``, ``10G``, ``1.5T`` (K, M, G, T, P are powers of 1024;
    a trailing ``B`` or ``iB`` is allowed)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: expected bytes, or a number with K, M, G, T or P "
            "(powers of 1024), e.g. 500M or 10G"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def _human(size: int | None) -> str:
    if size is None:
        return "none"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit} ({size} B)"
        value /= 1024
    raise AssertionError("unreachable")


@contextmanager
def _retriever(site: Path | None) -> Iterator[Retriever]:
    """A retriever on the site; an unknown archive ID ends the command with exit 1."""
    with _site(site) as s:
        try:
            yield Retriever(s.catalog, s.cache, s.storage, s.settings.cache_policy, s.clock)
        except NotFoundError as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None


def _tag(tag: str) -> str:
    try:
        return check_tag(tag)
    except InvalidTagError as exc:
        raise typer.BadParameter(str(exc), param_hint="TAG") from None


@cache_app.command("status")
def cache_status(as_json: JsonOption = False, site: SiteOption = None) -> None:
    """How much the cache holds, against its budget; virtual and pinned files."""
    with _retriever(site) as retriever:
        status = retriever.status()
    if as_json:
        print(json.dumps(status.to_json(), indent=1))
        return
    table = Table(title="obsflow cache", show_header=False)
    table.add_row("files in the cache", str(status.files))
    table.add_row("bytes in the cache", _human(status.bytes))
    table.add_row("of which not archived yet", _human(status.unarchived_bytes))
    table.add_row("virtual files (in the archive only)", str(status.virtual))
    table.add_row("pinned files", str(status.pinned))
    table.add_row("budget", _human(status.budget))
    table.add_row("low-water mark", _human(status.low_water))
    if status.over_budget:
        table.add_row("over budget", "[red]yes[/]: 'obsflow cache trim' (or the daemon) trims it")
    out.print(table)


@cache_app.command("trim")
def cache_trim(
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="BYTES",
            help="Trim to this size (e.g. 0, 500M, 10G; powers of 1024). "
            "Default: the low-water mark of the site's budget.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
    site: SiteOption = None,
) -> None:
    """Evict the least recently used archived files (never pinned or unarchived ones):
    they become virtual, and 'obsflow fetch' brings them back."""
    try:
        to_bytes = None if to is None else parse_size(to)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--to") from None
    with _retriever(site) as retriever:
        report = retriever.trim(to_bytes)
    if as_json:
        print(json.dumps(report.to_json(), indent=1))
        return
    if report.target is None:
        out.print(
            "the site has no cache budget (cache_policy.budget_bytes) and no --to was "
            f"given: nothing to do; the cache holds {_human(report.remaining_bytes)}"
        )
        return
    out.print(
        f"evicted {report.evicted} file(s), {_human(report.freed_bytes)}; the cache holds "
        f"{_human(report.remaining_bytes)} (target {_human(report.target)})",
        highlight=False,
    )
    if report.skipped_pinned or report.skipped_unarchived:
        out.print(
            f"kept {report.skipped_pinned} pinned and {report.skipped_unarchived} "
            "not yet archived file(s) that would otherwise have gone",
            highlight=False,
        )
    if report.remaining_bytes > report.target:
        err.print(
            f"[yellow]the cache is still over the target[/] by "
            f"{_human(report.remaining_bytes - report.target)}: the rest is pinned or "
            "not archived yet",
            highlight=False,
        )


@cache_app.command("pin")
def cache_pin(
    archive_id: IdArgument,
    holder: Annotated[str, typer.Option(help="Who holds the pin.")] = OPERATOR,
    site: SiteOption = None,
) -> None:
    """Keep a file in the cache until unpinned (trim never evicts it)."""
    with _retriever(site) as retriever:
        try:
            retriever.pin(archive_id, holder)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--holder") from None
    out.print(f"pinned {archive_id} (holder {holder})", highlight=False)


@cache_app.command("unpin")
def cache_unpin(
    archive_id: IdArgument,
    holder: Annotated[str, typer.Option(help="Whose pin to drop.")] = OPERATOR,
    every: Annotated[
        bool, typer.Option("--all", help="Drop every holder's pin (runs' too).")
    ] = False,
    site: SiteOption = None,
) -> None:
    """Let trim evict a file again (drop the operator's pin, or --holder's, or --all)."""
    with _retriever(site) as retriever:
        n = retriever.unpin(archive_id, None if every else holder)
    whose = "every holder" if every else f"holder {holder}"
    if n == 0:
        out.print(f"{archive_id} was not pinned by {whose}", highlight=False)
    else:
        out.print(f"unpinned {archive_id} ({n} pin(s) of {whose} dropped)", highlight=False)


@app.command()
def fetch(
    names: Annotated[
        list[str],
        typer.Argument(
            metavar="ID...",
            help="Archive IDs or original file names (the newest version of that name).",
            show_default=False,
        ),
    ],
    to: Annotated[
        Path | None,
        typer.Option(
            "--to",
            metavar="DIR",
            help="Copy the files into DIR (made if missing), each under its archive ID, "
            "its sha256 checked.",
            show_default=False,
        ),
    ] = None,
    print_path: Annotated[
        bool, typer.Option("--print-path", help="Print only the local paths (for scripts).")
    ] = False,
    site: SiteOption = None,
) -> None:
    """Make files' bytes local (restoring a virtual file from the archive, its checksum
    verified) and print where they are; with --to, copy them into a directory."""
    if to is not None and to.exists() and not to.is_dir():
        raise typer.BadParameter(f"{to} exists and is not a directory", param_hint="--to")
    with _site(site) as s:
        records = []
        for name in names:  # every name is checked before any file is fetched
            record = lookup(s, name)
            if record is None or record.archive_id is None:
                err.print(
                    f"[red]error:[/] no file with archive ID {name!r}, nor one first named so"
                )
                raise typer.Exit(1)
            records.append(record)
        retriever = Retriever(s.catalog, s.cache, s.storage, s.settings.cache_policy, s.clock)
        for record in records:
            assert record.archive_id is not None
            try:
                path = retriever.fetch(record.archive_id)
                if to is not None:
                    path = _copy(path, to / record.archive_id, record.sha256)
            except (NotFoundError, OSError) as exc:
                err.print(f"[red]error:[/] {record.archive_id}: {exc}", highlight=False)
                raise typer.Exit(1) from None
            if print_path:
                print(path)
            else:
                out.print(f"{record.archive_id}: {path}", highlight=False)


def _copy(source: Path, target: Path, sha256: str) -> Path:
    """Copy ``source`` to ``target`` through a temporary name, checking its sha256 on the
    way: ``target`` appears whole and right, or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    digest = hashlib.sha256()
    with source.open("rb") as reader, partial.open("wb") as writer:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            writer.write(chunk)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise OSError(f"{source} does not have the recorded sha256 {sha256}; not copied")
    partial.replace(target)
    return target


@tag_app.command("add")
def tag_add(
    archive_id: IdArgument,
    tag: Annotated[str, typer.Argument(metavar="TAG", help="The tag (letters, digits, _ . : -).")],
    site: SiteOption = None,
) -> None:
    """Tag a file."""
    _tag(tag)
    with _retriever(site) as retriever:
        added = retriever.add_tag(archive_id, tag)
    out.print(
        f"tagged {archive_id} {tag}" if added else f"{archive_id} already has tag {tag}",
        highlight=False,
    )


@tag_app.command("rm")
def tag_rm(
    archive_id: IdArgument,
    tag: Annotated[str, typer.Argument(metavar="TAG", help="The tag to remove.")],
    site: SiteOption = None,
) -> None:
    """Remove a tag from a file."""
    _tag(tag)
    with _retriever(site) as retriever:
        removed = retriever.remove_tag(archive_id, tag)
    if not removed:
        err.print(f"{archive_id} has no tag {tag}", highlight=False)
        raise typer.Exit(1)
    out.print(f"removed tag {tag} from {archive_id}", highlight=False)

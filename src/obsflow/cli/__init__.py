"""The ``obsflow`` command. Settings are read here, once, and passed down.

This module holds the app, the options and helpers its commands share, and :func:`main`;
each group of commands is a module of this package that registers them on :data:`app`
when imported, and :data:`COMMANDS` says which: ``obsflow CMD`` imports only CMD's
module(s) (``--help`` and shell completion import them all). The modules:
:mod:`~obsflow.cli.sites` (init, registry check),
:mod:`~obsflow.cli.ingest` (ingest, retry), :mod:`~obsflow.cli.files` (find, show),
:mod:`~obsflow.cli.status`, :mod:`~obsflow.cli.sim` (simulate, demo),
:mod:`~obsflow.cli.daemon` (run), :mod:`~obsflow.cli.cache` (cache, fetch, tag),
:mod:`~obsflow.cli.runs` (runs, reprocess, registry replay), :mod:`~obsflow.cli.verify`
(fixity audits), :mod:`~obsflow.cli.worker`, :mod:`~obsflow.cli.serve` and
:mod:`~obsflow.cli.tokens`; :mod:`~obsflow.cli.upkeep` (migrate, backup, restore)."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer
from rich.console import Console
from typer.main import get_command_name
from typer.models import CommandInfo

from obsflow import __version__
from obsflow.cli import logs
from obsflow.cli.logs import LogFormat, LogLevel
from obsflow.errors import ConfigError, ObsflowError, SiteError
from obsflow.receipt.metadata import parse_time
from obsflow.settings import Settings, load_settings, with_environment
from obsflow.site import Site, open_site

app = typer.Typer(
    help="obsflow: telescope frames from the instrument to the archive, with no operator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
)
registry_app = typer.Typer(help="Check and inspect the registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")

# soft_wrap: a message (file:line: ..., a path) is never broken across lines
log = logging.getLogger(__name__)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

SiteOption = Annotated[
    Path | None,
    typer.Option(
        "--site",
        envvar="OBSFLOW_SITE",
        help="The site directory (else $OBSFLOW_SITE, else the current directory).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings(site: Path | None) -> Settings:
    return with_environment(load_settings(site or Path.cwd()), os.environ)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"obsflow {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        int,
        typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug); anywhere."),
    ] = 0,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
    site: Annotated[
        Path | None,
        typer.Option(
            "--site",
            help="The site directory, for the command that follows (which may also "
            "take --site after its name).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            envvar="OBSFLOW_LOG_LEVEL",
            metavar=choices(LogLevel),
            help="The least level logged (else warning; -v: info, -vv: debug).",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            envvar="OBSFLOW_LOG_FORMAT",
            metavar=choices(LogFormat),
            help="json: one JSON object a line (time, level, logger, message, context).",
        ),
    ] = LogFormat.TEXT.value,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file",
            envvar="OBSFLOW_LOG_FILE",
            help="Also append the log to this file.",
            show_default=False,
        ),
    ] = None,
) -> None:
    if site is not None:
        # the default of every command's --site is $OBSFLOW_SITE: a --site before the
        # command sets it for this process (and the processes it starts)
        os.environ["OBSFLOW_SITE"] = str(site)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    named = choice(log_level, LogLevel, "log level", "--log-level")
    if named is not None:
        level = logging.getLevelNamesMapping()[named.value.upper()]
    fmt = choice(log_format, LogFormat, "log format", "--log-format")
    logs.configure(level, fmt or LogFormat.TEXT, log_file, err)


_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TIME_HELP: Final = "an ISO date-time (UTC unless it says), or a time ago: 30m, 6h, 7d"


def _time(value: str | None, option: str) -> datetime | None:
    """``value`` of a time option: an ISO date-time, or how long ago (``90s``, ``30m``,
    ``6h``, ``7d``, ``2w``): an operator asks for the last hours more often than for an
    instant."""
    if value is None:
        return None
    ago = _AGO.fullmatch(value.strip())
    if ago is not None:
        seconds = float(ago.group(1)) * _UNIT_SECONDS[ago.group(2).lower()]
        try:
            return datetime.now(UTC) - timedelta(seconds=seconds)
        except OverflowError:
            raise typer.BadParameter(f"{value!r} is too long ago", param_hint=option) from None
    try:
        return parse_time(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither an ISO date-time (e.g. 2026-11-22T05:00:00) nor a time "
            "ago (e.g. 30m, 6h, 7d)",
            param_hint=option,
        ) from None


def known(value: str | None, names: Iterable[str], what: str, option: str) -> str | None:
    """``value`` when it is one of ``names`` (or None); else a usage error (exit 2) that
    lists them and suggests the closest: a typo is an error, not an empty answer."""
    choices = sorted(set(names))
    if value is None or value in choices:
        return value
    folded = {c.casefold(): c for c in choices}
    close = [folded[value.casefold()]] if value.casefold() in folded else []
    close = close or difflib.get_close_matches(value, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(choices) if choices else "none yet"
    raise typer.BadParameter(f"no {what} {value!r}{hint} (known: {listed})", param_hint=option)


E = TypeVar("E", bound=StrEnum)


def choice(value: str | None, kind: type[E], what: str, option: str) -> E | None:
    """``value`` as a member of ``kind`` (or None); else the same usage error as
    :func:`known`: a sentence with the closest name, not a validation dump."""
    name = known(value, [member.value for member in kind], what, option)
    return None if name is None else kind(name)


def choices(kind: type[StrEnum]) -> str:
    """A metavar listing an enum's values: ``[queued|running|...]``."""
    return "[" + "|".join(member.value for member in kind) + "]"


@contextmanager
def _site(site: Path | None) -> Iterator[Site]:
    """Open the site for one command and close it after."""
    opened = open_site(_settings(site))
    try:
        yield opened
    finally:
        opened.close()


COMMANDS: Final[dict[str, tuple[str, ...]]] = {
    "init": ("sites",),
    "registry": ("sites", "runs"),
    "settings": ("sites",),
    "ingest": ("ingest",),
    "retry": ("ingest",),
    "find": ("files",),
    "show": ("files",),
    "status": ("status",),
    "demo": ("sim",),
    "simulate": ("sim",),
    "run": ("daemon",),
    "cache": ("cache",),
    "fetch": ("cache",),
    "tag": ("cache",),
    "runs": ("runs",),
    "groups": ("runs",),
    "reprocess": ("runs",),
    "reduce": ("reduce",),
    "reductions": ("reduce",),
    "serve": ("serve",),
    "token": ("tokens",),
    "migrate": ("upkeep",),
    "backup": ("upkeep",),
    "restore": ("upkeep",),
    "verify": ("verify",),
    "worker": ("worker",),
}
"""Each command (or group) → the modules of this package that register it. Importing a
module registers its commands on :data:`app`; ``obsflow CMD`` imports only CMD's, as
start-up is paid by every command (all of them together took ~0.3 s more).
``tests/test_cli_commands.py`` holds this table to what the modules register."""


def _list_in_order(group: typer.Typer, names: tuple[str, ...]) -> None:
    """Have ``--help`` list a group's commands in this order, the way a user meets them,
    whatever the order their modules are imported in; a command not named comes last."""

    def rank(command: CommandInfo) -> int:
        name = command.name or get_command_name(getattr(command.callback, "__name__", ""))
        return names.index(name) if name in names else len(names)

    group.registered_commands.sort(key=rank)


def load(command: str | None = None) -> None:
    """Register ``command`` on the app by importing its module(s); every command when
    None or not one of :data:`COMMANDS` (``--help``, a typo that click will answer)."""
    modules = COMMANDS.get(command or "") or sorted({m for ms in COMMANDS.values() for m in ms})
    for module in modules:
        importlib.import_module(f"obsflow.cli.{module}")
    _list_in_order(app, ORDER)
    _list_in_order(registry_app, ("check", "replay"))


ORDER: Final = (
    "init",
    "ingest",
    "demo",
    "find",
    "show",
    "status",
    "retry",
    "simulate",
    "run",
    "fetch",
    "reprocess",
    "serve",
)
"""The order ``--help`` lists the commands in."""


_VERBOSE: Final = re.compile(r"-v+|--verbose")
_VALUED: Final = ("--site", "--log-level", "--log-format", "--log-file")
"""The app's options that take a value (the next argument)."""


def _command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first argument that is no option of the app's and
    no option's value (None: only options, e.g. ``--help``)."""
    args = iter(argv)
    for arg in args:
        if arg in _VALUED:
            next(args, None)
        elif arg == "--":
            return next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _global_options_first(argv: list[str]) -> list[str]:
    """``argv`` with every ``-v``/``-vv``/``--verbose`` moved before the command, where
    the app takes it: ``obsflow status -v`` means ``obsflow -v status`` (up to a ``--``,
    after which everything is an argument)."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if _VERBOSE.fullmatch(a)]
    return flags + [a for a in argv[:end] if not _VERBOSE.fullmatch(a)] + argv[end:]


def _without_bool_noise(command: Any) -> Any:
    """Flags and counters show no ``<bool>``/``<int>`` in ``--help``: they take no
    value. (Typer's click is its own vendored copy, hence duck typing here.)"""
    help_option = command.get_help_option(command.context_class(command))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _without_bool_noise(sub)
    return command


def main() -> None:
    argv = _global_options_first(sys.argv[1:])
    completing = any(name.startswith("_OBSFLOW_COMPLETE") for name in os.environ)
    load(None if completing else _command_of(argv))
    command = _without_bool_noise(typer.main.get_command(app))
    try:
        command.main(argv, prog_name="obsflow")
    except ConfigError as exc:
        err.print("[red]configuration error[/]")
        for problem in exc.problems:
            err.print(str(problem), markup=False, highlight=False)
        sys.exit(2)
    except SiteError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except ObsflowError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)

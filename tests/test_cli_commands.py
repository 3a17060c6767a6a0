"""``obsflow CMD`` imports only CMD's module: the table that says which module registers
which command is held to what the modules register, and the app still knows them all
for ``--help`` (real subprocesses: imports are a process's own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from obsflow.cli import COMMANDS, _command_of
from tests.test_cli import obsflow

MODULES = sorted({module for modules in COMMANDS.values() for module in modules})

REGISTERS = """
import importlib, json
from typer.main import get_command_name
import obsflow.cli as cli

for module in MODULES:
    importlib.import_module("obsflow.cli." + module)
found = {}
for c in cli.app.registered_commands:
    found.setdefault(c.name or get_command_name(c.callback.__name__), []).append(
        c.callback.__module__)
for group in cli.app.registered_groups:
    for c in group.typer_instance.registered_commands:
        found.setdefault(group.name, []).append(c.callback.__module__)
print(json.dumps(found))
"""


def test_the_table_names_each_command_by_the_modules_that_define_it() -> None:
    code = f"MODULES = {MODULES!r}\n{REGISTERS}"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    found: dict[str, list[str]] = json.loads(done.stdout)
    defined = {
        name: {module.removeprefix("obsflow.cli.") for module in modules}
        for name, modules in found.items()
    }
    assert defined == {name: set(modules) for name, modules in COMMANDS.items()}


WHICH = """
import atexit, sys
atexit.register(lambda: print(
    "IMPORTED", " ".join(m for m in sys.modules if m.startswith("obsflow.cli.")), file=sys.stderr
))
from obsflow.cli import main
sys.argv = ["obsflow", *ARGS]
main()
"""


@pytest.mark.parametrize(
    "args", [["status", "--help"], ["--site", "/nowhere", "-v", "init", "--help"],
             ["registry", "check", "--help"]],
)  # fmt: skip
def test_a_command_imports_only_its_own_module(args: list[str]) -> None:
    command = _command_of(args)
    assert command is not None
    done = subprocess.run(
        [sys.executable, "-c", f"ARGS = {args!r}\n{WHICH}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Usage: obsflow" in done.stdout
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("IMPORTED")]
    imported = {name.removeprefix("obsflow.cli.") for name in line.split()[1:]}
    others = set(MODULES) - set(COMMANDS[command])
    assert imported & set(COMMANDS[command]) == set(COMMANDS[command])
    assert not imported & others, f"obsflow {command} imported {sorted(imported & others)}"


def test_help_lists_every_command_and_a_typo_is_an_error() -> None:
    listed = obsflow("--help")
    assert listed.returncode == 0, listed.stderr
    for name in COMMANDS:
        assert f" {name} " in listed.stdout, name
    typo = obsflow("statsu")
    assert typo.returncode == 2 and "statsu" in typo.stderr


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        ([], None),
        (["--help"], None),
        (["status"], "status"),
        (["-v", "--site", "status", "find"], "find"),  # a site named "status"
        (["--log-level", "info", "--log-format", "json", "--log-file", "x", "run"], "run"),
        (["--version"], None),
        (["--", "show", "x"], "show"),
    ],
)
def test_the_command_of_a_command_line(argv: list[str], command: str | None) -> None:
    assert _command_of(argv) == command

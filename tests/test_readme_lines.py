"""The README's usage lines, run as written, one after the other, on a new site made by
its first lines (``obsflow init ~/mysite``, a simulated night): each must succeed and
print something, as the README shows. A line is left out only if it cannot run here as
written: a daemon (``obsflow run``, ``serve``, ``worker``), a placeholder (``DIR``,
``ID...``, ``NEXT``), a path outside the user's home (``/srv/...``), or a run number
(the pipelines' section, whose runs need the daemon)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = (
    "## Using it",
    "### The daemon",
    "### The cache and the archive",
    "### Running it as a service",
)
"""The sections whose ``sh`` blocks are run, in the README's order."""
_SKIP = re.compile(
    r"\bobsflow (?:--\S+ \S+ )*(?:run|serve|worker)\b"  # a daemon
    r"|^until |\bDIR\b|\bID\.\.\.|\bNEXT\b"  # waiting for one; a placeholder
    r"|/srv/|/var/|/data/"  # outside the user's home
)


def usage_lines() -> list[str]:
    """The shell lines of the usage sections' ``sh`` blocks, without their comments and
    with ``[optional]`` parts left out."""
    text = README.read_text()
    lines: list[str] = []
    for title in SECTIONS:
        start = text.index(title + "\n")
        end = min(
            (i for i in (text.find("\n## ", start + 1), text.find("\n### ", start + 1)) if i > 0),
            default=len(text),
        )
        section = text[start:end]
        for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
            for line in block.splitlines():
                command = re.sub(r"\s+#\s.*$", "", line).strip()
                command = re.sub(r"\s*\[[^\]]*\]", "", command)
                if command and not command.startswith("#"):
                    lines.append(command)
    return lines


def test_the_readme_usage_lines_work_as_written(tmp_path: Path) -> None:
    lines = usage_lines()
    assert len(lines) >= 20, lines
    env = {k: v for k, v in os.environ.items() if k != "OBSFLOW_SITE"}
    env["HOME"] = str(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "160"
    ran: list[str] = []
    for line in lines:
        if _SKIP.search(line):
            continue
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = os.path.expanduser(value.replace("~", str(tmp_path), 1))
            continue
        # a pipe into head: head closes it when it has its lines, and the writer's broken
        # pipe is how that ends (its output is still checked below), not a failure
        pipefail = [] if re.search(r"\|\s*head\b", line) else ["-o", "pipefail"]
        done = subprocess.run(
            ["bash", *pipefail, "-c", line],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"README: {line!r} failed:\n{done.stdout}\n{done.stderr}"
        assert (done.stdout + done.stderr).strip(), f"README: {line!r} printed nothing"
        if line.startswith("obsflow find"):  # a search shown in the README finds something
            assert "OF." in done.stdout, f"README: {line!r} found nothing:\n{done.stdout}"
        ran.append(line)
    assert len(ran) >= 20, ran
    assert any(line.startswith("obsflow show ") for line in ran)
    assert any("fetch" in line and "--to" in line for line in ran)

"""``obsflow init`` and ``obsflow registry check``, run as real commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from obsflow.errors import RegistryError
from obsflow.registry import load_registry
from obsflow.site import init_site

PROBLEM_LINE = re.compile(r"^(?P<file>/\S+\.ya?ml):(?P<line>\d+): (?P<message>.+)$")


def obsflow(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, columns: int = 1000
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m obsflow ARGS`` with no site in the environment unless ``env`` says."""
    environ = {k: v for k, v in os.environ.items() if k != "OBSFLOW_SITE"}
    environ["COLUMNS"] = str(columns)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "obsflow", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ,
        timeout=120,
        check=False,
    )


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if needle in text)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site with the example registry (made in-process: ``obsflow init`` has its own test)."""
    return init_site(tmp_path / "site")


def test_init_lays_out_a_site_and_refuses_a_second_time(tmp_path: Path) -> None:
    result = obsflow("init", "new-site", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Created an obsflow site" in result.stdout
    site = (tmp_path / "new-site").resolve()
    assert (site / "obsflow.yaml").is_file()
    for name in ("registry", "incoming", "cache", "archive", "quarantine"):
        assert (site / name).is_dir(), name
    assert (site / "registry" / "ofcam.yaml").is_file()
    assert (site / "registry" / "ofcam_pipelines.yaml").is_file()
    settings = (site / "obsflow.yaml").read_text()

    again = obsflow("init", str(site))
    assert again.returncode == 2
    assert "already an obsflow site" in again.stderr
    assert (site / "obsflow.yaml").read_text() == settings


def test_registry_check_passes_on_the_example(site: Path) -> None:
    result = obsflow("registry", "check", "--site", str(site))
    assert result.returncode == 0, result.stderr
    assert "registry OK" in result.stdout
    assert "1 instrument(s), 6 product(s), 5 pipeline(s), 5 profile(s)" in result.stdout
    assert str(site / "registry") in result.stdout

    # the site can also come from $OBSFLOW_SITE
    from_env = obsflow("registry", "check", cwd=site.parent, env={"OBSFLOW_SITE": str(site)})
    assert from_env.returncode == 0, from_env.stderr
    assert "registry OK" in from_env.stdout


def break_registry(registry: Path) -> dict[tuple[str, int], str]:
    """Add broken files to a good registry; return (file name, line) -> words expected."""
    malformed = registry / "malformed.yaml"
    malformed.write_text("products:\n  - id: x\n    level: 0\n   instrument: OFCAM\n")
    typo = registry / "typo.yaml"
    typo.write_text(
        "products:\n  - id: ofcam_dark\n    level: 1\n    instrument: OFCAM\n"
        "    filenme: 'ofc_(?P<night>\\d{8})_dark\\.fits'\n"
    )
    refs = registry / "refs.yaml"
    refs.write_text(
        "products:\n  - id: other_raw\n    level: 0\n    instrument: OTHERCAM\n"
        "    filename: 'oth_\\d+\\.fits'\n"
        "pipelines:\n  - id: other_stack\n    profile: stack\n"
        "    inputs:\n      - {product: ofcam_raw, name: frames}\n"
    )
    return {
        ("malformed.yaml", 4): "malformed YAML",
        ("typo.yaml", line_of(typo, "filenme:")): "unknown key 'filenme'",
        ("typo.yaml", line_of(typo, "- id: ofcam_dark")): "missing required key",
        ("refs.yaml", line_of(refs, "instrument: OTHERCAM")): "instrument 'OTHERCAM'",
        ("refs.yaml", line_of(refs, "profile: stack")): "profile 'stack'",
    }


def test_registry_check_prints_every_problem_as_file_line(site: Path) -> None:
    expected = break_registry(site / "registry")
    result = obsflow("registry", "check", "--site", str(site))
    assert result.returncode == 2
    assert "registry OK" not in result.stdout

    printed = [m for m in map(PROBLEM_LINE.match, result.stderr.splitlines()) if m]
    found = {(Path(m["file"]).name, int(m["line"])): m["message"] for m in printed}
    assert set(found) == set(expected), result.stderr
    for where, words in expected.items():
        assert words in found[where]
    for m in printed:
        assert Path(m["file"]).parent == site / "registry"

    # exactly what the library reports, one problem per line
    with pytest.raises(RegistryError) as caught:
        load_registry(site / "registry")
    assert [m.group(0) for m in printed] == [str(p) for p in caught.value.problems]


def test_registry_check_keeps_each_problem_on_one_line_on_a_narrow_terminal(site: Path) -> None:
    break_registry(site / "registry")
    result = obsflow("registry", "check", "--site", str(site), columns=80)
    assert result.returncode == 2
    with pytest.raises(RegistryError) as caught:
        load_registry(site / "registry")
    lines = result.stderr.splitlines()
    for problem in caught.value.problems:
        assert str(problem) in lines


def test_registry_check_outside_a_site_says_so(tmp_path: Path) -> None:
    result = obsflow("registry", "check", cwd=tmp_path)
    assert result.returncode == 2
    assert "not an obsflow site" in result.stderr
    assert "obsflow init" in result.stderr

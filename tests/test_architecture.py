"""ARCHITECTURE.md stays true: every path it names exists, and every package and module
at the top of ``src/obsflow/`` is named there (so a new one cannot appear unexplained)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
PACKAGE = ROOT / "src" / "obsflow"


def named_paths() -> set[str]:
    """Every ``src/obsflow/...`` path in backticks in ARCHITECTURE.md."""
    return set(re.findall(r"`(src/obsflow/[\w/.]*)`", ARCHITECTURE.read_text()))


def test_every_path_architecture_names_exists() -> None:
    paths = named_paths()
    assert len(paths) > 10, "ARCHITECTURE.md names the packages as src/obsflow/... paths"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_the_modules_a_package_table_names_exist_in_that_package() -> None:
    """In the packages' table, `module.py` or `folder/` in a row live in that row's package."""
    missing = []
    for row in ARCHITECTURE.read_text().splitlines():
        package = re.match(r"\| `(src/obsflow/\w+/)` \|", row)
        if package is None:
            continue
        for name in re.findall(r"`(\w+(?:\.py|/))`", row.split("|", 3)[3]):
            if not (ROOT / package.group(1) / name).exists():
                missing.append(package.group(1) + name)
    assert not missing, f"ARCHITECTURE.md places modules where they are not: {missing}"


def test_every_top_level_package_and_module_is_named() -> None:
    top = {
        f"src/obsflow/{p.name}/" if p.is_dir() else f"src/obsflow/{p.name}"
        for p in PACKAGE.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"
    }
    top.add("src/obsflow/examples/")
    unnamed = sorted(top - named_paths())
    assert not unnamed, f"ARCHITECTURE.md does not say what these are for: {unnamed}"

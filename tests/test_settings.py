"""The site's settings: defaults, path resolution, errors at obsflow.yaml:LINE, immutability."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from obsflow.errors import ConfigError, SettingsError, SiteError
from obsflow.settings import Settings, defaults, load_settings
from obsflow.site import init_site


def write_site(tmp_path: Path, text: str) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "obsflow.yaml").write_text(text)
    return site


def settings_error(site: Path) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        load_settings(site)
    return caught.value


@pytest.mark.parametrize("text", ["", "# nothing configured yet\n", "{}\n"])
def test_an_empty_settings_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    site = write_site(tmp_path, text)
    settings = load_settings(site)
    assert settings.site == site.resolve()
    assert settings.incoming == site / "incoming"
    assert settings.cache == site / "cache"
    assert settings.archive == site / "archive"
    assert settings.quarantine == site / "quarantine"
    assert settings.registry == site / "registry"
    assert settings.catalog_url == f"sqlite:///{site / 'catalog.db'}"
    assert settings.workers.receipt == 2
    assert settings.workers.ingest == 2
    assert settings.receipt.unmatched == "ignore"
    assert settings.receipt.remove_source is False
    assert settings.ingest.max_attempts == 5
    assert settings == defaults(site)


def test_the_template_written_by_init_says_the_defaults(tmp_path: Path) -> None:
    site = init_site(tmp_path / "site")
    assert load_settings(site) == defaults(site)


def test_relative_paths_are_resolved_against_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere" / "archive"
    site = write_site(
        tmp_path,
        f"paths:\n  incoming: data/in\n  archive: {elsewhere}\n  registry: ../shared/registry\n",
    )
    monkeypatch.chdir(tmp_path)  # give the site as a relative path, from another directory
    settings = load_settings(Path("site"))
    assert settings.site == site
    assert settings.site.is_absolute()
    assert settings.incoming == site / "data" / "in"
    assert settings.archive == elsewhere  # an absolute path is kept
    assert settings.registry == site / ".." / "shared" / "registry"
    assert settings.cache == site / "cache"  # unset: the default, in the site


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///catalog.db", "sqlite:///{site}/catalog.db"),
        ("sqlite:///db/obsflow.sqlite", "sqlite:///{site}/db/obsflow.sqlite"),
        ("sqlite:////var/lib/obsflow/catalog.db", "sqlite:////var/lib/obsflow/catalog.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        (
            "postgresql+psycopg://obsflow@dbhost/obsflow",
            "postgresql+psycopg://obsflow@dbhost/obsflow",
        ),
    ],
)
def test_a_relative_sqlite_url_is_resolved_into_the_site(
    tmp_path: Path, url: str, expected: str
) -> None:
    site = write_site(tmp_path, f"catalog:\n  url: '{url}'\n")
    assert load_settings(site).catalog_url == expected.format(site=site)


def test_a_relative_driver_qualified_sqlite_url_is_resolved_into_the_site(tmp_path: Path) -> None:
    site = write_site(tmp_path, "catalog:\n  url: sqlite+pysqlite:///catalog.db\n")
    assert load_settings(site).catalog_url == f"sqlite+pysqlite:///{site}/catalog.db"


def test_values_given_are_used(tmp_path: Path) -> None:
    site = write_site(
        tmp_path,
        "workers:\n  receipt: 8\nreceipt:\n  unmatched: quarantine\n  settle_seconds: 0.5\n"
        "ingest:\n  batch: 64\n",
    )
    settings = load_settings(site)
    assert settings.workers.receipt == 8
    assert settings.workers.ingest == 2
    assert settings.receipt.unmatched == "quarantine"
    assert settings.receipt.settle_seconds == 0.5
    assert settings.ingest.batch == 64


def test_an_unknown_key_is_reported_at_its_line(tmp_path: Path) -> None:
    site = write_site(tmp_path, "workers:\n  receipt: 2\n  ingestt: 3\n")
    error = settings_error(site)
    assert len(error.problems) == 1
    problem = error.problems[0]
    assert problem.file == site.resolve() / "obsflow.yaml"
    assert problem.line == 3
    assert "unknown key 'ingestt'" in problem.message
    assert "expected one of: ingest, receipt" in problem.message
    assert str(problem).endswith("obsflow.yaml:3: " + problem.message)
    assert isinstance(error, ConfigError)


def test_an_unknown_section_is_reported_at_its_line(tmp_path: Path) -> None:
    site = write_site(tmp_path, "workers:\n  receipt: 2\n\nworkerz:\n  ingest: 3\n")
    (problem,) = settings_error(site).problems
    assert problem.line == 4
    assert "unknown key 'workerz'" in problem.message
    assert "workers" in problem.message


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("workers:\n  receipt: many\n", 2, ["workers.receipt", "integer", "'many'"]),
        ("# c\nworkers:\n  ingest: 0\n", 3, ["workers.ingest", "greater than or equal to 1"]),
        ("receipt:\n  unmatched: delete\n", 2, ["receipt.unmatched", "'ignore'", "'quarantine'"]),
        ("ingest:\n  lease_seconds: -1\n", 2, ["ingest.lease_seconds", "greater than 0"]),
        ("paths:\n  incoming: [a, b]\n", 2, ["paths.incoming"]),
        ("catalog: sqlite:///x.db\n", 1, ["catalog"]),
    ],
)
def test_a_wrong_type_or_value_is_reported_at_its_line(
    tmp_path: Path, text: str, line: int, words: list[str]
) -> None:
    site = write_site(tmp_path, text)
    (problem,) = settings_error(site).problems
    assert problem.file.name == "obsflow.yaml"
    assert problem.line == line
    for word in words:
        assert word in problem.message
    assert f"obsflow.yaml:{line}: " in str(problem)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    site = write_site(
        tmp_path, "workers:\n  receipt: many\nreceipt:\n  unmatched: delete\n  colour: blue\n"
    )
    error = settings_error(site)
    assert sorted(p.line or 0 for p in error.problems) == [2, 4, 5]
    # the exception's text holds every problem, one per line, as file:line: message
    assert str(error).splitlines() == [str(p) for p in error.problems]


def test_malformed_yaml_is_reported_at_its_line(tmp_path: Path) -> None:
    site = write_site(tmp_path, "workers:\n  receipt: 2\n ingest: 3\n")
    (problem,) = settings_error(site).problems
    assert problem.line == 3
    assert problem.message.startswith("malformed YAML")


def test_a_duplicate_key_is_reported(tmp_path: Path) -> None:
    site = write_site(tmp_path, "workers:\n  receipt: 2\n  receipt: 3\n")
    (problem,) = settings_error(site).problems
    assert problem.line == 3
    assert "duplicate key 'receipt'" in problem.message


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    site = write_site(tmp_path, "- workers\n- receipt\n")
    (problem,) = settings_error(site).problems
    assert problem.line == 1
    assert "expected a mapping" in problem.message


def test_a_directory_that_is_not_a_site_raises_site_error(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="not an obsflow site") as caught:
        load_settings(tmp_path)
    assert "obsflow init" in str(caught.value)
    with pytest.raises(SiteError, match="not an obsflow site"):
        load_settings(tmp_path / "does-not-exist")


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write_site(tmp_path, ""))
    assert isinstance(settings, Settings)
    with pytest.raises(ValidationError, match="frozen"):
        settings.incoming = tmp_path  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.workers.receipt = 99  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.receipt.unmatched = "quarantine"  # type: ignore[misc]
    assert settings.workers.receipt == 2
    assert settings.incoming == settings.site / "incoming"


def test_init_site_creates_the_layout_and_refuses_a_second_time(tmp_path: Path) -> None:
    site = init_site(tmp_path / "new" / "site")
    assert site == (tmp_path / "new" / "site").resolve()
    assert (site / "obsflow.yaml").is_file()
    for name in ("registry", "incoming", "cache", "archive", "quarantine"):
        assert (site / name).is_dir(), name
    assert sorted(p.name for p in (site / "registry").glob("*.yaml")) == [
        "ofcam.yaml",
        "ofcam_pipelines.yaml",
    ]
    (site / "obsflow.yaml").write_text("workers:\n  receipt: 7\n")
    with pytest.raises(SiteError, match="already an obsflow site"):
        init_site(site)
    assert (site / "obsflow.yaml").read_text() == "workers:\n  receipt: 7\n"  # not overwritten


def test_a_section_with_every_key_commented_out_means_its_defaults(tmp_path: Path) -> None:
    site = write_site(tmp_path, "workers:\n  # receipt: 4\ningest:\n")
    settings = load_settings(site)
    assert settings.workers.receipt == 2
    assert settings.ingest.max_attempts == 5


def test_the_settings_reference_names_every_key_its_default_and_meaning() -> None:
    """Made from the model: a setting added without a meaning fails here."""
    import subprocess
    import sys

    from obsflow.settings import _SettingsFile

    done = subprocess.run(
        [sys.executable, "-m", "obsflow", "settings"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 3:
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    for section, field in _SettingsFile.model_fields.items():
        model = field.annotation
        assert model is not None and hasattr(model, "model_fields")
        for key, spec in model.model_fields.items():
            name = f"{section}.{key}"
            assert name in rows, f"{name} is missing from the reference"
            default, meaning = rows[name]
            expected = spec.get_default(call_default_factory=True)
            shown = "none" if expected is None else str(getattr(expected, "value", expected))
            assert default == shown, name
            assert len(meaning) > 10, f"{name} has no meaning: write a docstring under it"
    assert rows["receipt.settle_seconds"][0] == "1.0"
    assert rows["transfer.role"][0] == "all"

"""The README's registry example is a working registry (the docs cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

from obsflow.registry import load_registry

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_registry_example_loads_and_recognises(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(# registry/(\S+)\n.*?)```", README.read_text(), re.DOTALL)
    assert len(blocks) == 2, "expected the two registry files of the README example"
    for text, name in blocks:
        (tmp_path / name).write_text(text)
    registry = load_registry(tmp_path)
    assert set(registry.products) == {"ofcam_raw", "ofcam_masterbias"}
    assert registry.recognise("ofc_20261122_0042.fits").product.id == "ofcam_raw"
    assert registry.recognise("ofc_20261121_mbias.fits").groups == {"night": "20261121"}
    assert [p.id for p in registry.consumers["ofcam_raw"]] == ["ofcam_masterbias"]


def test_readme_profile_example_fills_for_a_run(tmp_path: Path) -> None:
    from obsflow.processing.profile import build_profile

    blocks = re.findall(r"```yaml\n(# registry/(\S+)\n.*?)```", README.read_text(), re.DOTALL)
    for text, name in blocks:
        (tmp_path / name).write_text(text)
    registry = load_registry(tmp_path)
    pipeline = registry.pipelines["ofcam_masterbias"]
    biases = [tmp_path / f"b{i}.fits" for i in range(5)]
    profile = build_profile(
        run_id="7",
        pipeline=pipeline,
        profile=registry.profiles[pipeline.profile],
        parameters={**pipeline.defaults, "nightid": "20261121", "python": "python3"},
        inputs={"biases": biases},
        work=tmp_path / "work",
    )
    combine = profile.step("combine")
    assert combine.argv[-5:] == tuple(str(b) for b in biases)  # one argv item per file
    out = str(tmp_path / "work" / "out" / "ofc_20261121_mbias.fits")
    assert out in combine.argv
    check = profile.step("check")
    assert check.enabled and check.argv == ("sh", "-c", f"test -s {out}")


def test_readme_curl_examples_name_endpoints_and_parameters_the_api_has(tmp_path: Path) -> None:
    """Each curl line of the README's API section asks for a path, method and query
    parameters that the OpenAPI description declares."""
    from obsflow.api import create_app
    from obsflow.settings import load_settings
    from obsflow.site import init_site, open_site

    site = open_site(load_settings(init_site(tmp_path / "site")))
    try:
        spec = create_app(site).openapi()
    finally:
        site.close()
    paths: dict[str, dict[str, object]] = spec["paths"]
    calls = re.findall(
        r'curl -s (?:-X (\w+) )?(?:-H "[^"]*" )*(?:-o \S+ )?"?(\$API|http://127\.0\.0\.1:8000)'
        r'([^"\s]*)"?',
        README.read_text(),
    )
    assert len(calls) >= 12, calls
    for method, base, rest in calls:
        path, _, query = rest.partition("?")
        full = ("/api/v1" if base == "$API" else "") + path
        matches = [
            template
            for template in paths
            if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), full)
        ]
        assert matches, f"README: curl {full}: no such path in the OpenAPI description"
        operation = paths[matches[0]].get((method or "get").lower())
        assert isinstance(operation, dict), f"README: {method or 'GET'} {full}: no such method"
        declared = {p["name"] for p in operation.get("parameters", [])}
        for pair in filter(None, query.split("&")):
            name = pair.partition("=")[0]
            assert name in declared, f"README: {full}: no query parameter {name!r}"


def test_readme_container_profile_is_a_valid_profile_whose_paths_resolve_inside() -> None:
    import yaml

    from obsflow.registry.specs import ProfileSpec

    (block,) = re.findall(
        r"```yaml\n(profiles:\n  - id: calibrate_frame.*?)```", README.read_text(), re.DOTALL
    )
    (spec,) = [ProfileSpec.model_validate(p) for p in yaml.safe_load(block)["profiles"]]
    (step,) = spec.steps
    assert step.image == "localhost/obsflow-tools:1" and step.network is False
    assert step.cpus == 2 and step.memory == "4g"
    assert step.command[:4] == ("python", "-m", "obsflow.tools.ccd", "calibrate")

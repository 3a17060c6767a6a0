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
    from obsflow.profile import build_profile

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
        parameters={**pipeline.parameters, "nightid": "20261121", "python": "python3"},
        inputs={"biases": biases},
        work=tmp_path / "work",
    )
    combine = profile.step("combine")
    assert combine.argv[-5:] == tuple(str(b) for b in biases)  # one argv item per file
    out = str(tmp_path / "work" / "out" / "ofc_20261121_mbias.fits")
    assert out in combine.argv
    check = profile.step("check")
    assert check.enabled and check.argv == ("sh", "-c", f"test -s {out}")

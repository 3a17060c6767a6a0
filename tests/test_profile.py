"""The builder: a profile filled for one run, and the errors that name what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from obsflow.errors import ProfileError
from obsflow.processing.profile import RuntimeProfile, build_profile
from obsflow.registry.specs import PipelineSpec, ProfileSpec


def pipeline(**extra: object) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "id": "p",
            "profile": "prof",
            "inputs": [{"product": "raw", "name": "frames"}, {"product": "cal", "name": "flat"}],
            "outputs": [{"product": "red", "name": "red_{night}_{frame}.fits"}],
            **extra,
        }
    )


def profile(*steps: dict[str, object]) -> ProfileSpec:
    return ProfileSpec.model_validate({"id": "prof", "steps": list(steps)})


def build(prof: ProfileSpec, tmp_path: Path, **parameters: object) -> RuntimeProfile:
    return build_profile(
        run_id="42",
        pipeline=pipeline(),
        profile=prof,
        parameters={"night": "20261121", "frame": "0007", "exptime": 60.0, **parameters},  # type: ignore[dict-item]
        inputs={
            "frames": [tmp_path / "a.fits", tmp_path / "b.fits"],
            "flat": [tmp_path / "f.fits"],
        },
        work=tmp_path / "work",
    )


def test_every_placeholder_is_filled(tmp_path: Path) -> None:
    built = build(
        profile(
            {"name": "one", "command": ["tool", "--flat={inputs.flat}", "{inputs.frames}",
                                        "-o", "{outputs.red}", "{work}/x", "{{literal}}"]},
            {"name": "two", "needs": ["one"], "when": "exptime > 30", "command": ["true"]},
            {"name": "three", "when": "exptime > 100", "command": ["true"],
             "env": {"N": "{night}"}},
        ),
        tmp_path,
    )  # fmt: skip
    work = tmp_path / "work"
    assert built.step("one").argv == (
        "tool", f"--flat={tmp_path / 'f.fits'}", str(tmp_path / "a.fits"),
        str(tmp_path / "b.fits"), "-o", str(work / "out" / "red_20261121_0007.fits"),
        f"{work}/x", "{literal}",
    )  # fmt: skip
    assert built.step("two").enabled and built.step("two").needs == ("one",)
    assert not built.step("three").enabled  # when false: the controller skips it
    assert built.step("three").env == {"N": "20261121"}
    assert built.outputs == {"red": str(work / "out" / "red_20261121_0007.fits")}
    assert RuntimeProfile.from_json(built.to_json()) == built


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (["tool", "{threshold}"], ["run 42 step s", "{threshold}", "no such parameter"]),
        (["tool", "x={inputs.frames}"], ["holds 2 files", "alone"]),
        (["tool", "{inputs.bias}"], ["no input named 'bias'"]),
        (["tool", "{outputs.other}"], ["no output 'other'"]),
        (["tool", "{night!r}"], ["no ! or :"]),
        (["tool", "{oops"], ["bad template"]),
    ],
)
def test_what_cannot_be_filled_is_named(
    tmp_path: Path, command: list[str], words: list[str]
) -> None:
    with pytest.raises(ProfileError) as caught:
        build(profile({"name": "s", "command": command}), tmp_path)
    for word in words:
        assert word in str(caught.value)

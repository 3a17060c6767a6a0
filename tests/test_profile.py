"""The builder: a profile filled for one run, and the errors that name what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from obsflow.errors import ProfileError
from obsflow.processing.profile import Mount, RuntimeProfile, build_profile
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


def test_a_container_step_sees_container_paths_and_records_its_mounts(tmp_path: Path) -> None:
    built = build(
        profile(
            {"name": "host", "command": ["tool", "{inputs.flat}", "{work}/x"]},
            {"name": "boxed", "image": "localhost/reduce:2", "network": True, "cpus": 1.5,
             "memory": "512m", "env": {"OUT": "{outputs.red}"},
             "command": ["reduce", "--flat={inputs.flat}", "{inputs.frames}", "-o",
                         "{outputs.red}", "{work}/tmp"]},
        ),
        tmp_path,
    )  # fmt: skip
    work = tmp_path / "work"
    host, boxed = built.step("host"), built.step("boxed")

    assert host.argv == ("tool", str(tmp_path / "f.fits"), f"{work}/x")  # a subprocess: host paths
    assert host.mounts == () and host.image is None
    assert boxed.argv == (
        "reduce", "--flat=/inputs/flat/0/f.fits", "/inputs/frames/0/a.fits",
        "/inputs/frames/1/b.fits", "-o", "/work/out/red_20261121_0007.fits", "/work/tmp",
    )  # fmt: skip
    assert boxed.env == {"OUT": "/work/out/red_20261121_0007.fits"}
    assert boxed.mounts == (
        Mount(str(work), "/work", read_only=False),
        Mount(str(tmp_path / "a.fits"), "/inputs/frames/0/a.fits"),
        Mount(str(tmp_path / "b.fits"), "/inputs/frames/1/b.fits"),
        Mount(str(tmp_path / "f.fits"), "/inputs/flat/0/f.fits"),
    )
    assert (boxed.network, boxed.cpus, boxed.memory) == (True, 1.5, 512 << 20)
    # the run's outputs stay host paths: the controller checks and publishes them there
    assert built.outputs == {"red": str(work / "out" / "red_20261121_0007.fits")}
    assert RuntimeProfile.from_json(built.to_json()) == built


def test_two_inputs_with_one_base_name_do_not_collide_in_a_container(tmp_path: Path) -> None:
    built = build_profile(
        run_id="42",
        pipeline=pipeline(),
        profile=profile(
            {"name": "s", "image": "localhost/x:1", "command": ["t", "{inputs.frames}"]}
        ),
        parameters={"night": "20261121", "frame": "0007"},
        inputs={"frames": [tmp_path / "a" / "f.fits", tmp_path / "b" / "f.fits"], "flat": []},
        work=tmp_path / "work",
    )
    argv = built.step("s").argv
    assert argv == ("t", "/inputs/frames/0/f.fits", "/inputs/frames/1/f.fits")


def test_a_profile_stored_before_container_fields_still_loads(tmp_path: Path) -> None:
    stored = build(profile({"name": "s", "command": ["true"], "image": "x:1"}), tmp_path).to_json()
    for step in stored["steps"]:
        for key in ("mounts", "network", "cpus", "memory"):
            del step[key]
    step = RuntimeProfile.from_json(stored).step("s")
    assert (step.mounts, step.network, step.cpus, step.memory) == ((), False, None, None)


def test_a_subprocess_steps_json_has_no_container_fields(tmp_path: Path) -> None:
    stored = build(profile({"name": "s", "command": ["true"]}), tmp_path).to_json()
    assert set(stored["steps"][0]) == {
        "name", "argv", "needs", "enabled", "when", "timeout", "retries", "env", "image",
    }  # fmt: skip

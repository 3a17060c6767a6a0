"""The registry: loading, every problem at file:line, cross-references, and recognition."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from obsflow.errors import AmbiguousError, Problem, RecognitionError, RegistryError
from obsflow.receipt.metadata import extract
from obsflow.registry import Registry, load_registry
from obsflow.site import example_registry

REPO_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "registry"

INSTRUMENT = """\
instrument:
  name: CAM
  prefix: CM
"""

PRODUCTS = """\
products:
  - id: cam_raw
    level: 0
    instrument: CAM
    filename: 'cam_(?P<date>\\d{8})_(?P<frame>\\d{4})\\.fits'
  - id: cam_bias
    level: 1
    instrument: CAM
    filename: 'cam_(?P<night>\\d{8})_bias\\.fits'
"""

PROFILE = """\
profiles:
  - id: combine
    steps:
      - name: run
        command: [echo, "{inputs.frames}"]
"""


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def line_of(path: Path, needle: str, nth: int = 1) -> int:
    """The 1-based line number of the ``nth`` line of ``path`` containing ``needle``."""
    found = [i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text]
    assert len(found) >= nth, f"{needle!r} is not in {path} {nth} time(s)"
    return found[nth - 1]


def problems(root: Path) -> tuple[Problem, ...]:
    with pytest.raises(RegistryError) as caught:
        load_registry(root)
    assert caught.value.problems, "a RegistryError must hold at least one problem"
    return caught.value.problems


def only_problem(root: Path) -> Problem:
    found = problems(root)
    assert len(found) == 1, "\n".join(str(p) for p in found)
    return found[0]


def good_registry(root: Path) -> Path:
    write(root, "cam.yaml", INSTRUMENT + PRODUCTS)
    return root


# ------------------------------------------------------------- the example


@pytest.fixture(params=["packaged", "repository"])
def example(request: pytest.FixtureRequest) -> Registry:
    root = example_registry() if request.param == "packaged" else REPO_EXAMPLE
    return load_registry(root)


def test_the_example_registry_loads(example: Registry) -> None:
    assert set(example.instruments) == {"OFCAM"}
    assert {p.id: p.level for p in example.products.values()} == {
        "ofcam_raw": 0,
        "ofcam_masterbias": 1,
        "ofcam_masterflat": 1,
        "ofcam_calibrated": 1,
        "ofcam_sources": 2,
        "ofcam_nightcat": 3,
    }
    assert set(example.pipelines) == {
        "ofcam_masterbias",
        "ofcam_masterflat",
        "ofcam_calibrate",
        "ofcam_sources",
        "ofcam_nightcat",
    }
    assert set(example.profiles) == {
        "combine_bias",
        "combine_flat",
        "calibrate_frame",
        "detect_sources",
        "merge_night",
    }
    raw = example.products["ofcam_raw"]
    assert example.instrument_of(raw).prefix == "OF"
    assert example.instrument_of(raw).utc_offset_hours == -10


def test_the_example_consumers_index(example: Registry) -> None:
    def consumers(product: str) -> list[str]:
        return sorted(p.id for p in example.consumers.get(product, ()))

    assert consumers("ofcam_raw") == ["ofcam_calibrate", "ofcam_masterbias", "ofcam_masterflat"]
    assert consumers("ofcam_masterbias") == ["ofcam_calibrate", "ofcam_masterflat"]
    assert consumers("ofcam_masterflat") == ["ofcam_calibrate"]
    assert consumers("ofcam_calibrated") == ["ofcam_sources"]
    assert consumers("ofcam_sources") == ["ofcam_nightcat"]
    assert consumers("ofcam_nightcat") == []


def test_specs_know_the_file_and_line_they_come_from(example: Registry) -> None:
    raw = example.products["ofcam_raw"]
    assert raw.source is not None
    assert raw.source.file.name == "ofcam.yaml"
    assert raw.source.line == line_of(raw.source.file, "- id: ofcam_raw")
    calibrate = example.pipelines["ofcam_calibrate"]
    assert calibrate.source is not None
    assert calibrate.source.line == line_of(calibrate.source.file, "- id: ofcam_calibrate")


@pytest.mark.parametrize(
    ("name", "product", "groups"),
    [
        ("ofc_20261122_0001.fits", "ofcam_raw", {"date": "20261122", "frame": "0001"}),
        ("ofc_20261122_12345.fits", "ofcam_raw", {"date": "20261122", "frame": "12345"}),
        ("ofc_20261121_mbias.fits", "ofcam_masterbias", {"night": "20261121"}),
        ("ofc_20261121_mflat_R.fits", "ofcam_masterflat", {"night": "20261121", "filter": "R"}),
        ("ofc_20261122_0007_cal.fits", "ofcam_calibrated", {"date": "20261122", "frame": "0007"}),
        ("ofc_20261122_0007_src.fits", "ofcam_sources", {"date": "20261122", "frame": "0007"}),
        ("ofc_20261121_M31_cat.fits", "ofcam_nightcat", {"night": "20261121", "field": "M31"}),
    ],
)
def test_the_example_recognises_its_file_names(
    example: Registry, name: str, product: str, groups: dict[str, str]
) -> None:
    recognised = example.recognise(name)
    assert recognised.product.id == product
    assert dict(recognised.groups) == groups


@pytest.mark.parametrize(
    "name",
    [
        "ofc_20261122_0001.fits.tmp",  # an instrument still writing under a temporary name
        "xofc_20261122_0001.fits",  # the whole name must match, not a part of it
        "ofc_20261122_001.fits",
        "ofc_2026112_0001.fits",
        "",
    ],
)
def test_a_name_matching_no_product_is_not_recognised(example: Registry, name: str) -> None:
    with pytest.raises(RecognitionError, match="matches no registered product") as caught:
        example.recognise(name)
    assert not isinstance(caught.value, AmbiguousError)
    assert caught.value.reason == "unrecognised"


def test_the_registry_is_read_only(example: Registry) -> None:
    with pytest.raises(TypeError):
        example.products["x"] = example.products["ofcam_raw"]  # type: ignore[index]
    with pytest.raises(TypeError):
        example.consumers["x"] = ()  # type: ignore[index]
    with pytest.raises(ValueError, match="frozen"):
        example.products["ofcam_raw"].level = 2  # type: ignore[misc]


# ------------------------------------------------------- loading and files


def test_a_small_registry_loads_across_files_and_subdirectories(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT)
    write(tmp_path, "products/raw.yml", PRODUCTS)  # .yml too, in a subdirectory
    write(tmp_path, "empty.yaml", "# nothing here yet\n")
    write(tmp_path, "notes.txt", "not: [yaml")  # not a registry file: never read
    registry = load_registry(tmp_path)
    assert set(registry.products) == {"cam_raw", "cam_bias"}
    assert registry.instrument_of(registry.products["cam_raw"]).name == "CAM"
    assert dict(registry.consumers) == {}


def test_a_missing_or_empty_registry_directory_is_refused(tmp_path: Path) -> None:
    problem = only_problem(tmp_path / "nowhere")
    assert "does not exist" in problem.message
    problem = only_problem(tmp_path)
    assert "no registry files" in problem.message


@pytest.mark.parametrize("text", ["- products\n- pipelines\n", "just a sentence\n"])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "cam.yaml", text)
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, 1)
    assert "expected a mapping" in problem.message


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        # a key indented one column short
        (INSTRUMENT + "products:\n  - id: p1\n    level: 0\n   instrument: CAM\n", (7,)),
        # a flow sequence never closed: where it opens, or where the parser noticed
        (INSTRUMENT + "  required: [DATE-OBS, EXPTIME\nproducts:\n  - id: p1\n", (4, 5)),
        # a flow mapping never closed
        (INSTRUMENT + "products:\n  - {id: p1, level: 0\n  - id: p2\n", (5, 6)),
        # a tab for indentation
        (INSTRUMENT + "\tdescription: x\n", (4,)),
    ],
)
def test_malformed_yaml_is_reported_at_its_line(
    tmp_path: Path, text: str, lines: tuple[int, ...]
) -> None:
    path = write(tmp_path, "cam.yaml", text)
    problem = only_problem(tmp_path)
    assert problem.file == path
    assert problem.line in lines
    assert problem.message.startswith("malformed YAML")
    assert str(problem).startswith(f"{path}:{problem.line}: malformed YAML")


def test_an_unknown_key_is_reported_at_its_line_with_the_keys_expected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT
        + "products:\n  - id: p1\n    level: 0\n    instrument: CAM\n    filenme: 'p1\\.fits'\n",
    )
    found = problems(tmp_path)
    unknown = [p for p in found if "unknown key" in p.message]
    assert len(unknown) == 1
    assert unknown[0].file == path
    assert unknown[0].line == line_of(path, "filenme:")
    assert "unknown key 'filenme'" in unknown[0].message
    assert "expected one of:" in unknown[0].message
    for key in ("filename", "id", "instrument", "level", "time"):
        assert key in unknown[0].message.split("expected one of:")[1]
    # the required key it was meant to be is missing too, reported on the product
    missing = [p for p in found if "missing required key" in p.message]
    assert [p.line for p in missing] == [line_of(path, "- id: p1")]
    assert "filename" in missing[0].message


def test_an_unknown_top_level_section_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "cam.yaml", INSTRUMENT + "product:\n  - id: p1\n")
    problem = only_problem(tmp_path)
    assert problem.line == line_of(path, "product:")
    assert "unknown key 'product'" in problem.message
    assert "products" in problem.message


def test_an_invalid_regular_expression_is_reported_at_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT + "products:\n  - id: p1\n    level: 0\n    instrument: CAM\n"
        "    filename: 'p1_(?P<n>\\d+\\.fits'\n",
    )
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "filename:"))
    assert "invalid regular expression" in problem.message
    assert "p1_(?P<n>" in problem.message


def test_a_duplicate_product_id_names_where_the_first_is(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", INSTRUMENT + PRODUCTS)
    second = write(
        tmp_path,
        "b.yaml",
        "products:\n  - id: other\n    level: 0\n    instrument: CAM\n    filename: 'o'\n"
        "  - id: cam_bias\n    level: 1\n    instrument: CAM\n    filename: 'b'\n",
    )
    problem = only_problem(tmp_path)
    assert problem.file == second
    assert problem.line == line_of(second, "- id: cam_bias")
    assert "duplicate product ID 'cam_bias'" in problem.message
    assert f"first defined at {first}:{line_of(first, '- id: cam_bias')}" in problem.message


def test_a_duplicate_instrument_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", INSTRUMENT)
    second = write(tmp_path, "b.yaml", INSTRUMENT)
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (second, 1)
    assert "duplicate instrument ID 'CAM'" in problem.message


def test_a_duplicate_key_in_one_mapping_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT + "products:\n  - id: p1\n    level: 0\n    instrument: CAM\n"
        "    filename: 'p1'\n    level: 1\n",
    )
    problem = only_problem(tmp_path)
    assert problem.file == path
    assert problem.line == line_of(path, "level:", nth=2)
    assert "duplicate key 'level'" in problem.message


# ----------------------------------------------------------- cross-references


def test_a_product_naming_a_missing_instrument(tmp_path: Path) -> None:
    path = write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS.replace("CAM\n", "CAMERA\n", 1))
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "instrument: CAMERA"))
    assert "'cam_raw'" in problem.message
    assert "instrument 'CAMERA'" in problem.message
    assert "not registered" in problem.message
    assert "expected one of: CAM" in problem.message


PIPELINE = """\
pipelines:
  - id: bias
    profile: combine
    inputs:
      - product: cam_raw
        name: frames
        where: "frame_type == 'BIAS'"
        min: 3
    group: {by: [night]}
    outputs:
      - {product: cam_bias, name: "cam_{night}_bias.fits"}
"""


def test_a_good_pipeline_and_profile_load(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    write(tmp_path, "pipe.yaml", PIPELINE + PROFILE)
    registry = load_registry(tmp_path)
    assert [p.id for p in registry.consumers["cam_raw"]] == ["bias"]
    where = registry.pipelines["bias"].inputs[0].where
    assert where == "frame_type == 'BIAS'"


def test_a_pipeline_taking_one_product_twice_is_listed_once(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    write(
        tmp_path,
        "pipe.yaml",
        PIPELINE.replace(
            "    group:", '      - {product: cam_raw, name: flats, where: "x == 1"}\n    group:'
        )
        + PROFILE,
    )
    registry = load_registry(tmp_path)
    assert len(registry.pipelines["bias"].inputs) == 2
    assert [p.id for p in registry.consumers["cam_raw"]] == ["bias"]


def test_a_pipeline_naming_a_missing_product(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    path = write(
        tmp_path, "pipe.yaml", PIPELINE.replace("product: cam_raw", "product: cam_rwa") + PROFILE
    )
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "product: cam_rwa"))
    assert "pipeline 'bias' takes product 'cam_rwa'" in problem.message
    assert "not registered" in problem.message


def test_a_pipeline_output_naming_a_missing_product(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    path = write(
        tmp_path, "pipe.yaml", PIPELINE.replace("product: cam_bias", "product: nope") + PROFILE
    )
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "product: nope"))
    assert "outputs product 'nope'" in problem.message


def test_a_pipeline_naming_a_missing_profile(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    path = write(tmp_path, "pipe.yaml", PIPELINE + PROFILE.replace("id: combine", "id: stack"))
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "profile: combine"))
    assert "pipeline 'bias' names profile 'combine'" in problem.message
    assert "not registered" in problem.message


def test_every_cross_reference_problem_is_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    path = write(
        tmp_path,
        "pipe.yaml",
        PIPELINE.replace("product: cam_raw", "product: nope1").replace(
            "profile: combine", "profile: nope2"
        ),
    )
    assert sorted((p.file, p.line) for p in problems(tmp_path)) == [
        (path, line_of(path, "profile: nope2")),
        (path, line_of(path, "product: nope1")),
    ]


def write_profile(root: Path, steps: str) -> Path:
    write(root, "cam.yaml", INSTRUMENT + PRODUCTS)
    return write(root, "profiles.yaml", "profiles:\n  - id: prof\n    steps:\n" + steps)


def test_a_step_needing_a_missing_step(tmp_path: Path) -> None:
    path = write_profile(
        tmp_path,
        "      - name: a\n        command: [echo]\n"
        "      - name: b\n        command: [echo]\n        needs: [a, c]\n",
    )
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "needs: [a, c]"))
    assert "step 'b' needs 'c'" in problem.message
    assert "profile 'prof'" in problem.message


@pytest.mark.parametrize(
    ("steps", "cycle"),
    [
        (
            "      - name: a\n        command: [echo]\n        needs: [c]\n"
            "      - name: b\n        command: [echo]\n        needs: [a]\n"
            "      - name: c\n        command: [echo]\n        needs: [b]\n",
            "a -> c -> b -> a",
        ),
        ("      - name: a\n        command: [echo]\n        needs: [a]\n", "a -> a"),
    ],
)
def test_a_dependency_cycle_between_steps(tmp_path: Path, steps: str, cycle: str) -> None:
    path = write_profile(tmp_path, steps)
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "steps:"))
    assert "profile 'prof' has a dependency cycle" in problem.message
    assert cycle in problem.message


def test_steps_forming_a_dag_load(tmp_path: Path) -> None:
    write_profile(
        tmp_path,
        "      - name: a\n        command: [echo]\n"
        "      - name: b\n        command: [echo]\n        needs: [a]\n"
        "      - name: c\n        command: [echo]\n        needs: [a, b]\n",
    )
    registry = load_registry(tmp_path)
    assert [s.needs for s in registry.profiles["prof"].steps] == [(), ("a",), ("a", "b")]


def test_a_step_name_used_twice(tmp_path: Path) -> None:
    path = write_profile(
        tmp_path,
        "      - name: a\n        command: [echo]\n      - name: a\n        command: [ls]\n",
    )
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "- name: a", nth=2))
    assert "step name 'a' is used twice" in problem.message


# --------------------------------------------------------------- expressions


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("__import__('os')", "Call is not allowed"),
        ("exptime >", "cannot parse expression"),
        ("exptime ** 2 > 60", "operator Pow is not allowed"),
    ],
)
def test_a_bad_where_expression_is_refused_at_its_line(
    tmp_path: Path, where: str, words: str
) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    text = PIPELINE.replace("where: \"frame_type == 'BIAS'\"", f'where: "{where}"')
    text = text.replace("    group:", "      - {product: cam_bias, name: bias}\n    group:")
    path = write(tmp_path, "pipe.yaml", text + PROFILE)
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "where:"))
    assert words in problem.message


def test_a_bad_only_input_brings_no_spurious_too_short_problem(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    text = PIPELINE.replace("where: \"frame_type == 'BIAS'\"", 'where: "exptime >"')
    path = write(tmp_path, "pipe.yaml", text + PROFILE)
    found = problems(tmp_path)
    assert [(p.file, p.line) for p in found] == [(path, line_of(path, "where:"))]


def test_a_bad_when_expression_is_refused_at_its_line(tmp_path: Path) -> None:
    path = write_profile(
        tmp_path,
        "      - name: a\n        command: [echo]\n"
        "      - name: b\n        command: [echo]\n        when: \"open('x') == 1\"\n",
    )
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "when:"))
    assert "Call is not allowed" in problem.message


# -------------------------------------------------------------- instrument


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{prefix}.{yyyymmdd}.{frame}.{hundredths:02d}.fits", ["unknown field", "'frame'"]),
        ("{prefix}.{yyyymmdd}.{seconds_of_day:05d}.fits", ["must contain {hundredths"]),
        ("{night}/{prefix}.{seconds_of_day}.{hundredths}.fits", ["plain file name"]),
    ],
)
def test_a_bad_archive_id_template_is_refused(
    tmp_path: Path, template: str, words: list[str]
) -> None:
    path = write(tmp_path, "cam.yaml", INSTRUMENT + f"  archive_id: '{template}'\n")
    problem = only_problem(tmp_path)
    assert (problem.file, problem.line) == (path, line_of(path, "archive_id:"))
    for word in words:
        assert word in problem.message


def test_a_good_archive_id_template_is_accepted(tmp_path: Path) -> None:
    write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT
        + "  archive_id: '{instrument}_{night}_{hh:02d}{mi:02d}{ss:02d}.{hundredths:02d}.fits'\n",
    )
    registry = load_registry(tmp_path)
    assert registry.instruments["CAM"].archive_id.startswith("{instrument}_{night}")


# --------------------------------------------------------------- time rules


def product_with_time(time: str) -> str:
    return (
        INSTRUMENT + "products:\n  - id: log\n    level: 0\n    instrument: CAM\n"
        "    filename: 'log_(?P<date>\\d{8})_(?P<time>\\d{6})\\.fits'\n"
        f"    time: {time}\n"
    )


@pytest.mark.parametrize(
    ("time", "words"),
    [
        ("{from: header}", "'from: header' needs 'start: KEYWORD'"),
        ("{from: header, stop: DATE-END}", "'from: header' needs 'start: KEYWORD'"),
        ("{from: filename, start: '{date}{time}'}", "'from: filename' needs"),
        ("{from: filename, format: '%Y%m%d%H%M%S'}", "'from: filename' needs"),
        ("{from: exposure, start: DATE-OBS}", "'from: exposure' takes no start"),
        ("{from: clock}", "time.from"),
    ],
)
def test_an_incomplete_time_rule_is_refused(tmp_path: Path, time: str, words: str) -> None:
    path = write(tmp_path, "cam.yaml", product_with_time(time))
    problem = only_problem(tmp_path)
    assert problem.file == path
    assert problem.line == line_of(path, "time:")
    assert words in problem.message


def test_a_time_from_the_file_name_is_used_by_metadata(tmp_path: Path) -> None:
    write(
        tmp_path,
        "cam.yaml",
        product_with_time("{from: filename, start: '{date}{time}', format: '%Y%m%d%H%M%S'}"),
    )
    registry = load_registry(tmp_path)
    name = "log_20261122_053012.fits"
    recognised = registry.recognise(name)
    assert dict(recognised.groups) == {"date": "20261122", "time": "053012"}
    product = recognised.product
    metadata = extract(
        {"DATE-OBS": "2026-11-22T05:00:00", "EXPTIME": 10.0},
        product,
        registry.instrument_of(product),
        recognised.groups,
        tmp_path / name,
    )
    expected = datetime(2026, 11, 22, 5, 30, 12, tzinfo=UTC)
    assert metadata.start == expected  # from the name, not DATE-OBS
    assert metadata.stop == expected
    assert metadata.date_obs == datetime(2026, 11, 22, 5, 0, tzinfo=UTC)
    assert metadata.night == date(2026, 11, 21)  # the night began on the evening before (UTC)


# --------------------------------------------------------------- recognition


def test_a_name_matching_one_product_gives_its_groups(tmp_path: Path) -> None:
    registry = load_registry(good_registry(tmp_path))
    raw = registry.recognise("cam_20261122_0042.fits")
    assert raw.product.id == "cam_raw"
    assert dict(raw.groups) == {"date": "20261122", "frame": "0042"}
    bias = registry.recognise("cam_20261121_bias.fits")
    assert bias.product is registry.products["cam_bias"]
    assert dict(bias.groups) == {"night": "20261121"}


def test_an_optional_group_that_took_no_part_is_left_out(tmp_path: Path) -> None:
    write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT + "products:\n  - id: p\n    level: 0\n    instrument: CAM\n"
        "    filename: 'p_(?P<n>\\d+)(?:_(?P<part>[a-z]))?\\.fits'\n",
    )
    registry = load_registry(tmp_path)
    assert dict(registry.recognise("p_7.fits").groups) == {"n": "7"}
    assert dict(registry.recognise("p_7_b.fits").groups) == {"n": "7", "part": "b"}


def test_a_name_matching_no_product_raises_recognition_error(tmp_path: Path) -> None:
    registry = load_registry(good_registry(tmp_path))
    with pytest.raises(RecognitionError) as caught:
        registry.recognise("cam_20261122_bias.fits.part")
    assert not isinstance(caught.value, AmbiguousError)
    assert caught.value.path == Path("cam_20261122_bias.fits.part")
    assert "matches no registered product" in str(caught.value)


def test_a_name_matching_two_products_is_ambiguous_naming_both(tmp_path: Path) -> None:
    write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT + PRODUCTS + "  - id: cam_any\n    level: 0\n    instrument: CAM\n"
        "    filename: 'cam_(?P<anything>.+)\\.fits'\n",
    )
    registry = load_registry(tmp_path)  # overlapping rules are allowed; names are checked
    with pytest.raises(AmbiguousError) as caught:
        registry.recognise("cam_20261122_0042.fits")
    assert isinstance(caught.value, RecognitionError)
    assert caught.value.reason == "ambiguous"
    assert "'cam_raw'" in str(caught.value)
    assert "'cam_any'" in str(caught.value)
    assert "'cam_bias'" not in str(caught.value)
    # a name only the broad rule takes is still recognised
    assert registry.recognise("cam_notes.fits").product.id == "cam_any"


def many_products(count: int) -> str:
    lines = [INSTRUMENT, "products:\n"]
    for k in range(count):
        lines.append(
            f"  - id: gen{k:03d}\n    level: {k % 4}\n    instrument: CAM\n"
            f"    filename: 'gen{k:03d}_(?P<date>\\d{{8}})_(?P<seq_{k % 7}>\\d+)\\.fits'\n"
        )
    return "".join(lines)


def test_the_matcher_recognises_among_500_products(tmp_path: Path) -> None:
    write(tmp_path, "many.yaml", many_products(500))
    registry = load_registry(tmp_path)
    assert len(registry.products) == 500
    for k in (0, 1, 6, 7, 137, 250, 498, 499):
        recognised = registry.recognise(f"gen{k:03d}_20261122_{k + 1}.fits")
        assert recognised.product.id == f"gen{k:03d}"
        assert dict(recognised.groups) == {"date": "20261122", f"seq_{k % 7}": str(k + 1)}
    with pytest.raises(RecognitionError, match="matches no registered product"):
        registry.recognise("gen500_20261122_1.fits")


def test_the_matcher_detects_ambiguity_among_500_products(tmp_path: Path) -> None:
    write(tmp_path, "many.yaml", many_products(500))
    write(
        tmp_path,
        "broad.yaml",
        "products:\n  - id: broad\n    level: 0\n    instrument: CAM\n"
        "    filename: 'gen4\\d\\d_(?P<rest>.*)'\n",
    )
    registry = load_registry(tmp_path)
    with pytest.raises(AmbiguousError) as caught:
        registry.recognise("gen450_20261122_9.fits")
    assert "'gen450'" in str(caught.value)
    assert "'broad'" in str(caught.value)
    assert registry.recognise("gen350_20261122_9.fits").product.id == "gen350"
    assert registry.recognise("gen450_notes").product.id == "broad"


def test_a_named_backreference_refers_to_its_own_product(tmp_path: Path) -> None:
    write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT + "products:\n"
        "  - id: first\n    level: 0\n    instrument: CAM\n"
        "    filename: 'a_(?P<d>\\d+)\\.fits'\n"
        "  - id: twice\n    level: 0\n    instrument: CAM\n"
        "    filename: '(?P<d>\\d{8})_(?P=d)\\.fits'\n",
    )
    registry = load_registry(tmp_path)
    recognised = registry.recognise("20261122_20261122.fits")
    assert recognised.product.id == "twice"
    assert dict(recognised.groups) == {"d": "20261122"}
    with pytest.raises(RecognitionError):
        registry.recognise("20261122_20261123.fits")
    assert registry.recognise("a_5.fits").product.id == "first"


@pytest.mark.parametrize(
    ("rule", "name"),
    [
        ("(?i)cam_(?P<n>\\d+)\\.fits", "CAM_1.FITS"),
        ("(\\d)x\\1\\.fits", "1x1.fits"),
        ("(?P<d>\\d)?x(?(d)y|z)\\.fits", "1xy.fits"),
    ],
)
def test_a_valid_rule_is_recognised_or_refused_at_load(
    tmp_path: Path, rule: str, name: str
) -> None:
    path = write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT + "products:\n"
        "  - id: other\n    level: 0\n    instrument: CAM\n    filename: 'other\\.fits'\n"
        f"  - id: odd\n    level: 0\n    instrument: CAM\n    filename: '{rule}'\n",
    )
    try:
        registry = load_registry(path.parent)
    except RegistryError as exc:  # refusing the rule at its line would be fine too
        assert [p.line for p in exc.problems] == [line_of(path, "filename:", nth=2)]
        return
    assert registry.recognise(name).product.id == "odd"


def test_one_bad_product_does_not_bring_spurious_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "cam.yaml",
        INSTRUMENT + PRODUCTS + "  - id: cam_flat\n    level: 1\n    instrument: CAM\n"
        "    filename: 'cam_(?P<night>\\d{8})_flat\\.fits'\n    tgas: [calibration]\n",
    )
    write(tmp_path, "pipe.yaml", PIPELINE + PROFILE)
    found = problems(tmp_path)
    assert [(p.file, p.line) for p in found] == [(path, line_of(path, "tgas:"))]


# ------------------------------------------------------------ group by any field


def grouped_pipeline(by: str) -> str:
    return (
        PROFILE
        + f"""\
pipelines:
  - id: arcs
    profile: combine
    inputs:
      - {{product: cam_raw, name: frames}}
    group:
      by: {by}
"""
    )


def test_group_by_an_archived_keyword_or_name_group_loads(tmp_path: Path) -> None:
    products = PRODUCTS.replace(
        "'cam_(?P<date>\\d{8})_(?P<frame>\\d{4})\\.fits'\n",
        "'cam_(?P<date>\\d{8})_(?P<frame>\\d{4})\\.fits'\n    keywords: [GRATNAME, SLIT-W]\n",
        1,
    )
    assert "GRATNAME" in products
    write(tmp_path, "cam.yaml", INSTRUMENT + products)
    write(tmp_path, "p.yaml", grouped_pipeline("[night, GRATNAME, slit_w, date, exptime]"))
    spec = load_registry(tmp_path).pipelines["arcs"]
    assert spec.group.by == ("night", "gratname", "slit_w", "date", "exptime")


def test_group_by_an_unknown_field_names_it_at_its_line_with_the_choices(tmp_path: Path) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    path = write(tmp_path, "p.yaml", grouped_pipeline("[night, gratname]"))
    problem = only_problem(tmp_path)
    assert problem.file == path and problem.line == line_of(path, "by:")
    assert problem.message.startswith("group.by: unknown field 'gratname'; expected a metadata")
    assert "archived keyword of cam_raw" in problem.message
    assert "filter" in problem.message and "frame" in problem.message


# ------------------------------------------------------ errors in the YAML's words


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "    kickoff: {rule: soon}",
            "kickoff.rule: unknown value 'soon'; expected one of: 'ready', 'deadline'",
        ),
        (
            "    inputs: [{product: cam_raw, name: frames, min: -1}]",
            "inputs[0].min: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            "    inputs: [{product: cam_raw, name: 'my frames'}]",
            "inputs[0].name: 'my frames' is not an ID; expected a letter, then",
        ),
    ],
)
def test_a_registry_error_is_in_the_words_of_the_yaml(
    tmp_path: Path, line: str, message: str
) -> None:
    write(tmp_path, "cam.yaml", INSTRUMENT + PRODUCTS)
    text = PROFILE + "pipelines:\n  - id: arcs\n    profile: combine\n"
    if "inputs" not in line:
        text += "    inputs: [{product: cam_raw, name: frames}]\n"
    path = write(tmp_path, "p.yaml", text + line + "\n")
    problem = only_problem(tmp_path)
    assert problem.file == path and problem.line == len(path.read_text().splitlines())
    assert problem.message.startswith(message), problem.message
    assert "pipelines.0" not in problem.message


def test_a_lower_case_keyword_is_named_as_not_a_fits_keyword(tmp_path: Path) -> None:
    path = write(
        tmp_path, "cam.yaml", INSTRUMENT + "  keywords: {frame_type: {keyword: obstype}}\n"
    )
    problem = only_problem(tmp_path)
    assert problem.file == path and problem.line == 4
    assert problem.message.startswith(
        "keywords.frame_type.keyword: 'obstype' is not a FITS keyword"
    )

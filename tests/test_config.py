import inspect
from pathlib import Path

import pytest

from plabel.cli.main import train
from plabel.schemas.config import (
    ConfigError,
    RunConfig,
    _sections,
    build,
    load_run_config,
    main,
    render_docs,
)
from plabel.training.selection import GUARD_TOLERANCE, EpochSelector


def test_default_stages_per_backend():
    cfg = build(RunConfig, {"data": {"source": "x"}})
    assert cfg.label.sam.backend == "lite_medsam"
    assert cfg.label.sam.stages == [["box"], ["box", "mask"]]
    cfg = build(RunConfig, {"data": {"source": "x"}, "label": {"sam": {"backend": "vit_h", "checkpoint": "x.pth"}}})
    assert cfg.label.sam.stages == [["box"], ["points", "mask"]]  # the paper
    cfg = build(RunConfig, {"data": {"source": "x"}, "label": {"sam": {"stages": [["box"]]}}})
    assert cfg.label.sam.stages == [["box"]]


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"data": {"source": "x", "labeled": 3}}, "data.labeled: unknown key"),
        ({"data": {"source": "x"}, "label": {"sam": {"batch_size": "8"}}}, "label.sam.batch_size: expected an integer, got '8'"),
        ({"data": {"source": "x"}, "label": {"sam": {"backend": "vit_x"}}}, "label.sam.backend: expected one of"),
        ({"data": {"source": "x"}, "label": {"sam": {"stages": [["mask"]]}}}, "label.sam.stages[0]"),
        ({"data": {"source": "x"}, "label": {"sam": {"stages": [["box"], ["dots"]]}}}, "'dots'"),
        ({"data": {"source": "x"}, "label": {"sam": {"memory_gb": 0}}}, "label.sam.memory_gb: expected a number of GiB > 0"),
        ({"data": {"source": "x"}, "label": {"sam": {"memory_gb": "4Gi"}}}, "label.sam.memory_gb: expected a number"),
        ({"data": {"source": "x"}, "label": {"sam": {"resources": {"memory": 4}}}}, "memory from memory_gb"),
        ({"data": {"source": "x"}, "label": {"gate": {"per_class": {"heart": {"policy": "maybe"}}}}},
         "label.gate.per_class.heart.policy"),
        ({"data": {"source": "x"}, "teacher": {"image_size": 100}}, "teacher.image_size: expected a multiple of 2**depth = 16"),
        ({"data": {"source": "x"}, "teacher": {"augment": "yes"}}, "teacher.augment: expected true or false"),
        ({"data": {"source": "x", "shards": "y"}}, "exactly one of"),
        ({"data": {"source": "x", "labelled": 0}}, "data.labelled"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_errors_name_key_and_value(raw, message):
    with pytest.raises(ConfigError) as e:
        build(RunConfig, raw)
    assert message in str(e.value)


def test_load_resolves_relative_paths(tmp_path):
    p = tmp_path / "sub" / "c.yaml"
    p.parent.mkdir()
    p.write_text("name: a\ndata: {source: ../data, labelled: 2}\n")
    cfg = load_run_config(p)
    assert cfg.data.source == str((tmp_path / "data").resolve())
    assert cfg.run_dir == str((tmp_path / "sub" / "runs").resolve())
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")


def test_student_init_teacher_needs_the_teachers_architecture(tmp_path):
    cfg = build(RunConfig, {"teacher": {"base_channels": 8, "depth": 3}, "student": {"base_channels": 8, "depth": 3}})
    assert cfg.student.init == "teacher"
    with pytest.raises(ConfigError, match=r"student.base_channels and student.depth must equal the teacher's: got 16 / 4, "
                                          r"teacher 8 / 3"):
        build(RunConfig, {"teacher": {"base_channels": 8, "depth": 3}})
    assert build(RunConfig, {"teacher": {"base_channels": 8, "depth": 3}, "student": {"init": "scratch"}}).student.init \
        == "scratch"
    with pytest.raises(ConfigError, match=r"student.init: expected teacher or scratch, got 'imagenet'"):
        build(RunConfig, {"student": {"init": "imagenet"}})
    with pytest.raises(ConfigError, match=r"label.gate.prefer_on_tie: expected drop or unet"):
        build(RunConfig, {"label": {"gate": {"prefer_on_tie": "sam"}}})


def test_intensity_defaults_to_minmax_and_the_student_must_read_as_its_teacher():
    from plabel.method.preprocess import INTENSITIES

    cfg = build(RunConfig, {})
    assert (cfg.teacher.intensity, cfg.student.intensity) == ("minmax", "minmax")
    assert build(RunConfig, {"teacher": {"intensity": "fixed"}, "student": {"intensity": "fixed"}}).student.intensity \
        == "fixed"
    with pytest.raises(ConfigError, match=r"student.intensity must equal teacher.intensity: got minmax, teacher fixed"):
        build(RunConfig, {"teacher": {"intensity": "fixed"}})
    with pytest.raises(ConfigError, match=r"teacher.intensity: expected fixed or minmax, got 'clahe'"):
        build(RunConfig, {"teacher": {"intensity": "clahe"}})
    # the schema's choices are the engine's (schemas/ imports nothing from engine/)
    from plabel.schemas.config import TrainSection
    field = TrainSection.model_fields["intensity"]
    assert all(build(TrainSection, {"intensity": v}, "t").intensity == v for v in INTENSITIES)
    assert field.default == "minmax"


def test_student_selection_defaults_to_guarded_and_checks_its_values():
    cfg = build(RunConfig, {})
    assert (cfg.student.selection, cfg.student.selection_tolerance, cfg.student.distill) == ("guarded", 0.005, 1.0)
    # one tolerance everywhere: the config, `plabel train` and the engine's own default
    assert GUARD_TOLERANCE == EpochSelector().tolerance == 0.005
    assert inspect.signature(train).parameters["selection_tolerance"].default.default == GUARD_TOLERANCE
    assert build(RunConfig, {"student": {"selection": "mean"}}).student.selection == "mean"
    with pytest.raises(ConfigError, match=r"student.selection: expected guarded or mean, got 'last'"):
        build(RunConfig, {"student": {"selection": "last"}})
    for bad in (-0.1, 2.0, float("nan")):
        with pytest.raises(ConfigError, match=r"student.selection_tolerance: expected a number in \[0, 1\]"):
            build(RunConfig, {"student": {"selection_tolerance": bad}})
    with pytest.raises(ConfigError, match=r"student.distill: expected a number >= 0, got -1"):
        build(RunConfig, {"student": {"distill": -1}})


def test_student_soup_values():
    # the measured defaults (benchmarks/RESULTS.md, quality 2.0b and 2.0): one student, one round
    assert build(RunConfig, {}).student.soup == 1 and build(RunConfig, {}).student.rounds == 1
    assert build(RunConfig, {}).teacher.soup == 1
    assert build(RunConfig, {"student": {"init": "scratch"}}).student.soup == 1  # no common start to average
    assert build(RunConfig, {"student": {"soup": 1}}).student.soup == 1
    assert build(RunConfig, {"student": {"soup": 3}}).student.soup == 3
    for bad, msg in ((0, "student.soup: expected an int >= 1, got 0"),
                     (True, "student.soup: expected an integer, got True")):  # the type check (_convert)
        with pytest.raises(ConfigError) as e:
            build(RunConfig, {"student": {"soup": bad}})
        assert msg in str(e.value)
    with pytest.raises(ConfigError, match=r"student.soup: expected 1 unless init is teacher .*, got 2"):
        build(RunConfig, {"student": {"soup": 2, "init": "scratch"}})
    with pytest.raises(ConfigError, match=r"teacher.soup: expected 1 \(an average of several models"):
        build(RunConfig, {"teacher": {"soup": 2}})


def test_docs_config_reference_is_generated_from_the_declaration():
    """docs/config.md's reference tables are config_reference_markdown(): rerun
    `python -m plabel.schemas.config --write docs/config.md` after changing a key."""

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    text = doc.read_text()
    assert render_docs(text) == text, \
        "docs/config.md is out of date with schemas/config.py: run python -m plabel.schemas.config --write docs/config.md"
    assert main(["--check", str(doc)]) == 0
    for path, cls in _sections(RunConfig):  # every key is described, and listed
        for name, f in cls.model_fields.items():
            if not hasattr(f.annotation, "model_fields"):
                assert f.description, f"{path}.{name} has no description"
                assert f"| `{name}` |" in text


def test_sections_are_models():
    """The pydantic declaration: copies, dumps, null sections and mapping keys as the dataclasses had them."""
    cfg = build(RunConfig, {"data": {"source": "x"}, "label": None, "student": {"seed": 3},
                            "ray": {"num_cpus": 2}})
    assert cfg.label == build(RunConfig, {}).label  # null: the defaults
    moved = cfg.student.model_copy(update={"seed": 4})
    assert (moved.seed, moved.soup, cfg.student.seed) == (4, 1, 3)
    assert build(RunConfig, cfg.to_dict()) == cfg and cfg.to_dict()["label"]["sam"]["stages"] == [["box"], ["box", "mask"]]
    assert build(RunConfig, {"label": {"sam": {"resources": {1: 2}}}}).label.sam.resources == {"1": 2.0}
    assert build(RunConfig, {"teacher": {"lr": 1}}).teacher.lr == 1.0  # an int is a number
    for raw, message in (({"teacher": {"lr": True}}, "teacher.lr: expected a number, got True"),
                         ({"teacher": {"epochs": 2.0}}, "teacher.epochs: expected an integer, got 2.0"),
                         ({"label": {"sam": {"stages": [["box"], [3]]}}}, "label.sam.stages[1][0]: expected a string, got 3"),
                         ({"label": {"sam": {"x": 1}}}, "label.sam.x: unknown key; expected one of ['backend', "),
                         ({"label": 3}, "label: expected a mapping, got 3"),
                         ({"ray": {"num_cpus": 0}}, "ray.num_cpus: expected int > 0, got 0")):
        with pytest.raises(ConfigError) as e:
            build(RunConfig, raw)
        assert str(e.value).startswith(message)

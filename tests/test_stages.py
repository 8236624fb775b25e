"""plabel.jobs.stages: what each stage's key depends on (no Ray, no training).

A key is what decides whether `plabel run` reruns a stage (plabel.jobs.runner); here the keys of a
tiny ingested run are compared while one setting or input file at a time changes."""
import json

import pytest

from plabel.data.ingest import ingest
from plabel.data.synthetic import make_synthetic_dataset
from plabel.data.table_commit import MARKER_NAME
from plabel.jobs.runner import RunContext, digest
from plabel.jobs.stages import RUN_STAGES
from plabel.schemas.config import RunConfig, build

KEYS = {s.name: s.key for s in RUN_STAGES}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    src = make_synthetic_dataset(root / "data", n_images=10, size=32, seed=0)
    ingest(src, root / "run" / "shards", counts={"labelled": 2, "val": 2, "test": 1}, seed=0, shard_size=4)
    (root / "run" / "teacher.pt").write_bytes(b"teacher one")
    return root, src


def _ctx(run, **sections) -> RunContext:
    root, src = run
    cfg = build(RunConfig, {"data": {"source": str(src), "labelled": 2, "val": 2, "test": 1, "shard_size": 4},
                            **sections})
    return RunContext(cfg, str(root / "run"))


def _key(stage, ctx) -> str:
    return digest(KEYS[stage](ctx))


def test_the_teacher_key_follows_the_teacher_section_only(run):
    base = _key("teacher", _ctx(run))
    assert _key("teacher", _ctx(run, teacher={"epochs": 41})) != base
    assert _key("teacher", _ctx(run, student={"epochs": 41})) == base
    assert _key("teacher", _ctx(run, label={"sam": {"actors": 2}})) == base


def test_the_calibrate_key_ignores_per_class_overrides_and_follows_the_teacher(run):
    root, _ = run
    base = _key("calibrate", _ctx(run))
    assert _key("calibrate", _ctx(run, label={"gate": {"per_class": {"heart": {"policy": "unet"}}}})) == base
    assert _key("calibrate", _ctx(run, label={"gate": {"min_sam_iou": 0.7}})) != base
    assert _key("calibrate", _ctx(run, label={"sam": {"actors": 3, "compile": True}})) == base  # speed only
    (root / "run" / "teacher.pt").write_bytes(b"teacher two")
    try:
        assert _key("calibrate", _ctx(run)) != base
    finally:
        (root / "run" / "teacher.pt").write_bytes(b"teacher one")


def test_the_student_key_follows_the_committed_table(run):
    root, _ = run
    table = root / "run" / "pseudo_labels"
    table.mkdir(exist_ok=True)
    marker = {"format": "plabel-table", "rows": 5, "ok": 5, "empty": 0, "error": 0, "files": ["part-a.parquet"],
              "unet_checkpoint_sha256": "t", "job_fingerprint": "gate-1"}
    (table / MARKER_NAME).write_text(json.dumps(marker))
    base = _key("student", _ctx(run))
    assert _key("student", _ctx(run, teacher={"epochs": 41})) == base
    assert _key("student", _ctx(run, student={"lr": 0.01})) != base
    (table / MARKER_NAME).write_text(json.dumps({**marker, "job_fingerprint": "gate-2"}))  # same counts, other rows
    assert _key("student", _ctx(run)) != base


def test_self_training_rounds_name_their_stages_and_files():
    """student.rounds R: calibrate, label and student once per round; the last round keeps the plain
    names and top-level files, an earlier round r runs as <stage>-r into round-r/, and round r's
    teacher is round r - 1's student."""
    from plabel.jobs.stages import Round, run_stages_for

    assert [s.name for s in RUN_STAGES] == ["ingest", "teacher", "calibrate", "label", "student", "evaluate", "report"]
    cfg = build(RunConfig, {"data": {"source": "x"}, "student": {"rounds": 3}})
    stages = run_stages_for(cfg)
    assert [s.name for s in stages] == [
        "ingest", "teacher", "calibrate-1", "label-1", "student-1", "calibrate-2", "label-2", "student-2",
        "calibrate", "label", "student", "evaluate", "report"]
    by_name = {s.name: s for s in stages}
    assert by_name["calibrate-1"].writes == ("round-1/gate_policy.json",)
    assert by_name["label-2"].writes == (f"round-2/pseudo_labels/{MARKER_NAME}",)
    assert by_name["student-2"].writes == ("round-2/student.pt",) and "round-1/student.pt" in by_name["student-2"].reads
    assert by_name["student"].writes == ("student.pt",) and "round-2/student.pt" in by_name["student"].reads
    assert (Round(1, 1).teacher, Round(1, 1).student, Round(1, 1).table) == ("teacher.pt", "student.pt", "pseudo_labels")
    assert (Round(1, 2).teacher, Round(1, 2).student) == ("teacher.pt", "round-1/student.pt")
    assert (Round(2, 2).teacher, Round(2, 2).policy) == ("round-1/student.pt", "gate_policy.json")
    assert Round(2, 3).stage("label") == "label-2" and Round(3, 3).stage("label") == "label"
    with pytest.raises(Exception, match="rounds"):
        build(RunConfig, {"data": {"source": "x"}, "student": {"rounds": 0}})


def test_a_rounds_stage_keys_follow_its_own_teacher(run):
    """Round 2's calibrate key reads round 1's student; changing that file changes round 2's key only."""
    from plabel.jobs.stages import run_stages_for

    root, _ = run
    ctx = _ctx(run, student={"rounds": 2})
    keys = {s.name: s.key for s in run_stages_for(ctx.cfg)}
    (root / "run" / "round-1").mkdir(exist_ok=True)
    (root / "run" / "round-1" / "student.pt").write_bytes(b"student one")
    first = {n: digest(keys[n](ctx)) for n in ("calibrate-1", "calibrate")}
    (root / "run" / "round-1" / "student.pt").write_bytes(b"student two")
    second = {n: digest(keys[n](ctx)) for n in ("calibrate-1", "calibrate")}
    assert first["calibrate-1"] == second["calibrate-1"] and first["calibrate"] != second["calibrate"]

"""End to end: `plabel run` on a tiny synthetic config through Ray Data and Ray Train."""
import json
import math
import re
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from typer.testing import CliRunner

from plabel.cli.errors import describe
from plabel.cli.main import app
from plabel.data.imageio import decode_image, to_gray_float
from plabel.data.ingest import load_manifest, shard_paths
from plabel.data.shards import image_member
from plabel.jobs.calibrate_job import read_labelled_images
from plabel.jobs.label_job import run_label_job
from plabel.jobs.train_job import (labelled_dataset, maybe_materialize, pseudo_labelled_dataset, student_dataset,
                                   trainable_rows)
from plabel.method.calibration import load_gate_policy
from plabel.method.cleaning import CleaningConfig
from plabel.method.gate import gate_decision
from plabel.data.table_commit import table_files
from plabel.method.labelling import ImageMeta, clean_and_prompt, pseudo_label_rows, teacher_probs, teacher_view
from plabel.method.metrics import dice_per_class
from plabel.method.preprocess import masks_to_grid, to_unet_input
from plabel.method.sam import SamRefiner, load_sam
from plabel.method.unet import checkpoint_sha256, load_checkpoint, save_checkpoint
from plabel.schemas.config import LabelSection, SamSection, build
from plabel.schemas.masks import decode_mask
from plabel.schemas.tables import pseudo_label_schema, table_classes
from plabel.training.selection import GUARD_TOLERANCE
from plabel.training.soup import average_weights
from plabel.training.student_set import pseudo_part_arrays, shard_lookup
from tiny_config import CONFIG, TINY_SHAPE  # the session's one tiny run (fixture tiny_run, conftest.py)


def test_run_writes_every_stage(tiny_run):
    run, output = tiny_run
    results = json.loads((run / "results.json").read_text())
    assert set(results["stages"]) == {"ingest", "teacher", "calibrate", "label", "student", "evaluate", "report"}
    assert results["stages"]["ingest"]["counts"] == {"labelled": 6, "val": 2, "test": 4, "unlabelled": 14}
    for name in ("config.yaml", "environment.json", "teacher.pt", "student.pt", "dice_table.txt"):
        assert (run / name).exists(), name
    env = json.loads((run / "environment.json").read_text())
    assert env["packages"]["ray"] and env["packages"]["torch"]
    ev = results["stages"]["evaluate"]
    for model in ("teacher", "student"):
        assert ev[model]["n_images"] == 4
        per_image = np.array(list(ev[model]["per_image"].values()))
        assert per_image.shape == (4, 4)
        assert ev[model]["mean_dice"] == pytest.approx(per_image.mean(axis=1).mean())
    assert "teacher" in output and "student" in output and "mean ± std" in output
    # the images are not square (tiny_config.TINY_SHAPE): every row and kept mask is on its image's own grid,
    # and the PNG sources have no DICOM UID
    rows = pads.dataset(str(run / "pseudo_labels"), format="parquet").to_table().to_pylist()
    classes = load_manifest(run / "shards")["classes"]
    assert len(rows) == 14 and all(r["status"] == "ok" and r["sop_instance_uid"] is None for r in rows)
    for r in rows:
        assert (r["height"], r["width"]) == TINY_SHAPE
        masks = [decode_mask(r[f"{c}.mask"], *TINY_SHAPE) for c in classes if r[f"{c}.kept"] != "dropped"]
        assert any(m.any() for m in masks)


# What Ray and its workers print; none of it may reach the console of a plain `plabel run`.
RAY_LOG_LINE = re.compile(r"\(\w+ pid=\d+|\bpid=\d+\)|core_worker|raylet|\bINFO\b|\bWARNING\b|Ray Data|"
                          r"Running Dataset|\[repeated \d+x|ray\.train|ray\.data|Deprecat|logs? (are|is) in")


def test_console_holds_progress_and_summaries_not_ray_logs(tiny_run):
    """The console of `plabel run` (not a terminal here): plabel's lines only. Each long stage shows
    its progress (epochs or images done of total) and ends with one summary line; Ray's and the
    workers' lines went to <run>/logs/plabel.log."""
    run, output = tiny_run
    lines = output.splitlines()
    noise = [ln for ln in lines if RAY_LOG_LINE.search(ln)]
    assert noise == [], noise
    assert lines[0] == f"logs: {run / 'logs' / 'plabel.log'}"
    assert "[teacher] 25/25 epochs" in output and "val Dice" in output  # the last epoch's progress line
    for k in (1, 2, 3):
        assert f"[student {k}/3] 1/1 epochs" in output
    assert re.search(r"^\[label\] 14/14 images", output, re.M)
    for stage in ("ingest", "teacher", "calibrate", "label", "student", "evaluate", "report"):
        assert len([ln for ln in lines if ln.startswith(f"[{stage}] finished in ")]) == 1, stage
    # the summary says how the SAM pool was sized (tiny config: sam.cpus 2 on 4 logical CPUs -> 1 actor)
    assert re.search(r"^\[label\] finished in [\d.]+ s: 14 rows \(ok \d+, empty \d+, error 0\); 1 SAM actor\(s\) "
                     r"of 2 CPU: 4 CPUs less 1 U-Net actor\(s\) and decoding; not compiled \(auto: 14 images per "
                     r"actor, compiling pays from 48\)$", output, re.M)
    log = (run / "logs" / "plabel.log").read_text()
    assert re.search(r"\(RayTrainWorker pid=\d+", log)  # the workers' forwarded output is in the file


def test_pseudo_label_table_schema_and_rows(tiny_run):
    run, _ = tiny_run
    table = pads.dataset(str(run / "pseudo_labels"), format="parquet").to_table()
    manifest = load_manifest(run / "shards")
    classes = manifest["classes"]
    expected = pseudo_label_schema(classes)
    assert table.schema.names == expected.names
    for f in expected:
        assert table.schema.field(f.name).type == f.type, f.name
    assert table_classes(table.schema) == classes
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(manifest["splits"]["unlabelled"]["ids"])  # every image exactly once
    status = table.column("status").to_pylist()
    assert status.count("ok") + status.count("empty") + status.count("error") == 14
    assert status.count("error") == 0
    assert status.count("ok") >= 10, status  # the teacher finds structures on most images
    assert set(table.column("sam_backend").to_pylist()) == {"lite_medsam"}
    assert set(table.column("unet_checkpoint_sha256").to_pylist()) == {checkpoint_sha256(run / "teacher.pt")}
    kept = [k for c in classes for k in table.column(f"{c}.kept").to_pylist()]
    assert set(kept) <= {"sam", "unet", "dropped", "empty"} and "sam" in kept


def test_ray_job_rows_equal_in_process_method(tiny_run):
    """The Ray Data job gives the same pseudo labels as calling the method functions directly."""

    run, _ = tiny_run
    table = pads.dataset(str(run / "pseudo_labels"), format="parquet").to_table()
    by_id = {r["id"]: r for r in table.to_pylist()}
    classes = load_manifest(run / "shards")["classes"]
    model, _, extra = load_checkpoint(run / "teacher.pt")
    refiner = SamRefiner(load_sam("lite_medsam"), stages=tuple(tuple(s) for s in SamSection().stages))
    gate = load_gate_policy(run / "gate_policy.json").gate  # what the label stage used
    shard = shard_paths(run / "shards", "unlabelled")[0]
    samples = list(wds.WebDataset(shard, shardshuffle=False))[:3]
    grays, metas = [], []
    for s in samples:
        name, data = image_member(s)
        gray = np.round(to_gray_float(decode_image(data, name)) * 255).astype(np.uint8)
        grays.append(gray)
        metas.append(ImageMeta(json.loads(s["json"])["id"], shard, s["__key__"], *gray.shape))
    assert model.config.intensity == "minmax"  # the default: SAM is given the stretched images
    grays = teacher_view(model, grays)
    probs = teacher_probs(model, grays, extra["image_size"])
    cleaned = [clean_and_prompt(p, CleaningConfig(threshold=0.3)) for p in probs]
    rows = pseudo_label_rows(refiner, grays, [c[0] for c in cleaned], [c[1] for c in cleaned],
                             [c[2] for c in cleaned], metas, classes, gate, {})
    for row in rows:
        got = by_id[row["id"]]
        assert got["status"] == row["status"]
        for c in classes:
            assert got[f"{c}.kept"] == row[f"{c}.kept"]
            a = decode_mask(got[f"{c}.mask"], got["height"], got["width"])
            b = decode_mask(row[f"{c}.mask"], row["height"], row["width"])
            inter, total = (a & b).sum(), a.sum() + b.sum()
            assert total == 0 or 2 * inter / total >= 0.99
            if row[f"{c}.sam_iou"] is not None:
                assert got[f"{c}.sam_iou"] == pytest.approx(row[f"{c}.sam_iou"], abs=1e-3)


def test_calibrate_stage_writes_the_gate_policy_the_label_stage_used(tiny_run):
    """The calibrate stage reads the 2 validation images, writes gate_policy.json (the configured
    per-class override of clavicle wins), and every table row follows the stored gate."""

    run, output = tiny_run
    manifest = load_manifest(run / "shards")
    classes = manifest["classes"]
    policy = load_gate_policy(run / "gate_policy.json")
    assert sorted(policy.validation["ids"]) == sorted(manifest["splits"]["val"]["ids"])
    assert policy.validation["n_images"] == 2 and policy.overridden == ["clavicle"]
    assert set(policy.report) == set(classes) and set(policy.calibrated.per_class) == set(classes)
    assert policy.gate.for_class("clavicle").policy == "unet"
    for c in classes:
        r = policy.report[c]
        assert r["n_images"] == 2 and sum(r["kept"].values()) == 2 and 0.0 <= r["dice_unet"] <= 1.0
    results = json.loads((run / "results.json").read_text())
    assert results["stages"]["calibrate"]["n_images"] == 2 and "dice gated" in output
    assert output.index("[calibrate] ...") < output.index("[label] ...")
    table = pads.dataset(str(run / "pseudo_labels"), format="parquet").to_table().to_pylist()
    assert {row["clavicle.kept"] for row in table} <= {"unet", "empty"}
    for row in table:
        for c in classes:
            iou, agree = row[f"{c}.sam_iou"], row[f"{c}.agreement_dice"]
            assert row[f"{c}.kept"] == gate_decision(policy.gate.for_class(c), row[f"{c}.kept"] != "empty",
                                                     math.nan if iou is None else iou,
                                                     math.nan if agree is None else agree,
                                                     "ran" if iou is not None else "nonfinite")


def test_evaluate_command_writes_json(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "ev.json"
    result = CliRunner().invoke(app, ["evaluate", "--model", str(run / "teacher.pt"), "--data", str(run / "shards"),
                                      "--split", "test", "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ev = json.loads(out.read_text())
    assert ev["n_images"] == 4 and set(ev["per_class"]) == {"right_field", "left_field", "heart", "clavicle"}
    results = json.loads((run / "results.json").read_text())
    assert ev["mean_dice"] == pytest.approx(results["stages"]["evaluate"]["teacher"]["mean_dice"])


def test_bad_config_names_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: {source: x, labeled: 3}\n")
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "data.labeled" in result.output


def test_bad_samples_become_error_rows_naming_the_input(tiny_run, tmp_path):
    """A corrupt image and a sample without an image give error rows; good samples still get labels."""

    run, _ = tiny_run
    classes = load_manifest(run / "shards")["classes"]
    img = np.zeros((48, 40), np.uint8)
    img[10:30, 8:30] = 200
    png = cv2.imencode(".png", img)[1].tobytes()
    shard = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "good", "png": png, "json": b'{"id": "good"}'})
        w.write({"__key__": "corrupt", "png": png[:40], "json": b'{"id": "corrupt"}'})
        w.write({"__key__": "noimage", "json": b'{"id": "noimage"}'})
        w.write({"__key__": "zero", "png": b"", "json": b'{"id": "zero"}'})
    stale = tmp_path / ".table.tmp-deadbeef"  # what an interrupted run leaves behind
    stale.mkdir()
    (stale / "part.parquet").write_bytes(b"partial")
    summary = run_label_job([str(shard)], tmp_path / "table", classes, str(run / "teacher.pt"), LabelSection())
    assert summary["rows"] == 4 and summary["error"] == 3 and summary["ok"] + summary["empty"] == 1
    rows = {r["id"]: r for r in pads.dataset(str(tmp_path / "table"), format="parquet").to_table().to_pylist()}
    assert set(rows) == {"good", "corrupt", "noimage", "zero"}
    assert not stale.exists()
    assert rows["good"]["status"] in ("ok", "empty") and (rows["good"]["height"], rows["good"]["width"]) == (48, 40)
    for key in ("corrupt", "noimage", "zero"):
        assert rows[key]["status"] == "error"
        assert str(shard) in rows[key]["message"] and key in rows[key]["message"]
    with pytest.raises(FileExistsError, match="exists already"):
        run_label_job([str(shard)], tmp_path / "table", classes, str(run / "teacher.pt"), LabelSection())


def test_student_soup_averages_students_of_consecutive_seeds(tiny_run, tmp_path):
    """student.soup: 3 (the tiny config's): members of seeds 0, 1, 2, student.pt their average, the average
    scored on the validation split; a run that stops after the members reuses them."""

    run, output = tiny_run
    for k in (1, 2, 3):
        assert f"soup member {k} of 3 (seed {k - 1})" in output
    st = json.loads((run / "results.json").read_text())["stages"]["student"]
    assert [m["seed"] for m in st["soup"]] == [0, 1, 2] and st["best_epoch"] == [0, 0, 0]
    assert [m["checkpoint"] for m in st["soup"]] == ["student-0.pt", "student-1.pt", "student-2.pt"]
    members = [load_checkpoint(run / f"student-{k}.pt")[0] for k in range(3)]
    assert [m["sha256"] for m in st["soup"]] == [checkpoint_sha256(run / f"student-{k}.pt") for k in range(3)]
    for a, b in ((0, 1), (1, 2)):  # different seeds, different students
        assert not torch.equal(members[a].head.weight, members[b].head.weight)
    soup, _, meta = load_checkpoint(run / "student.pt")
    assert meta["averaged_from"] == 3 and meta["soup"] == [m["sha256"] for m in st["soup"]]
    want = average_weights([m.state_dict() for m in members])
    for k, v in soup.state_dict().items():
        assert torch.equal(v, want[k]), k
    # the average itself is scored on the validation split: recomputed here without Ray
    _, grays, truths, skipped = read_labelled_images(shard_paths(str(run / "shards"), "val"), 4)
    assert len(grays) == 2 and not skipped
    by_hand = np.array([dice_per_class(p > 0.5, t) for p, t in zip(teacher_probs(soup, grays, 64), truths)])
    sv = st["soup_val_dice"]
    assert sv["split"] == "val" and sv["n_images"] == 2
    assert sv["mean_dice"] == pytest.approx(by_hand.mean(axis=1).mean())
    classes = json.loads((run / "shards" / "manifest.json").read_text())["classes"]
    assert [sv["per_class"][c] for c in classes] == pytest.approx(list(by_hand.mean(axis=0)))
    assert "[student] soup of 3: validation Dice" in output
    assert "soup_guard" not in st  # selection mean: the average is kept as it is

    # a copy of the run that stopped after the members were written: they are reused, the average is the same
    root = tmp_path / "soup"
    shutil.copytree(run.parent.parent / "data", root / "data")
    shutil.copytree(run, root / "runs" / "tiny", ignore=shutil.ignore_patterns("student.pt", "ray_train"))
    out = root / "runs" / "tiny"
    results = json.loads((out / "results.json").read_text())
    for stage in ("student", "evaluate"):
        del results["stages"][stage]
    (out / "results.json").write_text(json.dumps(results))
    (root / "cfg.yaml").write_text(CONFIG)
    result = CliRunner().invoke(app, ["run", str(root / "cfg.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for stage in ("ingest", "teacher", "calibrate", "label"):
        assert f"[{stage}] done in an earlier run, skipped" in result.output
    for k in (1, 2, 3):
        assert f"soup member {k} of 3: student-{k - 1}.pt of an earlier run, reused" in result.output
    st2 = json.loads((out / "results.json").read_text())["stages"]["student"]
    assert [m.get("reused") for m in st2["soup"]] == [True] * 3 and st2["best_epoch"] == [0, 0, 0]
    assert [m["sha256"] for m in st2["soup"]] == [m["sha256"] for m in st["soup"]]
    assert st2["soup_val_dice"]["mean_dice"] == pytest.approx(sv["mean_dice"])
    again = load_checkpoint(out / "student.pt")[0]
    for k, v in again.state_dict().items():
        assert torch.equal(v, want[k]), k
    ev = json.loads((out / "results.json").read_text())["stages"]["evaluate"]
    assert ev["student"]["n_images"] == 4


def _rerun_student_with_members(tiny_run, root, members) -> tuple[Path, str]:
    """A copy of tiny_run without its student and evaluate stages, rerun with guarded selection and
    the soup members ``members`` [(state_dict, recorded best validation Dice)] in place."""

    run, _ = tiny_run
    shutil.copytree(run.parent.parent / "data", root / "data")
    out = root / "runs" / "tiny"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("student*.pt", "ray_train"))
    results = json.loads((out / "results.json").read_text())
    for stage in ("student", "evaluate"):
        del results["stages"][stage]
    (out / "results.json").write_text(json.dumps(results))
    model, cfg, meta = load_checkpoint(out / "teacher.pt")
    for k, (state, val_dice) in enumerate(members):
        model.load_state_dict(state)
        save_checkpoint(out / f"student-{k}.pt", model, cfg, {**meta, "role": "student", "val_dice": val_dice, "epoch": 0})
    assert "selection: mean" in CONFIG
    (root / "cfg.yaml").write_text(CONFIG.replace("selection: mean", "selection: guarded"))
    result = CliRunner().invoke(app, ["run", str(root / "cfg.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_a_soup_that_loses_a_class_on_validation_gives_way_to_its_best_member(tiny_run, tmp_path):
    """Guarded selection holds the average to the teacher's per-class validation Dice: members 1 and
    2 predict nothing (the teacher's body, head weights 0 and bias -1000), so their average with the
    teacher's weights (member 0), whose logits are (the teacher's - 2000) / 3, predicts nothing and
    loses every class the teacher finds; student.pt becomes member 0, the best one on
    validation, and scores exactly the teacher's test Dice."""

    teacher = load_checkpoint(tiny_run[0] / "teacher.pt")[0].state_dict()
    blind = {k: v.clone() for k, v in teacher.items()}
    blind["head.weight"].zero_()
    blind["head.bias"].fill_(-1000.0)
    out, output = _rerun_student_with_members(tiny_run, tmp_path, [(teacher, 0.6), (blind, 0.1), (blind, 0.2)])
    res = json.loads((out / "results.json").read_text())
    st, classes = res["stages"]["student"], json.loads((out / "shards" / "manifest.json").read_text())["classes"]
    guard = st["soup_guard"]
    soup, ref = st["soup_val_dice"]["per_class"], guard["teacher_val_dice"]
    assert all(soup[c] == 0.0 for c in classes if ref[c] > 0)  # the average predicts nothing
    by_hand = [c for c in classes if soup[c] < ref[c] - GUARD_TOLERANCE]
    assert by_hand and guard["lost_classes"] == by_hand and guard["tolerance"] == GUARD_TOLERANCE
    assert guard["kept"] == "student-0.pt"
    assert f"[student] the soup lost {', '.join(by_hand)} on the val split" in output
    assert "student.pt is student-0.pt (seed 0)" in output
    assert st["sha256"] == checkpoint_sha256(out / "student.pt") == st["soup"][0]["sha256"]
    kept = load_checkpoint(out / "student.pt")[0].state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in kept.items())
    ev = res["stages"]["evaluate"]
    assert ev["student"]["per_image"] == ev["teacher"]["per_image"]


def test_a_soup_that_loses_no_class_is_kept(tiny_run, tmp_path):
    """The same guard with three copies of the teacher's weights: their average loses nothing."""

    teacher = load_checkpoint(tiny_run[0] / "teacher.pt")[0].state_dict()
    out, output = _rerun_student_with_members(tiny_run, tmp_path, [(teacher, 0.5), (teacher, 0.7), (teacher, 0.6)])
    st = json.loads((out / "results.json").read_text())["stages"]["student"]
    guard = st["soup_guard"]
    assert guard["lost_classes"] == [] and guard["kept"] == "soup"
    for c, d in st["soup_val_dice"]["per_class"].items():
        assert d == pytest.approx(guard["teacher_val_dice"][c], abs=1e-6)
    assert load_checkpoint(out / "student.pt")[2]["averaged_from"] == 3
    assert "the soup lost" not in output


def test_student_training_set_takes_each_parts_images_from_its_shard(tiny_run, tmp_path):
    """The student's pseudo-labelled set: each table part with the images of the one shard its rows
    name (no join on id), in shard order, the same in every run; a row whose shard or sample is gone
    stops it with an error naming the row (a pseudo label never leaves training silently)."""

    run, _ = tiny_run
    table = str(run / "pseudo_labels")
    classes = load_manifest(str(run / "shards"))["classes"]
    status = pads.dataset(table, format="parquet").to_table(columns=["status"])["status"].to_pylist()
    lab = json.loads((run / "results.json").read_text())["stages"]["label"]
    assert len(status) == 14 and trainable_rows(table) == sum(s != "error" for s in status) == lab["ok"] + lab["empty"]
    shards = shard_paths(str(run / "shards"), "unlabelled")
    assert len(shards) == 3  # 5 + 5 + 4 images
    rows = trainable_rows(table)

    # Ray-free, part by part: the rows in their shard's order, each image decoded from its shard as
    # the U-Net sees it, each class weighted 1 unless the gate dropped it, the kept mask on the grid
    fs, files = table_files(table)
    assert len(files) == 3
    n_rows = 0
    for f in files:
        got = pseudo_part_arrays(f, fs, classes, 64, "minmax", shard_lookup(shards))
        table_rows = {r["id"]: r for r in pq.read_table(f).to_pylist() if r["status"] != "error"}
        (shard,) = {r["shard"] for r in table_rows.values()}
        in_shard = list(wds.WebDataset(shard, shardshuffle=False))
        assert list(got["id"]) == [json.loads(s["json"])["id"] for s in in_shard]
        for i, sample in enumerate(in_shard):
            row = table_rows[got["id"][i]]
            name, data = image_member(sample)
            gray = np.round(to_gray_float(decode_image(data, name)) * 255).astype(np.uint8)
            assert np.array_equal(got["image"][i], to_unet_input(gray, 64, "minmax"))
            for c, cls in enumerate(classes):
                kept = row[f"{cls}.kept"]
                assert got["weight"][i, c] == (0.0 if kept == "dropped" else 1.0)
                if kept != "dropped":
                    want = decode_mask(row[f"{cls}.mask"], row["height"], row["width"])
                    assert np.array_equal(got["masks"][i, c], masks_to_grid(want[None], 64)[0])
        n_rows += len(got["id"])
    assert n_rows == rows

    # through Ray: one task per part, materialized twice in the same order
    full = maybe_materialize(pseudo_labelled_dataset(table, shards, classes, 64, "fixed"), 14, len(classes), 64,
                             expected_rows=rows, what="whole table")
    assert full.count() == rows
    again = [float(np.asarray(r["image"]).sum()) for r in maybe_materialize(
        pseudo_labelled_dataset(table, shards, classes, 64, "fixed"), 14, len(classes), 64).iter_rows()]
    assert again == [float(np.asarray(r["image"]).sum()) for r in full.iter_rows()]

    # the last shard is not among those given: its rows have no image, and the error names one of them
    with pytest.raises(Exception) as e:
        maybe_materialize(pseudo_labelled_dataset(table, shards[:-1], classes, 64, "fixed"), 14, len(classes), 64,
                          expected_rows=rows, what="the table")
    code, message = describe(e.value)
    assert code == 2 and re.search(r"pseudo-label row \S+ comes from shard \S+-000002\.tar, which is not among "
                                   r"the 2 unlabelled shards given$", message), message
    # a shard that lost one sample (replaced after labelling): that row, by id and key
    moved = tmp_path / "unlabelled"
    moved.mkdir()
    for s in shards[:-1]:
        shutil.copy(s, moved)
    with tarfile.open(shards[-1]) as src, tarfile.open(moved / Path(shards[-1]).name, "w") as dst:
        members = src.getmembers()
        lost = members[0].name.split(".")[0]
        for m in members:
            if m.name.split(".")[0] != lost:
                dst.addfile(m, src.extractfile(m))
    # (the table names the original paths: the copies are found by file name)
    local = [str(moved / Path(s).name) for s in shards]
    with pytest.raises(Exception) as e:
        pseudo_labelled_dataset(table, local, classes, 64, "fixed").materialize()
    code, message = describe(e.value)
    assert code == 2 and re.search(rf"pseudo-label row \S+ has no image: sample {lost} not found in \S+", message), \
        message
    assert maybe_materialize(pseudo_labelled_dataset(table, local[:-1] + [shards[-1]], classes, 64, "fixed"), 14,
                             len(classes), 64, expected_rows=rows).count() == rows


def test_a_students_training_set_is_the_labelled_images_then_the_tables_rows(tiny_run):
    """student_dataset's rows, materialized: the labelled split's images first, then the table's
    pseudo-labelled rows in part order (the order quality.py hands fit_unet, so a one-worker Ray
    Train student and the benchmark's student shuffle the same rows into the same batches)."""
    run, _ = tiny_run
    table, shards_dir = str(run / "pseudo_labels"), str(run / "shards")
    classes = load_manifest(shards_dir)["classes"]
    unlabelled, labelled = shard_paths(shards_dir, "unlabelled"), shard_paths(shards_dir, "labelled")
    rows = trainable_rows(table)

    def rows_of(ds):
        got = list(ds.iter_rows())
        return [np.asarray(r["image"]) for r in got], [np.asarray(r["weight"]) for r in got]

    n_labelled = json.loads((run / "results.json").read_text())["stages"]["ingest"]["counts"]["labelled"]
    # both references through maybe_materialize, which keeps the block order (a plain materialize may not)
    lab_images, lab_weights = rows_of(maybe_materialize(labelled_dataset(labelled, len(classes), 64, "minmax"),
                                                        n_labelled, len(classes), 64))
    pseudo_images, pseudo_weights = rows_of(maybe_materialize(
        pseudo_labelled_dataset(table, unlabelled, classes, 64, "minmax"), rows, len(classes), 64))
    got_images, got_weights = rows_of(student_dataset(table, unlabelled, labelled, classes, 64, "minmax", rows,
                                                      n_labelled))
    assert n_labelled == len(lab_images) > 0 and len(got_images) == n_labelled + rows
    for g, w in zip(got_images, lab_images + pseudo_images):
        assert np.array_equal(g, w)
    # the labelled rows weigh every class 1; the table's rows keep their gate weights
    assert np.array_equal(np.stack(got_weights), np.stack(lab_weights + pseudo_weights))
    assert np.all(np.stack(lab_weights) == 1.0)


def test_a_second_self_training_round_takes_the_first_rounds_student_as_its_teacher(tiny_run, tmp_path):
    """student.rounds: 2 on a copy of the tiny run whose one round is moved to round-1/ (its stages
    renamed calibrate-1, label-1, student-1): round 1 is reused, round 2 calibrates, labels and trains
    from round-1/student.pt, and evaluate scores the teacher, round 1's student and the final one."""
    run, _ = tiny_run
    root = tmp_path / "rounds"
    shutil.copytree(run.parent.parent / "data", root / "data")
    out = root / "runs" / "tiny"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("ray_train", "report*", "dice_table.txt"))
    (out / "round-1").mkdir()
    for name in ("gate_policy.json", "pseudo_labels", "student.pt", "student-0.pt", "student-1.pt", "student-2.pt"):
        shutil.move(str(out / name), str(out / "round-1" / name))
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    for stage in ("calibrate", "label", "student"):
        stages[f"{stage}-1"] = stages.pop(stage)
    stages["student-1"]["soup"] = [{**m, "checkpoint": f"round-1/{m['checkpoint']}"} for m in stages["student-1"]["soup"]]
    for stage in ("evaluate", "report"):
        del stages[stage]
    (out / "results.json").write_text(json.dumps(results))
    assert "soup: 3, rounds: 1}" in CONFIG
    (root / "cfg.yaml").write_text(CONFIG.replace("soup: 3, rounds: 1}", "soup: 3, rounds: 2}"))
    result = CliRunner().invoke(app, ["run", str(root / "cfg.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for stage in ("ingest", "teacher", "calibrate-1", "label-1", "student-1"):
        assert f"[{stage}] done in an earlier run, skipped" in result.output
    for stage in ("calibrate", "label", "student", "evaluate"):
        assert f"[{stage}] ..." in result.output
    st = json.loads((out / "results.json").read_text())["stages"]
    round1 = out / "round-1" / "student.pt"
    assert st["student"]["teacher"] == "round-1/student.pt"
    assert json.loads((out / "pseudo_labels" / "_plabel_complete.json").read_text())[
        "unet_checkpoint_sha256"] == checkpoint_sha256(round1)
    assert load_gate_policy(str(out / "gate_policy.json")).settings["teacher_sha256"] == checkpoint_sha256(round1)
    ev = st["evaluate"]
    assert {"teacher", "student round 1", "student"} <= set(ev)
    first = json.loads((run / "results.json").read_text())["stages"]["evaluate"]["student"]
    assert ev["student round 1"]["per_image"] == first["per_image"]  # the same file, scored again
    assert checkpoint_sha256(out / "student.pt") != checkpoint_sha256(round1)
    assert "student round 1" in (out / "dice_table.txt").read_text()


def test_a_gate_that_consults_sam_for_no_class_labels_without_sam(tiny_run, tmp_path):
    """Every class drop or unet: the label job loads no SAM (its plan says so, the rows have no SAM
    provenance or IoU) and keeps exactly what the method keeps without a refiner."""
    run, _ = tiny_run
    classes = load_manifest(run / "shards")["classes"]
    gate = {"policy": "drop", "per_class": {classes[0]: {"policy": "unet"}}}
    section = build(LabelSection, {"cleaning": {"threshold": 0.3}, "gate": gate, "sam": {"batch_size": 4}}, "label")
    shard = shard_paths(run / "shards", "unlabelled")[0]
    out = run_label_job([shard], tmp_path / "table", classes, str(run / "teacher.pt"), section)
    assert out["plan"].startswith("SAM not run") and out["sam_actors"] == 1 and out["error"] == 0
    rows = pads.dataset(str(tmp_path / "table"), format="parquet").to_table().to_pylist()
    assert len(rows) == out["rows"] > 0
    model, _, extra = load_checkpoint(run / "teacher.pt")
    samples = {json.loads(s["json"])["id"]: s for s in wds.WebDataset(shard, shardshuffle=False)}
    for got in rows:
        assert got["sam_backend"] is None and got["sam_checkpoint_sha256"] is None
        name, data = image_member(samples[got["id"]])
        gray = np.round(to_gray_float(decode_image(data, name)) * 255).astype(np.uint8)
        m, up, pr = clean_and_prompt(teacher_probs(model, [gray], extra["image_size"])[0], CleaningConfig(threshold=0.3))
        (want,) = pseudo_label_rows(None, [gray], [m], [up], [pr], [ImageMeta(got["id"], shard, "k", *gray.shape)],
                                    classes, section_gate(section), {})
        for c in classes:
            assert got[f"{c}.kept"] == want[f"{c}.kept"] and got[f"{c}.sam_iou"] is None
            assert got[f"{c}.kept"] in (("unet", "empty") if c == classes[0] else ("dropped", "empty"))
            assert decode_mask(got[f"{c}.mask"], got["height"], got["width"]).sum() == \
                decode_mask(want[f"{c}.mask"], want["height"], want["width"]).sum()


def section_gate(section):
    from plabel.method.gate import GateConfig

    return GateConfig.from_dict(section.gate.to_gate_dict())

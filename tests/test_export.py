"""`plabel export` (png, nnunet, coco) and `plabel predict`: hand-made rows with known answers, then the
commands on the session's tiny run, checked against `plabel ingest`, nnU-Net's own dataset check,
pycocotools and `plabel evaluate`."""
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from plabel.cli.main import app
from plabel.data.export import nnunet
from plabel.data.export.coco import rle
from plabel.data.export.select import ClassLabel, ExportRow, Selection, export_labels, export_row
from plabel.data.ingest import ingest, load_manifest, shard_paths
from plabel.data.shard_reader import read_shard_file
from plabel.data.shards import decode_masks
from plabel.data.table_commit import read_pseudo_labels
from plabel.method.metrics import dice_per_class
from plabel.schemas.masks import decode_mask, encode_mask
from plabel.schemas.tables import class_column, prediction_schema, pseudo_label_schema, table_info

CLASSES = ["a", "b", "c"]


def _row(h=8, w=8, **per_class) -> dict:
    """A pseudo-label row: per class (kept, mask, sam_iou, unet_prob, box)."""
    row = {"id": "img1", "shard": "s.tar", "key": "img1", "height": h, "width": w, "status": "ok", "message": None}
    for c, (kept, mask, iou, prob, box) in per_class.items():
        row[class_column(c, "kept")] = kept
        row[class_column(c, "mask")] = encode_mask(mask)
        row[class_column(c, "sam_iou")] = iou
        row[class_column(c, "unet_prob")] = prob
        row[class_column(c, "box")] = box
    return row


def _masks():
    a = np.zeros((8, 8), bool)
    a[:, :4] = True  # left half
    b = np.zeros((8, 8), bool)
    b[:4, :] = True  # top half
    return a, b


def test_export_labels_states_and_scores():
    a, b = _masks()
    row = _row(a=("sam", a, 0.9, 0.7, [0, 0, 3, 7]), b=("unet", b, 0.2, 0.6, [0, 0, 7, 3]),
               c=("dropped", np.zeros((8, 8), bool), 0.1, 0.5, [2.0, 2.0, 5.0, 5.0]))
    labels = export_labels(row, "pseudo_labels", CLASSES, Selection())
    assert [labels[c].state for c in CLASSES] == ["sam", "unet", "unknown"]
    assert labels["a"].score == pytest.approx(0.9) and labels["b"].score == pytest.approx(0.6)  # SAM IoU / U-Net prob
    assert np.array_equal(labels["a"].mask, a) and labels["c"].mask is None and labels["c"].box == [2, 2, 5, 5]
    # --min-score 0.65: b's U-Net probability 0.6 is lower -> not known; --kept sam: b not known either
    assert export_labels(row, "pseudo_labels", CLASSES, Selection(min_score=0.65))["b"].state == "unknown"
    assert export_labels(row, "pseudo_labels", CLASSES, Selection(kept=("sam", "empty")))["b"].state == "unknown"
    # a prediction row: every class with pixels is the U-Net's, its score the mean probability
    pred = {"id": "p", "shard": "s.tar", "key": "p", "height": 8, "width": 8, "status": "ok",
            class_column("a", "mask"): encode_mask(a), class_column("a", "area"): 32, class_column("a", "unet_prob"): 0.8}
    lab = export_labels(pred, "predictions", ["a"], Selection(min_score=0.9))["a"]
    assert lab.state == "unknown" and lab.box == [0.0, 0.0, 3.0, 7.0]  # the mask's own inclusive box
    assert export_row({**pred, "status": "error"}, "predictions", ["a"], Selection()) == "error row (no masks)"
    assert "cannot be a file name" in export_row({**pred, "id": "../x"}, "predictions", ["a"], Selection())


def test_selection_rejects_bad_options():
    with pytest.raises(ValueError, match="--classes z: not a class of T"):
        Selection(classes=("z",)).check(CLASSES, "T")
    with pytest.raises(ValueError, match="--kept dropped"):
        Selection(kept=("dropped",)).check(CLASSES, "T")
    with pytest.raises(ValueError, match="--status error"):
        Selection(status=("error",)).check(CLASSES, "T")
    with pytest.raises(ValueError, match="--min-score 2"):
        Selection(min_score=2.0).check(CLASSES, "T")
    assert Selection(classes=("c", "a")).check(CLASSES, "T") == ("a", "c")  # table order


def test_nnunet_region_labels_and_ignore_box_by_hand():
    """a = left half, b = top half overlap in the top-left quadrant: combinations {a}=1, {b}=2,
    {a,b}=3 get values 1, 2, 3; c is unknown with box x 2..5, y 2..5 grown by 2 px -> rows/cols 0..7."""
    a, b = _masks()
    er = ExportRow("img1", "s.tar", "img1", 8, 8, {"a": ClassLabel("sam", a), "b": ClassLabel("unet", b)})
    plan = nnunet.plan([nnunet.scan_row(er)], ["a", "b"])
    assert plan["values"] == {"1": 1, "2": 2, "3": 3} and plan["ignore"] is None
    assert plan["labels"] == {"background": 0, "a": [1, 3], "b": [2, 3]} and plan["regions_class_order"] == [1, 2]
    lab = nnunet.label_map(er, plan)
    assert lab.dtype == np.uint8
    assert lab[0, 0] == 3 and lab[0, 7] == 2 and lab[7, 0] == 1 and lab[7, 7] == 0

    er16 = ExportRow("img2", "s.tar", "img2", 16, 16, {
        "a": ClassLabel("sam", np.pad(a, ((0, 8), (0, 8)))), "b": ClassLabel("empty", np.zeros((16, 16), bool)),
        "c": ClassLabel("unknown", None, box=[2.0, 2.0, 5.0, 5.0])})
    plan = nnunet.plan([nnunet.scan_row(er16)], ["a", "b", "c"])
    assert plan["values"] == {"1": 1} and plan["ignore"] == 2 and plan["absent"] == ["b", "c"]
    assert plan["labels"] == {"background": 0, "a": 1, "ignore": 2} and plan["regions_class_order"] is None
    lab = nnunet.label_map(er16, plan)
    expected = np.zeros((16, 16), np.uint8)
    expected[:8, :4] = 1
    expected[0:8, 0:8] = 2  # box 2..5 inclusive, margin max(2, 0.4) = 2 -> 0..7
    assert np.array_equal(lab, expected)


def test_coco_rle_decodes_to_the_mask():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    r = rle(mask)
    assert r["size"] == [5, 7] and isinstance(r["counts"], str)
    back = mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
    assert np.array_equal(back.astype(bool), mask)
    assert list(mask_utils.toBbox({"size": r["size"], "counts": r["counts"].encode()})) == [2, 1, 4, 2]


def test_prediction_schema_is_told_apart():
    assert table_info(prediction_schema(CLASSES)) == ("predictions", CLASSES)
    assert table_info(pseudo_label_schema(CLASSES)) == ("pseudo_labels", CLASSES)
    with pytest.raises(ValueError, match="not a plabel"):
        table_info(pa.schema([pa.field("x", pa.int8())]))


def test_a_version_1_table_is_still_read():
    """Schema version 2 added sop_instance_uid; a version-1 table (no such column) is read, its rows
    have no UID, and an unknown version is refused naming the versions this plabel reads."""
    v2 = pseudo_label_schema(CLASSES)
    assert v2.metadata[b"plabel.schema_version"] == b"2" and v2.field("sop_instance_uid").type == pa.string()
    meta = {**v2.metadata, b"plabel.schema_version": b"1"}
    v1 = pa.schema([f for f in v2 if f.name != "sop_instance_uid"], metadata=meta)
    assert table_info(v1) == ("pseudo_labels", CLASSES)
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    row = {"id": "a", "shard": "s.tar", "key": "a", "height": 4, "width": 6, "status": "ok", "message": None}
    for c in CLASSES:
        row.update({class_column(c, "mask"): encode_mask(mask), class_column(c, "kept"): "unet",
                    class_column(c, "unet_prob"): 0.9, class_column(c, "sam_iou"): None})
    (read,) = pa.Table.from_pylist([row], schema=v1).to_pylist()
    er = export_row(read, "pseudo_labels", CLASSES, Selection())
    assert er.sop_instance_uid is None and all(np.array_equal(lab.mask, mask) for lab in er.labels.values())
    er2 = export_row({**read, "sop_instance_uid": "1.2.3"}, "pseudo_labels", CLASSES, Selection())
    assert er2.sop_instance_uid == "1.2.3"
    with pytest.raises(ValueError, match="schema version '3' is not supported .*versions 1, 2"):
        table_info(pa.schema(list(v2), metadata={**v2.metadata, b"plabel.schema_version": b"3"}))


# ------------------------------------------------------------------ the commands on the tiny run


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def predicted(tiny_run, tmp_path_factory):
    """`plabel predict` of the tiny run's student on its test split, with --png."""
    run, _ = tiny_run
    out = tmp_path_factory.mktemp("predict") / "out"
    result = _invoke("predict", run / "shards", out, "--model", run / "student.pt", "--split", "test", "--png")
    assert result.exit_code == 0, result.output
    return run, out, result.output


def test_predict_masks_are_the_masks_evaluate_scores(predicted):
    """Dice of the prediction table's masks against the test masks = the evaluate stage's per-image
    Dice of the same student, exactly (same decode, U-Net, resize and threshold)."""
    run, out, output = predicted
    assert "predicted 4 images" in output
    table = read_pseudo_labels(out / "predictions")
    kind, classes = table_info(table.schema)
    assert kind == "predictions" and table.num_rows == 4
    evaluated = json.loads((run / "results.json").read_text())["stages"]["evaluate"]["student"]["per_image"]
    rows = {r["key"]: r for r in table.to_pylist()}
    seen = 0
    for shard in shard_paths(run / "shards", "test"):
        for sample in read_shard_file(shard):
            r = rows[sample["__key__"]]
            pred = np.stack([decode_mask(r[class_column(c, "mask")], r["height"], r["width"]) for c in classes])
            truth = decode_masks(sample["masks.npz"])
            np.testing.assert_array_equal(dice_per_class(pred, truth), evaluated[sample["__key__"]])
            assert r["unet_checkpoint_sha256"] and r["status"] in ("ok", "empty")
            seen += 1
    assert seen == 4


def test_png_export_round_trips_through_ingest(predicted, tmp_path):
    """predict --png wrote png/ with `plabel export --format png`: ingesting it gives back the
    table's masks bit for bit."""
    _, out, _ = predicted
    table = read_pseudo_labels(out / "predictions")
    _, classes = table_info(table.schema)
    assert json.loads((out / "png" / "classes.json").read_text()) == classes
    manifest = ingest(out / "png", tmp_path / "shards")
    assert manifest["splits"]["unlabelled"]["has_masks"] and manifest["splits"]["unlabelled"]["n_samples"] == 4
    rows = {r["id"]: r for r in table.to_pylist()}
    for shard in shard_paths(tmp_path / "shards", "unlabelled"):
        for sample in read_shard_file(shard):
            image_id = json.loads(sample["json"])["id"]
            r = rows[image_id]
            want = np.stack([decode_mask(r[class_column(c, "mask")], r["height"], r["width"]) for c in classes])
            assert np.array_equal(decode_masks(sample["masks.npz"]), want), image_id


def test_nnunet_export_passes_nnunets_own_check(tiny_run, tmp_path, monkeypatch):
    """The tiny run's pseudo labels as an nnU-Net v2 dataset: nnU-Net's verify_dataset_integrity
    accepts it; each label PNG is one channel whose values decode back to the table's masks (and
    `ignore` exactly where the exporter says)."""
    run, _ = tiny_run
    out = tmp_path / "Dataset001_tiny"
    result = _invoke("export", run / "pseudo_labels", out, "--format", "nnunet")
    assert result.exit_code == 0, result.output
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    verify_dataset_integrity(str(out), 1)
    doc = json.loads((out / "dataset.json").read_text())
    table = read_pseudo_labels(run / "pseudo_labels")
    rows = [r for r in table.to_pylist() if r["status"] != "error"]
    assert doc["numTraining"] == len(rows) == len(list((out / "labelsTr").glob("*.png")))
    classes = doc["plabel"]["classes"]
    combos = {int(v): set(cs) for v, cs in doc["plabel"]["combinations"].items()}
    ignore = doc["labels"].get("ignore")
    for r in rows:
        lab = cv2.imread(str(out / "labelsTr" / f"{r['key']}.png"), cv2.IMREAD_UNCHANGED)
        assert lab.ndim == 2, "label maps must have one channel"
        for c in classes:
            kept = r[class_column(c, "kept")]
            mask = decode_mask(r[class_column(c, "mask")], r["height"], r["width"])
            inside = np.isin(lab, [v for v, cs in combos.items() if c in cs])
            known = lab != ignore
            if kept != "dropped":
                assert np.array_equal(inside[known], mask[known]), (r["id"], c)
            else:
                assert ignore is not None and not known.all()


def test_coco_export_decodes_to_the_table_masks(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "coco"
    result = _invoke("export", run, out, "--format", "coco", "--min-score", "0.5")
    assert result.exit_code == 0, result.output
    coco = COCO(str(out / "annotations.json"))
    table = {r["id"]: r for r in read_pseudo_labels(run / "pseudo_labels").to_pylist()}
    classes = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    n = 0
    for img in coco.loadImgs(coco.getImgIds()):
        r = table[img["plabel_id"]]
        assert (out / "images" / img["file_name"]).exists()
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            c = classes[ann["category_id"] - 1]
            want = decode_mask(r[class_column(c, "mask")], r["height"], r["width"])
            assert np.array_equal(coco.annToMask(ann).astype(bool), want)
            assert ann["score"] >= 0.5 and ann["plabel_kept"] in ("sam", "unet")
            assert ann["area"] == want.sum()
            n += 1
    summary = json.loads((out / "plabel_export.json").read_text())
    assert n > 0 and summary["masks"] == n == len(coco.getAnnIds())


def test_export_refuses_bad_input(tiny_run, tmp_path):
    run, _ = tiny_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["export", run / "pseudo_labels", tmp_path / "full", "--format", "png"], "not empty"),
        (["export", run / "pseudo_labels", tmp_path / "o", "--format", "tiff"], "--format tiff"),
        (["export", run / "pseudo_labels", tmp_path / "o", "--format", "png", "--classes", "spleen"], "--classes spleen"),
        (["export", tmp_path / "nothing", tmp_path / "o", "--format", "png"], "no plabel table there"),
        (["predict", tmp_path / "nothing", tmp_path / "o", "--model", run / "student.pt"], "expected an image folder"),
    ]
    for args, needle in cases:
        result = _invoke(*args)
        assert result.exit_code == 2 and needle in result.output, (args, result.output)
    assert not (tmp_path / "o").exists()


def test_dicom_seg_export_references_its_source_and_reads_back(tmp_path, ray_local):
    """DX sources -> ingest -> a prediction table with hand-made masks -> `plabel export --format
    dicom-seg`: highdicom's segread gives back the masks, each SEG references its source's
    SOPInstanceUID and study, and dciodvfy (dicom3tools) reports no error."""
    import shutil
    import subprocess

    import highdicom as hd
    import pyarrow.parquet as pq

    from plabel.method.prediction import prediction_row
    from plabel.method.unet import UNet, UNetConfig, save_checkpoint
    from test_dicom import STORED, write_dicom

    assert shutil.which("dciodvfy"), "dciodvfy missing: apt-get install -y dicom3tools (see .ci/run)"
    study = "1.2.826.0.1.3680043.8.498.100"
    (tmp_path / "src" / "images").mkdir(parents=True)
    for k in range(2):
        write_dicom(tmp_path / "src" / "images" / f"case{k}.dcm", STORED, sop=f"1.2.826.0.1.3680043.8.498.{k + 10}",
                    PatientName="Test^P", PatientID="P1", StudyInstanceUID=study,
                    SeriesInstanceUID=f"1.2.826.0.1.3680043.8.498.20{k}", StudyDate="20260101", StudyTime="120000",
                    AccessionNumber="A1", ReferringPhysicianName="", StudyID="1", SeriesNumber=1, InstanceNumber=1,
                    PatientBirthDate="", PatientSex="O", PatientOrientation=["L", "F"], ImagerPixelSpacing=[0.5, 0.5],
                    Manufacturer="x")
    ingest(tmp_path / "src", tmp_path / "shards")
    classes, rows, want = ["a", "b"], [], {}
    for shard in shard_paths(tmp_path / "shards", "unlabelled"):
        for sample in read_shard_file(shard):
            meta = json.loads(sample["json"])
            h, w = meta["height"], meta["width"]
            m = np.zeros((2, h, w), bool)
            m[0, :5, :6] = True  # 30 pixels
            m[1, 3:, 4:] = True  # 6 x 8 = 48 pixels, overlapping a
            want[meta["id"]] = m
            rows.append(prediction_row({"id": meta["id"], "shard": shard, "key": sample["__key__"], "height": h,
                                        "width": w, "sop_instance_uid": meta["sop_instance_uid"], "message": None,
                                        "unet_checkpoint_sha256": "x"},
                                       m, np.array([0.9, 0.8], np.float32), classes))
    (tmp_path / "pred").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=prediction_schema(classes)), tmp_path / "pred" / "part-0.parquet")
    result = _invoke("export", tmp_path / "pred", tmp_path / "seg", "--format", "dicom-seg")
    assert result.exit_code == 0, result.output
    assert "exported 2 images and 4 masks of 2 rows" in result.output
    index = {e["id"]: e for e in json.loads((tmp_path / "seg" / "index.json").read_text())}
    for k in range(2):
        path = tmp_path / "seg" / f"case{k}.seg.dcm"
        seg = hd.seg.segread(path)
        assert seg.StudyInstanceUID == study and seg.PatientID == "P1"
        (_, _, source_uid), = seg.get_source_image_uids()
        assert source_uid == f"1.2.826.0.1.3680043.8.498.{k + 10}" == index[f"case{k}"]["source_sop_instance_uid"]
        assert [seg.get_segment_description(i).segment_label for i in (1, 2)] == classes
        pixels = seg.get_pixels_by_source_instance([source_uid], segment_numbers=[1, 2])[0]
        assert np.array_equal(np.moveaxis(pixels, -1, 0).astype(bool), want[f"case{k}"])
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (report.stdout + report.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors
    # the table's SOPInstanceUID (schema version 2) must be the shard's source: a shard replaced after
    # labelling (here: the table names another instance for case1) gets no SEG over the wrong image
    other = [{**r, "sop_instance_uid": "1.2.826.0.1.3680043.8.498.99"} if r["id"] == "case1" else r for r in rows]
    (tmp_path / "pred2").mkdir()
    pq.write_table(pa.Table.from_pylist(other, schema=prediction_schema(classes)), tmp_path / "pred2" / "part-0.parquet")
    result = _invoke("export", tmp_path / "pred2", tmp_path / "seg2", "--format", "dicom-seg")
    assert result.exit_code == 0, result.output
    assert "exported 1 images and 2 masks of 2 rows" in result.output, result.output
    summary = json.loads((tmp_path / "seg2" / "plabel_export.json").read_text())
    assert summary["skipped"] == {"the shard's DICOM source is not the labelled one": 1}
    assert "1.2.826.0.1.3680043.8.498.11" in summary["skipped_ids"]["case1"]
    # `plabel predict` on the DICOM shards fills the column from what ingest kept
    cfg = UNetConfig(in_channels=1, num_classes=2, base_channels=4, depth=2)
    save_checkpoint(tmp_path / "m.pt", UNet.from_config(cfg), cfg, {"classes": classes, "image_size": 32})
    result = _invoke("predict", tmp_path / "shards", tmp_path / "p", "--model", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "p" / "predictions").to_pylist()
    assert {r["id"]: r["sop_instance_uid"] for r in table} == {
        f"case{k}": f"1.2.826.0.1.3680043.8.498.{k + 10}" for k in range(2)}


def test_predict_and_export_non_square_images_end_to_end(tiny_run, tmp_path):
    """An image folder of non-square PNGs (40 x 72 and 72 x 40) -> predict (ingest, letterboxed U-Net
    input, masks cropped back) -> png export: every mask has its image's own size, and equals the
    in-process prediction of the same model."""
    from plabel.method.labelling import teacher_probs
    from plabel.method.prediction import predicted_masks
    from plabel.method.unet import load_checkpoint

    run, _ = tiny_run
    rng = np.random.default_rng(0)
    (tmp_path / "new" / "images").mkdir(parents=True)
    shapes = {"wide": (40, 72), "tall": (72, 40)}
    grays = {}
    for name, shape in shapes.items():
        grays[name] = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (7, 7), 0)
        cv2.imwrite(str(tmp_path / "new" / "images" / f"{name}.png"), grays[name])
    result = _invoke("predict", tmp_path / "new", tmp_path / "out", "--model", run / "student.pt", "--png")
    assert result.exit_code == 0, result.output
    assert "predicted 2 images" in result.output
    model, _, extra = load_checkpoint(run / "student.pt")
    classes = json.loads((tmp_path / "out" / "png" / "classes.json").read_text())
    for name, shape in shapes.items():
        want = predicted_masks(teacher_probs(model, [grays[name]], int(extra["image_size"]))[0])
        for ci, c in enumerate(classes):
            got = cv2.imread(str(tmp_path / "out" / "png" / "masks" / c / f"{name}.png"), cv2.IMREAD_UNCHANGED)
            assert got.shape == shape
            assert np.array_equal(got > 0, want[ci]), (name, c)


def test_predict_from_and_export_to_object_storage(tiny_run, s3_prefix):
    """predict reads shards from S3 and writes its table there; export reads that table and its images
    from S3 and writes a COCO export to S3 (moto server on loopback)."""
    from plabel.data import storage

    run, _ = tiny_run
    shards = storage.join(s3_prefix, "shards")
    for f in (run / "shards").rglob("*"):
        if f.is_file():
            storage.write_bytes(storage.join(shards, *f.relative_to(run / "shards").parts), f.read_bytes())
    out = storage.join(s3_prefix, "out")
    result = _invoke("predict", shards, out, "--model", run / "student.pt", "--split", "test")
    assert result.exit_code == 0, result.output
    table = read_pseudo_labels(storage.join(out, "predictions"))
    assert table.num_rows == 4 and all(s.startswith(f"{shards}/test/") for s in table.column("shard").to_pylist())
    coco = storage.join(s3_prefix, "coco")
    result = _invoke("export", storage.join(out, "predictions"), coco, "--format", "coco")
    assert result.exit_code == 0, result.output
    doc = json.loads(storage.read_text(storage.join(coco, "annotations.json")))
    assert len(doc["images"]) == 4
    for image in doc["images"]:
        assert storage.exists(storage.join(coco, "images", image["file_name"]))

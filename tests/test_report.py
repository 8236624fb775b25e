"""`plabel report`: the run report (plabel.report) on a hand-made run directory (no Ray, seconds),
and the report `plabel run` wrote for the session's tiny run, opened in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from plabel.cli.main import app
from plabel.data.ingest import ingest, load_manifest
from plabel.data.synthetic import make_synthetic_dataset
from plabel.errors import InputError
from plabel.method.calibration import GatePolicy
from plabel.method.gate import ClassGate, GateConfig
from plabel.method.unet import UNet, save_checkpoint
from plabel.report import build_report
from plabel.report.collect import read_run
from plabel.schemas.masks import encode_mask
from plabel.schemas.tables import pseudo_label_schema

# -------------------------------------------------------------------------------- a hand-made run

CLASSES = ["right_field", "left_field", "heart", "clavicle"]
# per unlabelled image (6): status and, per class, (kept, agreement Dice)
KEPT = [
    ("ok", [("sam", 0.95), ("sam", 0.90), ("dropped", 0.40), ("unet", 0.30)]),
    ("ok", [("sam", 0.85), ("unet", 0.20), ("dropped", 0.50), ("unet", 0.70)]),
    ("ok", [("sam", 0.99), ("sam", 0.97), ("dropped", 0.10), ("unet", 0.60)]),
    ("empty", [("empty", None)] * 4),
    ("ok", [("sam", 0.91), ("sam", 0.92), ("dropped", 0.60), ("unet", 0.80)]),
    ("error", None),
]
ERROR_MESSAGE = "unlabelled-000001.tar:SYN0099: tar truncated at byte 4242"
TEACHER = {"right_field": 0.9012, "left_field": 0.8523, "heart": 0.7731, "clavicle": 0.4417}
STUDENT = {"right_field": 0.9156, "left_field": 0.8644, "heart": 0.7612, "clavicle": 0.5039}


def _rows(manifest: dict, shards_moved_to: str) -> list[dict]:
    """Table rows for the unlabelled images; their ``shard`` names a folder that no longer exists (a
    moved run: the report finds the shard by name in the run's shards/)."""
    where = [(s["path"], k) for s in manifest["splits"]["unlabelled"]["shards"] for k in s["keys"]]
    assert len(where) == len(KEPT)
    rows = []
    for (path, key), (status, per_class) in zip(where, KEPT):
        row = {"id": key, "shard": f"{shards_moved_to}/{path}", "key": key, "height": 32, "width": 32,
               "status": status, "message": ERROR_MESSAGE if status == "error" else None,
               "unet_checkpoint_sha256": "0" * 64, "sam_backend": "lite_medsam", "sam_checkpoint_sha256": None}
        for i, c in enumerate(CLASSES):
            kept, agree = per_class[i] if per_class else (None, None)
            mask = np.zeros((32, 32), bool)
            if kept in ("sam", "unet"):
                mask[4 + 4 * i:12 + 4 * i, 6:20] = True
            row.update({f"{c}.mask": encode_mask(mask) if status != "error" else None,
                        f"{c}.box": [6.0, 4.0 + 4 * i, 19.0, 11.0 + 4 * i] if agree is not None else None,
                        f"{c}.points": [[12.0, 8.0 + 4 * i], [25.0, 25.0]] if agree is not None else None,
                        f"{c}.point_labels": [1, 0] if agree is not None else None,
                        f"{c}.area": int(mask.sum()) if status != "error" else None,
                        f"{c}.unet_prob": 0.5 + 0.1 * i if agree is not None else None,
                        f"{c}.sam_iou": 0.6 + 0.05 * i if agree is not None else None,
                        f"{c}.agreement_dice": agree, f"{c}.kept": kept})
        rows.append(row)
    return rows


def _evaluate(means: dict, keys: list[str], offset: float) -> dict:
    per_image = {k: [means[c] + offset * (j - 1.5) for c in CLASSES] for j, k in enumerate(keys)}
    a = np.array(list(per_image.values()))
    return {"mean_dice": float(a.mean(axis=1).mean()), "std_dice": float(a.mean(axis=1).std()),
            "per_class": {c: float(v) for c, v in zip(CLASSES, a.mean(axis=0))},
            "per_class_std": {c: float(v) for c, v in zip(CLASSES, a.std(axis=0))},
            "n_images": len(keys), "per_image": per_image}


def make_run(root: Path) -> Path:
    """A finished-looking run directory without Ray: real shards (4 test, 6 unlabelled images of
    32 px), untrained U-Nets, a hand-written table, gate_policy.json and results.json."""
    run = root / "runs" / "hand"
    src = make_synthetic_dataset(root / "data", n_images=12, size=32, seed=0)
    manifest = ingest(src, run / "shards", counts={"labelled": 2, "val": 0, "test": 4}, seed=0, shard_size=4)
    assert manifest["classes"] == CLASSES
    for name, seed in (("teacher.pt", 0), ("student.pt", 1)):
        torch.manual_seed(seed)
        model = UNet(1, len(CLASSES), base_channels=4, depth=2)
        save_checkpoint(run / name, model, model.config, {"image_size": 32, "classes": CLASSES})
    table = pa.Table.from_pylist(_rows(manifest, str(root / "gone")), schema=pseudo_label_schema(CLASSES))
    (run / "pseudo_labels").mkdir()
    pq.write_table(table, run / "pseudo_labels" / "part-unlabelled-000000.parquet")
    test_keys = [k for s in manifest["splits"]["test"]["shards"] for k in s["keys"]]
    gate = GateConfig(per_class={"right_field": ClassGate("sam", 0.5, 0.6), "left_field": ClassGate("auto"),
                                 "heart": ClassGate("drop"), "clavicle": ClassGate("unet")})
    report = {c: {"gate": gate.for_class(c).to_dict(), "calibrated": c != "clavicle",
                  "reason": None, "n_images": 3, "n_present": 3, "dice_unet": 0.811 + 0.01 * i, "dice_sam": 0.733,
                  "dice_gated": 0.844, "kept": {"sam": 2, "unet": 0, "dropped": 1, "empty": 0},
                  "decisions": ["sam", "sam", "dropped"], "drop_value": 0.8, "objective": 0.8642, "objective_base": 0.8}
              for i, c in enumerate(CLASSES)}
    policy = GatePolicy(gate=gate, calibrated=gate, report=report, overridden=["clavicle"],
                        validation={"split": "val", "n_images": 3, "ids": ["a", "b", "c"], "skipped": []})
    (run / "gate_policy.json").write_text(json.dumps(policy.to_dict()))
    results = {"stages": {
        "ingest": {"done": True, "wall_s": 0.5, "counts": {k: v["n_samples"] for k, v in manifest["splits"].items()}},
        "teacher": {"done": True, "wall_s": 12.25},
        "calibrate": {"done": True, "wall_s": 3.0, "n_images": 3},
        "label": {"done": True, "wall_s": 7.0, "rows": 6, "ok": 4, "empty": 1, "error": 1},
        "student": {"done": True, "wall_s": 20.0},
        "evaluate": {"done": True, "wall_s": 2.0, "teacher": _evaluate(TEACHER, test_keys, 0.02),
                     "student": _evaluate(STUDENT, test_keys, 0.04)},
    }}
    (run / "results.json").write_text(json.dumps(results))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "hand", "label": {
        "cleaning": {"threshold": 0.5},
        "gate": {"policy": "auto", "min_sam_iou": 0.5, "min_agreement": 0.6, "min_agreement_unet": 0.3,
                 "per_class": {"clavicle": {"policy": "unet"}}}}}))
    (run / "environment.json").write_text(json.dumps({"python": "3.11", "platform": "test",
                                                      "packages": {"plabel": "0.1.0", "torch": "2.x"}}))
    return run


@pytest.fixture
def hand_run(tmp_path) -> Path:
    return make_run(tmp_path)


def _imgs(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', html)


def test_report_json_holds_the_runs_numbers_and_the_html_shows_them(hand_run):
    out = build_report(hand_run, review=2, seed=0)
    assert out["html"] == str(hand_run / "report.html") and out["json"] == str(hand_run / "report.json")
    rep = json.loads((hand_run / "report.json").read_text())
    html = (hand_run / "report.html").read_text()

    # the run: stage order as `plabel run` runs them, counts, the error row with its message
    assert [s["name"] for s in rep["run"]["stages"]] == ["ingest", "teacher", "calibrate", "label", "student",
                                                        "evaluate"]
    assert rep["run"]["label"] == {"rows": 6, "ok": 4, "empty": 1, "error": 1}
    assert rep["run"]["splits"] == {"labelled": 2, "val": 0, "test": 4, "unlabelled": 6}
    [err] = rep["run"]["errors"]
    assert err["message"] == ERROR_MESSAGE and err["id"] in html and ERROR_MESSAGE in html
    assert "<td class=\"l\">teacher</td><td>12.2</td>" in html  # its wall time

    # teacher vs student: the tables of results.json, x100 in the HTML
    results = json.loads((hand_run / "results.json").read_text())["stages"]["evaluate"]
    for m in ("teacher", "student"):
        got = rep["dice"]["models"][m]
        assert got["mean"] == pytest.approx(results[m]["mean_dice"])
        for c in CLASSES:
            assert got["per_class"][c]["mean"] == pytest.approx(results[m]["per_class"][c])
            assert f"{100 * results[m]['per_class'][c]:.2f} &plusmn; {100 * results[m]['per_class_std'][c]:.2f}" in html
        assert f"{100 * results[m]['mean_dice']:.2f}" in html
    assert rep["dice"]["delta"]["heart"] == pytest.approx(STUDENT["heart"] - TEACHER["heart"])
    assert "heart (-1.19)" in html  # the class where the student is below the teacher

    # the gate: the policy used, overrides, evidence, kept counts of the table (error rows left out)
    gate = rep["gate"]["per_class"]
    assert gate["heart"]["gate"]["policy"] == "drop" and gate["clavicle"]["overridden"]
    assert gate["right_field"]["evidence"]["objective"] == pytest.approx(0.8642) and "0.864" in html
    expected = {c: {k: 0 for k in ("sam", "unet", "dropped", "empty")} for c in CLASSES}
    for status, per_class in KEPT:
        for c, (kept, _) in zip(CLASSES, per_class or []):
            expected[c][kept] += 1
    assert {c: g["kept"] for c, g in gate.items()} == expected
    assert rep["scores"]["heart"]["agreement_dice"]["n"] == 4

    # review queue: lowest agreement over the kept classes (sam / unet), then a seeded sample of the rest
    rv = rep["review"]
    assert rv["ranked_by"] == "kept classes"
    ids = [r["id"] for r in _rows(load_manifest(hand_run / "shards"), "x")]
    assert [(e["id"], e["min_class"]) for e in rv["lowest_agreement"]] == [(ids[1], "left_field"),
                                                                           (ids[0], "clavicle")]
    assert rv["lowest_agreement"][0]["min_agreement"] == pytest.approx(0.2)
    rand = [e["id"] for e in rv["random"]]
    assert len(rand) == 2 and not set(rand) & {ids[0], ids[1]} and ids[5] not in rand  # no error rows
    build_report(hand_run, hand_run / "again.html", review=2, seed=0)  # the same seed, the same sample
    assert rand == [e["id"] for e in json.loads((hand_run / "again.json").read_text())["review"]["random"]]
    for e in rv["lowest_agreement"] + rv["random"]:
        assert e["id"] in html

    # test examples: best / median / worst by the mean of teacher and student per-image Dice
    keys = list(results["teacher"]["per_image"])
    assert [(e["rank"], e["key"]) for e in rep["test_examples"]] == [("best", keys[3]), ("median", keys[1]),
                                                                    ("worst", keys[0])]
    # HD95: results.json has none, so the report computed it on the 4 test images
    assert rep["hd95"]["source"].startswith("computed by the report")
    assert set(rep["hd95"]["per_image"]["teacher"]) == set(keys)

    # self-contained: every image inline, nothing fetched
    imgs = _imgs(html)
    assert len(imgs) == out["images"] == 3 + 2 * 2 + 3  # dice, hd95, histograms + review + test examples
    assert all(s.startswith("data:image/png;base64,") for s in imgs)
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<link" not in html
    assert "data-images-loaded" not in html and "imagesLoaded" in html  # set by the inline script


def test_hd95_of_the_evaluate_stage_is_used_when_results_json_has_it(hand_run):
    res = json.loads((hand_run / "results.json").read_text())
    for m, base in (("teacher", 7.25), ("student", 5.5)):
        ev = res["stages"]["evaluate"][m]
        ev["per_image_hd95"] = {k: [base, base + 1, None, base + 2] for k in ev["per_image"]}
        ev["hd95"] = {"mean_hd95": base + 1, "std_hd95": 0.0, "n_images": 4, "n_nan": {c: 0 for c in CLASSES},
                      "per_class": {c: base + i for i, c in enumerate(CLASSES)},
                      "per_class_std": {c: 0.0 for c in CLASSES}}
    (hand_run / "results.json").write_text(json.dumps(res))
    build_report(hand_run, review=1)
    rep = json.loads((hand_run / "report.json").read_text())
    assert rep["hd95"]["source"] == "results.json (evaluate stage)"
    assert rep["hd95"]["models"]["teacher"]["per_class"]["left_field"]["mean"] == pytest.approx(8.25)
    html = (hand_run / "report.html").read_text()
    assert "8.25 &plusmn; 0.00" in html and "6.50 &plusmn; 0.00" in html


def test_missing_parts_say_not_in_this_run(hand_run):
    """No evaluate stage, no calibration, no table: the report still builds and names what is missing."""
    res = json.loads((hand_run / "results.json").read_text())
    del res["stages"]["evaluate"], res["stages"]["calibrate"]
    (hand_run / "results.json").write_text(json.dumps(res))
    (hand_run / "gate_policy.json").unlink()
    shutil.rmtree(hand_run / "pseudo_labels")
    (hand_run / "environment.json").unlink()
    out = build_report(hand_run)
    rep = json.loads(Path(out["json"]).read_text())
    assert rep["dice"] is None and rep["review"] is None and rep["test_examples"] is None and rep["scores"] is None
    assert set(rep["missing"]) >= {"dice", "calibration", "table"}
    html = Path(out["html"]).read_text()
    assert html.count("not in this run") >= 5
    assert rep["gate"]["source"] == "config.yaml (label.gate)"  # the configured gate, no kept counts
    assert rep["gate"]["per_class"]["clavicle"]["gate"]["policy"] == "unet"
    assert rep["gate"]["per_class"]["heart"]["gate"]["policy"] == "auto"
    assert _imgs(html) == [] and out["images"] == 0


def test_a_folder_that_is_not_a_run_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: not a plabel run directory (no results.json")):
        read_run(tmp_path)
    with pytest.raises(InputError, match="no such run directory"):
        read_run(tmp_path / "missing")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (f"error: {tmp_path}: not a plabel run directory (no results.json; "
                                                      "`plabel run` writes it)")
    with pytest.raises(InputError, match="local run directory"):
        read_run("s3://bucket/runs/x")


def test_cli_report_options(hand_run, tmp_path):
    out = tmp_path / "elsewhere" / "r.html"
    result = CliRunner().invoke(app, ["report", str(hand_run), "--out", str(out), "--review", "1", "--seed", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"report: {out} (") and str(tmp_path / "elsewhere" / "r.json") in result.output
    rep = json.loads((tmp_path / "elsewhere" / "r.json").read_text())
    assert rep["review"]["k"] == 1 and rep["review"]["seed"] == 3 and len(rep["review"]["random"]) == 1
    assert not (hand_run / "report.html").exists()
    assert CliRunner().invoke(app, ["report", str(hand_run), "--review", "-1"]).exit_code == 2


def test_report_is_the_last_ray_free_stage_of_plabel_run():
    from plabel.jobs.stages import RUN_STAGES

    stage = RUN_STAGES[-1]
    assert stage.name == "report" and stage.ray is False and stage.writes == ("report.html",)


def test_the_report_key_follows_the_results_the_table_and_the_models(hand_run):
    """The report stage reruns when another stage's result, the table's marker, a model or the gate
    changes, not when only its own entry in results.json does."""
    from plabel.jobs.runner import RunContext, digest
    from plabel.jobs.stages import RUN_STAGES
    from plabel.schemas.config import RunConfig, build

    key = RUN_STAGES[-1].key
    results = json.loads((hand_run / "results.json").read_text())
    ctx = RunContext(build(RunConfig, {"data": {"shards": str(hand_run / "shards")}}), str(hand_run), results=results)
    base = digest(key(ctx))
    results["stages"]["report"] = {"done": True, "wall_s": 3.0}
    assert digest(key(ctx)) == base
    results["stages"]["evaluate"]["wall_s"] = 2.5
    assert digest(key(ctx)) != base
    results["stages"]["evaluate"]["wall_s"] = 2.0
    for name in ("student.pt", "gate_policy.json"):
        saved = (hand_run / name).read_bytes()
        (hand_run / name).write_bytes(saved + b" ")
        assert digest(key(ctx)) != base, name
        (hand_run / name).write_bytes(saved)
    (hand_run / "pseudo_labels" / "_plabel_complete.json").write_text(json.dumps({"rows": 6}))
    assert digest(key(ctx)) != base


# ------------------------------------------------------------------- the tiny run, in a browser


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: the report test opens report.html in headless Chromium. "
                    "Install it with `apt-get install -y chromium` (Debian/Ubuntu; .ci/run does this)")
    return exe


def _browser(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_tiny_runs_report_loads_every_image_in_a_browser(tiny_run, tmp_path):
    """`plabel run` wrote report.html as its last stage; Chromium decodes all of its images (the
    inline script counts them) and the DOM holds the test Dice of results.json."""
    exe = _chromium()
    run, output = tiny_run
    page = run / "report.html"
    assert page.is_file() and (run / "report.json").is_file()
    last = output.rstrip().splitlines()[-1]  # `plabel run` (and `plabel demo`) end naming the report
    assert last.startswith("report: ") and Path(last[len("report: "):]).resolve() == page.resolve()
    results = json.loads((run / "results.json").read_text())
    assert results["stages"]["report"]["html"] == "report.html"

    dom = _browser(exe, tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert m, "the page's script did not run (no data-images-loaded on <body>)"
    loaded, total = int(m.group(1)), int(m.group(2))
    rows = results["stages"]["label"]["ok"] + results["stages"]["label"]["empty"]
    expected = 3 + min(rows, 8) + min(max(rows - 8, 0), 8) + 3  # plots + review queue + best / median / worst
    assert loaded == total >= expected, (loaded, total, expected)
    assert total == results["stages"]["report"]["images"]
    ev = results["stages"]["evaluate"]
    for model in ("teacher", "student"):
        assert f"{100 * ev[model]['mean_dice']:.2f}" in dom.stdout
        for c, v in ev[model]["per_class"].items():
            assert f"{100 * v:.2f} ± {100 * ev[model]['per_class_std'][c]:.2f}" in dom.stdout, (model, c)

    shot = tmp_path / "report.png"
    res = _browser(exe, tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape == (1600, 1280)
    assert (img < 200).mean() > 0.02 and img.std() > 20  # text, tables and a plot, not a blank page

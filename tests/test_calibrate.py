"""Gate calibration (plabel.method.calibration): hand-made masks with known answers, the label job's
consistency, the policy file, the config keys and the runner / CLI plumbing."""
import json
import math

import numpy as np
import pytest
import torch

from plabel.cli.errors import UsageError
from plabel.cli.main import _gate_option
from plabel.data.ingest import ingest, shard_paths
from plabel.data.synthetic import make_synthetic_dataset
from plabel.jobs.calibrate_job import labelling_config, read_labelled_images
from plabel.method.calibration import (
    POLICY_FILE,
    CalibrationObjective,
    GatePolicy,
    ValidationImage,
    agreement_dice,
    calibrate_gate,
    candidate_gates,
    format_calibration,
    load_gate_policy,
    save_gate_policy,
    validation_evidence,
)
from plabel.method.cleaning import CleaningConfig
from plabel.method.gate import ClassGate, GateConfig, gate_decision
from plabel.method.labelling import ImageMeta, clean_and_prompt, pseudo_label_rows, teacher_probs
from plabel.method.metrics import dice
from plabel.method.preprocess import normalise_intensity
from plabel.method.sam import SamRefiner, build_random_sam
from plabel.method.unet import UNetConfig
from plabel.schemas.config import ConfigError, GateSection, LabelSection, RunConfig, build

torch.set_num_threads(1)

S = 20


def square() -> np.ndarray:
    """bool (S, S) truth: a 10 x 10 square (100 pixels)."""
    t = np.zeros((S, S), bool)
    t[5:15, 5:15] = True
    return t


def part(truth: np.ndarray, d: float, from_end: bool = False) -> np.ndarray:
    """The first (or last) k pixels of ``truth`` in raster order, k chosen so that Dice ~ d."""
    ys, xs = np.nonzero(truth)
    k = int(round(d * truth.sum() / (2 - d)))
    sel = slice(len(ys) - k, None) if from_end else slice(0, k)
    m = np.zeros_like(truth)
    m[ys[sel], xs[sel]] = True
    return m


def image(i: int, unet: list, sam: list, sam_iou: list, agreement: list | None = None,
          truth: list | None = None) -> ValidationImage:
    """A ValidationImage of len(unet) classes; agreement defaults to Dice(unet, sam)."""
    truth = np.stack(truth if truth is not None else [square() for _ in unet])
    unet, sam = np.stack(unet), np.stack(sam)
    agreement = agreement_dice(unet, sam) if agreement is None else agreement
    return ValidationImage(f"img{i}", truth, unet, sam, sam_iou, agreement)


def test_policy_per_class_sam_good_unet_good_both_poor():
    """Three classes, four images each: SAM perfect / U-Net poor -> sam; SAM bad / U-Net good ->
    unet; both poor -> drop (a dropped image scores drop_floor 0.5, above either mask)."""
    t = square()
    images = [image(i,
                    unet=[part(t, 0.4), part(t, 0.9), part(t, 0.3)],
                    sam=[t, part(t, 0.2, from_end=True), part(t, 0.25, from_end=True)],
                    sam_iou=[0.9, 0.9, 0.9])
              for i in range(4)]
    d_unet = [dice(images[0].unet[c], t) for c in range(3)]
    assert d_unet == pytest.approx([0.4, 0.9, 0.3], abs=0.01)
    cal = calibrate_gate(images, ["a", "b", "c"])

    # a: keep SAM on every image; agreement ~0.4 needs min_agreement 0 (the only grid value
    # below it), min_sam_iou stays the configured 0.5; sam is simpler than auto
    assert cal.gate.for_class("a") == ClassGate("sam", 0.5, 0.0, 0.3)
    ra = cal.report["a"]
    assert ra["kept"] == {"sam": 4, "unet": 0, "dropped": 0, "empty": 0}
    assert ra["dice_gated"] == 1.0 and ra["objective"] == 1.0 and ra["dice_sam"] == 1.0
    assert ra["dice_unet"] == pytest.approx(d_unet[0])
    # the configured auto gate falls back to the U-Net mask (agreement 0.4 < 0.6, >= 0.3)
    assert ra["objective_base"] == pytest.approx(d_unet[0])

    # b: the cleaned U-Net mask ties with drop (break-even = the teacher's Dice): dropped by
    # default (prefer_on_tie drop), kept with prefer_on_tie unet
    assert cal.gate.for_class("b").policy == "drop"
    rb = cal.report["b"]
    assert rb["kept"] == {"sam": 0, "unet": 0, "dropped": 4, "empty": 0}
    assert rb["drop_value"] == pytest.approx(d_unet[1]) and rb["objective"] == pytest.approx(d_unet[1])
    assert rb["dice_sam"] == pytest.approx(0.2, abs=0.01)
    keep = calibrate_gate(images, ["a", "b", "c"], objective=CalibrationObjective(prefer_on_tie="unet"))
    assert keep.gate.for_class("b").policy == "unet"
    assert keep.report["b"]["kept"] == {"sam": 0, "unet": 4, "dropped": 0, "empty": 0}
    assert keep.report["b"]["objective"] == pytest.approx(d_unet[1])
    assert keep.gate.for_class("a") == cal.gate.for_class("a") and keep.gate.for_class("c").policy == "drop"
    # a margin above zero makes the U-Net masks beat dropping outright, whatever the tie-break
    lenient = calibrate_gate(images, ["a", "b", "c"], objective=CalibrationObjective(drop_margin=0.05))
    assert lenient.gate.for_class("b").policy == "unet"
    with pytest.raises(ValueError, match="prefer_on_tie 'sam'"):
        CalibrationObjective(prefer_on_tie="sam")

    # c: drop; the dropped images score the floor 0.5 > 0.3 (U-Net) > 0.25 (SAM)
    assert cal.gate.for_class("c").policy == "drop"
    rc = cal.report["c"]
    assert rc["kept"] == {"sam": 0, "unet": 0, "dropped": 4, "empty": 0}
    assert rc["objective"] == 0.5 and rc["drop_value"] == 0.5 and rc["dice_gated"] is None

    # the objective's settings move the break-even point: a lower floor makes class c's U-Net
    # masks tie with drop at the teacher's Dice (kept with prefer_on_tie unet); asking labels to
    # beat the teacher by 0.05 drops class b
    low = calibrate_gate(images, ["a", "b", "c"], objective=CalibrationObjective(drop_floor=0.2, prefer_on_tie="unet"))
    assert low.gate.for_class("c").policy == "unet" and low.report["c"]["drop_value"] == pytest.approx(d_unet[2])
    strict = calibrate_gate(images, ["a", "b", "c"], objective=CalibrationObjective(drop_margin=-0.05))
    assert strict.gate.for_class("b").policy == "drop"
    assert strict.report["b"]["drop_value"] == pytest.approx(d_unet[1] + 0.05)
    assert cal.gate.default == ClassGate() and cal.ids == ["img0", "img1", "img2", "img3"]
    table = format_calibration(cal.report)
    assert "sam iou>=0.5 agr>=0" in table and "0/0/4/0" in table


def test_min_sam_iou_chosen_where_it_separates_good_from_bad_sam_masks():
    """SAM is perfect with IoU 0.95, 0.9, 0.72 and echoes the poor U-Net mask (agreement 1) with
    IoU 0.65, 0.55, 0.4: only min_sam_iou 0.7 keeps the good ones and drops the bad ones (auto
    would fall back to the poor U-Net masks, whose agreement with SAM is perfect)."""
    t = square()
    ious = [0.95, 0.9, 0.72, 0.65, 0.55, 0.4]
    images = []
    for i, q in enumerate(ious):
        good = i < 3
        u = part(t, 0.8) if good else part(t, 0.3)
        images.append(image(i, unet=[u], sam=[t if good else u], sam_iou=[q]))
    # break-even "image" (default): each dropped image scores max(0.5 floor, its U-Net Dice): the
    # good images 0.8 (SAM's 1.0 gains), the bad ones 0.5 (their echoed 0.3 masks lose): same gate
    img = calibrate_gate(images, ["x"])
    assert img.gate.for_class("x") == ClassGate("sam", 0.7, 0.6, 0.3)
    assert img.report["x"]["decisions"] == ["sam"] * 3 + ["dropped"] * 3
    cal = calibrate_gate(images, ["x"], objective=CalibrationObjective(break_even="mean"))
    assert cal.gate.for_class("x") == ClassGate("sam", 0.7, 0.6, 0.3)
    r = cal.report["x"]
    assert r["decisions"] == ["sam"] * 3 + ["dropped"] * 3
    d_good, d_bad = dice(part(t, 0.8), t), dice(part(t, 0.3), t)
    v = (d_good + d_bad) / 2  # the teacher's mean Dice, above the 0.5 floor
    assert r["drop_value"] == pytest.approx(v)
    assert r["objective"] == pytest.approx((3 * 1.0 + 3 * v) / 6)
    # configured auto (0.5, 0.6, 0.3): SAM's bad masks at IoU 0.65 / 0.55, the U-Net's at 0.4
    assert r["objective_base"] == pytest.approx((3 * 1.0 + 3 * d_bad) / 6)
    assert img.report["x"]["objective"] == pytest.approx((3 * 1.0 + 3 * 0.5) / 6)
    assert img.report["x"]["drop_value"] == pytest.approx((d_good + 0.5) / 2)  # reported: the per-image mean


def test_auto_keeps_sam_then_unet_then_drops_and_keeps_the_configured_thresholds():
    t = square()
    images = []
    for i in range(6):
        if i < 2:  # SAM sure and right
            u, s, q = part(t, 0.7), t, 0.9
        elif i < 4:  # SAM unsure, U-Net good, the two agree fairly
            u, s, q = part(t, 0.9), part(t, 0.5), 0.4
        else:  # SAM unsure, U-Net poor, no agreement
            u, s, q = part(t, 0.2), part(t, 0.2, from_end=True), 0.4
        images.append(image(i, unet=[u], sam=[s], sam_iou=[q]))
    assert images[2].agreement[0] == pytest.approx(0.57, abs=0.02) and images[4].agreement[0] == 0.0
    # break-even "image": the U-Net fallback only ties with dropping, so sam (simpler) wins
    assert calibrate_gate(images, ["x"]).gate.for_class("x").policy == "sam"
    cal = calibrate_gate(images, ["x"], objective=CalibrationObjective(break_even="mean"))
    assert cal.gate.for_class("x") == ClassGate("auto", 0.5, 0.6, 0.3)  # the configured gate is optimal
    r = cal.report["x"]
    assert r["decisions"] == ["sam", "sam", "unet", "unet", "dropped", "dropped"]
    assert r["objective"] == pytest.approx(r["objective_base"])
    assert r["dice_gated"] == pytest.approx((2 * 1.0 + 2 * dice(part(t, 0.9), t)) / 4)


def test_too_few_images_absent_classes_and_nonfinite_sam():
    t, empty = square(), np.zeros((S, S), bool)
    base = GateConfig(per_class={"rare": ClassGate("sam", 0.8, 0.7, 0.3)})
    images = [
        # 'rare' found on 2 images only; 'never' on none (truth empty: its empty mask scores 1)
        image(i, unet=[t if i < 2 else empty, empty], sam=[t if i < 2 else empty, empty],
              sam_iou=[0.9 if i < 2 else np.nan, np.nan], truth=[t, empty])
        for i in range(4)
    ]
    cal = calibrate_gate(images, ["rare", "never"], base)
    assert cal.gate.for_class("rare") == ClassGate("sam", 0.8, 0.7, 0.3)
    assert cal.report["rare"]["calibrated"] is False and "fewer than 3" in cal.report["rare"]["reason"]
    assert cal.report["rare"]["kept"] == {"sam": 2, "unet": 0, "dropped": 0, "empty": 2}
    assert cal.report["never"]["kept"]["empty"] == 4 and cal.report["never"]["objective"] is None
    assert cal.report["never"]["dice_unet"] == 1.0
    # a present class with non-finite SAM output: the label job's fallback, not the gate's thresholds
    assert gate_decision(ClassGate("auto", min_agreement_unet=0.9), True, math.nan, math.nan, "nonfinite") == "unet"
    assert gate_decision(ClassGate("sam"), True, math.nan, math.nan, "nonfinite") == "dropped"
    assert gate_decision(ClassGate("auto"), False, math.nan, math.nan, "nonfinite") == "empty"
    ok = [image(i, unet=[t], sam=[t], sam_iou=[0.9]) for i in range(3)]
    bad = image(3, unet=[part(t, 0.3)], sam=[np.zeros((S, S), bool)], sam_iou=[np.nan], agreement=[np.nan])
    # (break-even "mean": perfect SAM masks beat the class's mean; per image they only tie with the
    # perfect U-Net masks and the class is dropped)
    assert calibrate_gate(ok + [bad], ["x"]).gate.for_class("x").policy == "drop"
    cal = calibrate_gate(ok + [bad], ["x"], objective=CalibrationObjective(break_even="mean"))  # auto/unet keep the U-Net mask on the 4th image, sam drops it
    assert cal.gate.for_class("x").policy == "sam" and cal.report["x"]["decisions"][3] == "dropped"


def test_candidates_simplest_first_and_include_the_configured_thresholds():
    cands = candidate_gates(ClassGate("auto", 0.55, 0.65, 0.35))
    assert [c.policy for c in cands[:3]] == ["drop", "unet", "sam"] and cands[-1].policy == "auto"
    swapped = candidate_gates(ClassGate("auto", 0.55, 0.65, 0.35), order=CalibrationObjective(prefer_on_tie="unet").policy_order)
    assert [c.policy for c in swapped[:3]] == ["unet", "drop", "sam"] and swapped[2:] == cands[2:]
    assert cands[2] == ClassGate("sam", 0.55, 0.65, 0.35)  # closest to the configured gate first
    first_auto = next(c for c in cands if c.policy == "auto")
    assert first_auto == ClassGate("auto", 0.55, 0.65, 0.35)
    assert len(cands) == 2 + 9 * 7 + 9 * 7 * 5


class ThresholdTeacher(torch.nn.Module):
    """A stand-in U-Net with known output: class 0 = bright pixels (x > 0.6), class 1 = mid-grey
    pixels (0.25 < x < 0.45), class 2 = nothing. Input (N, 1, S, S) -> logits (N, 3, S, S)."""

    def __init__(self, intensity: str = "fixed"):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(40.0))
        self.config = UNetConfig(num_classes=3, intensity=intensity)  # its input contract, as a UNet has

    def forward(self, x):
        return torch.cat([self.scale * (x - 0.6), self.scale * torch.minimum(x - 0.25, 0.45 - x),
                          torch.full_like(x, -20.0)], dim=1)


def _phantoms(n: int = 3, size: int = 48):
    grays, truths = [], []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        g = np.full((size, size), 20, np.uint8)
        disk = (yy - 14 - 2 * i) ** 2 + (xx - 30 + i) ** 2 <= (6 + i) ** 2
        rect = np.zeros((size, size), bool)
        rect[30:42, 6 + i:22 + 2 * i] = True
        g[disk], g[rect] = 220, 90
        grays.append(g)
        truths.append(np.stack([disk, rect, np.zeros_like(disk)]))
    return grays, truths


def test_evidence_is_the_label_jobs_and_calibrated_decisions_match_pseudo_label_rows():
    """validation_evidence on a known teacher and the random tiny SAM: masks, IoU and agreement
    are SAM's own, and the label job's rows under any gate keep exactly what calibration predicts."""

    classes = ["bright", "mid", "none"]
    grays, truths = _phantoms()
    ids = [f"p{i}" for i in range(3)]
    teacher = ThresholdTeacher()
    refiner = SamRefiner(build_random_sam(seed=1))
    images, skipped = validation_evidence(teacher, 48, refiner, grays, truths, ids, classes, batch_size=2)
    assert skipped == [] and [im.id for im in images] == ids
    prepared = [clean_and_prompt(p, CleaningConfig()) for p in teacher_probs(teacher, grays, 48)]
    chunks = [slice(0, 2), slice(2, 3)]  # SAM's encoder batches as in validation_evidence
    results = [r for ch in chunks for r in refiner.refine_batch(
        [np.repeat(g[:, :, None], 3, 2) for g in grays[ch]], [p[2] for p in prepared[ch]])]
    for im, truth, (cleaned, _, _), res in zip(images, truths, prepared, results):
        np.testing.assert_array_equal(im.present, [True, True, False])
        assert dice(im.unet[0], truth[0]) > 0.95 and dice(im.unet[1], truth[1]) > 0.95
        np.testing.assert_array_equal(im.unet, cleaned)
        np.testing.assert_array_equal(im.sam[:2], res.masks[:2])
        assert not im.sam[2].any() and np.isnan(im.sam_iou[2])
        np.testing.assert_allclose(im.sam_iou[:2], res.iou_pred[:2], rtol=0, atol=0)
        np.testing.assert_allclose(im.agreement[:2], [dice(im.unet[c], im.sam[c]) for c in range(2)])

    cal = calibrate_gate(images, classes)
    metas = [ImageMeta(i, None, None, *g.shape) for i, g in zip(ids, grays)]
    gates = [cal.gate, GateConfig(ClassGate("sam", 0.0, 0.5)), GateConfig(ClassGate("auto", 0.9, 0.9, 0.5))]
    for gate in gates:
        rows = [r for ch in chunks for r in pseudo_label_rows(
            refiner, grays[ch], [p[0] for p in prepared[ch]], [p[1] for p in prepared[ch]],
            [p[2] for p in prepared[ch]], metas[ch], classes, gate, {})]
        for ci, c in enumerate(classes):
            expected = [gate_decision(gate.for_class(c), bool(im.present[ci]), im.sam_iou[ci], im.agreement[ci],
                                      "ran" if math.isfinite(im.sam_iou[ci]) else "nonfinite")
                        for im in images]
            assert [row[f"{c}.kept"] for row in rows] == expected
            if gate is cal.gate:
                assert expected == cal.report[c]["decisions"]
    assert cal.report["none"]["kept"]["empty"] == 3 and cal.report["bright"]["calibrated"]


def test_a_minmax_teacher_and_sam_see_the_stretched_image():
    """Washed-out phantoms (levels 204 / 218 / 244: at gray / 255 the threshold teacher sees only
    'bright'): a minmax teacher reads 0 / 255 / 92 and finds the disk and the rectangle, and SAM is
    given the same stretched images (the label job's teacher_view), not the washed-out ones."""
    classes = ["bright", "mid", "none"]
    grays, truths = _phantoms()
    washed = [(200 + g.astype(np.int32) * 40 // 200).astype(np.uint8) for g in grays]  # 20->204, 90->218, 220->244
    assert sorted(np.unique(washed[0])) == [204, 218, 244]
    given = []

    class Recording(SamRefiner):
        def refine_batch(self, images, prompts):
            given.extend(im[:, :, 0].copy() for im in images)
            return super().refine_batch(images, prompts)

    ids = [f"p{i}" for i in range(3)]
    fixed, _ = validation_evidence(ThresholdTeacher("fixed"), 48, Recording(build_random_sam(seed=1)), washed,
                                   truths, ids, classes)
    assert all(im.unet[0].all() and not im.unet[1].any() for im in fixed)  # everything 'bright', no 'mid'
    np.testing.assert_array_equal(given[0], washed[0])
    given.clear()
    images, _ = validation_evidence(ThresholdTeacher("minmax"), 48, Recording(build_random_sam(seed=1)), washed,
                                    truths, ids, classes)
    assert [len(given)] == [3]
    for g, w, im, t in zip(given, washed, images, truths):
        np.testing.assert_array_equal(g, normalise_intensity(w, "minmax"))
        assert sorted(np.unique(g)) == [0, 89, 255]  # (218 - 204) / 40 * 255 = 89.25
        assert dice(im.unet[0], t[0]) > 0.95 and dice(im.unet[1], t[1]) > 0.95


def test_policy_file_round_trip_and_errors(tmp_path):
    t = square()
    cal = calibrate_gate([image(i, unet=[part(t, 0.4)], sam=[t], sam_iou=[0.9]) for i in range(3)], ["x"])
    policy = GatePolicy(gate=cal.gate, calibrated=cal.gate, report=cal.report,
                        validation={"split": "val", "n_images": 3, "ids": cal.ids, "skipped": []},
                        settings={"teacher_sha256": "abc"})
    path = tmp_path / POLICY_FILE
    save_gate_policy(path, policy)
    back = load_gate_policy(path)
    assert back.gate == cal.gate and back.calibrated == cal.gate and back.overridden == []
    assert back.report == json.loads(json.dumps(cal.report)) and back.validation["ids"] == ["img0", "img1", "img2"]
    assert back.to_dict() == json.loads(path.read_text())
    assert POLICY_FILE == "gate_policy.json"

    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ValueError, match="other.json: format 'something-else'"):
        load_gate_policy(tmp_path / "other.json")
    bad = policy.to_dict()
    bad["gate"]["per_class"]["x"]["policy"] = "maybe"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json: bad 'gate'.*'maybe'"):
        load_gate_policy(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_gate_policy(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        load_gate_policy(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "gate,message",
    [
        ({"calibrate": "yes"}, "label.gate.calibrate: expected true or false, got 'yes'"),
        ({"drop_floor": 1.5}, "label.gate.drop_floor: expected a number in [0, 1], got 1.5"),
        ({"drop_margin": -2}, "label.gate.drop_margin: expected a number in [-1, 1], got -2.0"),
        ({"min_images": 0}, "label.gate.min_images: expected int >= 1, got 0"),
        ({"min_sam_iou": float("nan")}, "label.gate.min_sam_iou: expected a finite number"),
        ({"per_class": {"heart": {"min_sam_iou": "high"}}}, "label.gate.per_class.heart.min_sam_iou: expected a finite number"),
        ({"per_class": {"heart": {"threshold": 0.5}}}, "label.gate.per_class.heart: expected keys from"),
    ],
)
def test_gate_config_errors_name_the_key(gate, message):
    with pytest.raises(ConfigError) as e:
        build(RunConfig, {"data": {"source": "x"}, "label": {"gate": gate}})
    assert message in str(e.value)


def test_gate_section_defaults_and_configured_overrides_win():
    g = build(RunConfig, {"data": {"source": "x"}}).label.gate
    assert (g.calibrate, g.drop_floor, g.drop_margin, g.min_images) == (True, 0.5, 0.0, 3)
    assert (g.cross_validate, g.min_sam_share) == (True, 0.0)
    # the objective plabel calibrates with; overrides that are None keep the section's values
    assert CalibrationObjective.from_gate_section(g) == CalibrationObjective(cross_validate=True)
    assert CalibrationObjective.from_gate_section(g, break_even="mean", prefer_on_tie=None, min_sam_share=0.5) \
        == CalibrationObjective(cross_validate=True, break_even="mean", min_sam_share=0.5)
    section = GateSection(min_sam_iou=0.4, per_class={"heart": {"policy": "unet"}})
    merged = section.with_calibrated({"heart": ClassGate("sam", 0.9, 0.9, 0.1).to_dict(),
                                      "lung": ClassGate("drop").to_dict()})
    gate = GateConfig.from_dict(merged.to_gate_dict())
    assert gate.for_class("heart") == ClassGate("unet", 0.4, 0.6, 0.3)  # the config's, not the calibrated
    assert gate.for_class("lung") == ClassGate("drop", 0.5, 0.6, 0.3)
    assert gate.for_class("other") == ClassGate("auto", 0.4, 0.6, 0.3)
    assert section.per_class == {"heart": {"policy": "unet"}}  # the section itself is unchanged


def test_runner_labelling_config(tmp_path):
    cfg = build(RunConfig, {"data": {"source": "x"}, "label": {"gate": {"per_class": {"heart": {"policy": "unet"}}}}})
    calibrated = GateConfig(per_class={"heart": ClassGate("sam", 0.8, 0.7, 0.3), "lung": ClassGate("drop")})
    path = str(tmp_path / POLICY_FILE)
    save_gate_policy(path, GatePolicy(gate=calibrated, calibrated=calibrated, settings={"teacher_sha256": "t1"}))
    label = labelling_config(cfg, path)
    assert isinstance(label, LabelSection) and label.sam == cfg.label.sam
    gate = GateConfig.from_dict(label.gate.to_gate_dict())  # what the label job gets
    assert gate.for_class("heart") == ClassGate("unet") and gate.for_class("lung") == ClassGate("drop")
    stored = load_gate_policy(path)  # rewritten: the file names the gate the label job uses
    assert stored.gate == gate and stored.calibrated == calibrated and stored.overridden == ["heart"]
    assert cfg.label.gate.per_class == {"heart": {"policy": "unet"}}


def test_runner_reads_validation_shards_in_process(tmp_path):
    src = make_synthetic_dataset(tmp_path / "data", n_images=5, size=32, seed=0)
    manifest = ingest(src, tmp_path / "shards", counts={"labelled": 2, "val": 3}, seed=0, shard_size=2)
    C = len(manifest["classes"])
    ids, grays, truths, bad = read_labelled_images(shard_paths(tmp_path / "shards", "val"), C)
    assert bad == [] and sorted(ids) == sorted(manifest["splits"]["val"]["ids"])
    assert all(g.dtype == np.uint8 and g.shape == (32, 32) for g in grays)
    assert all(t.dtype == bool and t.shape == (C, 32, 32) for t in truths) and any(t.any() for t in truths)


def test_cli_gate_policy_option_takes_a_policy_or_a_file(tmp_path):
    assert _gate_option("unet", None, 0.7) == {"policy": "unet", "min_agreement": 0.7}
    calibrated = GateConfig(ClassGate("auto", 0.6), per_class={"heart": ClassGate("sam", 0.8, 0.7, 0.3)})
    path = tmp_path / POLICY_FILE
    save_gate_policy(path, GatePolicy(gate=calibrated, calibrated=calibrated))
    section = build(LabelSection, {"gate": _gate_option(str(path), None, None)}, "label")
    assert GateConfig.from_dict(section.gate.to_gate_dict()) == calibrated
    with pytest.raises(UsageError, match="is a policy file: its gate sets the thresholds"):
        _gate_option(str(path), 0.5, None)  # thresholds come from the file
    with pytest.raises(UsageError, match="no such file"):
        _gate_option(str(tmp_path / "nope.json"), None, None)


def test_min_sam_share_refuses_a_sam_gate_that_wins_on_a_few_images_only():
    """10 images, the U-Net's masks Dice 0.8 everywhere. SAM is perfect with IoU 0.95 on 3 images
    and poor (Dice 0.3, IoU 0.4) on 7. Without the rule the configured sam thresholds keep the 3
    good masks (J = (3 x 1.0 + 7 x 0.8) / 10 = 0.86 against drop's 0.8); with min_sam_share 0.5 a
    sam / auto gate must keep SAM on 5 images, which takes in poor masks, so drop wins (it ties
    with unet at 0.8, and drop is preferred on a tie). At 0.3 the 3 of 10 are just enough."""
    t = square()
    images = [image(i, unet=[part(t, 0.8)], sam=[t if i < 3 else part(t, 0.3, from_end=True)],
                    sam_iou=[0.95 if i < 3 else 0.4]) for i in range(10)]
    free = calibrate_gate(images, ["x"])
    assert free.gate.for_class("x") == ClassGate("sam", 0.5, 0.6, 0.3)
    assert free.report["x"]["decisions"] == ["sam"] * 3 + ["dropped"] * 7
    d_unet = dice(part(t, 0.8), t)
    assert free.report["x"]["objective"] == pytest.approx((3 * 1.0 + 7 * d_unet) / 10)
    strict = calibrate_gate(images, ["x"], objective=CalibrationObjective(min_sam_share=0.5))
    assert strict.gate.for_class("x").policy == "drop"
    assert strict.report["x"]["objective"] == pytest.approx(d_unet)
    assert calibrate_gate(images, ["x"], objective=CalibrationObjective(min_sam_share=0.3)) \
        .gate.for_class("x") == ClassGate("sam", 0.5, 0.6, 0.3)
    # the key is written only when set (earlier policies keep their objective dict)
    assert "min_sam_share" not in CalibrationObjective().to_dict()
    assert CalibrationObjective(min_sam_share=0.5).to_dict()["min_sam_share"] == 0.5
    with pytest.raises(ValueError, match=r"min_sam_share 1.5 is not a number in \[0, 1\]"):
        CalibrationObjective(min_sam_share=1.5)
    with pytest.raises(ConfigError, match=r"label.gate.min_sam_share: expected a number in \[0, 1\]"):
        build(RunConfig, {"label": {"gate": {"min_sam_share": -0.1}}})


def test_cross_validation_rejects_a_gain_that_rests_on_one_image():
    """U-Net masks Dice ~0.8 on 10 images; SAM perfect with IoU 0.95 on the first `good` images,
    poor (IoU 0.4) on the rest. The plain search keeps SAM (iou >= 0.5) in both cases. Left-one-out:
    with one good image, leaving it out leaves nothing to gain, so its own score is drop's, and
    leaving out a poor image keeps it dropped either way: search and simple both score the U-Net's
    Dice, no gain, so drop is kept. With three good images each left-out good image is still kept
    by the search made on the other two: (3 x 1.0 + 7 x 0.8) / 10 against 0.8."""
    t = square()
    d_unet = dice(part(t, 0.8), t)
    cv = CalibrationObjective(cross_validate=True)
    for good, policy in ((1, "drop"), (3, "sam")):
        images = [image(i, unet=[part(t, 0.8)], sam=[t if i < good else part(t, 0.3, from_end=True)],
                        sam_iou=[0.95 if i < good else 0.4]) for i in range(10)]
        assert calibrate_gate(images, ["x"]).gate.for_class("x") == ClassGate("sam", 0.5, 0.6, 0.3)
        r = calibrate_gate(images, ["x"], objective=cv).report["x"]
        assert r["gate"]["policy"] == policy
        search = (good * 1.0 + (10 - good) * d_unet) / 10 if good > 1 else d_unet
        assert r["cross_validation"] == {"search": pytest.approx(search), "simple": pytest.approx(d_unet)}
        assert (r["reason"] is None) == (policy == "sam")
    assert CalibrationObjective(cross_validate=True).to_dict()["cross_validate"] is True
    assert "cross_validate" not in CalibrationObjective().to_dict()
    with pytest.raises(ConfigError, match=r"label.gate.cross_validate: expected true or false, got 'yes'"):
        build(RunConfig, {"label": {"gate": {"cross_validate": "yes"}}})
    assert build(RunConfig, {"label": {"gate": {"cross_validate": True}}}).label.gate.cross_validate is True

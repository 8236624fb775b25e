"""Batched SAM refinement (plabel.method.sam.refine) against the per-prompt SamPredictor reference.

Measured on CPU (fp32) when these tests were written:
  tiny random SAM, 4 images of different sizes: worst per-class mask Dice 0.99994 (threshold flips
  of near-zero logits), low-res logits max abs diff <= 1.6e-6 (|logits| ~ 0.2), iou_pred <= 5e-8.
  LiteMedSAM, 2 JSRT radiographs x 5 classes: mask Dice 1.0, low-res logits max abs diff 1.9e-5
  (|logits| up to ~24, i.e. ~1e-6 relative), iou_pred <= 3e-7.
On CUDA (H200, torch 2.11, TF32 convolutions by default), one device run, same cases but the
LiteMedSAM check on the synthetic images: worst Dice 0.9998, logits relative diff <= 6.1e-4.
Asserted: Dice >= 0.99 per class and stage, logits |diff| <= 1e-3 * max(1, max|ref|),
iou_pred |diff| <= 1e-3.
"""
from __future__ import annotations

import json
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
import torch
from shared_data import jsrt_path, require

from plabel.method.prompts import RefinementPrompts, extract_prompts
from plabel.method.sam import (
    DEFAULT_STAGES,
    RefinementResult,
    SamRefiner,
    build_random_sam,
    load_sam,
    refine_reference,
    refiner_from_config,
    validate_stages,
)
from plabel.method.sam.compile import CompiledDecoder, compile_sam, is_compiled

JSRT = jsrt_path()
DICE_MIN = 0.99
LOGIT_RTOL = 1e-3
IOU_ATOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Run on one intra-op thread: on a busy 2-core machine two OpenMP threads fighting for one free
    core made these small models up to 10x slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def synthetic_case(h: int, w: int, seed: int, absent=()) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (h, w, 3) image and bool (3, h, w) masks: ellipse, rectangle, disk (overlaps class 0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((3, h, w), dtype=bool)
    masks[0] = ((xx - 0.3 * w) / (0.2 * w)) ** 2 + ((yy - 0.5 * h) / (0.3 * h)) ** 2 <= 1
    masks[1] = (xx >= 0.55 * w) & (xx <= 0.9 * w) & (yy >= 0.2 * h) & (yy <= 0.8 * h)
    masks[2] = (xx - 0.35 * w) ** 2 + (yy - 0.45 * h) ** 2 <= (0.12 * min(h, w)) ** 2
    for c in absent:
        masks[c] = False
    img = rng.normal(40, 10, (h, w, 3))
    for c in range(3):
        img[masks[c]] += 50 * (c + 1)
    return np.clip(img, 0, 255).astype(np.uint8), masks


@contextmanager
def count_calls(module: torch.nn.Module):
    """Count calls of module.forward (a spy: the real forward runs)."""
    calls = []
    original = module.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    module.forward = spy
    try:
        yield calls
    finally:
        del module.forward  # back to the class's forward


def assert_equivalent(batched: RefinementResult, ref: RefinementResult, prompts: RefinementPrompts,
                      n_stages: int) -> None:
    assert len(batched.stage_masks) == len(ref.stage_masks) == n_stages
    for c in np.flatnonzero(prompts.valid):
        for k in range(n_stages):
            d = dice(batched.stage_masks[k][c], ref.stage_masks[k][c])
            assert d >= DICE_MIN, f"class {c} stage {k + 1}: Dice {d:.5f}"
            assert abs(batched.stage_iou[k][c] - ref.stage_iou[k][c]) <= IOU_ATOL
        diff = np.abs(batched.low_res_logits[c] - ref.low_res_logits[c]).max()
        scale = max(1.0, float(np.abs(ref.low_res_logits[c]).max()))
        assert diff <= LOGIT_RTOL * scale, f"class {c}: logits differ by {diff}"
    for c in np.flatnonzero(~prompts.valid):
        for res in (batched, ref):
            assert not res.masks[c].any() and np.isnan(res.iou_pred[c])
            assert np.isnan(res.low_res_logits[c]).all()


# ---------------------------------------------------------------- tiny random-weight SAM


@pytest.fixture(scope="module")
def tiny():
    return build_random_sam(seed=1)


@pytest.fixture(scope="module")
def tiny_cases():
    shapes = [((100, 150), ()), ((128, 96), (1,)), ((77, 128), ()), ((200, 160), ())]
    cases = [synthetic_case(h, w, i, absent) for i, ((h, w), absent) in enumerate(shapes)]
    return [im for im, _ in cases], [extract_prompts(m) for _, m in cases]


def test_random_batch_matches_reference_and_counts_calls(tiny, tiny_cases):
    images, prompts = tiny_cases
    refiner = SamRefiner(tiny)
    with count_calls(tiny.sam.image_encoder) as enc, count_calls(tiny.sam.mask_decoder) as dec:
        batched = refiner.refine_batch(images, prompts)
    assert len(enc) == 1 and enc[0].shape[0] == len(images)  # one encoder call for the batch
    assert len(dec) == len(images) * len(DEFAULT_STAGES)  # one decoder call per image per stage
    n_valid = [int(p.valid.sum()) for p in prompts]
    assert [out[0].shape[0] for out in dec] == [n for n in n_valid for _ in DEFAULT_STAGES]

    with count_calls(tiny.sam.mask_decoder) as ref_dec:
        refs = [refine_reference(tiny, im, p) for im, p in zip(images, prompts)]
    assert len(ref_dec) == sum(n_valid) * len(DEFAULT_STAGES)  # C per stage in the reference

    for im, p, b, r in zip(images, prompts, batched, refs):
        C, (H, W) = p.num_classes, im.shape[:2]
        assert b.masks.shape == (C, H, W) and b.masks.dtype == bool
        assert b.iou_pred.shape == (C,) and b.iou_pred.dtype == np.float32
        assert b.low_res_logits.shape == (C, 256, 256) and b.low_res_logits.dtype == np.float32
        assert b.masks is b.stage_masks[-1] and b.iou_pred is b.stage_iou[-1]
        assert_equivalent(b, r, p, len(DEFAULT_STAGES))


def test_stage2_depends_on_stage1_logits(tiny, tiny_cases):
    images, prompts = tiny_cases
    refiner = SamRefiner(tiny)
    base = refiner.refine_batch(images[:1], prompts[:1])[0]
    # Default stage 2 uses points + mask only; moving the boxes changes it only through stage 1.
    p = prompts[0]
    shifted = RefinementPrompts(p.boxes * 0.6 + 5.0, p.points, p.point_labels, p.valid)
    moved = refiner.refine_batch(images[:1], [shifted])[0]
    v = p.valid
    assert np.abs(moved.stage_iou[0][v] - base.stage_iou[0][v]).max() > 1e-4
    assert np.abs(moved.low_res_logits[v] - base.low_res_logits[v]).max() > 1e-3
    # ... and stage 2 is not what points alone give.
    points_only = SamRefiner(tiny, stages=(("points",),)).refine_batch(images[:1], prompts[:1])[0]
    assert np.abs(points_only.low_res_logits[v] - base.low_res_logits[v]).max() > 1e-3


def test_single_stage_box_only(tiny, tiny_cases):
    images, prompts = tiny_cases
    one = SamRefiner(tiny, stages=(("box",),)).refine_batch(images[:2], prompts[:2])
    two = SamRefiner(tiny).refine_batch(images[:2], prompts[:2])
    for a, b, p in zip(one, two, prompts):
        assert len(a.stage_masks) == len(a.stage_iou) == 1
        assert np.array_equal(a.masks, b.stage_masks[0])
        np.testing.assert_allclose(a.iou_pred[p.valid], b.stage_iou[0][p.valid], atol=1e-6)


def test_no_valid_classes(tiny, tiny_cases):
    images, prompts = tiny_cases
    empty = extract_prompts(np.zeros((3, 50, 70), dtype=bool))
    blank = np.zeros((50, 70, 3), dtype=np.uint8)
    refiner = SamRefiner(tiny)
    with count_calls(tiny.sam.image_encoder) as enc, count_calls(tiny.sam.mask_decoder) as dec:
        (res,) = refiner.refine_batch([blank], [empty])
    assert not enc and not dec
    assert res.masks.shape == (3, 50, 70) and not res.masks.any()
    assert np.isnan(res.iou_pred).all() and len(res.stage_masks) == 2
    # mixed with a valid image: the empty one is neither encoded nor decoded
    with count_calls(tiny.sam.image_encoder) as enc, count_calls(tiny.sam.mask_decoder) as dec:
        mixed = refiner.refine_batch([blank, images[0]], [empty, prompts[0]])
    assert enc[0].shape[0] == 1 and len(dec) == 2
    assert not mixed[0].masks.any()
    assert np.array_equal(mixed[1].masks, refiner.refine_batch(images[:1], prompts[:1])[0].masks)


def test_all_padding_columns_are_dropped(tiny, tiny_cases):
    images, prompts = tiny_cases
    p = prompts[0]
    C, P = p.point_labels.shape
    padded = RefinementPrompts(
        p.boxes,
        np.concatenate([p.points, np.full((C, 2, 2), 7.0, np.float32)], axis=1),
        np.concatenate([p.point_labels, np.full((C, 2), -1, np.int32)], axis=1),
        p.valid,
    )
    refiner = SamRefiner(tiny)
    a = refiner.refine_batch(images[:1], [p])[0]
    b = refiner.refine_batch(images[:1], [padded])[0]
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)


def test_ragged_points_run(tiny, tiny_cases):
    """Classes with different point counts share one decoder call (padding = not-a-point tokens)."""
    images, prompts = tiny_cases
    p = prompts[0]
    labels = p.point_labels.copy()
    labels[0, 1:] = -1  # class 0 keeps only its positive point
    ragged = RefinementPrompts(p.boxes, p.points, labels, p.valid)
    with count_calls(tiny.sam.mask_decoder) as dec:
        (res,) = SamRefiner(tiny).refine_batch(images[:1], [ragged])
    assert len(dec) == 2 and res.masks.shape == (3, *images[0].shape[:2])
    assert np.isfinite(res.low_res_logits).all()


def test_autocast_bfloat16_outputs_float32(tiny, tiny_cases):
    images, prompts = tiny_cases
    fp32 = SamRefiner(tiny).refine_batch(images[:2], prompts[:2])
    bf16 = SamRefiner(tiny, autocast_dtype=torch.bfloat16).refine_batch(images[:2], prompts[:2])
    for a, b, p in zip(fp32, bf16, prompts):
        assert b.low_res_logits.dtype == np.float32 and b.iou_pred.dtype == np.float32
        v = p.valid
        assert np.isfinite(b.low_res_logits[v]).all()
        # bf16 keeps ~3 significant digits; logits of this model are ~0.2 in magnitude
        assert np.abs(a.low_res_logits[v] - b.low_res_logits[v]).max() < 0.1


def test_grayscale_image_equals_rgb(tiny, tiny_cases):
    images, prompts = tiny_cases
    gray = images[0][:, :, 0].copy()
    refiner = SamRefiner(tiny)
    a = refiner.refine_batch([gray], prompts[:1])[0]
    b = refiner.refine_batch([np.repeat(gray[:, :, None], 3, axis=2)], prompts[:1])[0]
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)


@pytest.mark.parametrize(
    "stages, bad",
    [
        ((("box",), ("points", "scribble")), "scribble"),
        ((("box",), ()), "stage 2"),
        ((("mask",),), "mask"),
        ((("box", "mask"), ("points",)), "mask"),
        ((), "non-empty"),
    ],
)
def test_invalid_stages_rejected(tiny, stages, bad):
    with pytest.raises(ValueError, match=bad):
        validate_stages(stages)
    with pytest.raises(ValueError, match=bad):
        SamRefiner(tiny, stages=stages)


def test_validate_stages_normalises():
    assert validate_stages(DEFAULT_STAGES) == (("box",), ("points", "mask"))
    assert validate_stages(["box", ["points", "mask", "points"]]) == (("box",), ("points", "mask"))


def test_mismatched_lengths_rejected(tiny, tiny_cases):
    images, prompts = tiny_cases
    with pytest.raises(ValueError, match="prompt sets"):
        SamRefiner(tiny).refine_batch(images[:2], prompts[:1])


# ---------------------------------------------------------------- LiteMedSAM on real radiographs


@pytest.fixture(scope="module")
def lite_jsrt():
    require(JSRT, "the JSRT data (real-data equivalence test)", "classes.json")

    classes = json.loads((JSRT / "classes.json").read_text())
    ids = sorted(p.stem for p in (JSRT / "images").glob("*.png"))[:2]
    images, truth = [], []
    for i in ids:
        gray = cv2.imread(str(JSRT / "images" / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
        images.append(np.repeat(gray[:, :, None], 3, axis=2))
        truth.append(np.stack([
            cv2.imread(str(JSRT / "masks" / c / f"{i}.png"), cv2.IMREAD_GRAYSCALE) > 127 for c in classes
        ]))
    prompts = [extract_prompts(t) for t in truth]
    model = load_sam("lite_medsam")
    refiner = SamRefiner(model)
    with count_calls(model.sam.image_encoder) as enc, count_calls(model.sam.mask_decoder) as dec:
        batched = refiner.refine_batch(images, prompts)
    with count_calls(model.sam.mask_decoder) as ref_dec:
        refs = [refine_reference(model, im, p) for im, p in zip(images, prompts)]
    return dict(model=model, refiner=refiner, images=images, truth=truth, prompts=prompts,
                batched=batched, refs=refs, features=enc[0], n_enc=len(enc), n_dec=len(dec),
                n_ref_dec=len(ref_dec))


def test_lite_medsam_batch_matches_reference(lite_jsrt):
    d = lite_jsrt
    n_classes = [int(p.valid.sum()) for p in d["prompts"]]
    assert d["n_enc"] == 1 and d["features"].shape == (2, 256, 64, 64)
    assert d["n_dec"] == 2 * len(DEFAULT_STAGES)
    assert d["n_ref_dec"] == sum(n_classes) * len(DEFAULT_STAGES)
    for b, r, p in zip(d["batched"], d["refs"], d["prompts"]):
        assert_equivalent(b, r, p, len(DEFAULT_STAGES))
    # Real weights and LiteMedSAM's x/255 scaling: the box stage recovers the lungs.
    for b, t in zip(d["batched"], d["truth"]):
        for c in (0, 1):
            assert dice(b.stage_masks[0][c], t[c]) > 0.9


def test_lite_medsam_stage2_depends_on_stage1(lite_jsrt):
    d = lite_jsrt
    refiner, p = d["refiner"], d["prompts"][0]
    feats, size = d["features"][:1], d["images"][0].shape[:2]
    base = refiner.refine_features(feats, size, p)
    assert np.array_equal(base.masks, d["batched"][0].masks)
    shifted = RefinementPrompts(p.boxes * 0.8 + 10.0, p.points, p.point_labels, p.valid)
    moved = refiner.refine_features(feats, size, shifted)
    diff = np.abs(moved.low_res_logits - base.low_res_logits).max(axis=(1, 2))
    assert (diff > 0.1).all(), diff


def test_fixed_encoder_batch_pads_and_matches(tiny, tiny_cases):
    """encoder_batch=3 on 4 images: two encoder calls of exactly 3 images (the second padded with
    zero images), and the same results as one call of 4."""
    images, prompts = tiny_cases
    free = SamRefiner(tiny).refine_batch(images, prompts)
    fixed = SamRefiner(tiny, encoder_batch=3)
    with count_calls(tiny.sam.image_encoder) as enc:
        got = fixed.refine_batch(images, prompts)
    assert [e.shape[0] for e in enc] == [3, 3]
    for a, b, p in zip(got, free, prompts):
        assert_equivalent(a, b, p, len(DEFAULT_STAGES))
    with pytest.raises(ValueError, match="encoder_batch"):
        SamRefiner(tiny, encoder_batch=0)


def test_compiled_sam_matches_eager(tiny_cases):
    """plabel.method.sam.compile: the compiled encoder and decoder give the eager results (float32), the
    decoder is compiled for its first shapes only and runs eagerly for later new shapes."""

    images, prompts = tiny_cases
    eager = SamRefiner(build_random_sam(seed=3)).refine_batch(images, prompts)
    model = compile_sam(build_random_sam(seed=3), max_decoder_shapes=2)
    assert is_compiled(model) and compile_sam(model) is model  # once
    decoder = model.sam.mask_decoder
    assert isinstance(decoder, CompiledDecoder)
    got = SamRefiner(model, encoder_batch=2).refine_batch(images, prompts)
    for a, b, p in zip(got, eager, prompts):
        assert_equivalent(a, b, p, len(DEFAULT_STAGES))
    # images 0, 2, 3 have 3 classes, image 1 has 2: stage 1 and 2 shapes of 3 classes are compiled
    assert len(decoder.shapes) == 2 and all(s[1][0] == 3 for s in decoder.shapes)


def test_refiner_from_config_reads_the_label_sam_section():
    """The one place a label.sam config becomes a SamRefiner (label job actors, calibrate stage)."""

    sam = {"backend": "random_tiny", "checkpoint": None, "sha256": None, "stages": [["box"], ["points", "mask"]],
           "batch_size": 4, "autocast": "bf16", "compile": True}
    r = refiner_from_config(sam, "cpu", compile=False)
    assert r.stages == (("box",), ("points", "mask"))
    assert r.autocast_dtype is None  # autocast is for CUDA only
    assert r.encoder_batch is None and not is_compiled(r.model)
    r = refiner_from_config(sam, "cpu")  # compile from the config: static encoder batch
    assert is_compiled(r.model) and r.encoder_batch == 4
    with pytest.raises(ValueError, match="autocast 'fp8'"):
        refiner_from_config({**sam, "autocast": "fp8"}, "cpu", compile=False)

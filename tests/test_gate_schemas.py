import json

import numpy as np
import pyarrow as pa
import pytest

from plabel.method.gate import ClassGate, GateConfig, gate_decision
from plabel.method.labelling import pseudo_label_targets
from plabel.schemas.masks import decode_mask, encode_mask
from plabel.schemas.tables import class_column, decode_class_masks, pseudo_label_schema, table_classes


@pytest.mark.parametrize(
    "policy,present,iou,agree,expected",
    [
        ("auto", False, 0.9, 0.9, "empty"),
        ("auto", True, 0.9, 0.9, "sam"),
        ("auto", True, 0.4, 0.9, "unet"),  # SAM unsure
        ("auto", True, 0.9, 0.5, "unet"),  # agreement below 0.6 but above 0.3
        ("auto", True, 0.9, 0.2, "dropped"),
        ("auto", True, float("nan"), 0.9, "unet"),
        ("sam", True, 0.4, 0.9, "dropped"),
        ("sam", True, 0.6, 0.7, "sam"),
        ("unet", True, 0.99, 0.99, "unet"),
        ("drop", True, 0.99, 0.99, "dropped"),
    ],
)
def test_gate_decisions(policy, present, iou, agree, expected):
    g = ClassGate(policy=policy, min_sam_iou=0.5, min_agreement=0.6, min_agreement_unet=0.3)
    assert gate_decision(g, present, iou, agree) == expected


def test_gate_config_round_trip_and_bad_policy():
    cfg = GateConfig.from_dict({"default": {"min_sam_iou": 0.7}, "per_class": {"heart": {"policy": "unet"}}})
    assert cfg.for_class("heart").policy == "unet" and cfg.for_class("lung").min_sam_iou == 0.7
    assert GateConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="'maybe'"):
        ClassGate(policy="maybe")


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 9), (256, 256), (13, 1)])
def test_mask_codec_round_trip_and_size(shape):
    rng = np.random.default_rng(sum(shape))
    m = rng.random(shape) > 0.5
    data = encode_mask(m)
    assert len(data) == (shape[0] * shape[1] + 7) // 8  # exactly 1 bit per pixel
    np.testing.assert_array_equal(decode_mask(data, *shape), m)


def test_mask_codec_rejects_wrong_length():
    with pytest.raises(ValueError, match="3x5"):
        decode_mask(b"\x00", 3, 5)


def test_pseudo_label_schema_and_row_decoding():
    classes = ["lung", "heart"]
    schema = pseudo_label_schema(classes)
    assert table_classes(schema) == classes
    assert schema.field("heart.kept").type == pa.string()
    assert json.loads(schema.metadata[b"plabel.classes"]) == classes
    m = np.zeros((4, 6), bool)
    m[1:3, 2:5] = True
    row = {name: None for name in schema.names}
    row.update(id="a", status="ok", height=4, width=6)
    row[class_column("lung", "mask")] = encode_mask(m)
    row[class_column("lung", "kept")] = "sam"
    row[class_column("heart", "kept")] = "dropped"
    table = pa.Table.from_pylist([row], schema=schema)
    masks, weight = decode_class_masks(table.to_pylist()[0], table_classes(table.schema))
    np.testing.assert_array_equal(masks[0], m)
    assert not masks[1].any()
    np.testing.assert_array_equal(weight, [1.0, 0.0])
    with pytest.raises(ValueError, match="contain no '.'"):
        pseudo_label_schema(["a.b"])
    with pytest.raises(ValueError, match="not a plabel"):
        table_classes(pa.schema([pa.field("x", pa.int8())]))


def test_pseudo_label_targets_are_the_kept_masks_on_the_unet_grid():
    classes = ["lung", "heart"]
    lung = np.zeros((4, 4), bool)
    lung[0:2, 0:4] = True  # top half
    heart = np.ones((4, 4), bool)

    def row(status, kept, masks):
        r = {"id": "x", "status": status, "height": 4, "width": 4}
        for c, k, m in zip(classes, kept, masks):
            r[class_column(c, "kept")], r[class_column(c, "mask")] = k, None if m is None else encode_mask(m)
        return r

    rows = [row("ok", ["sam", "dropped"], [lung, heart]),
            row("empty", ["empty", "empty"], [np.zeros((4, 4), bool)] * 2),
            row("error", [None, None], [None, None])]
    masks, weight = pseudo_label_targets(rows, classes, 2)
    assert masks.dtype == np.uint8 and masks.shape == (3, 2, 2, 2) and weight.dtype == np.float32
    np.testing.assert_array_equal(masks[0, 0], [[1, 1], [0, 0]])  # nearest neighbour 4x4 -> 2x2
    assert not masks[0, 1].any() and not masks[1:].any()  # dropped, empty and error rows: no mask
    np.testing.assert_array_equal(weight, [[1, 0], [1, 1], [0, 0]])  # dropped / error: ignored
    m0, w0 = pseudo_label_targets([], classes, 2)
    assert m0.shape == (0, 2, 2, 2) and w0.shape == (0, 2)


@pytest.mark.parametrize("policy,sam,expected", [
    ("auto", "nonfinite", "unet"), ("unet", "nonfinite", "unet"), ("sam", "nonfinite", "dropped"),
    ("drop", "nonfinite", "dropped"), ("auto", "off", "unet"), ("sam", "off", "unet"), ("drop", "off", "unet"),
])
def test_gate_decision_without_a_trusted_sam_answer(policy, sam, expected):
    """A non-finite SAM answer falls back by policy; no SAM at all keeps the cleaned U-Net mask.
    Thresholds and the numbers passed do not matter then (they would keep SAM's mask)."""
    g = ClassGate(policy, min_sam_iou=0.0, min_agreement=0.0, min_agreement_unet=0.0)
    assert gate_decision(g, True, 0.99, 0.99, sam) == expected
    assert gate_decision(g, False, 0.99, 0.99, sam) == "empty"


@pytest.mark.parametrize("policy,expected", [("drop", "dropped"), ("unet", "unet")])
def test_gate_decision_when_sam_was_not_needed(policy, expected):
    """'unneeded': SAM was skipped because no class consults it; drop still drops, unet keeps the
    cleaned mask, and a policy that would consult SAM is a programming error."""
    g = ClassGate(policy)
    assert gate_decision(g, True, float("nan"), float("nan"), "unneeded") == expected
    assert gate_decision(g, False, float("nan"), float("nan"), "unneeded") == "empty"
    for consulting in ("sam", "auto"):
        with pytest.raises(ValueError, match="consults SAM"):
            gate_decision(ClassGate(consulting), True, 0.9, 0.9, "unneeded")


def test_a_gate_consults_sam_when_any_class_policy_looks_at_it():
    drop_all = GateConfig(ClassGate("drop"), {"b": ClassGate("unet")})
    assert not drop_all.consults_sam(["a", "b"])
    assert GateConfig(ClassGate("drop"), {"b": ClassGate("auto")}).consults_sam(["a", "b"])
    assert not GateConfig(ClassGate("drop"), {"b": ClassGate("auto")}).consults_sam(["a"])  # b not labelled
    assert GateConfig().consults_sam(["a"])  # the default policy is auto


def test_gate_decision_refuses_an_unknown_sam_state():
    with pytest.raises(ValueError, match="sam must be one of"):
        gate_decision(ClassGate(), True, 0.9, 0.9, "maybe")

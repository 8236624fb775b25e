"""Bad input: every case gives a correct row or an error row naming the input, and the job completes.

Fast tests first (the tar reader, decoding limits, NaN handling in the method functions, ingest
path safety, all without Ray); then ONE Ray label job over a set of crafted shards that mixes a
few good images with every bad case (module fixture ``bad_job``).

The teacher of the job is a hand-built U-Net (per-pixel arithmetic; ``band_unet``) with known
outputs: class 0 is present wherever the gray level is in [13, 110] or [148, 255], absent where it
is below ~12 (an all-black image is ``empty``); class 1 is never present; a gray level in
~[112, 143] gives NaN logits (1e38 * x = inf, then 0 * inf), so an image holding such pixels gets
non-finite probabilities (``teacher produced non-finite probabilities``), at any batch size.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from plabel.data import storage
from plabel.data.ingest import MANIFEST_FORMAT, MANIFEST_VERSION, IngestError, ingest, load_manifest
from plabel.data.samples import decode_gray, object_array, sample_masks
from plabel.data.shard_reader import (
    iter_shard_samples,
    read_shard_file,
    samples_table,
    unsafe_member_name,
)
from plabel.data.shards import ShardError, encode_masks, make_sample, sample_key, write_shards
from plabel.data.table_commit import read_pseudo_labels
from plabel.jobs.label_job import TeacherStage, _meta, _writable_status, decode_images, run_label_job
from plabel.jobs.shard_dataset import read_shards
from plabel.method.cleaning import CleaningConfig
from plabel.method.gate import GateConfig
from plabel.method.labelling import ImageMeta, clean_and_prompt, pseudo_label_rows, teacher_probs
from plabel.method.sam.refine import RefinementResult
from plabel.method.unet import UNet, UNetConfig, save_checkpoint
from plabel.schemas.config import ConfigError, GateSection, LabelSection, build
from plabel.schemas.tables import decode_class_masks

CLASSES = ["lung", "heart"]
IMAGE_SIZE = 32


# --------------------------------------------------------------------------------------- helpers


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _pil(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _json(image_id: str) -> bytes:
    return json.dumps({"id": image_id}).encode()


def tar_bytes(members) -> bytes:
    """A tar written member by member with the tarfile module, names used verbatim.

    members: (name, data) or (name, data, tar type) tuples; link types point at /etc/passwd.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            name, data = m[0], m[1]
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            if len(m) > 2:
                info.type, info.linkname, info.size, data = m[2], "/etc/passwd", 0, b""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(key: str, image: bytes, ext: str = "png", image_id: str | None = None, extra=()) -> list:
    """Members of one sample in plabel's order (sorted: json before png)."""
    members = [(f"{key}.json", _json(image_id or key)), *extra, (f"{key}.{ext}", image)]
    return sorted(members, key=lambda m: m[0])


def member_offsets(data: bytes) -> dict[str, tuple[int, int, int]]:
    """name -> (header offset, data offset, size) of a complete tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


def parse(data: bytes, shard: str = "S.tar", **kw) -> list[dict]:
    return list(iter_shard_samples(io.BytesIO(data), shard, **kw))


def band_unet(num_classes: int = 2):
    """The hand-built teacher described in the module docstring (eval mode).

    Level 0 computes, per pixel x in [0, 1], u0 = relu(1000 (0.12 - relu(x - 0.45) - relu(0.55 - x)))
    (> 0 only for x in ~[0.44, 0.56]) and u2 = relu(1000 (0.05 - x)) (dark pixels). Level 1
    multiplies u0 by 1e38 (inf in the band: one product, whatever the summation order) and then
    by a zero weight (0 * inf = NaN), which the decoder carries to the logits. Class 0's logit is
    10 - u2, class 1's -10. All other weights are zero, every norm layer is the identity.
    """

    model = UNet(1, num_classes, base_channels=4, depth=1, norm="batch")
    e0c1, e0n1, _, e0c2, e0n2, _ = model.encoders[0]
    e1c1, e1n1, _, e1c2, e1n2, _ = model.encoders[1]
    d0c1, d0n1, _, d0c2, d0n2, _ = model.decoders[0]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for bn in (e0n1, e0n2, e1n1, e1n2, d0n1, d0n2):
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(1.0)
        e0c1.weight[:, 0, 1, 1] = 1.0  # every channel = the pixel
        e0n1.running_mean[:] = torch.tensor([0.45, 0.55, 0.05, 0.0])
        e0n1.weight[:] = torch.tensor([1.0, -1.0, -1.0, 0.0])
        e0c2.weight[0, :2, 1, 1] = -1.0
        e0c2.weight[2, 2, 1, 1] = 1.0
        e0n2.running_mean[:] = torch.tensor([-0.12, 0.0, 0.0, 0.0])
        e0n2.weight[:] = torch.tensor([1000.0, 0.0, 1000.0, 0.0])
        e1c1.weight[0, 0, 1, 1] = 1e38  # u0 * 1e38: inf in the band; e1c2 (all zero) makes it NaN
        d0c1.weight[0, 8 + 2, 1, 1] = 1.0  # decoder input = [up(level 1) (8 channels), level 0 (4)]
        d0c1.weight[1, 0, 1, 1] = 1.0
        d0c2.weight[0, 0, 1, 1] = 1.0
        d0c2.weight[1, 1, 1, 1] = 1.0
        model.head.weight[:, 0, 0, 0] = -1.0
        model.head.weight[:, 1, 0, 0] = 1.0
        model.head.bias[:] = torch.tensor([10.0] + [-10.0] * (num_classes - 1))
    return model.eval()


def save_band_unet(path: Path) -> Path:
    model = band_unet(len(CLASSES))
    save_checkpoint(path, model, model.config, {"image_size": IMAGE_SIZE})
    return path


def numpy_batch(samples: list[dict]) -> dict:
    """A numpy batch as Ray Data gives it for the reader's rows."""
    table = samples_table(samples)
    out = {}
    for name in table.column_names:
        arr = np.empty(table.num_rows, dtype=object)
        arr[:] = table.column(name).to_pylist()
        out[name] = arr
    return out


# ----------------------------------------------------------------------------------- tar reader


GOOD = tar_bytes(sample_members("a", b"A" * 1000) + sample_members("b", b"B" * 700))


def test_reader_reads_a_good_tar_like_webdataset(tmp_path):
    rows = parse(GOOD)
    assert [(r["__key__"], r["png"], r["json"], r["__occurrence__"]) for r in rows] == [
        ("a", b"A" * 1000, _json("a"), 1), ("b", b"B" * 700, _json("b"), 1)]
    assert all("__error__" not in r and r["__url__"] == "S.tar" for r in rows)
    path = tmp_path / "good.tar"
    path.write_bytes(GOOD)
    ref = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [(s["__key__"], s["png"], s["json"]) for s in ref] == [(r["__key__"], r["png"], r["json"]) for r in rows]
    assert [r["__key__"] for r in read_shard_file(str(path))] == ["a", "b"]


def test_reader_truncated_mid_member_one_error_for_the_cut_sample():
    off = member_offsets(GOOD)
    _, data_at, size = off["b.png"]
    rows = parse(GOOD[: data_at + size // 2])
    assert [r["__key__"] for r in rows] == ["a", "b"]
    assert "__error__" not in rows[0] and rows[0]["png"] == b"A" * 1000
    err = rows[1]["__error__"]
    assert "truncated" in err and "'b.png'" in err and "700 bytes" in err
    assert "png" not in rows[1]  # the partial member is not handed on
    # cut inside a.png: a is the cut sample, b is lost together with the rest
    rows = parse(GOOD[: off["a.png"][1] + 10])
    assert [r["__key__"] for r in rows] == ["a"] and "'a.png'" in rows[0]["__error__"]


def test_reader_truncated_in_a_header_or_between_members():
    off = member_offsets(GOOD)
    b_json = off["b.json"][0]
    # the header's name field is there: the cut sample is known
    rows = parse(GOOD[: b_json + 200])
    assert [r["__key__"] for r in rows] == ["a", "b"]
    assert "'b.json'" in rows[1]["__error__"] and "truncated" in rows[1]["__error__"]
    # too little of the header to know the name: one row naming shard and offset
    for cut, at in ((b_json + 50, b_json), (b_json, b_json)):
        rows = parse(GOOD[:cut], shard="s3://bucket/x.tar")
        assert [r["__key__"] for r in rows] == ["a", f"@{at}"]
        assert rows[1]["__id__"] == f"s3://bucket/x.tar@{at}"
        assert f"byte {at}" in rows[1]["__error__"] or f"byte {cut}" in rows[1]["__error__"]
    rows = parse(b"")
    assert len(rows) == 1 and "empty (0 bytes)" in rows[0]["__error__"]


def test_reader_any_cut_point():
    """Cut anywhere: no exception, complete samples byte-exact, at most one error row."""
    whole = {r["__key__"]: r for r in parse(GOOD)}
    end = max(at + -(-size // 512) * 512 for _, at, size in member_offsets(GOOD).values())
    for cut in range(0, len(GOOD), 61):
        rows = parse(GOOD[:cut])
        errors = [r for r in rows if "__error__" in r]
        assert len(errors) == (1 if cut < end else 0), cut
        for r in rows:
            if "__error__" not in r:
                assert r == whole[r["__key__"]], cut
    rows = parse(tar_bytes([("README", b"x" * 600)])[:700])
    assert [r["__key__"] for r in rows] == ["@0"] and "README" in rows[0]["__error__"]


def test_reader_corrupt_header_stops_with_an_offset_row():
    bad = bytearray(GOOD)
    at = member_offsets(GOOD)["b.json"][0]
    bad[at + 3] ^= 0xFF  # the name changes, the checksum does not
    rows = parse(bytes(bad))
    assert [r["__key__"] for r in rows] == ["a", f"@{at}"]
    assert "corrupt tar header" in rows[1]["__error__"] and "checksum" in rows[1]["__error__"]


def test_reader_duplicate_keys_every_occurrence_accounted_for():
    data = tar_bytes(sample_members("a", b"1") + sample_members("c", b"2") + sample_members("a", b"3")
                     + sample_members("d", b"4") + sample_members("d", b"5"))
    rows = parse(data)
    assert [(r["__key__"], r["__occurrence__"], r["png"]) for r in rows] == [
        ("a", 1, b"1"), ("c", 1, b"2"), ("a#2", 2, b"3"), ("d", 1, b"4"), ("d#2", 2, b"5")]
    assert [("__error__" in r) for r in rows] == [False, False, True, False, True]
    assert "duplicate key 'a' in shard S.tar" in rows[2]["__error__"]
    assert "duplicate key 'd'" in rows[4]["__error__"]


def test_reader_refuses_unsafe_names_links_and_huge_members():
    data = tar_bytes([("../evil.json", _json("ok1")), ("../evil.png", b"x"), ("/etc/evil.png", b"y"),
                      ("sub/../z.png", b"z"), ("C:evil.png", b"w"), ("lnk.png", b"", tarfile.SYMTYPE),
                      ("hard.png", b"", tarfile.LNKTYPE), ("sub/ok1.png", b"fine"), ("big.png", b"B" * 2000),
                      ("README", b"no key")])
    rows = {r["__key__"]: r for r in parse(data, max_member_bytes=1000)}
    assert set(rows) == {"../evil", "/etc/evil", "sub/../z", "C:evil", "lnk", "hard", "sub/ok1", "big"}
    for key, member in (("../evil", "../evil.png"), ("/etc/evil", "/etc/evil.png"), ("sub/../z", "sub/../z.png"),
                        ("C:evil", "C:evil.png")):
        assert f"unsafe member name {member!r}" in rows[key]["__error__"]
        assert rows[key]["__id__"] == key  # the JSON's id ("ok1") is not trusted
        assert "png" not in rows[key] and "json" not in rows[key]
    assert "'../evil.json'" in rows["../evil"]["__error__"]
    assert "symbolic link" in rows["lnk"]["__error__"] and "hard link" in rows["hard"]["__error__"]
    assert "above the limit" in rows["big"]["__error__"] and "png" not in rows["big"]
    assert rows["sub/ok1"]["png"] == b"fine" and "__error__" not in rows["sub/ok1"]


def test_unsafe_member_name():
    for bad in ("../x.png", "/etc/x.png", "a/../../x.png", "..\\x.png", "\\x.png", "C:x.png", "", "a\x00.png"):
        assert unsafe_member_name(bad), bad
    for ok in ("x.png", "sub/x.png", "./x.png", "x..y.png", "...png"):
        assert not unsafe_member_name(ok), ok


def test_reader_pax_and_gnu_long_names():
    long = "d" * 150
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in ((f"{long}.json", b"{}"), (f"{long}.png", b"p"), ("é" * 3 + ".png", b"u")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        rows = parse(buf.getvalue())
        assert [(r["__key__"], r.get("png")) for r in rows] == [(long, b"p"), ("ééé", b"u")]


def test_samples_table_keeps_known_members_only():
    rows = parse(tar_bytes(sample_members("a", b"1", extra=[("a.masks.npz", b"m"), ("a.txt", b"t")])
                           + [("b.PNG", b"2")]))
    t = samples_table(rows).to_pylist()
    assert t[0]["png"] == b"1" and t[0]["masks.npz"] == b"m" and "txt" not in t[0]
    assert t[1]["png"] == b"2" and t[1]["json"] is None  # suffix case folded for the column


# ------------------------------------------------------------------------ decoding and the limits


def _decoded(samples, **kw):
    out = decode_images(numpy_batch(samples), **kw)
    return [dict(zip(out, vals)) for vals in zip(*out.values())]


def test_decode_images_limits_and_reader_errors():
    rows = _decoded(parse(tar_bytes(
        sample_members("tiny", _png(np.zeros((1, 1), np.uint8)))
        + sample_members("big", _png(np.zeros((120, 100), np.uint8)))
        + sample_members("fits", _png(np.zeros((100, 100), np.uint8)),
                         extra=[("fits.masks.npz", encode_masks(np.zeros((2, 10, 10), bool)))])
        + sample_members("fits", _png(np.zeros((9, 9), np.uint8)))
        + [("badjson.json", b"{not json"), ("badjson.png", _png(np.zeros((8, 8), np.uint8)))] * 2)),
        max_pixels=10_000)
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"tiny", "big", "fits", "fits#2", "badjson", "badjson#2"}
    assert by_id["badjson"]["status"] == "error"
    assert "S.tar:badjson: json: JSONDecodeError" in by_id["badjson"]["message"]
    assert "duplicate key 'badjson'" in by_id["badjson#2"]["message"]  # the reader's reason wins
    assert by_id["tiny"]["status"] == "error" and "S.tar:tiny:" in by_id["tiny"]["message"]
    assert "1x1" in by_id["tiny"]["message"] and "at least 8x8" in by_id["tiny"]["message"]
    assert by_id["big"]["status"] == "error" and "120x100" in by_id["big"]["message"]
    assert "max_pixels=10000" in by_id["big"]["message"] and "S.tar:big" in by_id["big"]["message"]
    fits = by_id["fits"]
    assert fits["status"] == "ok" and (fits["height"], fits["width"]) == (100, 100)
    assert "masks.npz (ground truth) is 10x10" in fits["message"] and "100x100" in fits["message"]
    dup = by_id["fits#2"]
    assert dup["status"] == "error" and dup["key"] == "fits#2" and "duplicate key 'fits'" in dup["message"]
    assert (dup["height"], dup["width"]) == (0, 0)


def test_max_image_pixels_config_key():
    assert LabelSection().max_image_pixels == 64_000_000
    assert build(LabelSection, {"max_image_pixels": 5000}, "label").max_image_pixels == 5000
    with pytest.raises(ConfigError, match="label.max_image_pixels"):
        build(LabelSection, {"max_image_pixels": 10}, "label")
    with pytest.raises(ConfigError, match="label.max_image_pixels"):
        build(LabelSection, {"max_image_pixels": "big"}, "label")


def test_decode_gray_refuses_samples_the_reader_marked():
    rows = parse(tar_bytes(sample_members("a", _png(np.zeros((8, 8), np.uint8))) * 2))
    assert decode_gray(rows[0]).shape == (8, 8)
    with pytest.raises(ShardError, match=r"S.tar:a#2: duplicate key 'a'"):
        decode_gray(rows[1])
    sample = {"__key__": "m", "__url__": "S.tar", "masks.npz": encode_masks(np.zeros((2, 9, 8), bool))}
    with pytest.raises(ValueError, match=r"S.tar:m: masks.npz is 9x8 \(HxW\) but the image is 8x8"):
        sample_masks(sample, (8, 8), 2)
    assert sample_masks(sample, (9, 8), 2).shape == (2, 9, 8)


# -------------------------------------------------------------------- NaN / inf from the models


class _NaNFor(torch.nn.Module):
    """Wraps a model; the outputs of the given batch positions become NaN (or +inf logits)."""

    def __init__(self, inner, positions, value=float("nan")):
        super().__init__()
        self.inner, self.positions, self.value = inner, set(positions), value
        self.config = inner.config  # the inner U-Net's input contract (intensity)

    def forward(self, x):
        out = self.inner(x).clone()
        for i in self.positions:
            if i < len(out):
                out[i, 0, 0, 0] = self.value
        return out


def test_teacher_probs_non_finite_per_image():
    grays = [np.full((20, 24), v, np.uint8) for v in (60, 60, 200)]
    model = _NaNFor(band_unet(), [1])
    probs = teacher_probs(model, grays, IMAGE_SIZE, nonfinite="none")
    assert probs[1] is None and probs[0].shape == (2, 20, 24) and np.isfinite(probs[2]).all()
    with pytest.raises(ValueError, match="img-b: teacher produced non-finite probabilities"):
        teacher_probs(model, grays, IMAGE_SIZE, names=["img-a", "img-b", "img-c"])
    # +inf logits are probability 1: finite, labelled normally
    assert teacher_probs(_NaNFor(band_unet(), [0], float("inf")), grays[:1], IMAGE_SIZE)[0] is not None
    # the hand-built teacher itself: NaN exactly for the mid-gray image
    out = teacher_probs(band_unet(), [np.full((16, 16), v, np.uint8) for v in (0, 60, 128, 255)], IMAGE_SIZE,
                        nonfinite="none")
    assert [p is None for p in out] == [False, False, True, False]
    assert out[0][0].max() < 0.5 and out[1][0].min() > 0.5 and out[1][1].max() < 0.5


def test_teacher_stage_turns_non_finite_into_error_rows(tmp_path):
    stage = TeacherStage(str(save_band_unet(tmp_path / "t.pt")), {"threshold": 0.5}, len(CLASSES))
    rows = _decoded(parse(tar_bytes(sample_members("dark", _png(np.full((16, 20), 60, np.uint8)))
                                    + sample_members("mid", _png(np.full((16, 16), 128, np.uint8))))))
    batch = {k: object_array([r[k] for r in rows]) for k in rows[0]}
    batch["status"].flags.writeable = False  # as Ray may hand them over
    batch["message"] = np.full(len(rows), np.nan, np.float32)  # an all-null column, as Ray may give it
    out = stage(batch)
    assert list(out["status"]) == ["ok", "error"]
    assert out["message"][1] == "S.tar:mid: teacher produced non-finite probabilities (NaN or inf)"
    assert out["valid"][0].tolist() == [True, False] and not out["valid"][1].any()


def test_teacher_stage_hands_on_the_image_its_teacher_reads(tmp_path):
    """A minmax teacher: the decoded image (levels 200 and 240, washed out) leaves the U-Net stage
    stretched to 0 and 255, which is what RefineStage gives SAM; a fixed teacher leaves it alone."""
    gray = np.full((16, 20), 200, np.uint8)
    gray[4:12, 5:15] = 240
    rows = _decoded(parse(tar_bytes(sample_members("w", _png(gray)))))
    for intensity, want in (("minmax", np.where(gray == 240, 255, 0)), ("fixed", gray)):
        cfg = UNetConfig(num_classes=len(CLASSES), base_channels=4, depth=1, intensity=intensity)
        save_checkpoint(tmp_path / f"{intensity}.pt", UNet.from_config(cfg), cfg, {"image_size": IMAGE_SIZE})
        stage = TeacherStage(str(tmp_path / f"{intensity}.pt"), {"threshold": 0.5}, len(CLASSES))
        out = stage({k: object_array([r[k] for r in rows]) for k in rows[0]})
        assert list(out["status"]) == ["ok"]
        np.testing.assert_array_equal(out["image"][0], want)


def test_refine_stage_meta_from_ray_like_columns():
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "shard": np.array(["S"] * 3, dtype=object),
             "key": np.array(["a", "b", "c"], dtype=object), "height": np.array([8, 8, 0], np.int32),
             "width": np.array([9, 9, 0], np.int32), "status": np.array(["ok", "ok", "error"], dtype=object),
             "message": np.array([np.nan, "warning: x", "S:c: bad"], dtype=object),
             # a column of nulls may reach a stage as NaN: no UID, like None
             "sop_instance_uid": np.array([np.nan, "1.2.3", None], dtype=object)}
    batch["status"].flags.writeable = False
    _writable_status(batch)
    batch["status"][0] = "ok"  # writable now
    assert [_meta(batch, i).note for i in range(3)] == [None, "warning: x", None]
    assert _meta(batch, 1).height == 8 and _meta(batch, 1).width == 9
    assert [_meta(batch, i).sop_instance_uid for i in range(3)] == [None, "1.2.3", None]


class _FakeRefiner:
    """refine_batch like SamRefiner's: SAM's mask = the cleaned mask, with non-finite outputs where told."""

    def __init__(self, cleaned, nan_iou=(), nan_logits=()):
        self.cleaned, self.nan_iou, self.nan_logits = cleaned, set(nan_iou), set(nan_logits)

    def refine_batch(self, images, prompts):
        out = []
        for m, p in zip(self.cleaned, prompts):
            C = m.shape[0]
            iou = np.where(p.valid, 0.95, np.nan).astype(np.float32)
            logits = np.zeros((C, 64, 64), np.float32)
            for c in self.nan_iou:
                iou[c] = np.nan
            for c in self.nan_logits:
                logits[c, 3, 3] = np.inf
            out.append(RefinementResult(m.copy(), iou, [m.copy()], [iou], logits))
        return out


def test_sam_non_finite_output_falls_back_per_class():
    probs = np.zeros((3, 24, 24), np.float32)
    probs[0, 2:10, 2:10] = 0.9
    probs[1, 12:20, 12:20] = 0.8
    probs[2, 2:8, 14:22] = 0.9
    cleaned, up, prompts = clean_and_prompt(probs, CleaningConfig())
    gray = np.zeros((24, 24), np.uint8)
    meta = ImageMeta("img", "S.tar", "img", 24, 24, note="warning: something")
    classes = ["a", "b", "c"]
    refiner = _FakeRefiner([cleaned], nan_iou=[0], nan_logits=[1])
    auto = GateConfig.from_dict(GateSection().to_gate_dict())
    row = pseudo_label_rows(refiner, [gray], [cleaned], [up], [prompts], [meta], classes, auto, {})[0]
    assert row["status"] == "ok"
    assert (row["a.kept"], row["b.kept"], row["c.kept"]) == ("unet", "unet", "sam")
    assert row["a.sam_iou"] is None and row["a.agreement_dice"] is None and row["a.area"] == 64
    assert row["c.sam_iou"] == pytest.approx(0.95)
    msg = row["message"]
    assert msg.startswith("warning: something")
    assert "class a: SAM produced non-finite logits or IoU; kept the cleaned U-Net mask" in msg
    assert "class b: SAM produced non-finite" in msg and "class c" not in msg
    strict = GateConfig.from_dict(GateSection(policy="sam").to_gate_dict())
    row = pseudo_label_rows(refiner, [gray], [cleaned], [up], [prompts], [meta], classes, strict, {})[0]
    assert (row["a.kept"], row["b.kept"], row["c.kept"]) == ("dropped", "dropped", "sam")
    assert "class a: SAM produced non-finite logits or IoU; class dropped" in row["message"]
    assert row["a.area"] == 0


# ------------------------------------------------------------------------- ingest: paths, masks


def test_ingest_mask_size_mismatch_names_both_files(tmp_path):
    src = tmp_path / "src"
    for d in ("images", "masks/lung", "masks/heart"):
        (src / d).mkdir(parents=True)
    (src / "classes.json").write_text(json.dumps(CLASSES))
    for i in range(3):
        (src / "images" / f"im{i}.png").write_bytes(_png(np.zeros((16, 20), np.uint8)))
        for c in CLASSES:
            shape = (17, 20) if (i, c) == (1, "heart") else (16, 20)
            (src / "masks" / c / f"im{i}.png").write_bytes(_png(np.zeros(shape, np.uint8)))
    with pytest.raises(IngestError) as info:
        ingest(src, tmp_path / "out", {"labelled": 3})
    msg = str(info.value)
    assert str(src / "masks" / "heart" / "im1.png") in msg and str(src / "images" / "im1.png") in msg
    assert "17x20" in msg and "16x20" in msg
    assert not (tmp_path / "out").exists()


def test_ingest_writes_only_inside_its_output(tmp_path):
    for bad in ("../x", "a/b", "a\\b", "/abs", "__meta", ""):
        with pytest.raises(ShardError):
            sample_key(bad)
    with pytest.raises(ShardError):
        make_sample("../x", b"png", "png", {}, None)
    with pytest.raises(ShardError):
        write_shards([{"__key__": "a", "../../x": b"1"}], tmp_path / "w", "p", 1)
    with pytest.raises(ShardError):
        write_shards([], tmp_path / "w", "../p", 1)
    outside = sorted(p.name for p in tmp_path.iterdir())
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for name in ("a..b", "c d", "é", "x.y.z"):  # odd but legal file names
        (src / "images" / f"{name}.png").write_bytes(_png(np.zeros((8, 8), np.uint8)))
    (src / "images" / "..hidden.png").write_bytes(b"")  # hidden: not an image of the source
    out = tmp_path / "out"
    manifest = ingest(src, out, shard_size=2)
    assert sorted(manifest["splits"]["unlabelled"]["ids"]) == sorted(["a..b", "c d", "é", "x.y.z"])
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(outside + ["src", "out"])
    manifest["splits"]["unlabelled"]["shards"][0]["path"] = "../evil.tar"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IngestError, match="unsafe shard path"):
        load_manifest(out)


# ------------------------------------------------------------------- the Ray job over bad shards


def _good_images() -> dict[str, tuple[bytes, str, tuple[int, int]]]:
    """id -> (bytes, ext, (H, W)) of images the job labels ('ok'), avoiding the teacher's NaN band."""
    g16 = np.full((64, 96), 1000, np.uint16)
    g16[:, 48:] = 60000  # min-max scaled to 0 | 255, block-aligned with the 2x3 down-sampling
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = (60, 70, 80)
    rgba[..., 3] = np.arange(50, dtype=np.uint8)[None, :] * 5
    idx = (np.arange(36 * 44).reshape(36, 44) // 7 % 2).astype(np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette([30, 60, 90, 90, 80, 20] + [0] * 762)
    cmyk = Image.fromarray(np.full((48, 40, 3), (70, 80, 60), np.uint8)).convert("CMYK")
    return {
        "g16": (_png(g16), "png", (64, 96)),
        "rgba": (_pil(Image.fromarray(rgba, "RGBA"), "PNG"), "png", (40, 50)),
        "pal": (_pil(pal, "PNG"), "png", (36, 44)),
        "cmyk": (_pil(cmyk, "JPEG", quality=95), "jpg", (48, 40)),
    }


def build_bad_shards(root: Path):
    """Writes the crafted shards; returns (shard paths, {row id: (shard, status, [message parts], (H, W))},
    number of images written)."""

    root.mkdir(parents=True, exist_ok=True)
    black = _png(np.zeros((32, 32), np.uint8))
    rng = np.random.default_rng(0)
    noisy = _png(rng.integers(0, 100, (40, 40), dtype=np.uint8))
    crc = bytearray(noisy)
    crc[60] ^= 0xFF  # inside IDAT: the CRC no longer matches
    expect: dict[str, tuple] = {}
    shards = []

    def shard(name: str, data: bytes) -> str:
        path = root / name
        path.write_bytes(data)
        shards.append(str(path))
        return str(path)

    # A: good images of every layout, and undecodable / out-of-limit / NaN-producing images
    members, good = [], _good_images()
    for image_id, (data, ext, _) in good.items():
        extra = [("g16.masks.npz", encode_masks(np.zeros((2, 10, 10), bool)))] if image_id == "g16" else []
        members += sample_members(image_id, data, ext, extra=extra)
    bad_a = {
        "black": (black, "empty", []),
        "mid": (_png(np.full((32, 32), 128, np.uint8)), "error", ["teacher produced non-finite probabilities"]),
        "tiny": (_png(np.zeros((1, 1), np.uint8)), "error", ["1x1", "at least 8x8"]),
        "big": (_png(np.zeros((120, 100), np.uint8)), "error", ["120x100", "max_pixels=10000"]),
        "zero": (b"", "error", ["zero-byte"]),
        "noise": (rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), "error", ["unrecognised signature"]),
        "crc": (bytes(crc), "error", ["CRC mismatch"]),
        "cut": (noisy[: len(noisy) // 2], "error", ["truncated PNG"]),
    }
    for image_id, (data, _, _) in bad_a.items():
        members += sample_members(image_id, data)
    a = shard("a-000000.tar", tar_bytes(members))
    for image_id, (_, _, hw) in good.items():
        parts = ["masks.npz (ground truth) is 10x10", "ignored"] if image_id == "g16" else []
        expect[image_id] = (a, "ok", parts, hw)
    for image_id, (_, status, parts) in bad_a.items():
        hw = (0, 0) if status == "error" and image_id != "mid" else (32, 32)  # mid fails after decoding
        expect[image_id] = (a, status, [f"{a}:{image_id}:", *parts] if status == "error" else [], hw)

    # B: duplicate keys, apart and back to back
    b = shard("b-000000.tar", tar_bytes(sample_members("d1", black) + sample_members("x1", black)
                                        + sample_members("d1", black) + sample_members("d2", black)
                                        + sample_members("d2", black)))
    for image_id in ("d1", "x1", "d2"):
        expect[image_id] = (b, "empty", [], (32, 32))
    for key in ("d1", "d2"):
        expect[f"{key}#2"] = (b, "error", [f"{b}:{key}#2:", f"duplicate key '{key}' in shard {b}"], (0, 0))

    # C: unsafe member names and a link next to a good sample
    c = shard("c-000000.tar", tar_bytes([("../evil.json", _json("ok1")), ("../evil.png", black),
                                         ("/etc/evil.png", black), ("lnk.png", b"", tarfile.SYMTYPE)]
                                        + sample_members("ok1", black)))
    expect["ok1"] = (c, "empty", [], (32, 32))
    expect["../evil"] = (c, "error", [f"{c}:../evil:", "unsafe member name '../evil.png'"], (0, 0))
    expect["/etc/evil"] = (c, "error", [f"{c}:/etc/evil:", "unsafe member name '/etc/evil.png'"], (0, 0))
    expect["lnk"] = (c, "error", [f"{c}:lnk:", "'lnk.png' is a symbolic link"], (0, 0))

    # D: truncated in the middle of t2.png
    full = tar_bytes(sample_members("t1", black) + sample_members("t2", noisy))
    _, at, size = member_offsets(full)["t2.png"]
    d = shard("d-000000.tar", full[: at + size // 2])
    expect["t1"] = (d, "empty", [], (32, 32))
    expect["t2"] = (d, "error", [f"{d}:t2:", "tar truncated", "'t2.png'"], (0, 0))

    # E: truncated 50 bytes into the header of the second sample's first member (name unknown)
    full = tar_bytes(sample_members("u1", black) + sample_members("u2", black))
    at = member_offsets(full)["u2.json"][0]
    e = shard("e-000000.tar", full[: at + 50])
    expect["u1"] = (e, "empty", [], (32, 32))
    expect[f"{e}@{at}"] = (e, "error", [f"{e}:@{at}:", "tar truncated", f"byte {at}"], (0, 0))

    # F: a whole, properly closed tar that holds only the first of the 3 samples its manifest lists
    # (cut between members after ingest: nothing in the tar itself shows the loss)
    f = shard("f-000000.tar", tar_bytes(sample_members("v1", black)))
    keys = ["v1", "v2", "v3"]
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "classes": CLASSES, "seed": 0,
                "shard_size": 3, "counts": {"unlabelled": 3},
                "splits": {"unlabelled": {"n_samples": 3, "has_masks": False, "ids": keys, "shards": [
                    {"path": f"{root.name}/f-000000.tar", "n_samples": 3, "sha256": "0" * 64, "keys": keys}]}}}
    (root.parent / "manifest.json").write_text(json.dumps(manifest))
    expect["v1"] = (f, "empty", [], (32, 32))
    for key in ("v2", "v3"):
        expect[key] = (f, "error", [f"{f}:{key}: listed in the manifest but not in the shard"], (0, 0))

    images_in = len(good) + len(bad_a) + 5 + 4 + 2 + 2 + 3  # samples written or listed, repeats included
    return shards, expect, images_in


@pytest.fixture(scope="module")
def bad_job(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    shards, expect, images_in = build_bad_shards(root / "shards")
    teacher = save_band_unet(root / "teacher.pt")
    cfg = build(LabelSection, {"max_image_pixels": 10_000, "sam": {"batch_size": 8}, "unet_batch_size": 8}, "label")
    summary = run_label_job(shards, root / "table", CLASSES, str(teacher), cfg)
    rows = read_pseudo_labels(root / "table").to_pylist()
    return summary, rows, expect, images_in


def test_job_completes_and_counts_reconcile(bad_job):
    summary, rows, expect, images_in = bad_job
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "ids must be unique"
    assert len(rows) == images_in == len(expect)
    status = [r["status"] for r in rows]
    assert status.count("ok") + status.count("empty") + status.count("error") == len(rows)
    assert {k: summary[k] for k in ("rows", "ok", "empty", "error")} == {
        "rows": len(rows), "ok": status.count("ok"), "empty": status.count("empty"), "error": status.count("error")}
    assert summary["ok"] == 4


def test_job_row_per_input(bad_job):
    _, rows, expect, _ = bad_job
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == set(expect)
    for image_id, (shard, status, parts, hw) in expect.items():
        row = by_id[image_id]
        assert row["shard"] == shard, image_id
        assert row["status"] == status, (image_id, row["message"])
        for part in parts:
            assert part in (row["message"] or ""), (image_id, part, row["message"])
        assert (row["height"], row["width"]) == hw, image_id
        if status == "error":
            assert all(row[f"{c}.kept"] is None for c in CLASSES)
        else:
            assert row[f"{CLASSES[1]}.kept"] == "empty"
            assert row[f"{CLASSES[0]}.kept"] in (("sam", "unet", "dropped") if status == "ok" else ("empty",))
        if status != "error" and not parts:
            assert row["message"] is None, (image_id, row["message"])


def test_job_good_images_have_masks_on_their_own_grid(bad_job):
    _, rows, expect, _ = bad_job
    for row in rows:
        if row["status"] != "ok":
            continue
        masks, _ = decode_class_masks(row, CLASSES)
        assert masks.shape == (2, *expect[row["id"]][3])
        assert not masks[1].any()
        assert row[f"{CLASSES[0]}.box"] is not None and row[f"{CLASSES[0]}.unet_prob"] > 0.5


def test_read_shards_from_s3_with_a_truncated_shard(ray_local, s3_prefix):
    """The reader's Ray path on an object store: rows name the redacted URI; a cut shard completes."""

    full = tar_bytes(sample_members("a", b"A" * 900) + sample_members("b", b"B" * 900))
    _, at, size = member_offsets(full)["b.png"]
    good, cut = storage.join(s3_prefix, "good.tar"), storage.join(s3_prefix, "cut.tar")
    storage.write_bytes(good, full)
    storage.write_bytes(cut, full[: at + size // 2])
    rows = read_shards([good, cut]).take_all()
    got = sorted((r["__url__"], r["__key__"], r["png"], r["__error__"] is None) for r in rows)
    assert got == sorted([(good, "a", b"A" * 900, True), (good, "b", b"B" * 900, True),
                          (cut, "a", b"A" * 900, True), (cut, "b", None, False)])
    err = next(r["__error__"] for r in rows if r["__error__"])
    assert "'b.png'" in err and "truncated" in err
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        read_shards([good, storage.join(s3_prefix, "missing.tar")])


def test_one_failing_image_does_not_cost_its_batch():
    """label_job.per_image: the batch call fails because of image 2; each image is then processed
    alone, 2 is reported with its exception, the others keep their results (label, refine, predict)."""
    from plabel.jobs.label_job import per_image

    calls, errors = [], []

    def process(idx):
        calls.append(list(idx))
        if 2 in idx:
            raise ValueError("image 2 is broken")
        return [10 * i for i in idx]

    out = per_image([0, 2, 5], process, lambda i, e: errors.append((i, str(e))))
    assert out == {0: 0, 5: 50} and errors == [(2, "image 2 is broken")]
    assert calls == [[0, 2, 5], [0], [2], [5]]
    assert per_image([1, 3], process, lambda i, e: errors.append(i)) == {1: 10, 3: 30}  # no failure: one call

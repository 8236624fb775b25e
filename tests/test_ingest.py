"""plabel.data.shards and plabel.data.ingest on small hand-made sources (and jsrt256 when present)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from shared_data import jsrt_path, require

from plabel.data.imageio import decode_mask
from plabel.data.ingest import (
    IngestError,
    ingest,
    load_manifest,
    make_splits,
    scan_source,
    shard_paths,
    write_unlabelled_shards,
)
from plabel.data.shards import (
    ShardError,
    decode_masks,
    encode_masks,
    image_member,
    make_sample,
    sample_key,
    write_shards,
)

JSRT = jsrt_path()
CLASSES = ["lung", "heart"]
H, W = 16, 20


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def make_src(root: Path, n: int = 12, classes=CLASSES, masks: bool = True, dotted: bool = True) -> Path:
    """n gray 16x20 PNGs (id 'img00'.., the last one 'case.7' when dotted), a rectangle mask per class."""
    rng = np.random.default_rng(123)
    (root / "images").mkdir(parents=True)
    ids = [f"img{i:02d}" for i in range(n)]
    if dotted:
        ids[-1] = "case.7"
    for k, image_id in enumerate(ids):
        (root / "images" / f"{image_id}.png").write_bytes(_png(rng.integers(0, 256, (H, W), dtype=np.uint8)))
        if masks:
            for c, cls in enumerate(classes):
                m = np.zeros((H, W), np.uint8)
                m[2 + c : 8 + c + k % 4, 3 : 9 + k % 5 + c] = 255
                d = root / "masks" / cls
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{image_id}.png").write_bytes(_png(m))
    if masks:
        (root / "classes.json").write_text(json.dumps(list(classes)))
    return root


def read_split(out: Path, split: str) -> list[dict]:
    paths = shard_paths(out, split)
    if not paths:
        return []
    return list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))


# ============================================================================================ shards


@pytest.mark.parametrize("width", [1, 7, 8, 9, 13, 20])
def test_masks_roundtrip_odd_widths(width):
    rng = np.random.default_rng(width)
    masks = rng.random((3, 5, width)) > 0.5
    data = encode_masks(masks)
    back = decode_masks(data)
    assert back.dtype == np.bool_ and back.shape == (3, 5, width)
    np.testing.assert_array_equal(back, masks)
    assert encode_masks(masks) == data  # reproducible bytes (fixed zip timestamps)
    with np.load(io.BytesIO(data)) as npz:  # a plain npz
        assert npz["bits"].shape == (3, 5, (width + 7) // 8)
        assert list(npz["shape"]) == [3, 5, width]


def test_decode_masks_rejects_garbage():
    with pytest.raises(ShardError):
        decode_masks(b"nope")


def test_sample_keys_and_make_sample_validation():
    assert sample_key("a.b.c") == "a_b_c"
    for bad in ("a/b", "..", "x..y", "", "__k"):
        with pytest.raises(ShardError):
            make_sample(bad, b"x", "png", {}, None)
    with pytest.raises(ShardError, match="extension"):
        make_sample("k", b"x", "gif", {}, None)
    with pytest.raises(ShardError, match="4x5"):
        make_sample("k", b"x", "png", {"height": 4, "width": 5}, np.zeros((1, 4, 6), bool))
    s = make_sample("k", b"IMG", ".PNG", {"id": "k"}, np.ones((2, 3, 4), bool))
    assert set(s) == {"__key__", "png", "json", "masks.npz"}
    assert json.loads(s["json"]) == {"id": "k"}


def test_image_member():
    assert image_member({"__key__": "k", "tif": b"abc", "json": b"{}"}) == ("tif", b"abc")
    assert image_member({"__key__": "k", ".jpg": bytearray(b"z")}) == ("jpg", b"z")
    with pytest.raises(ShardError, match="no image member"):
        image_member({"__key__": "k", "json": b"{}", "masks.npz": b""})
    with pytest.raises(ShardError, match="several"):
        image_member({"__key__": "k", "png": b"a", "jpg": b"b"})
    with pytest.raises(ShardError, match="raw bytes"):
        image_member({"__key__": "k", "png": np.zeros((4, 4), np.uint8)})


def _samples(n: int):
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        masks = rng.random((2, 9, 11)) > 0.5
        meta = {"id": f"s{i}", "source": f"images/s{i}.png", "height": 9, "width": 11}
        out.append(make_sample(f"s{i}", bytes([i]) * (10 + i), "png", meta, masks if i % 2 == 0 else None))
    return out


def test_write_shards_read_back(tmp_path):
    samples = _samples(5)
    info = write_shards(iter(samples), tmp_path / "a", "train", shard_size=2)
    assert [s["path"] for s in info] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["n_samples"] for s in info] == [2, 2, 1]
    assert [k for s in info for k in s["keys"]] == [f"s{i}" for i in range(5)]
    paths = [str(tmp_path / "a" / s["path"]) for s in info]
    for s, p in zip(info, paths):
        assert hashlib.sha256(Path(p).read_bytes()).hexdigest() == s["sha256"]
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                assert not m.name.startswith("/") and ".." not in m.name and "/" not in m.name
                assert m.mtime == 0 and m.uid == 0 and m.gid == 0
    got = list(wds.WebDataset(paths, shardshuffle=False))
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    for g, s in zip(got, samples):
        assert image_member(g) == ("png", s["png"])
        assert g["json"] == s["json"]
        assert ("masks.npz" in g) == ("masks.npz" in s)
        if "masks.npz" in s:
            np.testing.assert_array_equal(decode_masks(g["masks.npz"]), decode_masks(s["masks.npz"]))
    # deterministic: same samples elsewhere -> byte-identical tars
    info2 = write_shards(_samples(5), tmp_path / "b", "train", shard_size=2)
    assert [s["sha256"] for s in info2] == [s["sha256"] for s in info]
    assert not list((tmp_path / "a").glob(".*"))  # no temp files left


def test_write_shards_refuses_duplicates_and_bad_prefix(tmp_path):
    s = _samples(1)
    with pytest.raises(ShardError, match="duplicate"):
        write_shards(s + s, tmp_path, "x", 4)
    with pytest.raises(ShardError):
        write_shards(s, tmp_path, "../x", 4)
    with pytest.raises(ValueError):
        write_shards(s, tmp_path, "x", 0)
    assert write_shards([], tmp_path / "empty", "x", 4) == []


# ============================================================================================ splits


def test_make_splits_counts_and_determinism():
    ids = [f"id{i:03d}" for i in range(50)]
    counts = {"labelled": 5, "val": 7, "test": 10}
    a = make_splits(ids, counts, seed=0)
    assert {k: len(v) for k, v in a.items()} == {"labelled": 5, "val": 7, "test": 10, "unlabelled": 28}
    assert sorted(sum(a.values(), [])) == ids  # a partition
    assert all(v == sorted(v) for v in a.values())
    assert make_splits(list(reversed(ids)), dict(reversed(list(counts.items()))), seed=0) == a
    assert make_splits(ids, counts, seed=1) != a
    # test and val do not move when only the labelled count changes
    b = make_splits(ids, {**counts, "labelled": 12}, seed=0)
    assert b["test"] == a["test"] and b["val"] == a["val"]
    assert set(a["labelled"]) <= set(b["labelled"])


def test_make_splits_errors():
    ids = [f"i{i}" for i in range(10)]
    with pytest.raises(IngestError, match=r"add up to 11 but only 10"):
        make_splits(ids, {"labelled": 5, "val": 3, "test": 3}, 0)
    with pytest.raises(IngestError, match=">= 0"):
        make_splits(ids, {"labelled": -1}, 0)
    with pytest.raises(IngestError, match="unknown split"):
        make_splits(ids, {"train": 1}, 0)
    with pytest.raises(IngestError, match="duplicate"):
        make_splits(ids + ["i0"], {}, 0)


# ============================================================================================ ingest


COUNTS = {"labelled": 2, "val": 2, "test": 3}


def test_ingest_small_source(tmp_path):
    src = make_src(tmp_path / "src")
    calls = []
    m = ingest(src, tmp_path / "out", COUNTS, seed=3, shard_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (12, 12) and len(calls) == 12
    assert m == load_manifest(tmp_path / "out") == load_manifest(tmp_path / "out" / "manifest.json")
    assert m["format"] == "plabel-shards" and m["version"] == 1
    assert m["classes"] == CLASSES and m["seed"] == 3 and m["shard_size"] == 2 and m["counts"] == COUNTS
    sizes = {k: v["n_samples"] for k, v in m["splits"].items()}
    assert sizes == {"labelled": 2, "val": 2, "test": 3, "unlabelled": 5}
    assert all(v["has_masks"] for v in m["splits"].values())
    assert len(m["splits"]["unlabelled"]["shards"]) == 3
    assert m["splits"]["test"]["shards"][0]["path"] == "test/test-000000.tar"
    all_ids = sorted(i for v in m["splits"].values() for i in v["ids"])
    assert all_ids == sorted(p.stem for p in (src / "images").iterdir())
    # read back every split and compare with the source files
    for split, entry in m["splits"].items():
        got = read_split(tmp_path / "out", split)
        assert [g["__key__"] for g in got] == [sample_key(i) for i in entry["ids"]]
        for g in got:
            meta = json.loads(g["json"])
            assert g["__key__"] == sample_key(meta["id"])
            assert meta["source"] == f"images/{meta['id']}.png"
            assert (meta["height"], meta["width"]) == (H, W)
            ext, data = image_member(g)
            assert ext == "png" and data == (src / meta["source"]).read_bytes()
            masks = decode_masks(g["masks.npz"])
            assert masks.shape == (2, H, W)
            for c, cls in enumerate(CLASSES):
                want = decode_mask((src / "masks" / cls / f"{meta['id']}.png").read_bytes(), "m")
                np.testing.assert_array_equal(masks[c], want)
    dotted = [s for s in m["splits"].values() if "case.7" in s["ids"]][0]
    assert "case_7" in [k for sh in dotted["shards"] for k in sh["keys"]]


def test_ingest_deterministic_rerun_and_seeds(tmp_path):
    src = make_src(tmp_path / "src")
    out = tmp_path / "out"
    m1 = ingest(src, out, COUNTS, seed=0, shard_size=3)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    m2 = ingest(src, out, COUNTS, seed=0, shard_size=3)  # same ingest into same OUT: allowed
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert m1 == m2 and before == after
    m3 = ingest(src, tmp_path / "other", COUNTS, seed=0, shard_size=3)
    assert m3 == m1
    m4 = ingest(src, tmp_path / "seed1", COUNTS, seed=1, shard_size=3)
    assert {k: v["ids"] for k, v in m4["splits"].items()} != {k: v["ids"] for k, v in m1["splits"].items()}
    # a different ingest into a used OUT is refused, and OUT is left untouched
    with pytest.raises(IngestError, match="manifest.json"):
        ingest(src, out, COUNTS, seed=1, shard_size=3)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_ingest_refuses_foreign_non_empty_out(tmp_path):
    src = make_src(tmp_path / "src", n=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(IngestError, match="not empty"):
        ingest(src, out)


def test_write_unlabelled_shards_manifest_and_bytes(tmp_path):
    rng = np.random.default_rng(0)
    grays = [rng.integers(0, 256, (6 + i, 9), dtype=np.uint8) for i in range(5)]
    items = [(f"img{i}", cv2.imencode(".png", g)[1].tobytes(), *g.shape) for i, g in enumerate(grays)]
    items[3] = ("img3", b"not a png", 9, 9)  # stored as given: a soak test's corrupt file
    m = write_unlabelled_shards(iter(items), ["a", "b"], tmp_path / "out", shard_size=2, seed=4)
    assert load_manifest(tmp_path / "out") == m
    assert m["classes"] == ["a", "b"] and m["seed"] == 4 and m["shard_size"] == 2
    u = m["splits"]["unlabelled"]
    assert u["ids"] == [f"img{i}" for i in range(5)] and u["n_samples"] == 5 and not u["has_masks"]
    assert [s["n_samples"] for s in u["shards"]] == [2, 2, 1]
    got = read_split(tmp_path / "out", "unlabelled")
    metas = [json.loads(g["json"]) for g in got]
    assert [m["id"] for m in metas] == u["ids"]
    assert [(m["height"], m["width"]) for m in metas] == [(6, 9), (7, 9), (8, 9), (9, 9), (10, 9)]
    assert image_member(got[3]) == ("png", b"not a png")
    for i in (0, 1, 2, 4):
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(image_member(got[i])[1], np.uint8), 0), grays[i])


def test_ingest_without_masks(tmp_path):
    src = make_src(tmp_path / "src", n=5, masks=False)
    m = ingest(src, tmp_path / "out")
    assert m["classes"] == []
    assert m["splits"]["unlabelled"]["n_samples"] == 5
    assert not m["splits"]["unlabelled"]["has_masks"]
    assert all("masks.npz" not in g for g in read_split(tmp_path / "out", "unlabelled"))
    with pytest.raises(IngestError, match="no masks"):
        ingest(src, tmp_path / "out2", {"labelled": 1})


def test_unmasked_images_go_to_unlabelled(tmp_path):
    src = make_src(tmp_path / "src", n=8)
    for cls in CLASSES:
        (src / "masks" / cls / "img00.png").unlink()
    m = ingest(src, tmp_path / "out", {"labelled": 3, "val": 2, "test": 2}, seed=0)
    assert m["splits"]["unlabelled"]["ids"] == ["img00"]
    assert not m["splits"]["unlabelled"]["has_masks"]
    with pytest.raises(IngestError, match="only 7 of 8"):
        ingest(src, tmp_path / "out2", {"labelled": 8})


def _expect(src, match, tmp_path, counts=COUNTS):
    with pytest.raises(IngestError, match=match) as info:
        ingest(src, tmp_path / "out_err", counts, seed=0)
    assert not (tmp_path / "out_err").exists()  # nothing half-written
    return str(info.value)


def test_error_duplicate_ids(tmp_path):
    src = make_src(tmp_path / "src", n=6)
    shutil.copy(src / "images" / "img01.png", src / "images" / "img01.jpg")
    msg = _expect(src, "duplicate ids", tmp_path)
    assert "img01.png" in msg and "img01.jpg" in msg


def test_error_key_collision(tmp_path):
    src = make_src(tmp_path / "src", n=6)  # has case.7
    shutil.copy(src / "images" / "img01.png", src / "images" / "case_7.png")
    _expect(src, "case_7.png", tmp_path)


def test_error_mask_without_image(tmp_path):
    src = make_src(tmp_path / "src", n=6)
    shutil.copy(src / "masks" / "lung" / "img01.png", src / "masks" / "lung" / "ghost.png")
    _expect(src, r"without an image.*ghost\.png", tmp_path)


def test_error_mask_size_differs(tmp_path):
    src = make_src(tmp_path / "src", n=6)
    (src / "masks" / "heart" / "img02.png").write_bytes(_png(np.zeros((H + 1, W), np.uint8)))
    msg = _expect(src, r"masks/heart/img02\.png", tmp_path, counts={"labelled": 6})
    assert "17x20" in msg and "16x20" in msg


def test_error_unknown_class_dir(tmp_path):
    src = make_src(tmp_path / "src", n=4)
    shutil.copytree(src / "masks" / "lung", src / "masks" / "spleen")
    _expect(src, "spleen", tmp_path)


def test_error_masks_without_classes_json(tmp_path):
    src = make_src(tmp_path / "src", n=4)
    (src / "classes.json").unlink()
    _expect(src, "classes.json", tmp_path)


def test_error_missing_class_mask(tmp_path):
    src = make_src(tmp_path / "src", n=8)
    (src / "masks" / "heart" / "img03.png").unlink()
    msg = _expect(src, "incomplete", tmp_path)
    assert "img03.png" in msg and "heart" in msg


def test_error_undecodable_image_and_mask(tmp_path):
    src = make_src(tmp_path / "src", n=6)
    (src / "images" / "img04.png").write_bytes(b"")
    (src / "images" / "img05.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    msg = _expect(src, "img04.png", tmp_path, counts={})
    assert "img05.png" in msg and "zero-byte" in msg
    src2 = make_src(tmp_path / "src2", n=6)
    (src2 / "masks" / "lung" / "img01.png").write_bytes(b"garbage")
    _expect(src2, r"masks/lung/img01\.png", tmp_path, counts={"labelled": 6})


def test_scan_source_and_manifest_errors(tmp_path):
    src = make_src(tmp_path / "src", n=5)
    idx = scan_source(src)
    assert idx.ids == sorted(idx.ids) and len(idx.ids) == 5 and idx.classes == CLASSES
    assert idx.masks[("heart", "img01")] == src / "masks" / "heart" / "img01.png"
    with pytest.raises(IngestError, match="no images/"):
        scan_source(tmp_path / "nowhere")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(IngestError, match="bad.json"):
        load_manifest(bad)
    bad.write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(IngestError, match="format"):
        load_manifest(bad)
    ingest(src, tmp_path / "out", {"test": 2})
    paths = shard_paths(tmp_path / "out", "test")
    assert len(paths) == 1 and Path(paths[0]).is_absolute() and Path(paths[0]).is_file()
    assert shard_paths(tmp_path / "out", "val") == []
    with pytest.raises(IngestError, match="no split"):
        shard_paths(tmp_path / "out", "train")


def test_ingest_jsrt256(tmp_path):
    require(JSRT, "the JSRT data", "classes.json")
    m = ingest(JSRT, tmp_path / "out", {"labelled": 10, "val": 10, "test": 40}, seed=0)
    classes = json.loads((JSRT / "classes.json").read_text())
    assert m["classes"] == classes
    sizes = {k: v["n_samples"] for k, v in m["splits"].items()}
    assert sizes == {"labelled": 10, "val": 10, "test": 40, "unlabelled": 140}
    assert all(v["has_masks"] for v in m["splits"].values())
    g = read_split(tmp_path / "out", "labelled")[0]
    meta = json.loads(g["json"])
    assert (meta["height"], meta["width"]) == (256, 256)
    assert image_member(g)[1] == (JSRT / "images" / f"{meta['id']}.png").read_bytes()
    masks = decode_masks(g["masks.npz"])
    assert masks.shape == (len(classes), 256, 256)
    for c, cls in enumerate(classes):
        png = cv2.imread(str(JSRT / "masks" / cls / f"{meta['id']}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(masks[c], png > 0)
    assert masks.sum(axis=0).max() >= 2  # classes overlap (multi-label)

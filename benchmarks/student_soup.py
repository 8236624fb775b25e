"""Students of one configuration trained with different seeds: each, their weight average, their ensemble.

    python benchmarks/student_soup.py runs/quality/student/A.json runs/quality/student/B.json [...]

Takes students that benchmarks/quality.py trained (their .json next to their .pt) which share the
split, the teacher and the starting weights (warm-started students differ only in their training
seed, --student-seed-offset), and prints the test Dice (x100, 40 test images, > 0.5 on the 256-px
grid: plabel.method.metrics.dice_of_probs, as quality.py and plabel evaluate) of: the teacher, each
student, the uniform average of the students' weights (one U-Net, a "soup": plabel.training.loop.
average_weights, as plabel's student.soup) and the ensemble (the students' probabilities averaged,
k U-Nets at test time); per class as the difference to the teacher.
Refuses students of different splits, teachers or architectures, and scratch students (their
weights have no common start, so their average is no model).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qualitybench.grid import load_data, run_config  # noqa: E402  (quality.py's data loading)

from plabel.method.labelling import teacher_probs
from plabel.method.metrics import dice_of_probs
from plabel.method.unet import load_checkpoint
from plabel.training.soup import average_weights


def load_group(paths: list[Path]) -> tuple[list[dict], Path]:
    """The students' .json records and their teacher's .json; SystemExit naming the odd one out."""
    metas = []
    for p in paths:
        if not p.exists() or not p.with_suffix(".pt").exists():
            raise SystemExit(f"{p}: no such student (.json and .pt of benchmarks/quality.py)")
        metas.append(json.loads(p.read_text()))
    first = metas[0]["spec"]
    if first.get("init") != "teacher":
        raise SystemExit(f"{paths[0]}: a scratch student; a weight average needs students warm-started from one teacher")
    for p, m in zip(paths[1:], metas[1:]):
        for field in ("teacher", "train_ids", "val_ids", "test_ids", "init", "image_size", "kind", "unet", "sam",
                      "distill"):
            if m["spec"].get(field) != first.get(field):
                raise SystemExit(f"{p}: its {field} differs from {paths[0]}'s")
        if m["spec"].get("gate") != first.get("gate"):  # e.g. calibrated with and without cross_validate
            print(f"note: {p.name} and {paths[0].name} come from different gate calibrations; their pseudo labels "
                  "are the same only if the gates made the same per-class choices (quality.py's report lists them)")
    teachers = list((paths[0].parent.parent / "teacher").glob(f"*-{first['teacher']}.json"))
    if not teachers:
        raise SystemExit(f"{paths[0]}: its teacher ({first['teacher']}) is not in {paths[0].parent.parent / 'teacher'}")
    return metas, teachers[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("students", nargs="+", type=Path, help="student .json files of benchmarks/quality.py")
    ap.add_argument("--data", default=str(run_config().data.source), help="JSRT-layout folder")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)
    if len(args.students) < 2:
        ap.error("give at least two students")
    torch.set_num_threads(args.threads)

    metas, teacher_json = load_group(args.students)
    data = load_data(Path(args.data))
    ids, size = metas[0]["spec"]["test_ids"], metas[0]["spec"]["image_size"]
    truths = [data.truths[i] for i in ids]

    def probs(model):  # on each image's grid, as quality.py and plabel evaluate
        return teacher_probs(model, [data.grays[i] for i in ids], size, names=ids)

    def dice(prob_list):  # test Dice x100 per class
        return 100 * dice_of_probs(prob_list, truths).mean(axis=0)

    ref = dice(probs(load_checkpoint(teacher_json.with_suffix(".pt"))[0]))
    models = [load_checkpoint(p.with_suffix(".pt"))[0] for p in args.students]
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(average_weights([m.state_dict() for m in models]))  # as plabel's student.soup
    soup.eval()
    each = [probs(m) for m in models]
    rows = [("teacher", ref)]
    rows += [(f"student {p.stem} (training seed offset {m['spec'].get('train_seed_offset', 0)})", dice(e))
             for p, m, e in zip(args.students, metas, each)]
    rows += [(f"soup of {len(models)} (weights averaged)", dice(probs(soup))),
             (f"ensemble of {len(models)} (probabilities averaged)", dice([np.mean(z, axis=0) for z in zip(*each)]))]
    print("Test Dice x100; per class: the teacher's, then each model's minus the teacher's.\n")
    print(f"| model | mean | {' | '.join(data.classes)} | worst class vs teacher |")
    print("|---|---|" + "---|" * len(data.classes) + "---|")
    for name, d in rows:
        diff = d - ref
        cells = " | ".join(f"{v:.2f}" if name == "teacher" else f"{v:+.2f}" for v in (d if name == "teacher" else diff))
        worst = "" if name == "teacher" else f"{diff.min():+.2f}"
        print(f"| {name} | {d.mean():.2f} | {cells} | {worst} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

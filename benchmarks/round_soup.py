"""The self-training rounds' students combined: each round alone, the weight average of the last k
rounds (one U-Net) and the ensemble of the last k (k U-Nets at test time), on the test and the
validation images.

    python benchmarks/round_soup.py runs/quality-s8 --n 10 --seeds 0 1 2 [--last 2 3 4] [--intensity minmax]

Reads the rounds that benchmarks/quality.py trained with --rounds R (the default student,
gated_distill from the teacher, one per round: --student-soup 1): round 1's student starts from the
split's teacher, round r's from round r - 1's, so their weights share one lineage and their average
is a model (as in plabel.training.soup, plabel's student.soup, over seeds instead of rounds). The
chain is followed by the keys in each student's .json (round r's spec "teacher" is round r - 1's
key); a missing or ambiguous round is an error naming it.

Prints per split and as the mean over the splits: the test Dice x100 (40 test images, > 0.5 on the
256-px grid: plabel.method.metrics.dice_of_probs, as quality.py and plabel evaluate) of the teacher,
each round, 'best val': the round with the best validation Dice (a rule a user could apply), and
for each k the average and the ensemble of rounds R-k+1..R; with each model's validation Dice and
its worst class against the teacher.
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

from qualitybench.grid import as_read, load_data, run_config  # noqa: E402  (quality.py's data loading)

from plabel.method.labelling import teacher_probs
from plabel.method.metrics import dice_of_probs
from plabel.method.preprocess import INTENSITIES
from plabel.method.unet import load_checkpoint
from plabel.training.soup import average_weights

STUDENT = "gated_distill-initteacher-lite_medsam"  # quality.py's name of the default student (lite_medsam)


def chain(work: Path, n: int, seed: int) -> tuple[dict, list[dict]]:
    """The split's teacher .json and its rounds' student .json records, round 1 first (each with
    'path'). SystemExit naming what is missing or ambiguous."""
    teachers = sorted((work / "teacher").glob(f"n{n}-s{seed}-*.json"))
    if len(teachers) != 1:
        raise SystemExit(f"{work / 'teacher'}: {len(teachers)} teachers for n = {n}, seed {seed} (want exactly one)")
    teacher = {**json.loads(teachers[0].read_text()), "path": teachers[0]}
    rounds, prev = [], teacher["key"]
    for r in range(1, 100):
        tag = "" if r == 1 else f"-r{r}"
        found = [m for p in sorted((work / "student").glob(f"n{n}-s{seed}{tag}-{STUDENT}-*.json"))
                 if (m := {**json.loads(p.read_text()), "path": p})["spec"].get("teacher") == prev
                 and "train_seed_offset" not in m["spec"] and "selection" not in m["spec"]]
        if not found:
            break
        if len(found) > 1:
            raise SystemExit(f"round {r} of n = {n}, seed {seed}: {len(found)} students follow "
                             f"{prev} ({', '.join(m['path'].name for m in found)}); keep one work folder per recipe")
        rounds.append(found[0])
        prev = found[0]["key"]
    if len(rounds) < 2:
        raise SystemExit(f"{work / 'student'}: {len(rounds)} round(s) of n = {n}, seed {seed}; run quality.py with --rounds")
    return teacher, rounds


def evaluate_split(data, work: Path, n: int, seed: int, lasts: list[int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(model name, test Dice x100 per class (C,), validation Dice x100 per class (C,))] for one split."""
    teacher, rounds = chain(work, n, seed)
    spec, size = rounds[0]["spec"], rounds[0]["spec"]["image_size"]
    sets = {"test": spec["test_ids"], "val": spec["val_ids"]}

    def probs(model, which):  # on each image's grid, as quality.py and plabel evaluate
        ids = sets[which]
        return teacher_probs(model, [data.grays[i] for i in ids], size, names=ids)

    def dice(prob_list, which):
        return 100 * dice_of_probs(prob_list, [data.truths[i] for i in sets[which]]).mean(axis=0)

    models = [load_checkpoint(m["path"].with_suffix(".pt"))[0] for m in [teacher, *rounds]]
    out = {w: [probs(m, w) for m in models] for w in sets}
    rows = [("teacher", dice(out["test"][0], "test"), dice(out["val"][0], "val"))]
    rows += [(f"round {r}", dice(out["test"][r], "test"), dice(out["val"][r], "val")) for r in range(1, len(models))]
    best = max(range(1, len(models)), key=lambda r: rows[r][2].mean())
    rows.append((f"best val (round {best})", rows[best][1], rows[best][2]))
    R = len(rounds)
    for k in lasts:
        if not 2 <= k <= R:
            continue
        members = list(range(R - k + 1, R + 1))
        soup = copy.deepcopy(models[R])
        soup.load_state_dict(average_weights([models[r].state_dict() for r in members]))  # as plabel.training.soup
        soup.eval()
        rows.append((f"average of rounds {members[0]}-{R}", dice(probs(soup, "test"), "test"), dice(probs(soup, "val"), "val")))
        rows.append((f"ensemble of rounds {members[0]}-{R}",
                     *(dice([np.mean(z, axis=0) for z in zip(*(out[w][r] for r in members))], w) for w in ("test", "val"))))
    return rows


def table(title: str, classes, rows) -> str:
    ref = rows[0][1]
    lines = [f"\n{title}\n", f"| model | test mean | {' | '.join(classes)} | worst class vs teacher | val mean |",
             "|---|---|" + "---|" * len(classes) + "---|---|"]
    for name, test, val in rows:
        worst = "" if name == "teacher" else f"{(test - ref).min():+.2f}"
        lines.append(f"| {name} | {test.mean():.2f} | " + " | ".join(f"{v:.2f}" for v in test) + f" | {worst} | {val.mean():.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="benchmarks/quality.py's work folder (--out)")
    ap.add_argument("--n", type=int, default=10, help="labelled images of the configuration")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="split seeds; several: also their mean")
    ap.add_argument("--last", type=int, nargs="+", default=[2, 3, 4], help="k: combine the last k rounds")
    ap.add_argument("--data", default=str(run_config().data.source), help="JSRT-layout folder")
    ap.add_argument("--intensity", choices=INTENSITIES, default=run_config().teacher.intensity,
                    help="the gray levels the work folder was run with (quality.py --intensity)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(Path(args.data))
    data = as_read(data, args.intensity)
    per_split = []
    for seed in args.seeds:
        rows = evaluate_split(data, args.work, args.n, seed, args.last)
        per_split.append(rows)
        print(table(f"n = {args.n}, split seed {seed}: Dice x100 (40 test images; val: the 10 validation images)",
                    data.classes, rows), flush=True)
    if len(per_split) > 1:  # 'best val' may pick a different round per split: it keeps that name only
        names = ["best val" if r[0].startswith("best val") else r[0] for r in per_split[0]]
        mean = [(name, *(np.mean([rows[i][j] for rows in per_split], axis=0) for j in (1, 2)))
                for i, name in enumerate(names)]
        print(table(f"n = {args.n}, mean of split seeds {args.seeds} (worst class: of the mean over the splits)",
                    data.classes, mean))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The figure of mean test Dice against n (the paper's Figure 2) from quality.py's result files,
chosen by what each file records (its spec: labelled images, split seed, kind, round, image size,
gray levels, epochs) rather than by quality.py's cache keys, so that models trained before a key
changed still count (the tenth session's min-max rounds and full-supervision models predate the
`intensity` field in the keys; `quality.py --report-only` finds only models of the current keys).

    python benchmarks/dice_vs_n.py runs/quality-minmax --out benchmarks/figures/quality_dice_vs_n.png

Draws the teacher, full supervision, the baselines (post-processing = `cleaned`, `mean_teacher`,
the control `none`) and plabel's `gated_distill` students of round 1 and round --rounds, each started
from its teacher (the recipe: one student, mean selection; soups, seed offsets and guarded students are
left out), with the default epochs; error bars: std over the split seeds present.
Two files for the same model, n, seed and round with different test Dice stop it, naming both.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from qualitybench.report import plot_dice_vs_n

KINDS = ("gated_distill", "cleaned", "mean_teacher", "none")
ROUND = re.compile(r"-r(\d+)-")


def spec_of(path: Path) -> tuple[dict, dict]:
    m = json.loads(path.read_text())
    return m, m["spec"]["train"]


def collect(work: Path, image_size: int, minmax: bool, rounds: int, teacher_epochs: int, student_epochs: int) -> list[dict]:
    """One {"n", "seed", "model", "backend", "init", "mean", "file"} per model and (n, seed)."""
    found: dict = {}

    def add(key, mean, path):
        if key in found and not np.isclose(found[key][0], mean, atol=1e-9):
            raise SystemExit(f"{path} and {found[key][1]} are the same model ({key}) with different test Dice "
                             f"({100 * mean:.2f} against {100 * found[key][0]:.2f})")
        found[key] = (mean, path)

    fulls = {}
    for step in ("teacher", "full", "student"):
        for path in sorted((work / step).glob("*.json")):
            m, train = spec_of(path)
            spec = m["spec"]
            if spec.get("image_size") != image_size or str(spec.get("data", "")).endswith("-minmax") != minmax:
                continue
            mean = float(np.mean(m["test_dice"]))
            if step == "full":
                if train["epochs"] == teacher_epochs:
                    fulls.setdefault(spec["seed"], (mean, path))
                    add(("full", None, "", -1, spec["seed"]), mean, path)
                continue
            n = len(spec["train_ids"])
            if step == "teacher":
                if train["epochs"] == teacher_epochs:
                    add(("teacher", None, "", n, spec["seed"]), mean, path)
                continue
            rnd = int(ROUND.search(path.name).group(1)) if ROUND.search(path.name) else 1
            variant = "soup" in spec or spec.get("train_seed_offset", 0) or spec.get("selection", "mean") != "mean"
            if (spec.get("kind") not in KINDS or spec.get("init") != "teacher" or train["epochs"] != student_epochs
                    or rnd not in (1, rounds) or variant):
                continue
            backend = spec.get("backend") if spec["kind"] == "gated_distill" else None
            add((spec["kind"], backend, "teacher" + (f"#r{rnd}" if rnd > 1 else ""), n, spec["seed"]), mean, path)
    configs = {(k[3], k[4]) for k in found if k[0] == "teacher"}
    rows = [{"n": k[3], "seed": k[4], "model": k[0], "backend": k[1], "init": k[2], "mean": v[0], "file": str(v[1])}
            for k, v in found.items() if k[0] != "full"]
    rows += [{"n": n, "seed": seed, "model": "full", "backend": None, "init": "", "mean": fulls[seed][0],
              "file": str(fulls[seed][1])} for n, seed in sorted(configs) if seed in fulls]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="quality.py's work folder (--out)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--image-size", type=int, default=128, help="U-Net input side of the models drawn")
    ap.add_argument("--intensity", choices=("minmax", "fixed"), default="minmax", help="gray levels of the models drawn")
    ap.add_argument("--rounds", type=int, default=6, help="plabel's last self-training round drawn (beside round 1)")
    ap.add_argument("--teacher-epochs", type=int, default=80, help="epochs of the teachers and full supervision drawn")
    ap.add_argument("--student-epochs", type=int, default=20, help="epochs of the students and baselines drawn")
    args = ap.parse_args(argv)
    rows = collect(args.work, args.image_size, args.intensity == "minmax", args.rounds, args.teacher_epochs,
                   args.student_epochs)
    if not rows:
        raise SystemExit(f"{args.work}: no result files of {args.image_size}-px {args.intensity} models")
    for r in sorted(rows, key=lambda r: (r["n"], r["model"], r["init"], r["seed"])):
        print(f"n {r['n']:>2} seed {r['seed']} {r['model']:13s} {r['init']:11s} {100 * r['mean']:6.2f}  {r['file']}")
    title = f"JSRT: mean test Dice against labelled images ({args.image_size} px, {args.intensity} gray levels)"
    plot_dice_vs_n({"test": rows}, args.out, title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

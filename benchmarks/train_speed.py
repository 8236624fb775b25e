"""U-Net training speed on this CPU (the quality issue: make 256-px training affordable), and whether
a faster setting trains as well.

    python benchmarks/train_speed.py                       # epoch times, every variant, 128 and 256 px
    python benchmarks/train_speed.py --quality --size 256 --epochs 80 --variants fp32 bf16+cl

Data: JSRT (benchmarks/jsrt_n10.yaml's data.source), the n = 10, seed 0 split of benchmarks/quality.py
(plabel.data.ingest.make_splits: 40 test, 10 validation, 10 labelled). Every variant trains the
product's loop (plabel.training.inprocess.fit_unet -> plabel.training.loop.fit) with the config's
teacher section, changed only by the variant:

    fp32       TrainConfig(precision fp32, channels_last False)   the loop before this benchmark
    cl         channels_last activations and weights
    bf16       bf16 autocast of the forward passes (plabel.training.precision)
    bf16+cl    both

Epoch time: the loop's own per-epoch wall time (training steps + validation of the 10 validation
images), median over the epochs after the first. --quality: the test Dice per class of each
variant's teacher after --epochs epochs (same seed, same data), to show that the faster setting
trains as well. Prints markdown tables; all variants run in one process, one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from qualitybench.grid import load_data, run_config  # noqa: E402

from plabel.data.ingest import make_splits  # noqa: E402
from plabel.method.labelling import teacher_probs  # noqa: E402
from plabel.method.metrics import dice_of_probs  # noqa: E402
from plabel.method.preprocess import masks_to_grid, to_unet_input  # noqa: E402
from plabel.training.inprocess import fit_unet  # noqa: E402
from plabel.training.loop import TrainConfig  # noqa: E402
from plabel.training.precision import cpu_has_bf16  # noqa: E402

VARIANTS = {"fp32": dict(precision="fp32", channels_last=False), "cl": dict(precision="fp32", channels_last=True),
            "bf16": dict(precision="bf16", channels_last=False), "bf16+cl": dict(precision="bf16", channels_last=True)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="U-Net input sides")
    ap.add_argument("--size", type=int, help="one side (overrides --sizes)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=4, help="epochs per variant (speed: the first is not timed)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4], help="training batch sizes")
    ap.add_argument("--depths", type=int, nargs="+", default=None,
                    help="U-Net depths (default: the teacher section's); --quality with several: a stronger few-label "
                         "teacher at 256 px (one more level keeps 128 px's receptive field relative to the image)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--quality", action="store_true", help="also the test Dice of each variant's teacher")
    ap.add_argument("--json", type=Path, help="write the measurements here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    sizes = [args.size] if args.size else args.sizes

    cfg_run = run_config()
    data = load_data(cfg_run.data.source)
    sp = make_splits(data.ids, {"test": cfg_run.data.test, "val": cfg_run.data.val, "labelled": 10}, 0)
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, avx512_bf16/amx_bf16: {cpu_has_bf16()}, torch "
          f"{torch.__version__}, {args.threads} threads")
    rows = []
    for S in sizes:
        def arrays(ids):
            return (np.stack([to_unet_input(data.grays[i], S, cfg_run.teacher.intensity) for i in ids]),
                    np.stack([masks_to_grid(data.truths[i], S) for i in ids]))
        x, y = arrays(sp["labelled"])
        vx, vy = arrays(sp["val"])
        for bs, depth, name in [(b, d, v) for b in args.batch_sizes for d in args.depths or [cfg_run.teacher.depth]
                                for v in args.variants]:
            cfg = TrainConfig.from_section(cfg_run.teacher, epochs=args.epochs, batch_size=bs, seed=0, depth=depth,
                                           **VARIANTS[name])
            t0 = time.time()
            res = fit_unet(x, y, cfg, val_images=vx, val_masks=vy)
            wall = time.time() - t0
            secs = [h["seconds"] for h in res.history]
            row = {"size": S, "batch_size": bs, "depth": depth, "variant": name, "epochs": args.epochs,
                   "s_per_epoch": statistics.median(secs[1:] or secs), "first_epoch_s": secs[0],
                   "wall_s": round(wall, 1), "best_val_dice": res.best_val_dice}
            if args.quality:
                probs = [p for k in range(0, len(sp["test"]), 8) for p in
                         teacher_probs(res.model, [data.grays[i] for i in sp["test"][k:k + 8]], S)]
                dice = dice_of_probs(probs, [data.truths[i] for i in sp["test"]])  # (N, C)
                row["test_dice_per_class"] = dict(zip(data.classes, (100 * dice.mean(0)).round(2).tolist()))
                row["test_dice"] = round(float(100 * dice.mean()), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| size | batch | depth | variant | s / epoch | x fp32 |" + (" test Dice |" if args.quality else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.quality else ""))
    for r in rows:
        base = next((b for b in rows if b["size"] == r["size"] and b["batch_size"] == r["batch_size"]
                     and b["depth"] == r["depth"] and b["variant"] == "fp32"), None)
        speed = f"{base['s_per_epoch'] / r['s_per_epoch']:.2f}" if base else "-"
        q = f" {r['test_dice']:.2f} |" if args.quality else ""
        print(f"| {r['size']} | {r['batch_size']} | {r['depth']} | {r['variant']} | {r['s_per_epoch']:.2f} | {speed} |{q}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

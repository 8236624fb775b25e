"""One Ray Train teacher epoch at 256 px: `plabel train` on GPU against the same epochs on CPU.

    python benchmarks/train_epoch.py --devices cuda cpu      # the GPU machine (benchmarks/gpu_speed.sh)
    python benchmarks/train_epoch.py --devices cpu --images 12 --epochs 1 2   # a quick run here

Data: plabel's synthetic radiographs (plabel.data.synthetic; the GPU machine has no JSRT copy) at
--size px, ingested with `plabel ingest` (--images labelled + 4 validation). Each device trains the
product's command, `plabel train --role teacher` (Ray Train, one worker, `--gpu` on cuda), twice: for
the two epoch counts of --epochs. The seconds per epoch are the difference of the two runs' wall
times divided by the difference of their epochs, so Ray's and Ray Train's fixed start-up cost (the
same in both runs) drops out. Prints a markdown table and writes --out/train_epoch.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plabel(*args: str) -> list[str]:
    """The command line of `plabel ARGS` with this interpreter (the GPU machine has no `plabel` script)."""
    return [sys.executable, "-m", "plabel.cli.main", *args]


def train_wall(shards: Path, out: Path, device: str, epochs: int, args) -> float:
    """Wall seconds of one `plabel train` run (a fresh local Ray each time)."""
    cmd = plabel("train", "--shards", str(shards), "--out", str(out), "--role", "teacher", "--epochs", str(epochs),
                 "--image-size", str(args.size), "--batch-size", str(args.batch_size), "--workers", "1",
                 "--gpu" if device == "cuda" else "--no-gpu")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PLABEL_LOG_DIR": str(out.parent / "logs")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run must not touch the GPU
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"plabel train ({device}, {epochs} epochs) failed with exit status {proc.returncode}")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"], choices=("cuda", "cpu"), help="devices to time")
    ap.add_argument("--images", type=int, default=48, help="labelled training images")
    ap.add_argument("--size", type=int, default=256, help="image side and U-Net input size (px)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per training step")
    ap.add_argument("--epochs", type=int, nargs=2, default=[1, 3], metavar=("E1", "E2"),
                    help="the two epoch counts whose wall-time difference gives the time per epoch")
    ap.add_argument("--out", default="/tmp/plabel-train-epoch", help="work and result folder")
    args = ap.parse_args(argv)
    e1, e2 = args.epochs
    if e2 <= e1:
        raise SystemExit(f"--epochs: the second count must exceed the first, got {e1} {e2}")
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from plabel.data.synthetic import make_synthetic_dataset  # local: after argparse, so --help is fast

    src = make_synthetic_dataset(work / "data", n_images=args.images + 4, size=args.size, seed=0)
    shards = work / "shards"
    subprocess.run(plabel("ingest", str(src), str(shards), "--labelled", str(args.images), "--val", "4"),
                   check=True, cwd=str(REPO), capture_output=True)
    result = {"command": " ".join(sys.argv), "size": args.size, "images": args.images, "batch_size": args.batch_size,
              "epochs": [e1, e2], "devices": {}}
    for device in args.devices:
        w1 = train_wall(shards, work / f"{device}-{e1}.pt", device, e1, args)
        w2 = train_wall(shards, work / f"{device}-{e2}.pt", device, e2, args)
        result["devices"][device] = {"wall_s": [round(w1, 2), round(w2, 2)], "s_per_epoch": round((w2 - w1) / (e2 - e1), 2)}
        print(f"[train_epoch] {device}: {e1} epoch(s) {w1:.1f} s, {e2} epochs {w2:.1f} s -> "
              f"{result['devices'][device]['s_per_epoch']} s per epoch", flush=True)
    (work / "train_epoch.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.images} synthetic images at {args.size} px, batch {args.batch_size}, `plabel train` (Ray Train, 1 worker)")
    print("| device | s per epoch | wall of the two runs (s) |")
    print("|---|---|---|")
    for device, r in result["devices"].items():
        print(f"| {device} | {r['s_per_epoch']} | {r['wall_s'][0]} ({e1} ep), {r['wall_s'][1]} ({e2} ep) |")
    if {"cuda", "cpu"} <= set(result["devices"]):
        ratio = result["devices"]["cpu"]["s_per_epoch"] / max(result["devices"]["cuda"]["s_per_epoch"], 1e-9)
        print(f"GPU epoch {ratio:.1f}x faster than CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is bf16 autocast worth it for SAM on this CPU? Speed and mask agreement against float32.

    .venv/bin/python benchmarks/sam_bf16_cpu.py --images 24      # LiteMedSAM on JSRT, one thread

The brief's rule: use bf16 where `lscpu` shows avx512_bf16 *once masks match fp32 (Dice >= 0.99)*.
On --images JSRT radiographs (every 8th image) with prompts from their ground-truth masks
(plabel.method.prompts.extract_prompts), the SAM refinement engine (plabel.method.sam.SamRefiner,
LiteMedSAM's default stages, batches of 8, one torch thread) runs three times after a warm-up pass:
float32; the image encoder under bf16 autocast (decoder float32); encoder and decoder under bf16.
Prints the seconds per image of encoder and decoder and, per class, the mean and worst Dice of the
final masks against float32's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from plabel.method.metrics import dice
from plabel.method.prompts import extract_prompts
from plabel.method.sam import SamRefiner, load_sam

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsrt256"


def run(refiner: SamRefiner, images, prompts, encoder_dtype, decoder_dtype, batch: int = 8):
    """Final masks of every image, and the encoder's and decoder's seconds per image."""
    results, t_enc, t_dec = [], 0.0, 0.0
    for k in range(0, len(images), batch):
        chunk, chunk_prompts = images[k:k + batch], prompts[k:k + batch]
        refiner.autocast_dtype = encoder_dtype
        t = time.perf_counter()
        features = refiner.encode(chunk)
        t_enc += time.perf_counter() - t
        refiner.autocast_dtype = decoder_dtype
        t = time.perf_counter()
        results += [refiner.refine_features(features[j:j + 1], chunk[j].shape, chunk_prompts[j])
                    for j in range(len(chunk))]
        t_dec += time.perf_counter() - t
    return [r.masks for r in results], t_enc / len(images), t_dec / len(images)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="JSRT-layout folder (images/, masks/<class>/, classes.json)")
    ap.add_argument("--images", type=int, default=24, help="images (every 8th of the folder)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the label job's SAM actors use 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    classes = json.loads((root / "classes.json").read_text())
    ids = sorted(p.stem for p in (root / "images").glob("*.png"))[::8][:args.images]
    images = [cv2.imread(str(root / "images" / f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in ids]
    prompts = [extract_prompts(np.stack([cv2.imread(str(root / "masks" / c / f"{i}.png"), cv2.IMREAD_GRAYSCALE) > 127
                                         for c in classes])) for i in ids]
    refiner = SamRefiner(load_sam("lite_medsam", device="cpu"), [["box"], ["box", "mask"]])
    run(refiner, images, prompts, None, None)  # warm-up
    ref, e0, d0 = run(refiner, images, prompts, None, None)
    flags = Path("/proc/cpuinfo").read_text()
    print(f"{len(images)} JSRT images, LiteMedSAM, {args.threads} thread(s); avx512_bf16: {'avx512_bf16' in flags}, "
          f"amx_bf16: {'amx_bf16' in flags}")
    print("| precision | encoder s/img | decoder s/img | " + " | ".join(f"{c} mean / worst Dice" for c in classes) + " |")
    print("|---" * (3 + len(classes)) + "|")
    print(f"| float32 | {e0:.3f} | {d0:.3f} | " + " | ".join("1 / 1" for _ in classes) + " |")
    for name, enc, dec in (("bf16 encoder", torch.bfloat16, None), ("bf16 encoder + decoder", torch.bfloat16, torch.bfloat16)):
        masks, e, d = run(refiner, images, prompts, enc, dec)
        per = np.array([[dice(a[c], b[c]) for c in range(len(classes))] for a, b in zip(ref, masks)])
        print(f"| {name} | {e:.3f} ({e0 / e:.2f}x) | {d:.3f} ({d0 / d:.2f}x) | "
              + " | ".join(f"{per[:, c].mean():.4f} / {per[:, c].min():.4f}" for c in range(len(classes))) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ray Train's cost per checkpoint: the JSRT teacher of benchmarks/jsrt_n10.yaml (10 labelled
images, 80 epochs at 128 px) trained by plabel.jobs.train_job.train_unet, as `plabel run`'s teacher
stage runs it, with a checkpoint after every epoch (`checkpoint_every_s: 0`) and with the default
(`teacher.checkpoint_every_s`), in one process one after the other; then the same loop in process
(plabel.training.inprocess.fit_unet, no Ray). Prints the wall times and the kept epochs.

    .venv/bin/python benchmarks/train_checkpoints.py [runs/<a finished jsrt_n10 run>]

Needs a run directory of benchmarks/jsrt_n10.yaml for its shards (default runs/jsrt-n10).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from plabel.jobs.shard_dataset import read_shards
from plabel.jobs.train_job import labelled_dataset, maybe_materialize, prepare_labelled, train_unet
from plabel.schemas.config import load_run_config
from plabel.training.inprocess import fit_unet
from plabel.training.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def arrays(shards, size, num_classes, intensity):
    """The shards' images float32 (N, S, S) and masks uint8 (N, C, S, S), prepared as the Ray dataset prepares them."""
    batches = [prepare_labelled(b, size, num_classes, intensity) for b in read_shards(shards).iter_batches(batch_size=16, batch_format="numpy")]
    return np.concatenate([b["image"] for b in batches]), np.concatenate([b["masks"] for b in batches])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", type=Path, default=ROOT / "runs" / "jsrt-n10",
                    help="a run folder of `plabel run benchmarks/jsrt_n10.yaml` (its shards/ are read)")
    run = ap.parse_args(argv).run
    if not (run / "shards" / "manifest.json").is_file():
        ap.error(f"{run}: no shards/manifest.json; give the folder of a `plabel run benchmarks/jsrt_n10.yaml` run")
    cfg = load_run_config(ROOT / "benchmarks" / "jsrt_n10.yaml")
    section, classes = cfg.teacher, json.loads((run / "shards" / "manifest.json").read_text())["classes"]
    shards = {s: sorted(str(p) for p in (run / "shards" / s).glob("*.tar")) for s in ("labelled", "val")}
    C, S = len(classes), section.image_size
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    train = maybe_materialize(labelled_dataset(shards["labelled"], C, S, section.intensity), 10, C, S)
    val = maybe_materialize(labelled_dataset(shards["val"], C, S, section.intensity), 10, C, S)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for every_s in (0.0, section.checkpoint_every_s):
            sec = section.model_copy(update={"checkpoint_every_s": every_s})
            r = train_unet(train, val, classes, sec, Path(d) / f"t{every_s}.pt", Path(d) / "ray_train", f"t{every_s}")
            out[f"ray_train_every_{every_s:g}s"] = {k: r[k] for k in ("wall_s", "best_epoch", "best_val_dice")}
            print(out, flush=True)
    ray.shutdown()
    I = section.intensity
    (x, y), (vx, vy) = arrays(shards["labelled"], S, C, I), arrays(shards["val"], S, C, I)
    torch.set_num_threads(2)
    t0 = time.time()
    st = fit_unet(x, y, TrainConfig.from_section(section), val_images=vx, val_masks=vy)
    out["in_process"] = {"wall_s": round(time.time() - t0, 2), "best_epoch": st.best_epoch,
                         "best_val_dice": st.best_val_dice}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

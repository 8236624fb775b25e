"""Soak run of the label job: many synthetic images, random faults, exactly-once accounting.

    python benchmarks/soak.py --images 5000            # the issue's size; see benchmarks/RESULTS.md

What it does:

1. renders ``--images`` synthetic radiograph-like images (plabel.data.synthetic, ``--size`` px), encodes
   them as PNG and writes plabel shards (``--shard-size`` images each) with a manifest, as
   ``plabel ingest`` would, except that a random ``--corrupt`` fraction of the images is replaced by
   corrupt files (a truncated PNG, garbage behind a PNG signature, random bytes);
2. labels them with one label job (plabel.jobs.label_job.run_label_job) on a local Ray, with a
   tiny random U-Net teacher and the ``random_tiny`` SAM backend (random weights: this measures
   the machinery, not pseudo-label quality; LiteMedSAM costs ~3.5 s per image on one CPU core);
3. meanwhile SIGKILLs ``--kills`` actor processes while they run a batch (so a batch in flight is
   always lost): the first kill hits the U-Net actor as soon as it works (the U-Net is fast and
   finishes early), the others are spread over the job (kill i once i/kills of the shards are
   committed) and hit a random one of the busy actors;
4. reads the committed table and prints images in, rows out, duplicates, lost, error rows (every
   corrupt file must give exactly one), the kills and the wall time, as a table and as JSON.

Exit status 0 when rows out == images in, no duplicates, none lost and the error rows are
exactly the corrupt files; 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared /proc helpers
import logging

import cv2
import torch
from procs import cmdline, descendants  # noqa: E402

from plabel.data.ingest import shard_paths, write_unlabelled_shards
from plabel.data.synthetic import SYNTHETIC_CLASSES, render_synthetic
from plabel.data.table_commit import read_pseudo_labels
from plabel.method.unet import UNet, UNetConfig, save_checkpoint
from plabel.schemas.config import LabelSection, build


def actor_pids(stage: str, busy: bool = False) -> list[int]:
    """PIDs of this process's Ray actor processes of a label stage (the local Ray runs under us);
    busy: only those running a batch now (Ray titles them 'ray::MapWorker(...).submit' meanwhile)."""
    want = f"MapWorker(MapBatches({stage})).submit" if busy else f"MapBatches({stage})"
    return [p for p in descendants(os.getpid()) if want in cmdline(p) and "ray::" in cmdline(p)]


def corrupt(png: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["truncated_png", "garbage_after_signature", "random_bytes"])
    if kind == "truncated_png":
        return kind, png[: max(8, len(png) // 3)]
    if kind == "garbage_after_signature":
        return kind, png[:8] + rng.randbytes(len(png))
    return kind, rng.randbytes(max(16, len(png) // 2))


def build_shards(root: Path, n: int, size: int, shard_size: int, corrupt_frac: float, seed: int) -> dict:
    """Shards + manifest.json under root/shards (split 'unlabelled'); returns the corruption log."""

    rng = random.Random(seed)
    bad = set(rng.sample(range(n), int(round(n * corrupt_frac))))
    kinds: dict[str, str] = {}

    def images():
        for i in range(n):
            image_id = f"SOAK{i:06d}"
            image, _ = render_synthetic(i, size=size, seed=seed)
            data = cv2.imencode(".png", image)[1].tobytes()
            if i in bad:
                kinds[image_id], data = corrupt(data, rng)
            yield image_id, data, size, size

    manifest = write_unlabelled_shards(images(), SYNTHETIC_CLASSES, root / "shards", shard_size, seed)
    return {"ids": manifest["splits"]["unlabelled"]["ids"], "corrupt": kinds}


def tiny_teacher(path: Path, classes, size: int) -> None:
    cfg = UNetConfig(num_classes=len(classes), base_channels=4, depth=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNet.from_config(cfg)
    save_checkpoint(path, model, cfg, {"classes": list(classes), "image_size": size, "role": "teacher"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--corrupt", type=float, default=0.01, help="fraction of images replaced by corrupt files")
    ap.add_argument("--kills", type=int, default=4, help="actor processes to SIGKILL during the job")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    ap.add_argument("--batch-size", type=int, default=16, help="U-Net and SAM batch size")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="plabel-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    table_dir = work / "pseudo_labels"
    for stale in (table_dir, work / ".pseudo_labels.inprogress", work / "shards"):
        shutil.rmtree(stale, ignore_errors=True)
    t_all = time.time()
    data = build_shards(work, args.images, args.size, args.shard_size, args.corrupt, args.seed)
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    tiny_teacher(work / "teacher.pt", manifest["classes"], args.size)
    prep_s = time.time() - t_all

    from plabel.jobs.cluster import ensure_ray  # local: Ray only in the process that runs the job
    from plabel.jobs.label_job import run_label_job  # local: Ray only in the process that runs the job

    ensure_ray(num_cpus=args.num_cpus)
    cfg = build(LabelSection, {"sam": {"backend": "random_tiny", "batch_size": args.batch_size},
                               "unet_batch_size": args.batch_size, "cleaning": {"threshold": 0.3}}, "label")
    shards = shard_paths(work / "shards", "unlabelled")
    staging = work / ".pseudo_labels.inprogress"
    outcome: dict = {}
    kills: list[dict] = []
    t0 = time.time()

    def job():
        try:
            outcome["summary"] = run_label_job(shards, table_dir, manifest["classes"], str(work / "teacher.pt"), cfg)
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = repr(e)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    rng = random.Random(args.seed + 1)
    for i in range(args.kills):
        threshold = i * len(shards) / args.kills
        while thread.is_alive() and len(list(staging.glob("part-*.parquet"))) < threshold:
            time.sleep(0.1)
        stages = ("TeacherStage",) if i == 0 else ("TeacherStage", "RefineStage")
        busy: dict[str, list[int]] = {}
        deadline = time.time() + (300 if i == 0 else 60)
        while thread.is_alive() and not busy and time.time() < deadline:
            busy = {s: p for s in stages if (p := actor_pids(s, busy=True))}
            time.sleep(0.02)
        if not thread.is_alive() or not busy:
            break
        stage = rng.choice(sorted(busy))
        pid = rng.choice(busy[stage])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills.append({"at_s": round(time.time() - t0, 1), "actor": stage, "pid": pid,
                      "shards_committed": len(list(staging.glob("part-*.parquet")))})
        print(f"[soak] {kills[-1]['at_s']:7.1f} s  SIGKILL {stage} actor pid {pid} "
              f"({kills[-1]['shards_committed']}/{len(shards)} shards committed)", flush=True)
    thread.join()
    wall = time.time() - t0

    result = {"images_in": args.images, "shards": len(shards), "corrupt_files": len(data["corrupt"]),
              "actor_kills": len(kills), "kills": kills, "label_wall_s": round(wall, 1),
              "prepare_s": round(prep_s, 1)}
    if "error" in outcome:
        result["error"] = outcome["error"]
        ok = False
    else:
        table = read_pseudo_labels(table_dir)
        ids = table.column("id").to_pylist()
        status = dict(zip(ids, table.column("status").to_pylist()))
        errors = {i for i, s in status.items() if s == "error"}
        result.update(
            rows_out=len(ids), duplicates=len(ids) - len(set(ids)), lost=len(set(data["ids"]) - set(ids)),
            unexpected=len(set(ids) - set(data["ids"])), error_rows=sum(1 for s in status.values() if s == "error"),
            corrupt_without_error_row=len(set(data["corrupt"]) - errors),
            error_rows_not_corrupt=len(errors - set(data["corrupt"])),
            images_per_s=round(args.images / wall, 1), summary=outcome["summary"])
        ok = (result["rows_out"] == args.images and result["duplicates"] == 0 and result["lost"] == 0
              and result["unexpected"] == 0 and result["corrupt_without_error_row"] == 0
              and result["error_rows_not_corrupt"] == 0)
    result["ok"] = ok
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"

    rows = [("images in", result["images_in"]), ("rows out", result.get("rows_out")),
            ("duplicates", result.get("duplicates")), ("lost", result.get("lost")),
            ("error rows (corrupt files)", f"{result.get('error_rows')} ({result['corrupt_files']})"),
            ("actor kills", result["actor_kills"]), ("shards", result["shards"]),
            ("wall time (label job)", f"{result['label_wall_s']} s"), ("images / s", result.get("images_per_s")),
            ("exactly once", "yes" if ok else "NO")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

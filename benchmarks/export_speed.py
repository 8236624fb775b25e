"""Throughput of `plabel predict` and `plabel export` (every format) on synthetic DICOM radiographs.

    python benchmarks/export_speed.py --images 1000 --size 256 --out runs/export_speed

1. N synthetic radiograph-like images (plabel.data.synthetic, 5 overlapping classes) are written as
   DX DICOM files (so that every format, DICOM SEG included, can be exported) and ingested (untimed).
2. predict: run_predict_job over the shards with a randomly initialised U-Net of the default
   student size (base 16, depth 4) at --size: the U-Net's cost does not depend on its weights.
3. export: a prediction table holding the synthetic ground-truth masks (one Parquet part per shard,
   as the job writes them) is exported in each format by run_export (one Ray Data task per part).

Each figure is images / wall time of the whole call (Ray Data start-up included), in one process with
a local Ray of --num-cpus logical CPUs. Results: stdout and --out/export_speed.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from plabel.data.ingest import ingest, shard_paths
from plabel.data.shard_reader import read_shard_file
from plabel.data.shards import decode_masks
from plabel.data.synthetic import SYNTHETIC_CLASSES, render_synthetic
from plabel.jobs.cluster import ensure_ray
from plabel.jobs.export_job import run_export
from plabel.jobs.predict_job import run_predict_job
from plabel.method.prediction import mask_confidence, prediction_row
from plabel.method.unet import UNet, UNetConfig, save_checkpoint
from plabel.schemas.tables import prediction_schema

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def write_dx(path: Path, image: np.ndarray, study: str) -> None:
    """uint8 (H, W) -> a DX DICOM file with the attributes a SEG needs to reference it."""
    meta = FileMetaDataset()
    sop = generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = DX, sop, ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX, sop, "DX"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Bench", "SYN", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyID, ds.AccessionNumber = study, generate_uid(), "1", "A1"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.Manufacturer = "20260101", "120000", "", "plabel"
    ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation, ds.ImagerPixelSpacing = 1, 1, ["L", "F"], [0.7, 0.7]
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = image.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_source(root: Path, n: int, size: int) -> Path:
    src = root / "src"
    (src / "images").mkdir(parents=True)
    for c in SYNTHETIC_CLASSES:
        (src / "masks" / c).mkdir(parents=True)
    study = generate_uid()
    import cv2

    for i in range(n):
        image, masks = render_synthetic(i, size=size, seed=0)
        write_dx(src / "images" / f"SYN{i:05d}.dcm", image, study)
        for c, m in zip(SYNTHETIC_CLASSES, masks):
            cv2.imwrite(str(src / "masks" / c / f"SYN{i:05d}.png"), m.astype(np.uint8) * 255)
    (src / "classes.json").write_text(json.dumps(SYNTHETIC_CLASSES))
    return src


def truth_table(shards: list[str], out: Path) -> None:
    """A prediction table of the ground-truth masks, one part per shard."""
    out.mkdir(parents=True)
    schema = prediction_schema(SYNTHETIC_CLASSES)
    for k, shard in enumerate(shards):
        rows = []
        for s in read_shard_file(shard):
            m = decode_masks(s["masks.npz"])
            meta = json.loads(s["json"])
            image = {"id": meta["id"], "shard": shard, "key": s["__key__"], "height": m.shape[1], "width": m.shape[2],
                     "message": None, "unet_checkpoint_sha256": "ground-truth"}
            rows.append(prediction_row(image, m, mask_confidence(m.astype(np.float32), m), SYNTHETIC_CLASSES))
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / f"part-{k:06d}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="synthetic images")
    ap.add_argument("--size", type=int, default=256, help="image side and U-Net input size")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    ap.add_argument("--out", type=Path, default=Path("runs/export_speed"))
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    t = time.time()
    src = make_source(args.out, args.images, args.size)
    ingest(src, args.out / "shards", shard_size=64)
    shards = shard_paths(args.out / "shards", "unlabelled")
    print(f"data: {args.images} DICOM images {args.size}x{args.size}, {len(shards)} shards ({time.time() - t:.1f} s)")

    ensure_ray(None, args.num_cpus)
    results = {"images": args.images, "size": args.size, "num_cpus": args.num_cpus, "machine": platform.processor()
               or platform.machine(), "cpu": _cpu(), "rows": {}}
    cfg = UNetConfig(in_channels=1, num_classes=len(SYNTHETIC_CLASSES), base_channels=16, depth=4)
    save_checkpoint(args.out / "unet.pt", UNet(**vars(cfg)), cfg, {"classes": SYNTHETIC_CLASSES, "image_size": args.size})
    t = time.time()
    got = run_predict_job(shards, str(args.out / "predictions"), SYNTHETIC_CLASSES, str(args.out / "unet.pt"))
    wall = time.time() - t
    results["rows"]["predict"] = {"wall_s": round(wall, 2), "images_per_s": round(got["rows"] / wall, 2)}
    truth_table(shards, args.out / "truth")
    for fmt in ("png", "coco", "nnunet", "dicom-seg"):
        t = time.time()
        s = run_export(str(args.out / "truth"), str(args.out / f"export-{fmt}"), fmt)
        wall = time.time() - t
        results["rows"][f"export {fmt}"] = {"wall_s": round(wall, 2), "images_per_s": round(s["images"] / wall, 2),
                                            "images": s["images"], "masks": s["masks"]}
    print(f"{'step':<18} {'wall s':>8} {'images/s':>9}")
    for k, v in results["rows"].items():
        print(f"{k:<18} {v['wall_s']:8.2f} {v['images_per_s']:9.2f}")
    (args.out / "export_speed.json").write_text(json.dumps(results, indent=1) + "\n")


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return name + (" (avx512_bf16)" if "avx512_bf16" in out else "")


if __name__ == "__main__":
    main()

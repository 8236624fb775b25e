"""plabel: distributed batch pseudo-labelling for medical image segmentation (SAM Carries the Burden).

The public Python API (everything else is internal and may move):

    plabel.run(config)                      `plabel run`: every stage from a YAML config (path) or RunConfig
    plabel.load_run_config(path)            read and validate a run config (plabel.schemas.config)
    plabel.label(shards, out, teacher, ...) the Ray Data label job: a pseudo-label table from shards
    plabel.load_checkpoint(path)            a U-Net checkpoint -> (model, UNetConfig, metadata)
    plabel.read_pseudo_labels(table)        a finished pseudo-label table -> pyarrow.Table
    plabel.table_classes(table)             its class names, in mask order
    plabel.pseudo_label_masks(row, classes) one row's kept masks bool (C, H, W) and class weights float32 (C,)

Rooms of the package (one concern each; only plabel.jobs imports Ray):
    plabel.method    the paper's method as plain numpy/torch functions (U-Net, losses, cleaning,
                     prompts, SAM refinement, the gate, calibration, metrics (Dice, HD95),
                     per-image labelling, prediction)
    plabel.data      images, ingest, WebDataset shards, storage (local / s3 / gs), the table on disk,
                     exports (data/export: png, nnU-Net, COCO, DICOM SEG)
    plabel.training  the one training loop, epoch selection, weight soups
    plabel.report    the run's report.html (Ray-free: reads a run directory)
    plabel.jobs      Ray: cluster, Ray Data jobs (label, predict, export, evaluate), Ray Train, submit,
                     the run's stages
    plabel.schemas   config, table schema and mask codec (depends on nothing else in plabel)
    plabel.cli       the `plabel` command

Names resolve on first use, so `import plabel` (and the CLI's --help) stays free of torch and Ray.
"""
from __future__ import annotations

import importlib
from importlib import metadata

try:
    __version__ = metadata.version("plabel")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

_API = {
    "run": ("plabel.api", "run"),
    "label": ("plabel.api", "label"),
    "load_run_config": ("plabel.schemas.config", "load_run_config"),
    "load_checkpoint": ("plabel.method.unet", "load_checkpoint"),
    "read_pseudo_labels": ("plabel.data.table_commit", "read_pseudo_labels"),
    "table_classes": ("plabel.api", "table_classes"),
    "pseudo_label_masks": ("plabel.schemas.tables", "decode_class_masks"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'plabel' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))

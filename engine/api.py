"""The functions behind `import plabel` that are more than a re-export (see plabel/__init__.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa

from plabel.schemas import tables
from plabel.schemas.config import LabelSection, RunConfig, load_run_config


def run(config: str | Path | RunConfig, echo=print) -> dict:
    """`plabel run`: every stage from a YAML run config (path) or a RunConfig; returns results.json's content."""
    from plabel.jobs.runner import run_pipeline  # local: `import plabel` stays free of torch and Ray

    cfg = config if isinstance(config, RunConfig) else load_run_config(config)
    return run_pipeline(cfg, echo=echo)


def label(shards: Sequence[str], out: str, teacher: str, label_cfg: LabelSection | None = None,
          classes: Sequence[str] | None = None, address: str | None = None) -> dict:
    """Pseudo-label ``shards`` (WebDataset tar paths or URIs) with the U-Net checkpoint ``teacher``
    into the Parquet table ``out`` (the Ray Data label job; a local Ray is started unless
    ``address``). label_cfg: the label section (default LabelSection(): LiteMedSAM, the default gate);
    classes: default the teacher checkpoint's. Returns the job's counts {rows, ok, empty, error, ...}."""
    from plabel.jobs.cluster import ensure_ray  # local: `import plabel` stays free of torch and Ray
    from plabel.jobs.label_job import run_label_job  # local: `import plabel` stays free of torch and Ray
    from plabel.method.unet import load_checkpoint  # local: `import plabel` stays free of torch and Ray

    if classes is None:
        classes = load_checkpoint(teacher)[2].get("classes")
        if not classes:
            raise ValueError(f"{teacher}: the checkpoint names no classes; pass classes=")
    ensure_ray(address)
    return run_label_job(list(shards), out, list(classes), teacher, label_cfg or LabelSection())


def table_classes(table: pa.Table | pa.Schema) -> list[str]:
    """The class names of a pseudo-label table (or its schema), in the order of its masks."""
    return tables.table_classes(table.schema if isinstance(table, pa.Table) else table)

"""The config of `plabel demo`: small enough for 2 CPU cores in a few minutes."""
from __future__ import annotations

from pathlib import Path

from plabel.schemas.config import RunConfig, build


def demo_config(source: Path, directory: Path, n_images: int = 40, size: int = 256) -> RunConfig:
    """Splits ~15% labelled, 10% validation, 25% test, the rest unlabelled; small U-Nets at
    min(size, 128) px. With `plabel demo`'s 256-px images the teacher's masks are upsampled from 128 px
    and LiteMedSAM (256 px input) sharpens them: on the demo's seed the gate keeps SAM for two classes
    and the student gains on all four (benchmarks/RESULTS.md, demo)."""
    labelled = max(2, round(0.15 * n_images))
    val = max(1, round(0.10 * n_images))
    test = max(1, round(0.25 * n_images))
    train = {"image_size": min(size, 128), "base_channels": 16, "depth": 4, "batch_size": 4, "lr": 2e-3}
    return build(RunConfig, {
        "name": "demo",
        "run_dir": str(Path(directory).resolve() / "runs"),
        "data": {"source": str(Path(source).resolve()), "labelled": labelled, "val": val, "test": test,
                 "shard_size": 16},
        "teacher": {**train, "epochs": 40},
        # one round (plabel's default, pinned): the demo shows the machinery in minutes
        "student": {**train, "epochs": 20, "rounds": 1},
        "label": {"sam": {"backend": "lite_medsam", "batch_size": 8}},
    })

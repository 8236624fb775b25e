"""Fixtures of the fault tests: one small dataset and tiny random teacher for the session, and the
table an uninterrupted label job makes of it (the reference every faulted run must reproduce)."""
from __future__ import annotations

import pytest

import faultkit

N_IMAGES, SHARD_SIZE, LABELLED = 82, 4, 2  # 80 unlabelled images in 20 shards


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory):
    """(root, manifest): root/shards (ingested), root/teacher.pt (tiny random U-Net, 64 px)."""
    root = tmp_path_factory.mktemp("faults")
    manifest = faultkit.make_dataset(root, N_IMAGES, SHARD_SIZE, labelled=LABELLED)
    return root, manifest


@pytest.fixture(scope="session")
def reference_table(fault_data, ray_local, tmp_path_factory):
    """The table of an uninterrupted in-process label job (random_tiny SAM) on fault_data."""
    from plabel.data.ingest import shard_paths
    from plabel.jobs.label_job import run_label_job
    from plabel.data.table_commit import read_pseudo_labels

    root, manifest = fault_data
    out = tmp_path_factory.mktemp("reference") / "table"
    summary = run_label_job(shard_paths(root / "shards", "unlabelled"), out, manifest["classes"],
                            str(root / "teacher.pt"), faultkit.label_section())
    assert summary["rows"] == manifest["splits"]["unlabelled"]["n_samples"] and summary["shards_skipped"] == 0
    return read_pseudo_labels(out)

"""A worker node removed mid-job from a simulated cluster (ray.cluster_utils.Cluster, in a
subprocess with its own Ray): the node ran the SAM actor; the job completes with every input image
exactly once, and the table equals an uninterrupted run's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faultkit

from plabel.data.table_commit import read_pseudo_labels


def test_worker_node_removed_mid_job(fault_data, reference_table, tmp_path):
    root, manifest = fault_data
    out = tmp_path / "table"
    env, run_id = faultkit.private_env()
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # several nodes need Ray's cluster mode
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).parent / "node_loss_job.py"), str(root), str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        faultkit.kill_run(None, run_id)  # whatever of that Ray is still running
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print(result)
    assert "error" not in result, result
    assert 0 < result["parts_at_removal"] < result["shards"]
    assert result["alive_nodes"] == 2  # the head and the worker that stayed
    assert result["rows"] == result["unique_ids"] == manifest["splits"]["unlabelled"]["n_samples"] and not result["lost"]
    table = read_pseudo_labels(out)
    faultkit.assert_exactly_once(table, manifest["splits"]["unlabelled"]["ids"])
    faultkit.assert_same_rows(table, reference_table)

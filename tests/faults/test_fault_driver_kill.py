"""The driver of `plabel label` SIGKILLed mid-job (its whole process group and the local Ray it
started): nothing partial is visible as the table; the same command run again skips the shards
that were committed and yields the same table as an uninterrupted run."""
from __future__ import annotations

import json
import subprocess
import time

import faultkit
import pyarrow.parquet as pq
import pytest

from plabel.data.table_commit import read_pseudo_labels


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def test_driver_killed_then_rerun_resumes(fault_data, reference_table, tmp_path):
    root, manifest = fault_data
    out = tmp_path / "table"
    cmd = faultkit.plabel("label", "--shards", str(root / "shards"), "--teacher", str(root / "teacher.pt"),
                          "--out", str(out), *faultkit.LABEL_ARGS, "--num-cpus", "4")
    n_shards = len(manifest["splits"]["unlabelled"]["shards"])
    env, run_id = faultkit.private_env()
    t0 = time.time()
    proc = faultkit.start(cmd, env, tmp_path / "first.log")
    try:
        faultkit.wait_for(lambda: faultkit.staged_parts(out) or proc.poll() is not None, timeout=300,
                          interval=0.02, what="the first committed shard")
        assert proc.poll() is None, "the job finished before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:]
    finally:
        killed = faultkit.kill_run(proc, run_id)
    parts = faultkit.staged_parts(out)
    print(f"killed {len(killed)} processes at {time.time() - t0:.1f} s, {len(parts)}/{n_shards} shards committed")
    assert 0 < len(parts) < n_shards
    assert not faultkit.marked_pids(run_id)

    # nothing partial is visible: no table at `out`, every committed part is whole
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        read_pseudo_labels(out)
    for p in parts:
        assert pq.read_table(p).num_rows == 4

    env, run_id = faultkit.private_env()
    try:
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    finally:
        faultkit.kill_run(None, run_id)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = _summary(rerun.stdout)
    print(f"rerun done at {time.time() - t0:.1f} s: {summary}")
    assert f"skipped {len(parts)} of {n_shards} shard(s)" in rerun.stdout
    assert summary["shards"] == n_shards and summary["shards_skipped"] == len(parts)
    table = read_pseudo_labels(out)
    faultkit.assert_exactly_once(table, manifest["splits"]["unlabelled"]["ids"])
    faultkit.assert_same_rows(table, reference_table)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["_plabel_complete.json", "_plabel_job.json"] + [f"part-unlabelled-{i:06d}.parquet" for i in range(n_shards)])
    assert not faultkit.staged_parts(out)  # the staging folder became the table

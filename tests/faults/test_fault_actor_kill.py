"""A U-Net (TeacherStage) and a SAM (RefineStage) actor process SIGKILLed mid-job, each while it
runs a batch: Ray Data restarts the actors and re-runs their lost tasks; the job completes with
every input image exactly once, and the table equals an uninterrupted run's."""
from __future__ import annotations

import os
import signal
import threading
import time

import faultkit

from plabel.data.ingest import shard_paths
from plabel.data.table_commit import read_pseudo_labels
from plabel.jobs.label_job import run_label_job


def test_actors_killed_mid_job(fault_data, reference_table, ray_local, tmp_path):
    root, manifest = fault_data
    shards = shard_paths(root / "shards", "unlabelled")
    out = tmp_path / "table"
    outcome: dict = {}

    def job():
        try:
            outcome["summary"] = run_label_job(shards, out, manifest["classes"], str(root / "teacher.pt"),
                                               faultkit.label_section())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            outcome["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    t0 = time.time()
    thread.start()
    me = os.getpid()  # the session's Ray (ray_local) runs under this process: its actors are our descendants
    kills = []

    def kill_when_busy(stage: str, also=lambda: True):
        """SIGKILL the stage's actor while it runs a batch (and `also()` holds)."""
        def busy():
            if not thread.is_alive():
                return "finished"
            return (also() and faultkit.actor_pids(f"MapBatches({stage})", under=me, busy=True)) or None

        pids = faultkit.wait_for(busy, timeout=300, interval=0.02, what=f"a busy {stage} actor")
        assert pids != "finished", f"the job ended before its {stage} actor could be killed: {outcome} {kills}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        kills.append((stage, pids, round(time.time() - t0, 1), len(faultkit.staged_parts(out))))

    kill_when_busy("TeacherStage")  # U-Net: while the SAM actor still starts, before any shard is done
    kill_when_busy("RefineStage", also=lambda: bool(faultkit.staged_parts(out)))  # SAM: mid-way, shards committed
    assert kills[-1][3] < len(shards)

    thread.join(timeout=400)
    assert not thread.is_alive(), "the job did not finish after its actors were killed"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    print(f"kills (stage, pids, at s, shards committed): {kills}; job done in {time.time() - t0:.1f} s; {summary}")

    ids_in = manifest["splits"]["unlabelled"]["ids"]
    table = read_pseudo_labels(out)
    faultkit.assert_exactly_once(table, ids_in)
    assert summary["rows"] == len(ids_in) and summary["error"] == 0
    faultkit.assert_same_rows(table, reference_table)

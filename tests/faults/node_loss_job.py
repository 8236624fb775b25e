"""Run by test_fault_node_loss.py in its own process (with its own Ray): a label job on a
simulated three-node cluster (ray.cluster_utils.Cluster: a head without CPUs and two worker nodes)
that loses the worker node running the SAM actor mid-job.

    python node_loss_job.py DATA_ROOT OUT_DIR    -> prints one JSON line (RESULT {...}) at the end

The UDFs (decode_images, TeacherStage, RefineStage) come from the installed plabel package.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import faultkit  # noqa: E402

WORKER_CPUS = 3  # one node must fit both actors (1 CPU each) plus a read and a decode task


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def main(root: Path, out: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from plabel.data.ingest import load_manifest, shard_paths
    from plabel.jobs.cluster import quiet_ray_data
    from plabel.jobs.label_job import run_label_job
    from plabel.data.table_commit import read_pseudo_labels

    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    quiet_ray_data()
    started = time.time() - t0
    manifest = load_manifest(root / "shards")
    shards = shard_paths(root / "shards", "unlabelled")
    outcome: dict = {}

    def job():
        try:
            outcome["summary"] = run_label_job(shards, out, manifest["classes"], str(root / "teacher.pt"),
                                               faultkit.label_section())
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = repr(e)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()

    def victim():
        if not thread.is_alive():
            return "finished"
        if not faultkit.staged_parts(out):
            return None
        for node in workers:
            pids = faultkit.actor_pids("MapBatches(RefineStage)", under=_raylet_pid(node))
            if pids:
                return node, pids
        return None

    found = faultkit.wait_for(victim, timeout=300, what="a committed shard and the SAM actor's node")
    result = {"cluster_start_s": round(started, 1), "shards": len(shards)}
    if found == "finished":
        result["error"] = "the job finished before a node could be removed"
        return result
    node, pids = found
    result.update(parts_at_removal=len(faultkit.staged_parts(out)), removed_at_s=round(time.time() - t0, 1),
                  sam_actor_pids_on_removed_node=pids)
    cluster.remove_node(node, allow_graceful=False)  # raylet, workers, actors of that node: all gone
    thread.join(timeout=400)
    result["job_s"] = round(time.time() - t0, 1)
    if thread.is_alive():
        result["error"] = "the job did not finish after the node was removed"
        return result
    result.update(outcome)
    if "summary" in outcome:
        table = read_pseudo_labels(out)
        ids = table.column("id").to_pylist()
        result.update(rows=len(ids), unique_ids=len(set(ids)),
                      lost=sorted(set(manifest["splits"]["unlabelled"]["ids"]) - set(ids)),
                      alive_nodes=len([n for n in ray.nodes() if n["Alive"]]))
    return result


if __name__ == "__main__":
    import os

    res = main(Path(sys.argv[1]), Path(sys.argv[2]))
    print("RESULT " + json.dumps(res, default=str), flush=True)
    sys.stderr.flush()
    # no interpreter teardown: Ray's exit hooks on a cluster that lost a node may fail; the test
    # stops this run's processes by their environment marker
    os._exit(0)

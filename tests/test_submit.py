"""`plabel submit` against a real two-node Ray cluster started with `ray start` on 127.0.0.1.

The worker node advertises a fake GPU and a custom resource; the demo config is submitted through
the Jobs API and the SAM actors must have run on that node (CPU torch, since the GPU is fake).
"""
import json

import pyarrow.dataset as pads
import pytest
import yaml
from local_cluster import LocalRayCluster, marked_pids
from ray.util.state import list_actors
from typer.testing import CliRunner

from plabel.cli.main import app
from plabel.data.demo import demo_config
from plabel.data.synthetic import make_synthetic_dataset
from plabel.jobs.submit import entrypoint, job_config, jobs_api_address, remote_locations
from plabel.schemas.config import RunConfig, build, load_run_config


def test_jobs_api_address_forms(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs_api_address("http://head:8265") == "http://head:8265"
    assert jobs_api_address("head:8265") == "http://head:8265"
    with pytest.raises(ValueError, match="ray://head:10001"):
        jobs_api_address("ray://head:10001")
    with pytest.raises(ValueError, match="RAY_API_SERVER_ADDRESS"):
        jobs_api_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # not a Jobs API URL: ignored
    with pytest.raises(ValueError):
        jobs_api_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.5:8265")
    assert jobs_api_address(None) == "http://10.0.0.5:8265"


def test_job_config_is_absolute_and_joins_the_cluster(tmp_path):
    (tmp_path / "c.yaml").write_text("name: r\nrun_dir: out\ndata: {shards: shards}\nray: {num_cpus: 2}\n")
    cfg = load_run_config(tmp_path / "c.yaml")
    data = job_config(cfg)
    assert data["ray"]["address"] == "auto" and data["ray"]["num_cpus"] == 2
    assert data["run_dir"] == str((tmp_path / "out").resolve())
    assert data["data"]["shards"] == str((tmp_path / "shards").resolve())
    assert build(RunConfig, data).to_dict() == data  # the job's config round-trips unchanged
    assert remote_locations(cfg) == {"data.shards": data["data"]["shards"], "run_dir": data["run_dir"]}
    assert entrypoint() == "plabel run plabel.yaml --address auto"


def test_submit_bad_config_names_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("name: r\nlabel: {sam: {device: tpu}}\n")
    result = CliRunner().invoke(app, ["submit", str(tmp_path / "c.yaml"), "--address", "http://127.0.0.1:9"])
    assert result.exit_code != 0
    assert "label.sam.device" in result.output and "tpu" in result.output


def test_submit_unreachable_address_is_a_clear_error(tmp_path):
    (tmp_path / "c.yaml").write_text("name: r\n")
    port = __import__("local_cluster").free_port()  # nothing listens there
    result = CliRunner().invoke(app, ["submit", str(tmp_path / "c.yaml"), "--address", f"127.0.0.1:{port}"])
    assert result.exit_code != 0
    assert f"127.0.0.1:{port}" in result.output


@pytest.fixture(scope="module")
def two_node_cluster():
    cluster = LocalRayCluster(head_cpus=3, worker_cpus=2, worker_gpus=1, worker_resources={"sam_node": 1})
    with cluster:
        yield cluster
    assert marked_pids(cluster.marker) == []
    assert len(cluster.stopped) >= 4  # GCS, raylets, agents, dashboard: all found
    assert cluster.leftovers() == []  # agents included (found by RAY_RAYLET_PID)


def test_submit_runs_the_demo_with_sam_on_the_gpu_node(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    nodes = cluster.nodes()
    gpu_nodes = [n["node_id"] for n in nodes if n["resources_total"].get("GPU", 0) >= 1]
    assert len(nodes) == 2 and len(gpu_nodes) == 1
    assert all(n["node_ip"] == cluster.ip for n in nodes)  # loopback
    [sam_node] = [n for n in nodes if n["resources_total"].get("sam_node") == 1]
    assert sam_node["node_id"] == gpu_nodes[0]

    src = make_synthetic_dataset(tmp_path / "data", n_images=16, size=64, seed=3)
    cfg = demo_config(src, tmp_path, n_images=16, size=64).to_dict()
    cfg["teacher"].update(epochs=2, depth=3, base_channels=8)
    cfg["student"].update(epochs=1, depth=3, base_channels=8, soup=1, rounds=1)  # one student, one round: soups and rounds are test_pipeline's
    # random_tiny: this test is about where the job's actors run, not about SAM's masks (LiteMedSAM's
    # are test_pipeline's); likewise no calibration and no test split, both tested there
    cfg["label"]["sam"].update(backend="random_tiny", batch_size=4, memory_gb=0.25)
    cfg["label"]["gate"] = {"calibrate": False}
    cfg["data"].update(test=0)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg))

    result = CliRunner().invoke(app, ["submit", str(tmp_path / "demo.yaml"), "--address", cluster.dashboard_url,
                                      "--job-id", "plabel-demo-test"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "job plabel-demo-test: SUCCEEDED" in result.output
    assert "submitted plabel-demo-test" in result.output

    run = tmp_path / "runs" / "demo"
    results = json.loads((run / "results.json").read_text())
    assert set(results["stages"]) >= {"ingest", "teacher", "label", "student"}
    label = results["stages"]["label"]
    unlabelled = results["stages"]["ingest"]["counts"]["unlabelled"]
    assert label["rows"] == unlabelled > 0 and label["sam_on_gpu"] is True
    table = pads.dataset(str(run / "pseudo_labels"), format="parquet").to_table(columns=["id", "status"])
    assert table.num_rows == unlabelled and len(set(table.column("id").to_pylist())) == unlabelled

    actors = list_actors(address=cluster.dashboard_url, detail=True, limit=10_000)
    refine = [a for a in actors if "RefineStage" in a.class_name]
    teacher = [a for a in actors if "TeacherStage" in a.class_name]
    assert refine and teacher
    assert {a.node_id for a in refine} == {gpu_nodes[0]}  # SAM actors asked for the (fake) GPU
    assert all(a.required_resources.get("GPU") == 1.0 for a in refine)
    assert all(a.required_resources.get("memory") == 0.25 * 2**30 for a in refine)  # label.sam.memory_gb, bytes
    assert all("memory" not in a.required_resources for a in teacher)


def test_submit_reports_a_failed_run(two_node_cluster, tmp_path):
    missing = tmp_path / "no-such-shards"
    (tmp_path / "bad.yaml").write_text(f"name: bad\nrun_dir: {tmp_path / 'runs'}\ndata: {{shards: {missing}}}\n")
    result = CliRunner().invoke(app, ["submit", str(tmp_path / "bad.yaml"), "--address",
                                      two_node_cluster.dashboard_url], catch_exceptions=False)
    assert result.exit_code == 1
    assert "FAILED" in result.output
    assert str(missing) in result.output  # the driver's error, streamed back, names the input


def test_a_cluster_with_token_auth_refuses_a_submit_without_the_token(tmp_path, monkeypatch):
    """A head started with RAY_AUTH_MODE=token: `plabel submit` without the token and with a wrong
    one ends in one error line (exit 2), with it the job is accepted; the token is never printed."""
    token = "plabel-test-" + __import__("uuid").uuid4().hex
    (tmp_path / "c.yaml").write_text("name: tok\nrun_dir: runs\ndata: {shards: none}\n")  # fails fast on the cluster
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of this machine
    cluster = LocalRayCluster(head_cpus=1, auth_token=token)
    try:
        cluster.start_head()
        args = ["submit", str(tmp_path / "c.yaml"), "--address", cluster.dashboard_url, "--no-wait"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (f"error: the Ray Jobs API at {cluster.dashboard_url} refused the request "
                                         f"(no token): give the cluster's token with RAY_AUTH_TOKEN or --token-file "
                                         f"(--address {cluster.dashboard_url})")
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token\n")
        result = CliRunner().invoke(app, [*args, "--token-file", str(wrong)])
        assert result.exit_code == 2 and "(a wrong token)" in result.stderr
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        result = CliRunner().invoke(app, [*args, "--job-id", "plabel-token-test"])
        assert result.exit_code == 0, result.output
        assert "submitted plabel-token-test" in result.output and token not in result.output
        right = tmp_path / "token"
        right.write_text(token + "\n")
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        result = CliRunner().invoke(app, [*args, "--job-id", "plabel-token-test-2", "--token-file", str(right)])
        assert result.exit_code == 0, result.output
    finally:
        cluster.stop()
    assert cluster.leftovers() == []

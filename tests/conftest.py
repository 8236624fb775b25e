import os
import socket

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train polls its workers every 2 s and watches for preemption every 5 s: each run of the suite's
# ~30 tiny Ray Train runs then ends seconds after its last epoch (about 3.5 s per run measured here)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# the log files of single-stage commands (cli/main.py _command_log) stay out of the repository
os.environ.setdefault("PLABEL_LOG_DIR", os.path.join(__import__("tempfile").mkdtemp(prefix="plabel-test-logs-")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3 tests talk to a moto server on loopback (fixture s3_server). Its port and the AWS variables
# are set here, at import time, because the workers of the session's local Ray (ray_local) copy
# the environment of this process when Ray starts; pyarrow (>= 15) and boto3 read the endpoint
# from AWS_ENDPOINT_URL. Fixed fake credentials keep the tests away from any real account.
MOTO_PORT = _free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
})
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)
S3_BUCKET = "plabel-test"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1:MOTO_PORT with the bucket S3_BUCKET; yields its endpoint URL."""
    import logging

    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh s3:// prefix in the test bucket for one test."""
    import uuid

    return f"s3://{S3_BUCKET}/{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 4 logical CPUs so 1-CPU actor pools cannot starve reads."""
    import ray

    from plabel.jobs.cluster import ensure_ray

    ensure_ray(num_cpus=4)
    yield
    ray.shutdown()


def crop_width(data, width: int) -> None:
    """Crop every image and mask PNG of a synthetic dataset to its middle ``width`` columns."""
    import cv2

    for png in sorted(data.glob("images/*.png")) + sorted(data.glob("masks/*/*.png")):
        a = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        x0 = (a.shape[1] - width) // 2
        assert cv2.imwrite(str(png), a[:, x0:x0 + width])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_local):
    """(run directory, console output) of ONE `plabel run` of tiny_config.CONFIG on 26 synthetic
    images of TINY_SHAPE (cropped from 64 x 64), shared by every test file that needs a finished run
    (pipeline, export, predict, report)."""
    from typer.testing import CliRunner

    from plabel.cli.main import app
    from plabel.data.synthetic import make_synthetic_dataset
    from tiny_config import CONFIG, TINY_SHAPE

    root = tmp_path_factory.mktemp("run")
    make_synthetic_dataset(root / "data", n_images=26, size=64, seed=1)
    crop_width(root / "data", TINY_SHAPE[1])
    (root / "cfg.yaml").write_text(CONFIG)
    result = CliRunner().invoke(app, ["run", str(root / "cfg.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "runs" / "tiny", result.output

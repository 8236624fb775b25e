"""A two-node Ray cluster on this machine, started with `ray start` the way an operator would.

Every process the cluster spawns inherits a unique marker variable in its environment, so
stop() finds and stops exactly those processes (never `ray stop`, which kills every Ray on the
machine). Used by tests that need a real head node with the Jobs API.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from procs import descendants, pids_with_env

MARKER = "PLABEL_TEST_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_pids(marker_value: str) -> list[int]:
    """PIDs of this user's processes whose environment carries MARKER=marker_value."""
    return pids_with_env(MARKER, marker_value)


def cluster_pids(marker_value: str, known: tuple[int, ...] = ()) -> list[int]:
    """Every process of the cluster: the marked ones, their descendants, and the raylets' agents.

    Ray's dashboard and runtime-env agents replace their environment (only RAY_RAYLET_PID of the
    raylet that started them survives), so the marker alone misses them; once their raylet is
    gone they are no longer its descendants either, so they are found by that variable (known:
    PIDs found earlier, e.g. raylets already stopped)."""
    pids = set(marked_pids(marker_value)) | set(known)
    for p in list(pids):
        pids.update(descendants(p))
    pids.update(pids_with_env("RAY_RAYLET_PID", {str(p) for p in pids}))
    pids.discard(os.getpid())
    return sorted(pids)


class LocalRayCluster:
    """Head (no GPU) + one worker node (fake GPUs, custom resources), both on 127.0.0.1."""

    def __init__(self, head_cpus: int = 3, worker_cpus: int = 2, worker_gpus: int = 1,
                 worker_resources: dict | None = None, auth_token: str | None = None):
        """auth_token: start with Ray token authentication (RAY_AUTH_MODE=token, this token)."""
        self.head_cpus, self.worker_cpus, self.worker_gpus = head_cpus, worker_cpus, worker_gpus
        self.auth_token = auth_token
        self.worker_resources = worker_resources or {}
        self.marker = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="plr-", dir="/tmp")  # short: Ray's socket paths
        self.gcs_port, self.dashboard_port, self.client_port = free_port(), free_port(), free_port()
        self.log: list[str] = []
        self.stopped: list[int] = []  # PIDs stop() signalled
        # Ray rewrites 127.0.0.1 to the machine's routable address in cluster mode; any other
        # loopback address is kept, so both nodes advertise (and are reached on) loopback.
        self.ip = "127.0.0.2"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update({MARKER: self.marker, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    # a multi-node cluster needs cluster mode; nodes still advertise 127.0.0.1
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        if self.auth_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.auth_token)
        return env

    def _ray(self, *args: str) -> None:
        ray_cli = str(Path(sys.executable).parent / "ray")
        proc = subprocess.run([ray_cli, "start", *args, "--disable-usage-stats"], env=self.env(),
                              capture_output=True, text=True, timeout=180)
        self.log.append(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    @staticmethod
    def _node_ports() -> list[str]:
        """Ports two nodes on one machine would otherwise share (the agent's 52365 above all)."""
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def start(self) -> "LocalRayCluster":
        self._ray("--head", *self._node_ports(), f"--node-ip-address={self.ip}", f"--port={self.gcs_port}",
                  f"--num-cpus={self.head_cpus}", "--num-gpus=0", "--include-dashboard=true",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                  f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir}")
        self._ray(f"--address={self.ip}:{self.gcs_port}", *self._node_ports(), f"--node-ip-address={self.ip}",
                  f"--num-cpus={self.worker_cpus}", f"--num-gpus={self.worker_gpus}",
                  f"--resources={json.dumps(self.worker_resources)}")
        self.wait_for_nodes(2)
        return self

    def start_head(self, timeout_s: float = 120.0) -> "LocalRayCluster":
        """The head node only; waits for the dashboard's public health endpoint (with token
        authentication every other endpoint needs the token)."""
        self._ray("--head", *self._node_ports(), f"--node-ip-address={self.ip}", f"--port={self.gcs_port}",
                  f"--num-cpus={self.head_cpus}", "--num-gpus=0", "--include-dashboard=true",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                  f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir}")
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/gcs_healthz", timeout=5):
                    return self
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1.0)

    def nodes(self) -> list[dict]:
        """Alive nodes as the dashboard reports them (node_id, resources_total, ...)."""
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else dict(n)
                for n in list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")])]

    def wait_for_nodes(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.time() + timeout_s
        last: Exception | None = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5):
                    pass
                if len(self.nodes()) >= n:
                    return
            except Exception as e:  # dashboard still starting
                last = e
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray nodes not up after {timeout_s} s ({last})")

    def stop(self) -> list[int]:
        """SIGTERM then SIGKILL every process of this cluster; returns the PIDs it stopped."""
        pids = cluster_pids(self.marker)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5  # then SIGKILL (a raylet's agents may ignore SIGTERM for long)
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            time.sleep(0.3)
        for pid in cluster_pids(self.marker, known=tuple(pids)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.stopped = sorted(set(pids) | set(self.stopped))
        return pids

    def leftovers(self) -> list[int]:
        """Processes of this cluster still running after stop() (should be none)."""
        return [p for p in cluster_pids(self.marker, known=tuple(self.stopped))
                if Path(f"/proc/{p}").exists() and not _zombie(p)]

    def __enter__(self) -> "LocalRayCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

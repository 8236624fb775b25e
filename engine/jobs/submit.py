"""Submitting `plabel run` to an existing Ray cluster through the Ray Jobs API.

This is what a KubeRay RayJob's submitter does: the run config travels with the job (as the
job's working directory), the entrypoint runs on the cluster's head node and joins the cluster
with `--address auto`. Data and run-directory locations in the config must be reachable from the
cluster (a shared volume or an s3:// / gs:// URI); plabel does not copy data.

A cluster with Ray token authentication (deploy/k8s: authOptions mode token) refuses requests
without its token: :func:`auth_headers` sends it as ``Authorization: Bearer <token>``, read as Ray
reads it (RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token) or from the
file given. The token is never printed, logged or written anywhere.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from ray.job_submission import JobSubmissionClient

from plabel.schemas.config import RunConfig, load_run_config

CONFIG_NAME = "plabel.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Submission:
    job_id: str
    address: str
    status: str | None = None  # terminal status when waited for, else None


def jobs_api_address(address: str | None) -> str:
    """The Jobs API (dashboard) URL: 'http://host:8265' as given, 'host:port' gets http://;
    None falls back to RAY_API_SERVER_ADDRESS, then RAY_ADDRESS when that is an http(s) URL."""
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
        if address and not address.startswith(("http://", "https://")):
            address = ""
    if not address:
        raise ValueError("no Ray Jobs API address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    if address.startswith("ray://") or address == "auto":
        raise ValueError(f"--address {address!r}: `plabel submit` talks to the Jobs API of the head node "
                         "(its dashboard port), e.g. http://HEAD:8265")
    return address if "://" in address else f"http://{address}"


def read_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The cluster's token: the contents of ``token_file``, else RAY_AUTH_TOKEN, else the file named
    by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; None when there is none. Surrounding
    whitespace is stripped; an empty or unreadable named file raises ValueError (naming the file)."""
    named = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token_file and os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if not named and not path.is_file():
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the Ray token file {path}: {type(exc).__name__}") from None
    if not token:
        raise ValueError(f"the Ray token file {path} is empty")
    return token


def auth_headers(token_file: str | os.PathLike | None = None) -> dict[str, str]:
    """HTTP headers for the Jobs API: the bearer token when there is one (read_token), else none."""
    token = read_token(token_file)
    return {"Authorization": f"Bearer {token}"} if token else {}


def remote_locations(cfg: RunConfig) -> dict[str, str]:
    """The config's data and output locations the cluster must reach, by config key."""
    keys = {"data.source": cfg.data.source, "data.shards": cfg.data.shards, "run_dir": cfg.run_dir,
            "label.sam.checkpoint": cfg.label.sam.checkpoint}
    return {k: v for k, v in keys.items() if v}


def job_config(cfg: RunConfig) -> dict:
    """The config as the job will read it: paths already absolute, Ray joined with address auto."""
    data = cfg.to_dict()
    data["ray"] = {**data["ray"], "address": "auto"}
    return data


def entrypoint() -> str:
    """Shell command the job runs on the head node, in the uploaded working directory."""
    return f"plabel run {CONFIG_NAME} --address auto"


def submit_run(config: str | Path, address: str | None, job_id: str | None = None, wait: bool = True,
               echo: Callable[[str], None] = print, poll_s: float = 2.0, agent_wait_s: float = 120.0,
               token_file: str | os.PathLike | None = None) -> Submission:
    """Submit `plabel run CONFIG` as a Ray job; with wait, stream its logs until it ends.

    A cluster whose job agent is not up yet (a head node that just started) is retried for
    agent_wait_s seconds."""

    cfg = load_run_config(config)  # validates and resolves relative paths against the config's folder
    url = jobs_api_address(address)
    job_id = job_id or f"plabel-{cfg.name}-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="plabel-submit-"))
    try:
        (workdir / CONFIG_NAME).write_text(yaml.safe_dump(job_config(cfg), sort_keys=False))
        client = JobSubmissionClient(url, headers=auth_headers(token_file))  # raises AuthenticationError
        deadline = time.time() + agent_wait_s
        while True:
            try:
                client.submit_job(entrypoint=entrypoint(), submission_id=job_id,
                                  runtime_env={"working_dir": str(workdir)}, metadata={"plabel_run": cfg.name})
                break
            except RuntimeError as e:  # a head node that just started has no job agent yet
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(2.0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    echo(f"submitted {job_id} to {url}")
    for key, loc in remote_locations(cfg).items():
        echo(f"  {key}: {loc} (must be reachable from the cluster's nodes)")
    sub = Submission(job_id, url)
    if wait:
        try:
            sub.status = follow(client, job_id, echo, poll_s)
        except KeyboardInterrupt:  # stop following; the job goes on
            echo(f"stopped following {job_id}; it keeps running (ray job stop {job_id} --address {url})")
            sub.status = "DETACHED"
    return sub


def follow(client, job_id: str, echo: Callable[[str], None], poll_s: float = 2.0) -> str:
    """Print the job's new log lines every poll_s seconds until it reaches a terminal status."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)

"""Connecting to Ray: an existing cluster, or a local one that plabel starts on loopback."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Initialise Ray once per process.

    address None: start a local Ray bound to 127.0.0.1 with the dashboard off (unless asked) and
    token auth off (a loopback-only, single-user cluster); logical CPUs default to max(4, cores)
    so that read tasks and 1-CPU actor pools cannot starve each other on small machines.
    address "auto" or "ray://...": join that cluster as it is configured.
    """
    if address is None:
        # Must be set before Ray reads its constants: the node address becomes 127.0.0.1 and
        # every Ray server of the local cluster listens on loopback only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # plabel.console shows progress
    import ray  # local: Ray reads its constants on import: plabel's environment comes first

    if not ray.is_initialized():
        _init(ray, address, num_cpus, dashboard)
    quiet_ray_data()


def _init(ray, address: str | None, num_cpus: int | None, dashboard: bool) -> None:
    """ray.init for :func:`ensure_ray`: join ``address``, or start the local loopback Ray."""
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    from ray._private import ray_constants  # local: after ensure_ray's variables are set

    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False  # ray was imported before the variable was set
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(
        num_cpus=cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    log.info("started a local Ray with %d logical CPUs on 127.0.0.1", cpus)


def cluster_cpus() -> float:
    """Number of logical CPUs the connected cluster advertises."""
    import ray  # local: Ray reads its constants on import: plabel's environment comes first

    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    """Number of GPUs the connected cluster advertises (0.0 when none)."""
    import ray  # local: Ray reads its constants on import: plabel's environment comes first

    return float(ray.cluster_resources().get("GPU", 0.0))


def quiet_ray_data() -> None:
    """No Ray Data progress bars (plabel shows its own, plabel.console), no execution-plan dump at
    each start, and a UDF's original exception raised on the driver. Datasets carry the driver's DataContext to the workers that iterate them (Ray Train
    workers reading their validation set each epoch), so this is set on the driver once Ray is up."""
    import ray  # local: Ray reads its constants on import: plabel's environment comes first

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # a UDF's own error (an InputError naming the input) reaches the driver, not a UserCodeException
    # that keeps only its text: the CLI ends such errors with one line and exit code 2 (cli/errors.py)
    ctx.raise_original_map_exception = True

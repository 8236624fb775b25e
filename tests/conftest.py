import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 4 logical CPUs so 1-CPU actor pools cannot starve reads."""
    import ray

    from engine.pipeline.cluster import ensure_ray

    ensure_ray(num_cpus=4)
    yield
    ray.shutdown()

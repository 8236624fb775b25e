"""plabel.jobs.resources.train_threads: how many torch threads a Ray Train worker uses (values by hand)."""
import pytest

from plabel.jobs.resources import train_threads
from plabel.schemas.config import ConfigError, TrainSection, build


def test_unset_uses_the_node_cpus_capped_by_the_cores_and_shared_among_its_workers():
    # plabel's loopback Ray counts 4 CPUs on a 2-core machine: 2 threads for its one worker, not Ray's 1
    assert train_threads(None, node_cpus=4, cores=2, local_workers=1) == 2
    # a 16-CPU pod on a 64-core host with 2 Train workers: 16 // 2
    assert train_threads(None, node_cpus=16, cores=64, local_workers=2) == 8
    # 7 CPUs for 2 workers: 3 each (never more threads than CPUs in all)
    assert train_threads(None, node_cpus=7, cores=7, local_workers=2) == 3
    # more workers than CPUs: still one thread each
    assert train_threads(None, node_cpus=4, cores=2, local_workers=4) == 1


def test_a_set_value_is_kept():
    assert train_threads(3, node_cpus=4, cores=2, local_workers=1) == 3


def test_config_refuses_zero_threads_and_names_the_key():
    assert build(TrainSection, {"threads": 2}, "student").threads == 2
    assert build(TrainSection, {}, "student").threads is None
    with pytest.raises(ConfigError, match="student.threads"):
        build(TrainSection, {"threads": 0}, "student")

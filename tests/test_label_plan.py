"""plabel.jobs.resources.plan_label: how `auto` SAM actors and compilation are resolved (values by hand)."""
import pytest

from plabel.jobs.resources import NO_SAM, COMPILE_MIN_IMAGES_PER_ACTOR, label_requests, plan_label
from plabel.schemas.config import ConfigError, LabelSection, build


def section(**sam):
    return build(LabelSection, {"sam": sam}, "label")


def test_auto_on_cpu_is_one_single_thread_actor_per_cpu_left_and_compiles_long_jobs():
    # 4 logical CPUs (plabel's local Ray on 2 cores) less 1 U-Net actor less 0.5 for decoding: 2.5 -> 2
    plan = plan_label(section(), cluster_cpus=4, cluster_gpus=0, images=140)
    assert (plan.sam_actors, plan.compile, plan.sam_on_gpu) == (2, True, False)  # 70 images per actor >= 48
    assert "2 SAM actor(s) of 1 CPU" in plan.why and "compiled (auto: 70 images per actor" in plan.why
    # 16 CPUs, 2 U-Net actors, 2-CPU SAM actors: (16 - 2 - 0.5) / 2 = 6.75 -> 6
    sixteen = build(LabelSection, {"unet_actors": 2, "sam": {"cpus": 2}}, "label")
    assert plan_label(sixteen, 16, 0, 10_000).sam_actors == 6
    # a small job: no more actors than batches of 8 (20 images -> 3 batches), not compiled (7 per actor)
    small = plan_label(section(), 64, 0, 20)
    assert (small.sam_actors, small.compile) == (3, False)
    assert "capped at 3 for 20 images in batches of 8" in small.why
    # the threshold itself: exactly COMPILE_MIN_IMAGES_PER_ACTOR per actor compiles, one less does not
    assert plan_label(section(), 4, 0, 2 * COMPILE_MIN_IMAGES_PER_ACTOR).compile is True
    assert plan_label(section(), 4, 0, 2 * COMPILE_MIN_IMAGES_PER_ACTOR - 1).compile is False
    # unknown job size: no cap, no compilation
    unknown = plan_label(section(), 4, 0, None)
    assert (unknown.sam_actors, unknown.compile) == (2, False) and "job size unknown" in unknown.why
    # a cluster too small for even one: still one actor (Ray queues it until a CPU frees)
    assert plan_label(section(), 1, 0, 100).sam_actors == 1


def test_auto_on_gpu_is_one_actor_per_num_gpus_and_not_compiled():
    plan = plan_label(section(), cluster_cpus=64, cluster_gpus=4, images=10_000)
    assert (plan.sam_actors, plan.compile, plan.sam_on_gpu) == (4, False, True)
    assert plan_label(section(num_gpus=0.5), 64, 4, 10_000).sam_actors == 8  # two actors share a GPU
    # device gpu on a cluster whose GPU group is still at zero (autoscaler): one actor, on GPU
    zero = plan_label(section(device="gpu"), 8, 0, 1000)
    assert (zero.sam_actors, zero.sam_on_gpu) == (1, True)


def test_explicit_values_are_kept():
    plan = plan_label(section(actors=5, compile=False), cluster_cpus=4, cluster_gpus=0, images=10_000)
    assert (plan.sam_actors, plan.compile, plan.why) == (5, False, "as configured")
    assert plan_label(section(actors=1, compile=True), 4, 0, 3).compile is True
    refine = {r.stage: r for r in label_requests(section(actors=5), False, sam_actors=5)}["refine"]
    assert (refine.count, refine.resources) == (5, {"CPU": 1.0})
    # without a plan (deployment fit checks), auto asks for the least the cluster must hold: one actor
    assert {r.stage: r for r in label_requests(section(), False)}["refine"].count == 1


def test_a_gate_that_consults_sam_for_no_class_plans_no_sam():
    """needs_sam False (every class drop or unet, e.g. a later self-training round): one 1-CPU actor
    gates the rows, nothing is compiled, no GPU is asked for, whatever label.sam says."""
    gpu = section(device="gpu", actors=4, compile=True, num_gpus=1)
    plan = plan_label(gpu, cluster_cpus=64, cluster_gpus=4, images=10_000, needs_sam=False)
    assert (plan.sam_actors, plan.compile, plan.sam_on_gpu) == (1, False, False)
    assert plan.why == NO_SAM and "SAM not run" in plan.as_dict()["plan"]
    refine = {r.stage: r for r in label_requests(gpu, True, sam_actors=1, needs_sam=False)}["refine"]
    assert (refine.count, refine.resources) == (1, {"CPU": 1.0})


@pytest.mark.parametrize("key,value,expected", [
    ("actors", 0, "label.sam.actors: expected `auto` or an int > 0, got 0"),
    ("actors", "many", "label.sam.actors: expected `auto` or an int > 0, got 'many'"),
    ("actors", True, "label.sam.actors: expected `auto` or an int > 0, got True"),
    ("compile", "yes", "label.sam.compile: expected `auto`, true or false, got 'yes'"),
])
def test_bad_values_name_the_key(key, value, expected):
    with pytest.raises(ConfigError) as e:
        section(**{key: value})
    assert str(e.value) == expected

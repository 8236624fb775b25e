"""The config of the tiny end-to-end run that several test files share (fixture ``tiny_run``,
conftest.py: ONE `plabel run` per session, about 200 s here)."""

# The tiny run's images are not square (H x W; conftest.crop_width): teacher, calibration, SAM, student,
# evaluation, report and exports all run on letterboxed inputs and give masks back on each image's grid
TINY_SHAPE = (64, 48)

CONFIG = """
name: tiny
run_dir: runs
data: {source: data, labelled: 6, val: 2, test: 4, shard_size: 5}
teacher: {epochs: 25, image_size: 64, base_channels: 8, depth: 3, lr: 0.005, batch_size: 3}
# student.soup 3 (the default is 1: the soup test needs one); selection mean: with one epoch, guarded
# selection may hand the teacher's weights back to every soup member, and the soup test needs members
# that differ; rounds 1 (default 6): test_pipeline builds a second round on a copy of this run itself
student: {epochs: 1, image_size: 64, base_channels: 8, depth: 3, selection: mean, soup: 3, rounds: 1}
label:
  cleaning: {threshold: 0.3}
  sam: {batch_size: 4, cpus: 2}  # two threads: LiteMedSAM on 14 images is most of the run
  gate: {per_class: {clavicle: {policy: unet}}}
  unet_batch_size: 4
"""

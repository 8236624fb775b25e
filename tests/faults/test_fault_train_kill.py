"""`plabel train` SIGKILLed mid-training, after its first epoch checkpoint reached the run
directory: the same command run again resumes after the last checkpoint (its epochs continue,
they do not restart) and finishes."""
from __future__ import annotations

import json
import re
import subprocess
import time

import faultkit

from plabel.method.unet import load_checkpoint

# enough epochs that the kill lands mid-training: a small training set is read into the worker once,
# so these tiny epochs take a few hundredths of a second each
EPOCHS = 300


def test_training_killed_then_rerun_resumes(tmp_path):
    root = tmp_path
    faultkit.make_dataset(root, n_images=10, shard_size=4, labelled=6, val=2, teacher=False)
    out = root / "model" / "teacher.pt"
    storage = root / "model" / "ray_train" / "teacher"  # `plabel train`'s default: next to --out, named after it
    train_log = root / "train.log"  # the command's log file: the Ray Train worker's lines ([teacher] epoch k/n)
    cmd = faultkit.plabel("--log-file", str(train_log), "train", "--shards", str(root / "shards"), "--out", str(out), "--epochs", str(EPOCHS),
                          "--image-size", "64", "--base-channels", "4", "--depth", "2", "--batch-size", "2",
                          "--num-cpus", "4")
    env, run_id = faultkit.private_env()
    log = root / "first.log"
    t0 = time.time()
    proc = faultkit.start(cmd, env, log)
    # Ray Train V2 records a checkpoint in its snapshot once it is complete in storage; the worker's
    # "[teacher] epoch k/n" line reaches the command's log file through Ray's log streaming, which can
    # land after the snapshot (CI saw the kill come first): wait for both, so the log shows the epoch
    def first_epoch_done():
        logged = train_log.exists() and re.search(r"\[teacher\] epoch \d+/", train_log.read_text())
        return bool((storage / "checkpoint_manager_snapshot.json").exists() and logged) or proc.poll() is not None

    try:
        faultkit.wait_for(first_epoch_done, timeout=400, interval=0.05, what="the first checkpoint")
        assert proc.poll() is None, "training finished before it could be killed:\n" + log.read_text()[-3000:]
    finally:
        faultkit.kill_run(proc, run_id)
    first = train_log.read_text()
    done_before = sorted({int(m) for m in re.findall(r"\[teacher\] epoch (\d+)/", first)})
    print(f"killed at {time.time() - t0:.1f} s after epochs {done_before}")
    assert not out.exists() and done_before and max(done_before) < EPOCHS
    assert list(storage.glob("checkpoint_*/state.pt"))

    env, run_id = faultkit.private_env()
    try:
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    finally:
        faultkit.kill_run(None, run_id)
    text = train_log.read_text()[len(first):] + rerun.stdout + rerun.stderr  # the rerun appends to the log file
    assert rerun.returncode == 0, text[-4000:]
    result = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    resumed = re.search(r"\[teacher\] resuming from the checkpoint of epoch (\d+)/", text)
    epochs_after = sorted({int(m) for m in re.findall(r"\[teacher\] epoch (\d+)/", text)})
    print(f"rerun done at {time.time() - t0:.1f} s: resumed after epoch {result['resumed_from_epoch']}, "
          f"ran epochs {epochs_after}")
    assert resumed and int(resumed.group(1)) == result["resumed_from_epoch"] >= 1
    assert epochs_after == list(range(result["resumed_from_epoch"] + 1, EPOCHS + 1))  # continued, not restarted
    assert result["resumed_from_epoch"] >= min(done_before)  # at least one epoch of the killed run was kept
    _, _, extra = load_checkpoint(out)
    assert extra["role"] == "teacher" and 0 <= extra["epoch"] < EPOCHS

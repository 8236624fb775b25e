"""Refinement speed, measured in one run against the paper's reference, on the same images and model.

    python benchmarks/speed.py refine --backend lite_medsam --images 100          # CPU table
    python benchmarks/speed.py refine --backend vit_b --random-weights --images 100
    python benchmarks/speed.py streaming --small 200 --large 2000                 # flat memory
    bash benchmarks/gpu_speed.sh                                                   # GPU (ViT-H)

``refine`` measures, on the same images (real JSRT radiographs, cycled when --images exceeds
them) and the same SAM weights:

  (a) the reference: segment_anything's SamPredictor, set_image per image, one predict call per
      class per stage, float32, torch's default threads (plabel.method.sam.refine.refine_reference);
  (b) plabel's refinement engine in this process (SamRefiner.refine_batch: batched encoder,
      one decoder call per image and stage for all classes; --compile: torch.compile);
  (c) the whole `plabel label` Ray Data job (decode, U-Net + cleaning actors, SAM actors,
      table commit) in a child process, on shards of the same images, with the settings given here
      (--sam-actors, --compile, ...): the tuned job whose steady state is the bar;
  (d) with --defaults: the same job with plabel's default label settings (label.sam.actors and
      label.sam.compile `auto`, plabel.jobs.resources.plan_label), as `plabel label` runs it when a
      user sets nothing; its whole wall time against (c)'s steady state is the ratio to watch
      (`d_total/c_steady`, s per image).

(a) and (b) get the prompts the job's U-Net teacher gives (computed once, untimed), so all three
refine the same classes. The teacher is a small U-Net trained here on JSRT images that are not
among the benchmark images (--teacher to pass one). Warm-up (model load, compilation, the first
batch) is excluded from (a) and (b); for (c) the steady state is the rows that arrive after the
first block divided by the time from the first block to the last, and the total wall time is
reported next to it. Equivalence: per-class Dice of (b)'s final masks against (a)'s.

``streaming`` labels --small and --large synthetic images (tiny random U-Net, random_tiny SAM)
in two child processes and compares the driver's peak RSS and the actors' peak RSS.

Results go to stdout (a table) and --out/speed.json, which is written after each of (a), (b) and
(c), so a run stopped during (c) keeps (a) and (b); ``refine --job-only`` then measures (c) alone and
takes (a) and (b) from that file (it refuses one from another backend, image count, teacher or batch
size, and names the earlier run in the result as ``ab_from``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]  # the shared /proc helpers; soak's shard builders
from procs import cmdline, descendants  # noqa: E402
from soak import build_shards, tiny_teacher  # noqa: E402

from plabel.data.ingest import shard_paths, write_unlabelled_shards
from plabel.data.synthetic import make_synthetic_dataset
from plabel.method.cleaning import CleaningConfig
from plabel.method.labelling import clean_and_prompt, teacher_probs
from plabel.method.preprocess import to_unet_input
from plabel.method.metrics import dice
from plabel.method.sam import load_sam
from plabel.method.sam.backends import RANDOM_BACKENDS, build_architecture
from plabel.method.sam.compile import compile_sam
from plabel.method.sam.refine import SamRefiner, autocast_dtype, refine_reference
from plabel.method.unet import load_checkpoint, save_checkpoint
from plabel.schemas.config import LabelSection, SamSection, build
from plabel.training.inprocess import fit_unet
from plabel.training.loop import TrainConfig

DEFAULT_DATA = REPO.parent / "shared" / "data" / "jsrt256"
TEACHER_IMAGES = 20  # the last images of the data set train the teacher; the others are benchmarked


# ----------------------------------------------------------------------------- data and teacher


def jsrt(data: Path):
    """(ids, classes) of a JSRT-layout folder (images/<id>.png, masks/<class>/<id>.png, classes.json)."""
    classes = json.loads((data / "classes.json").read_text())
    classes = classes["classes"] if isinstance(classes, dict) else classes
    ids = sorted(p.stem for p in (data / "images").glob("*.png"))
    if len(ids) <= TEACHER_IMAGES:
        raise SystemExit(f"{data}: {len(ids)} images; need more than {TEACHER_IMAGES}")
    return ids, list(classes)


def read_gray(path: Path):
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SystemExit(f"cannot read image {path}")
    return image


def train_teacher(data: Path, ids, classes, out: Path, image_size: int = 128, epochs: int = 40) -> Path:
    """A small U-Net teacher on ``ids`` (in this process, seed 0); cached at ``out``."""
    if out.exists():
        return out

    cfg = TrainConfig(epochs=epochs, batch_size=4, seed=0)
    x = np.stack([to_unet_input(read_gray(data / "images" / f"{i}.png"), image_size, cfg.intensity) for i in ids])
    y = np.stack([[cv2.resize((read_gray(data / "masks" / c / f"{i}.png") > 127).astype(np.float32),
                              (image_size, image_size), interpolation=cv2.INTER_AREA) > 0.5
                   for c in classes] for i in ids]).astype(np.float32)
    t0 = time.time()
    fitted = fit_unet(x, y, cfg)  # no validation: the last epoch
    model, ucfg = fitted.model, fitted.config
    save_checkpoint(out, model.eval(), ucfg,
                    {"classes": classes, "image_size": image_size, "role": "teacher"})
    print(f"[speed] teacher trained on {len(ids)} images in {time.time() - t0:.0f} s -> {out}", flush=True)
    return out


def write_shards(images, ids, classes, out: Path, shard_size: int = 16) -> Path:
    """plabel shards (split 'unlabelled') + manifest.json of gray uint8 images under out."""

    write_unlabelled_shards(((i, cv2.imencode(".png", im)[1].tobytes(), *im.shape) for i, im in zip(ids, images)),
                            classes, out, shard_size)
    return out


# ----------------------------------------------------------------------------- SAM models


def sam_checkpoint(backend: str, checkpoint: str | None, random_weights: bool, work: Path) -> str | None:
    """The checkpoint all three paths load. --random-weights: the backend's architecture with
    seeded random weights saved to a file (speed does not depend on the weights). A backend that
    has random weights by design (random_tiny) takes none."""
    if not random_weights or backend in RANDOM_BACKENDS:
        return checkpoint

    path = work / f"random-{backend}.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(build_architecture(backend).state_dict(), path)
    return str(path)


# ----------------------------------------------------------------------------- memory sampling


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak RSS (VmHWM, MiB) of a process; for this one, unlike ru_maxrss, it does not inherit the
    parent's peak across fork/exec. OSError when the process is gone."""
    status = Path(f"/proc/{pid}/status").read_text()
    return round(next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:")) / 1024, 1)


def rss_sampler(stop: threading.Event, peaks: dict, period: float = 0.5) -> None:
    """Peak RSS (VmHWM, MiB) of this process's Ray actor processes by stage, until ``stop``."""
    while not stop.is_set():
        for pid in descendants(os.getpid()):
            line = cmdline(pid)
            stage = next((s for s in ("TeacherStage", "RefineStage") if f"MapBatches({s})" in line), None)
            if stage is None:
                continue
            try:
                peaks[stage] = max(peaks.get(stage, 0.0), peak_rss_mib(pid))
            except (OSError, StopIteration):
                continue
        stop.wait(period)


class GpuSampler:
    """nvidia-smi utilisation samples (%, with timestamps) while running; no-op without nvidia-smi."""

    def __init__(self, period_ms: int = 200):
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={period_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip().split(",")[0])))
            except ValueError:
                pass

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def mean_between(self, t0: float, t1: float) -> float | None:
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return round(sum(vals) / len(vals), 1) if vals else None


# ----------------------------------------------------------------------------- (c) the Ray job


def job_main(args) -> int:
    """Child process: one label job; prints one JSON line (wall, steady state, memory)."""
    from plabel.jobs.cluster import ensure_ray  # local: Ray only in the process that runs the job
    from plabel.jobs.label_job import run_label_job  # local: Ray only in the process that runs the job

    spec = json.loads(Path(args.spec).read_text())
    ensure_ray(num_cpus=spec["num_cpus"])
    cfg = build(LabelSection, spec["label"], "label")
    arrivals: list[tuple[float, int]] = []
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=rss_sampler, args=(stop, peaks), daemon=True)
    sampler.start()
    gpu = GpuSampler() if spec.get("gpu") else None
    t0 = time.time()
    summary = run_label_job(shard_paths(spec["shards"], "unlabelled"), spec["table"], spec["classes"],
                            spec["teacher"], cfg, progress=lambda n, total=None: arrivals.append((time.time(), n)))
    arrivals = [(t, n) for t, n in arrivals if n]  # the call before the first block reports 0 rows
    wall = time.time() - t0
    stop.set()
    sampler.join()
    if gpu is not None:
        gpu.stop()
    # steady state: from the arrival of the k-th block (k = SAM actors: every actor has finished its
    # first batch, start-up and compilation are behind) to the last block, the rows in between
    k = max(0, min(int(summary["sam_actors"]), len(arrivals)) - 1)
    first, last = arrivals[k][0], arrivals[-1][0]
    steady_rows = sum(n for _, n in arrivals[k + 1:])
    out = {"summary": summary, "wall_s": round(wall, 2), "images_per_s_total": round(summary["rows"] / wall, 3),
           "s_per_image_total": round(wall / summary["rows"], 4),
           "first_block_s": round(arrivals[0][0] - t0, 2), "steady_from_s": round(first - t0, 2),
           "arrivals": [[round(t - t0, 2), n] for t, n in arrivals],
           "images_per_s_steady": round(steady_rows / (last - first), 3) if last > first else None,
           "driver_peak_rss_mib": peak_rss_mib(),
           "actor_peak_rss_mib": {k: round(v, 1) for k, v in peaks.items()}}
    if gpu is not None:
        out["gpu_util_mean_pct"] = gpu.mean_between(first, last)
        out["gpu_samples"] = len(gpu.samples)
    print("SPEED_JOB " + json.dumps(out), flush=True)
    return 0


def run_job(spec: dict, work: Path, name: str) -> dict:
    """(c) in a child process (its own driver RSS, its own local Ray)."""
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **spec.get("env", {})}
    proc = subprocess.run([sys.executable, __file__, "_job", "--spec", str(path)], capture_output=True, text=True,
                          env=env, cwd=str(REPO))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SPEED_JOB ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"the label job ({name}) failed with exit status {proc.returncode}")
    return json.loads(line[len("SPEED_JOB "):])


# ----------------------------------------------------------------------------- refine: a, b, c


def refine_main(args) -> int:
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    if args.synthetic:
        data = work / "synthetic"
        if not (data / "classes.json").exists():
            make_synthetic_dataset(data, n_images=args.synthetic, size=256, seed=0)
    if not (data / "classes.json").exists():
        raise SystemExit(f"--data {data}: not a JSRT-layout folder (no classes.json); use --synthetic N")
    ids, classes = jsrt(data)
    device = args.device
    result: dict = {"machine": machine(), "backend": args.backend, "random_weights": args.random_weights,
                    "images": args.images, "device": device, "command": " ".join(sys.argv)}

    # teacher, images, prompts (untimed)
    teacher = Path(args.teacher) if args.teacher else train_teacher(data, ids[-TEACHER_IMAGES:], classes,
                                                                      work / "teacher.pt", epochs=args.teacher_epochs)
    pool = ids[:-TEACHER_IMAGES]
    bench_ids = [f"{pool[i % len(pool)]}-{i // len(pool)}" for i in range(args.images)]
    grays = [read_gray(data / "images" / f"{pool[i % len(pool)]}.png") for i in range(args.images)]
    unet, _, extra = load_checkpoint(teacher)
    cleaning = build(LabelSection, {}, "label").cleaning
    prompts = []
    for k in range(0, len(grays), 8):
        for p in teacher_probs(unet, grays[k:k + 8], int(extra.get("image_size", 256))):
            prompts.append(clean_and_prompt(p, CleaningConfig(**cleaning.model_dump()))[2])
    result["classes_refined"] = int(sum(np.asarray(p.valid).sum() for p in prompts))
    checkpoint = sam_checkpoint(args.backend, args.checkpoint, args.random_weights, work)
    stages = tuple(tuple(s) for s in SamSection(backend=args.backend).stages)
    result["stages"] = [list(s) for s in stages]

    result["teacher"] = str(teacher)
    result["batch_size"] = args.batch_size
    if args.no_reference:
        print("[speed] --no-reference: (c) and (d) only", flush=True)
        return run_c(args, result, work, bench_ids, grays, classes, teacher, checkpoint, device)
    if args.job_only:
        earlier = earlier_ab(work / "speed.json", result)
        result.update({k: earlier[k] for k in ("a", "b", "equivalence", "equivalence_held")})
        result["ab_from"] = {"command": earlier["command"], "measured_at": earlier.get("measured_at")}
        print(f"[speed] --job-only: (a), (b) from {work / 'speed.json'} ({result['ab_from']})", flush=True)
        return run_c(args, result, work, bench_ids, grays, classes, teacher, checkpoint, device)

    # (a) and (b) on the first --reference-images images (all by default); (c) on all of them
    n_ab = min(args.reference_images or args.images, args.images)
    result["reference_images"] = n_ab
    ab_grays, ab_prompts = grays[:n_ab], prompts[:n_ab]

    # (a) reference: torch's default threads, float32, one predict call per class per stage
    torch.set_num_threads(args.reference_threads or os.cpu_count())
    model = load_sam(args.backend, checkpoint, device=device)
    refine_reference(model, ab_grays[0], ab_prompts[0], stages)  # warm-up
    sync(device)
    t = time.perf_counter()
    ref = [refine_reference(model, g, p, stages) for g, p in zip(ab_grays, ab_prompts)]
    sync(device)
    a_s = time.perf_counter() - t
    result["a"] = {"images_per_s": round(n_ab / a_s, 3), "s_per_image": round(a_s / n_ab, 4),
                   "threads": torch.get_num_threads()}
    print(f"[speed] (a) reference: {result['a']}", flush=True)
    save(work, result)  # a run stopped later keeps what it measured

    # (b) the engine in this process
    torch.set_num_threads(args.engine_threads or os.cpu_count())
    autocast = autocast_dtype(args.autocast)
    model = load_sam(args.backend, checkpoint, device=device)
    if args.compile:
        compile_sam(model)
    refiner = SamRefiner(model, stages=stages, autocast_dtype=autocast if device == "cuda" else None,
                         encoder_batch=args.batch_size if args.compile else None)
    t = time.perf_counter()
    refiner.refine_batch(ab_grays[:args.batch_size], ab_prompts[:args.batch_size])  # warm-up (compilation)
    sync(device)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    eng = []
    for k in range(0, n_ab, args.batch_size):
        eng += refiner.refine_batch(ab_grays[k:k + args.batch_size], ab_prompts[k:k + args.batch_size])
    sync(device)
    b_s = time.perf_counter() - t
    result["b"] = {"images_per_s": round(n_ab / b_s, 3), "s_per_image": round(b_s / n_ab, 4),
                   "threads": torch.get_num_threads(), "batch_size": args.batch_size, "compile": args.compile,
                   "autocast": args.autocast, "warmup_s": round(warm, 1),
                   "process_peak_rss_mib": peak_rss_mib()}
    if device == "cuda":
        result["b"]["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(f"[speed] (b) engine: {result['b']}", flush=True)

    # equivalence of (b) with (a)
    per_class = {c: [] for c in classes}
    for r, e, p in zip(ref, eng, ab_prompts):
        for ci in np.flatnonzero(np.asarray(p.valid)):
            per_class[classes[ci]].append(dice(r.masks[ci], e.masks[ci]))
    result["equivalence"] = {c: {"mean_dice": round(float(np.mean(v)), 5), "min_dice": round(float(np.min(v)), 5),
                                 "n": len(v)} for c, v in per_class.items() if v}
    result["equivalence_held"] = all(v["mean_dice"] >= 0.99 for v in result["equivalence"].values())
    print(f"[speed] equivalence (b vs a, per-class mask Dice): {result['equivalence']}", flush=True)
    del model, refiner, ref, eng
    save(work, result)

    if args.skip_job:
        print(f"[speed] (c) skipped; b/a = {result['b']['images_per_s'] / result['a']['images_per_s']:.2f}")
        return 0
    return run_c(args, result, work, bench_ids, grays, classes, teacher, checkpoint, device)


def save(work: Path, result: dict) -> None:
    """Write --out/speed.json with what is measured so far (stamped with the time)."""
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (work / "speed.json").write_text(json.dumps(result, indent=2) + "\n")


def earlier_ab(path: Path, now: dict) -> dict:
    """(a) and (b) of an earlier run in the same --out, checked to be the same benchmark as ``now``."""
    if not path.exists():
        raise SystemExit(f"--job-only: {path} does not exist; run once without --job-only first")
    earlier = json.loads(path.read_text())
    missing = [k for k in ("a", "b", "equivalence") if k not in earlier]
    if missing:
        raise SystemExit(f"--job-only: {path} has no {', '.join(missing)}: that run stopped before measuring them")
    keys = ("backend", "random_weights", "images", "device", "teacher", "batch_size", "classes_refined")
    differ = [f"{k}: {earlier.get(k)!r} there, {now[k]!r} now" for k in keys if earlier.get(k) != now[k]]
    if differ:
        raise SystemExit(f"--job-only: {path} measured another benchmark ({'; '.join(differ)})")
    return earlier


def run_c(args, result: dict, work: Path, bench_ids, grays, classes, teacher, checkpoint,
          device: str) -> int:
    """(c): the label job on shards of the benchmark images; ratios against (a) and (b); speed.json."""
    # (c) the label job
    shards = work / "shards"
    if not (shards / "manifest.json").exists() or json.loads((shards / "manifest.json").read_text()) \
            ["splits"]["unlabelled"]["ids"] != bench_ids:

        shutil.rmtree(shards, ignore_errors=True)
        write_shards(grays, bench_ids, classes, shards, shard_size=args.shard_size)
    table = work / f"pseudo_labels-{int(time.time())}"
    sam_cfg = {"backend": args.backend, "checkpoint": checkpoint, "batch_size": args.batch_size,
               "actors": args.sam_actors, "cpus": args.sam_cpus, "compile": args.compile,
               "autocast": args.autocast, "device": "gpu" if device == "cuda" else "cpu"}
    spec = {"num_cpus": args.num_cpus, "shards": str(shards), "table": str(table), "classes": classes,
            "teacher": str(teacher), "gpu": device == "cuda",
            "label": {"sam": sam_cfg, "unet_actors": args.unet_actors, "unet_batch_size": args.batch_size}}
    c = run_job(spec, work, "job")
    c["config"] = spec["label"]
    result["c"] = c
    shutil.rmtree(table, ignore_errors=True)
    c_ips = c["images_per_s_steady"] or c["images_per_s_total"]
    result["ratios"] = {}
    if "a" in result:
        a_ips, b_ips = result["a"]["images_per_s"], result["b"]["images_per_s"]
        result["ratios"] = {"b/a": round(b_ips / a_ips, 2), "c/a": round(c_ips / a_ips, 2),
                            "c/b": round(c_ips / b_ips, 2), "c_total/a": round(c["images_per_s_total"] / a_ips, 2)}
    save(work, result)
    if args.defaults:
        # (d) the same job with plabel's defaults: only what names the model and the device is given
        table = work / f"pseudo_labels-defaults-{int(time.time())}"
        n_d = args.defaults_images or args.images
        shards_d = shards
        if n_d != args.images:  # the first n_d benchmark images, e.g. a main job's unlabelled count
            shards_d = work / f"shards-first-{n_d}"
            if not (shards_d / "manifest.json").exists():
                write_shards(grays[:n_d], bench_ids[:n_d], classes, shards_d, shard_size=args.shard_size)
        # a new inductor cache: (d) compiles cold, as a first run on a fresh machine does
        cache = work / f"inductor-cache-{int(time.time())}"
        spec_d = {**spec, "table": str(table), "shards": str(shards_d), "env": {"TORCHINDUCTOR_CACHE_DIR": str(cache)},
                  "label": {"sam": {k: sam_cfg[k] for k in ("backend", "checkpoint", "device")}}}
        d = run_job(spec_d, work, "job-defaults")
        d["config"] = spec_d["label"]
        result["d"] = d
        shutil.rmtree(table, ignore_errors=True)
        d["images"] = n_d
        d["inductor_cache"] = "cold (a new TORCHINDUCTOR_CACHE_DIR)"
        shutil.rmtree(cache, ignore_errors=True)
        result["ratios"]["d_total/c_steady"] = round(c_ips / d["images_per_s_total"], 2)  # s/image ratio
        save(work, result)
    print_table(result)
    return 0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def machine() -> str:
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    out = f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    try:
        out += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            out += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return out


def print_table(r: dict) -> None:
    c = r["c"]
    print(f"\nbackend {r['backend']}{' (random weights)' if r['random_weights'] else ''}, {r['images']} images, "
          f"{r['classes_refined']} classes refined, device {r['device']}; {r['machine']}")
    print("| path | images/s | s/image | peak memory |")
    print("|---|---|---|---|")
    if "a" in r:
        a, b = r["a"], r["b"]
        print(f"| (a) reference SamPredictor ({a['threads']} threads) | {a['images_per_s']} | {a['s_per_image']} | |")
        print(f"| (b) engine in-process ({b['threads']} threads, batch {b['batch_size']}, compile {b['compile']}) | "
              f"{b['images_per_s']} | {b['s_per_image']} | process {b['process_peak_rss_mib']} MiB |")
    steady = c["images_per_s_steady"]
    print(f"| (c) Ray Data label job, steady state (total incl. start-up: {c['images_per_s_total']} img/s, "
          f"{c['wall_s']} s) | {steady} | {round(1 / steady, 3) if steady else ''} | driver "
          f"{c['driver_peak_rss_mib']} MiB, actors {c['actor_peak_rss_mib']} |")
    if "d" in r:
        d = r["d"]
        print(f"| (d) the job with plabel's defaults on {d['images']} images ({d['summary'].get('plan')}), total "
              f"incl. start-up ({d['wall_s']} s) | "
              f"{d['images_per_s_total']} | {d['s_per_image_total']} | driver {d['driver_peak_rss_mib']} MiB, "
              f"actors {d['actor_peak_rss_mib']} |")
    if r.get("ab_from"):
        print(f"(a) and (b) from an earlier run: {r['ab_from']}")
    print(f"ratios: {r['ratios']}; equivalence held (per-class mean Dice >= 0.99): {r.get('equivalence_held')}")


# ----------------------------------------------------------------------------- streaming


def streaming_main(args) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "command": " ".join(sys.argv)}
    for n in (args.small, args.large):
        root = work / f"n{n}"
        if not (root / "shards" / "manifest.json").exists():
            build_shards(root, n, args.size, args.shard_size, 0.0, 0)
        manifest = json.loads((root / "shards" / "manifest.json").read_text())
        tiny_teacher(root / "teacher.pt", manifest["classes"], args.size)
        table = root / f"pseudo_labels-{int(time.time())}"
        spec = {"num_cpus": 4, "shards": str(root / "shards"), "table": str(table), "classes": manifest["classes"],
                "teacher": str(root / "teacher.pt"),
                "label": {"sam": {"backend": "random_tiny", "batch_size": 16}, "unet_batch_size": 16,
                          "cleaning": {"threshold": 0.3}}}
        result[str(n)] = run_job(spec, work, f"job-{n}")

        shutil.rmtree(table, ignore_errors=True)
        print(f"[speed] streaming {n} images: {result[str(n)]}", flush=True)
    s, big = result[str(args.small)], result[str(args.large)]
    result["driver_rss_ratio"] = round(big["driver_peak_rss_mib"] / s["driver_peak_rss_mib"], 3)
    result["actor_rss_ratio"] = {k: round(v / s["actor_peak_rss_mib"][k], 3)
                                 for k, v in big["actor_peak_rss_mib"].items() if k in s["actor_peak_rss_mib"]}
    (work / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| images | rows | wall s | driver peak RSS MiB | actor peak RSS MiB |\n|---|---|---|---|---|")
    for n in (args.small, args.large):
        x = result[str(n)]
        print(f"| {n} | {x['summary']['rows']} | {x['wall_s']} | {x['driver_peak_rss_mib']} | {x['actor_peak_rss_mib']} |")
    print(f"driver peak RSS {args.large} / {args.small}: {result['driver_rss_ratio']} (target within 10 %); "
          f"actors: {result['actor_rss_ratio']}")
    return 0 if result["driver_rss_ratio"] <= 1.10 else 1


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refine", help="(a) reference vs (b) engine vs (c) Ray job")
    r.add_argument("--backend", default="lite_medsam", help="SAM backend (plabel.method.sam.backends.BACKENDS)")
    r.add_argument("--checkpoint", default=None, help="SAM checkpoint (not needed for lite_medsam)")
    r.add_argument("--random-weights", action="store_true", help="the backend's architecture with random weights")
    r.add_argument("--images", type=int, default=100, help="images to refine (JSRT images, cycled)")
    r.add_argument("--data", default=str(DEFAULT_DATA), help="JSRT-layout folder")
    r.add_argument("--synthetic", type=int, default=0, help="use N synthetic 256-px images instead of --data")
    parts = r.add_mutually_exclusive_group()
    parts.add_argument("--skip-job", action="store_true", help="measure (a) and (b) only (no Ray installed)")
    parts.add_argument("--no-reference", action="store_true", help="measure (c) (and (d)) only: no (a), no (b)")
    parts.add_argument("--job-only", action="store_true",
                   help="measure (c) only; (a) and (b) come from --out/speed.json of an earlier run of the same "
                        "benchmark (backend, images, teacher, batch size), named in the result as ab_from")
    r.add_argument("--reference-images", type=int, default=None,
                   help="(a) and (b) (and the equivalence) on the first N images only; (c) on all --images")
    r.add_argument("--defaults", action="store_true",
                   help="(d): also run the job with plabel's default label settings and compare its total with (c)")
    r.add_argument("--defaults-images", type=int, default=None,
                   help="(d) labels the first N benchmark images (default: all --images)")
    r.add_argument("--teacher", default=None, help="U-Net teacher checkpoint (default: train a small one)")
    r.add_argument("--teacher-epochs", type=int, default=40, help="epochs of the default teacher")
    r.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    r.add_argument("--batch-size", type=int, default=8, help="images per SAM call in (b) and (c)")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile SAM in (b) and (c) (label.sam.compile)")
    r.add_argument("--autocast", default="none", choices=("none", "bf16", "fp16"), help="(b), (c) on GPU only")
    r.add_argument("--reference-threads", type=int, default=None, help="(a) torch threads (default: all cores)")
    r.add_argument("--engine-threads", type=int, default=None, help="(b) torch threads (default: all cores)")
    r.add_argument("--sam-actors", type=int, default=2, help="(c) SAM actors")
    r.add_argument("--sam-cpus", type=float, default=1.0, help="(c) CPUs (torch threads) per SAM actor on CPU")
    r.add_argument("--unet-actors", type=int, default=1, help="(c) U-Net + cleaning actors")
    r.add_argument("--num-cpus", type=int, default=4, help="(c) logical CPUs of the local Ray")
    r.add_argument("--shard-size", type=int, default=16)
    r.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "plabel-speed"), help="work and result folder")
    s = sub.add_parser("streaming", help="driver/actor peak memory: --small vs --large images")
    s.add_argument("--small", type=int, default=200)
    s.add_argument("--large", type=int, default=2000)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--shard-size", type=int, default=50)
    s.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "plabel-streaming"))
    j = sub.add_parser("_job", help=argparse.SUPPRESS)
    j.add_argument("--spec", required=True)
    args = ap.parse_args(argv)
    return {"refine": refine_main, "streaming": streaming_main, "_job": job_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

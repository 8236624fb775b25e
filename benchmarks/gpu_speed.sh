#!/usr/bin/env bash
# GPU speed benchmark, one command: ViT-H at 1024 px (random weights: speed does not depend on
# them) through (a) the reference SamPredictor, (b) the engine in-process and (c) the Ray Data
# label job, on one GPU, with 256-px synthetic images (the device machine has no JSRT copy).
#
#   bash benchmarks/gpu_speed.sh                  # defaults below
#   UNET_ACTORS=12 bash benchmarks/gpu_speed.sh   # more CPU actors for U-Net + cleaning
#
# Needs torch with CUDA, segment-anything, ray[data] and this package importable (pip install -e .).
# Without Ray, SKIP_JOB=1 measures (a) and (b) only. Prints the table; writes $OUT/speed.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/plabel-speed-gpu}
BACKEND=${BACKEND:-vit_h}
IMAGES=${IMAGES:-512}
BATCH=${BATCH:-8}
AUTOCAST=${AUTOCAST:-bf16}
UNET_ACTORS=${UNET_ACTORS:-8}
CPUS=$(nproc)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
extra=()
if [[ "${SKIP_JOB:-0}" == "1" ]]; then extra+=(--skip-job); fi
"$PY" benchmarks/speed.py refine --backend "$BACKEND" --random-weights --device cuda --synthetic 64 \
  --images "$IMAGES" --batch-size "$BATCH" --autocast "$AUTOCAST" --compile --sam-actors 1 \
  --unet-actors "$UNET_ACTORS" --num-cpus "$CPUS" --shard-size 32 --out "$OUT" "${extra[@]}" "$@"

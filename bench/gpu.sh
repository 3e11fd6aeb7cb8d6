#!/usr/bin/env bash
# The benchmarks of bench/speed.py on one GPU, unchanged code, in one command (a few minutes).
#
# Once, on the CPU checkout (fetches the one pure-Python package the GPU image lacks):
#   bash bench/gpu.sh --prepare          # ml_collections wheel -> .gpu/ (git-ignored locally)
# Then on the GPU machine, from the repository root (with the device tool: carry ['.gpu']):
#   bash bench/gpu.sh                    # writes $OUT/speed_gpu.txt (or /tmp/... without $OUT)
#
# What it runs: JAX only (the CPU PyTorch is no comparison for a GPU; cpu_tuning.configure() does
# nothing there, so one side), MobileFaceNet and IR-SE100,
# training (2-sphere ArcFace over 10,000 classes) then embedding, float32 and bfloat16, with MFU
# for training against the H200's dense peaks (bf16 989 TFLOP/s; float32 runs XLA's default
# precision, TF32 on Hopper, 494 TFLOP/s). Training lines come first and every line is printed as
# soon as it is measured, so a cut-short run keeps what it finished. The image's python3 is used
# (PYTHON=... to change it), with the checkout on PYTHONPATH (the GPU image has no project venv);
# TensorFlow is not needed: the benchmarks import training.step, which does not use clu.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p .gpu
  .venv/bin/python -m pip download --quiet --no-deps --dest .gpu 'ml_collections==1.1.0'
  grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  ls .gpu
  exit 0
fi

PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/multiface_gpu}
mkdir -p "$OUT"
extra_path=""
if ! "$PYTHON" -c 'import ml_collections' 2>/dev/null; then
  wheel=$(ls .gpu/ml_collections-*.whl 2>/dev/null | head -n 1 || true)
  if [[ -z "$wheel" ]]; then
    echo "ml_collections is missing: run 'bash bench/gpu.sh --prepare' on the CPU checkout and" \
         "carry .gpu" >&2
    exit 1
  fi
  extra_path=":$PWD/$wheel"  # a pure-Python wheel imports straight from the zip
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD$extra_path" PYTHONUNBUFFERED=1
"$PYTHON" -c 'import jax; print("JAX", jax.__version__, jax.devices())'
"$PYTHON" bench/speed.py --sides=plain \
    --nets=mobilefacenet,ir_se100 --modes=train,embed --dtypes=float32,bfloat16 \
    --mobilefacenet_train_batch=512 --mobilefacenet_embed_batch=512 \
    --ir_train_batch=256 --ir_embed_batch=256 --reps=5 --steps=10 \
    --peak_tflops=float32=494,bfloat16=989 "$@" 2>&1 | tee "$OUT/speed_gpu.txt"

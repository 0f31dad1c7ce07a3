#!/usr/bin/env bash
# fewstep against PyTorch on this machine's CPU: the same networks with the same weights and
# inputs, in one run (issue 19, item 1). tools/torch_bench.py does the measuring, as it does on
# a GPU for tools/gpu-bench.sh:
#   - the SD1.5- and SDXL-shaped UNets at their real widths (random weights made with
#     diffusers, shared by both sides), 64x64 latents, f32, one UNet evaluation per round
#     (forward samples/s), fewstep against diffusers eager and torch.compile;
#   - the tiny teacher and student (models/tiny-shapes-teacher, models/tiny-shapes: our DiT,
#     which tools/tiny_torch.py mirrors in PyTorch on the same safetensors), forward and
#     training step (forward + backward + clipped AdamW), fewstep against eager and compiled,
#     in alternating rounds;
#   - both sides pinned to THREADS threads (default 1), every output compared across the two.
#
#   tools/cpu-bench.sh [ARGS...]     ARGS go to torch_bench.py (--nets, --batches, --reps, ...)
#
# Installs pinned PyTorch (PyPI's wheel, CUDA libraries and all: the CPU-only index is not
# reachable from here) and diffusers into .venv-bench/ (git-ignored, ~5 GB), builds fewstep
# (release) and writes bench.json, fewstep-<net>.json and log.txt to $OUT (default
# ./cpu-bench-out). The SDXL UNet is 10 GB in f32: torch drops its copy while fewstep runs, so
# about 12 GB of free memory is enough. At 1 thread the whole run takes about 30 minutes, more
# when torch.compile starts from a cold cache.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
TORCH=2.15.0
DIFFUSERS=0.42.1
THREADS="${THREADS:-1}"
out="${OUT:-$root/cpu-bench-out}"
venv="$root/.venv-bench"

if ! "$venv/bin/python" -c "import torch, diffusers; assert torch.__version__.startswith('$TORCH') and diffusers.__version__ == '$DIFFUSERS'" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$TORCH" "diffusers==$DIFFUSERS" "setuptools>=77"
fi
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/release/fewstep"
mkdir -p "$out"
# One thread per side, set before either runtime starts its pools.
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" RAYON_NUM_THREADS="$THREADS" \
  CANDLE_NUM_THREADS="$THREADS"
PYTHONUNBUFFERED=1 "$venv/bin/python" tools/torch_bench.py --device cpu --threads "$THREADS" \
  --fewstep "$bin" --out "$out" --steps 1 --batches 1,4 --sdxl-batches 1 --unet-reps 3 --reps 5 \
  --compile-budget-s 420 "$@" 2>&1 | tee "$out/log.txt"

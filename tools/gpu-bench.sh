#!/usr/bin/env bash
# fewstep against diffusers (eager and torch.compile) on one GPU: the SDXL UNet's 4-step
# denoising at 1024x1024 in bf16, batch 1/4/8, same weights and inputs, with a parity check
# (tools/torch_bench.py does the measuring; tools/cpu-bench.sh is its CPU counterpart).
#
# The GPU machine reaches no registry, so the work is split in two:
#   tools/gpu-bench.sh prepare [COMPUTE_CAP]   here: builds the CUDA binary (tools/build-cuda.sh),
#                                              packs it into .carry/ and the wheels diffusers
#                                              needs into .whl/ (both git-ignored)
#   tools/gpu-bench.sh run [ARGS...]           on the GPU machine, from the repository root with
#                                              .carry/ and .whl/ beside it; ARGS go to
#                                              torch_bench.py (--batches, --reps, ...)
#   tools/gpu-bench.sh run --wan [BUDGET_S] [ARGS...]
#                                              instead: Wan2.1-T2V-1.3B (random weights), 81
#                                              frames at 832x480, 4 student steps, bf16, against
#                                              diffusers (tools/wan_bench.py), all within
#                                              BUDGET_S seconds (default 420) of wall time
# The machine needs a CUDA 13 driver, python3 with torch (CUDA), and the CUDA 13 libraries
# (cuBLAS, cudart, cuRAND) in that python's site-packages (torch's cu13 wheels bring them) or
# on LD_LIBRARY_PATH. Results go to $OUT (default ./gpu-bench-out): bench.json and
# fewstep-sdxl.json, or for --wan wan-bench.json and fewstep-wan.json; and log.txt.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
DIFFUSERS=0.42.1
IMPORTLIB_METADATA=8.7.0

case "${1:-}" in
prepare)
  cap="${2:-90}"
  target="${CARGO_TARGET_DIR:-$root/target-cuda}"
  CARGO_TARGET_DIR="$target" tools/build-cuda.sh "$cap"
  mkdir -p .carry .whl
  # Line tables are of no use there; without them the packed binary is a fraction the size.
  objcopy --strip-debug "$target/release/fewstep" .carry/fewstep
  xz -T0 -6 -f .carry/fewstep
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==$DIFFUSERS" "importlib_metadata==$IMPORTLIB_METADATA"
  du -sh .carry .whl
  echo "prepared; on the GPU machine, carrying .carry and .whl: tools/gpu-bench.sh run"
  ;;
run)
  shift
  out="${OUT:-$root/gpu-bench-out}"
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-bench-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-bench-site${PYTHONPATH:+:$PYTHONPATH}
  # shellcheck source=tools/gpu-env.sh
  source tools/gpu-env.sh
  if [ "${1:-}" = "--wan" ]; then
    shift
    budget=420
    if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
      budget="$1"
      shift
    fi
    # The whole run, weights included, stays inside the budget: wan_bench.py kills fewstep at
    # what is left and skips the optional phases that would not fit; timeout is the backstop.
    PYTHONUNBUFFERED=1 timeout --kill-after=20 "$((budget + 60))" python3 tools/wan_bench.py \
      --device cuda --fewstep "$FEWSTEP_BIN" --out "$out" --budget-s "$budget" "$@" \
      2>&1 | tee "$out/log.txt"
  else
    PYTHONUNBUFFERED=1 python3 tools/torch_bench.py --device cuda --fewstep "$FEWSTEP_BIN" \
      --out "$out" "$@" \
      2>&1 | tee "$out/log.txt"
  fi
  ;;
*)
  sed -n '2,22p' "$0"
  exit 2
  ;;
esac

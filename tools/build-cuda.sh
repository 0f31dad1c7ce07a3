#!/usr/bin/env bash
# Builds `fewstep` with `--features cuda` on a machine without a system CUDA toolkit, against
# NVIDIA's CUDA 13.0 wheels from PyPI (nvcc, headers, cuBLAS, cuRAND, the runtime). The binary
# links libcublas.so.13, libcublasLt.so.13, libcudart.so.13 and libcurand.so.10: the target
# machine needs a CUDA 13 driver and those libraries on its LD_LIBRARY_PATH (a CUDA 13 toolkit
# or the same wheels).
#
# Usage: tools/build-cuda.sh [COMPUTE_CAP]     (default 90: H100/H200; 80: A100)
# Env:   CUDA_WHEELS_DIR (default ~/.cache/fewstep-cuda13), CARGO_TARGET_DIR (as cargo).
set -euo pipefail
cap="${1:-90}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${CUDA_WHEELS_DIR:-$HOME/.cache/fewstep-cuda13}"
cuda="$cache/site/nvidia/cu13"

if [ ! -x "$cuda/bin/nvcc" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheels" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cublas==13.0.2.14" \
    "nvidia-curand==10.4.0.35" "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85" \
    "nvidia-nvvm==13.0.88" "nvidia-cuda-nvrtc==13.0.88"
  for w in "$cache"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$cache/site"
  done
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
  # The layout the build scripts expect: lib64/ and unversioned names to link against.
  ln -sfn lib "$cuda/lib64"
  for l in cublas cublasLt cudart curand nvrtc; do
    so=$(cd "$cuda/lib" && ls "lib$l".so.* | head -1)
    ln -sf "$so" "$cuda/lib/lib$l.so"
  done
fi

cd "$root"
build() {
  PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs" \
    CUDA_COMPUTE_CAP="$cap" cargo build --release --features cuda
}
if ! build; then
  # libcuda.so ships with the driver, which a build machine lacks: link against a stub that
  # defines the driver entry points cudarc uses; the driver's own library is loaded at run time.
  mkdir -p "$cuda/lib/stubs"
  nm -u "${CARGO_TARGET_DIR:-$root/target}"/release/deps/libcudarc-*.rlib 2>/dev/null |
    awk '$1 == "U" && $2 ~ /^cu[A-Z]/ { print "void " $2 "(void) {}" }' | sort -u \
    > "$cuda/lib/stubs/cuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/cuda.c"
  build
fi
echo "built target/release/fewstep for compute capability $cap;" \
  "run it with LD_LIBRARY_PATH=<dir of libcublas.so.13> (here: $cuda/lib)"

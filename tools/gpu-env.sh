# Sourced by the tools/gpu-*.sh scripts on the GPU machine. Unpacks the carried CUDA build
# (.carry/fewstep.xz, made by `tools/gpu-bench.sh prepare`) to /tmp/fewstep, puts the CUDA 13
# libraries it links (from the nvidia wheels in python's site-packages, which torch's cu13
# wheels bring) on LD_LIBRARY_PATH, and sets FEWSTEP_BIN. A FEWSTEP_BIN that is already set
# (say, a CPU build for a dry run here) is kept and nothing is unpacked.
if [ -z "${FEWSTEP_BIN:-}" ]; then
  xz -dc .carry/fewstep.xz > /tmp/fewstep && chmod +x /tmp/fewstep
  FEWSTEP_BIN=/tmp/fewstep
  cuda_libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for lib in ("libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10"):
        for f in glob.glob(os.path.join(root, "nvidia", "**", lib), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH="$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
  if ldd "$FEWSTEP_BIN" | grep "not found"; then
    echo "fewstep is missing libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
  fi
fi
export FEWSTEP_BIN

#!/usr/bin/env bash
# Installs what tools/parity/make_fixtures.py needs on a Debian 12 machine:
#   - Debian's CPU build of PyTorch (python3-torch 1.13.1) and numpy for /usr/bin/python3,
#   - Debian's torchvision (python3-torchvision 0.14.1, built for that torch), which open_clip
#     imports for its image transforms,
#   - pinned diffusers/transformers/open_clip and their pure-Python (or self-contained wheel)
#     deps, installed with --no-deps into tools/parity/.pydeps so no second torch is pulled,
#   - an overlay tools/parity/.pydeps-wan (a newer diffusers and huggingface_hub) that only
#     wan_fixture.py puts before .pydeps.
# Idempotent: apt is skipped when torch already imports, pip when a folder matches its pins.
# Usage (as root): bash tools/parity/setup.sh
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
py=/usr/bin/python3
target="$here/.pydeps"

# Every package is pinned; the list is the whole closure that diffusers, transformers and
# open_clip import at run time (numpy, torch and torchvision come from Debian).
pins=(
  diffusers==0.29.2
  transformers==4.41.2
  tokenizers==0.19.1
  safetensors==0.4.3
  huggingface_hub==0.23.4
  regex==2024.5.15
  filelock==3.15.4
  fsspec==2024.6.0
  packaging==24.1
  PyYAML==6.0.1
  requests==2.32.3
  urllib3==2.2.2
  idna==3.7
  charset-normalizer==3.3.2
  certifi==2024.6.2
  tqdm==4.66.4
  typing_extensions==4.12.2
  importlib_metadata==7.1.0
  zipp==3.19.2
  Pillow==10.3.0
  open_clip_torch==2.24.0
  ftfy==6.2.0
  wcwidth==0.2.13
)

if ! "$py" -c 'import torch, numpy; assert torch.__version__.startswith("1.13")' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends python3-torch python3-numpy python3-pip
fi
if ! "$py" -c 'import torchvision' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends python3-torchvision
fi
if ! "$py" -m pip --version >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends python3-pip
fi

# install_pins DIR PIN...: (re)installs exactly PIN... into DIR unless DIR/.pins lists them.
install_pins() {
  local dir="$1"
  shift
  local want
  want="$(printf '%s\n' "$@")"
  if [[ -f "$dir/.pins" && "$(cat "$dir/.pins")" == "$want" ]]; then
    echo "tools/parity/$(basename "$dir") is up to date"
    return
  fi
  rm -rf "$dir"
  # --target skips Debian's externally-managed check; --no-deps keeps torch/numpy out.
  "$py" -m pip install --no-deps --only-binary=:all: --no-compile --target "$dir" "$@"
  printf '%s\n' "$want" >"$dir/.pins"
}
install_pins "$target" "${pins[@]}"

# wan_fixture.py needs diffusers >= 0.33 (WanTransformer3DModel), whose Stable Diffusion
# pipelines no longer import on torch 1.13: an overlay put before .pydeps on PYTHONPATH for
# that script alone, so the SD and CLIP fixtures keep their pins.
wan_target="$here/.pydeps-wan"
wan_pins=(
  diffusers==0.33.1
  huggingface_hub==0.27.1
)
install_pins "$wan_target" "${wan_pins[@]}"

PYTHONPATH="$target" "$py" - <<'PY'
import torch, torchvision, numpy, diffusers, transformers, tokenizers, safetensors, open_clip.version
print("torch", torch.__version__, "torchvision", torchvision.__version__, "numpy", numpy.__version__,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "tokenizers", tokenizers.__version__, "safetensors", safetensors.__version__,
      "open_clip", open_clip.version.__version__)
PY

PYTHONPATH="$wan_target:$target" "$py" -c 'import diffusers; print("wan overlay: diffusers", diffusers.__version__)'

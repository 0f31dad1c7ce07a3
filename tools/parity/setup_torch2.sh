#!/usr/bin/env bash
# The PyTorch 2 environment of the Wan fixtures (tools/parity/umt5_fixture.py and the Wan VAE
# fixture): a virtualenv at tools/parity/.venv-torch2 with torch from PyPI (its Linux wheel is
# the CUDA build; it runs on the CPU, which is all a fixture needs) and pinned diffusers,
# transformers, tokenizers and sentencepiece. About 5 GB, mostly torch's CUDA libraries.
# Idempotent: pip runs only when an import or a version does not match the pins.
# Usage: bash tools/parity/setup_torch2.sh, then
#   tools/parity/.venv-torch2/bin/python tools/parity/umt5_fixture.py [--check]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-torch2"
pins=(
  torch==2.15.0
  numpy==2.4.6
  safetensors==0.8.0
  huggingface_hub==2.4.0
  diffusers==0.42.1
  transformers==5.25.0
  tokenizers==0.23.3
  sentencepiece==0.2.1
  protobuf==7.36.2
)

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
check='
import sys, importlib.metadata as m
want = dict(p.split("==") for p in sys.argv[1:])
bad = {k: v for k, v in want.items() if m.version(k) != v}
sys.exit(1 if bad else 0)
'
if ! "$venv/bin/python" -c "$check" "${pins[@]}" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "${pins[@]}"
fi
"$venv/bin/python" -c "$check" "${pins[@]}"
echo "torch 2 parity environment ready: $venv"

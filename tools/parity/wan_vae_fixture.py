#!/usr/bin/env python3
"""Parity fixture for the Wan2.1 video VAE (``AutoencoderKLWan``).

Builds a tiny random-weight ``AutoencoderKLWan`` with diffusers, saves it in the diffusers
layout under ``tests/fixtures/wan/wan-tiny-t2v/vae/`` (the pipeline directory, with the text path) and
writes ``wan-tiny-vae.reference.safetensors`` (fixed inputs and the reference outputs) and
``wan-tiny-vae.reference.json`` (config, versions, what each tensor is). The Rust tests
(``src/families/wan/vae/tests.rs``) load the directory with fewstep's own code and compare.

Unlike ``wan_fixture.py`` (diffusers 0.33.1 on the Debian torch 1.13, with shims) this script
runs on torch 2 and a current diffusers, the reference the VAE port was written against:

    /path/to/venv/bin/python tools/parity/wan_vae_fixture.py          # writes the fixture
    /path/to/venv/bin/python tools/parity/wan_vae_fixture.py --check  # recomputes, writes nothing

with torch 2.15.0 (CPU), diffusers 0.42.1, safetensors 0.8.0, numpy 2.4.6 (see
tools/parity/README.md). Generation is seeded and deterministic (one thread): a rerun
rewrites byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_common import compare_outputs, describe_in, randomize, tensor_tables, wan_vae_extra  # noqa: E402

import diffusers  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "wan"
NAME = "wan-tiny-vae"
MODEL_DIR = OUT_DIR / "wan-tiny-t2v" / "vae"
SEEDS = dict(weights=601, stats=602, inputs=6001)
STD_RANGE = (0.1, 5.0)
Z_DIM = 4

# Wan2.1's VAE structure (dim_mult of four stages, temporal downsampling in the last two,
# num_res_blocks 2, no attention outside the mid blocks) scaled down: base 8 channels,
# multipliers [1, 1, 2, 2] (a channel change inside the stack and at the decoder's halving
# upsamplers), z_dim 4. latents_mean / latents_std are drawn (not 0 / 1) so that the
# normalisation helpers matter.
CONFIG = dict(
    base_dim=8,
    z_dim=Z_DIM,
    dim_mult=[1, 1, 2, 2],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)

# Decode: B = 2 normalised latents with 3 latent frames on a non-square 3 x 5 grid
# -> video [2, 3, 1 + 4 * 2, 24, 40]. Encode: B = 2 videos of 9 frames (chunks 1, 4, 4) at
# 16 x 24 -> latents [2, 4, 3, 2, 3].
DECODE_LATENTS = (2, Z_DIM, 3, 3, 5)
ENCODE_VIDEO = (2, 3, 9, 16, 24)

DESCRIPTIONS = {
    "vae.decode.latents": "[2,4,3,3,5] input: normalised latents [B, z, F, h, w] (the transformer's space)",
    "vae.decode.video": "[2,3,9,24,40] vae.decode(latents / (1 / latents_std) + latents_mean).sample, "
    "as WanPipeline decodes (frame by frame with the causal cache, clamped to [-1, 1])",
    "vae.encode.video": "[2,3,9,16,24] input video [B, 3, T, H, W] in [-1, 1]",
    "vae.encode.mean": "[2,4,3,2,3] vae.encode(video).latent_dist.mean (raw latents)",
    "vae.encode.logvar": "[2,4,3,2,3] vae.encode(video).latent_dist.logvar (clamped to [-30, 20])",
    "vae.encode.latents": "[2,4,3,2,3] (mean - latents_mean) * (1 / latents_std): the normalised mean",
}


def describe(name: str) -> str:
    return describe_in(DESCRIPTIONS, name)


def is_input(name: str) -> bool:
    return name in ("vae.decode.latents", "vae.encode.video")


def latent_stats() -> tuple[list[float], list[float]]:
    """Per-channel latent mean and std, rounded to 4 decimals like the released config."""
    g = torch.Generator().manual_seed(SEEDS["stats"])
    mean = (torch.randn(Z_DIM, generator=g) * 0.5).tolist()
    std = (torch.rand(Z_DIM, generator=g) * 2.2 + 0.8).tolist()
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def build() -> AutoencoderKLWan:
    torch.manual_seed(0)
    mean, std = latent_stats()
    model = AutoencoderKLWan(**CONFIG, latents_mean=mean, latents_std=std)
    randomize(model, SEEDS["weights"], extra=wan_vae_extra(model))
    return model.eval()


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEEDS["inputs"])
    return {
        "vae.decode.latents": torch.randn(DECODE_LATENTS, generator=g),
        "vae.encode.video": torch.rand(ENCODE_VIDEO, generator=g) * 2.0 - 1.0,
    }


def stats_tensors(model: AutoencoderKLWan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`latents_mean` and `1 / latents_std` shaped [1, z, 1, 1, 1], as WanPipeline builds them."""
    shape = (1, model.config.z_dim, 1, 1, 1)
    mean = torch.tensor(model.config.latents_mean).view(shape).to(dtype)
    inv_std = 1.0 / torch.tensor(model.config.latents_std).view(shape).to(dtype)
    return mean, inv_std


def compute_reference(model: AutoencoderKLWan, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In float64 from the f32 weights and inputs, stored as f32. diffusers' `WanUpsample`
    rounds to f32 around its nearest-neighbour resize even then (exact for the copy itself)."""
    m = model.to(torch.float64)
    mean, inv_std = stats_tensors(m, torch.float64)
    with torch.no_grad():
        z = x["vae.decode.latents"].double() / inv_std + mean
        video = m.decode(z).sample
        dist = m.encode(x["vae.encode.video"].double()).latent_dist
    return {
        "vae.decode.video": video.float(),
        "vae.encode.mean": dist.mean.float(),
        "vae.encode.logvar": dist.logvar.float(),
        "vae.encode.latents": ((dist.mean - mean) * inv_std).float(),
    }


def std_check(r: dict[str, torch.Tensor]) -> dict[str, float]:
    stds = {}
    for k, v in r.items():
        if not torch.isfinite(v).all():
            raise SystemExit(f"{NAME}: {k} has non-finite values")
        stds[k] = round(float(v.std()), 4)
        if not STD_RANGE[0] <= stds[k] <= STD_RANGE[1]:
            raise SystemExit(f"{NAME}: {k} std {stds[k]} is outside {STD_RANGE}: fix the init scale")
    return stds


def clamped_fraction(video: torch.Tensor) -> float:
    """The share of decoded values at the [-1, 1] clamp, where a wrong value can hide."""
    return round(float((video.abs() >= 1.0).double().mean()), 4)


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
    }


def generate() -> None:
    model = build()
    x = make_inputs()
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    # Saved in f32 before compute_reference casts the model to f64.
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    r = compute_reference(model, x)
    stds = std_check(r)
    clamped = clamped_fraction(r["vae.decode.video"])
    if clamped > 0.05:
        raise SystemExit(f"{NAME}: {clamped:.1%} of the decoded video is clamped: fix the init scale")
    tensors = {k: v.detach().clone().contiguous() for k, v in sorted({**x, **r}.items())}
    safetensors.torch.save_file(tensors, str(OUT_DIR / f"{NAME}.reference.safetensors"))
    mean, std = latent_stats()
    meta = {
        "model": NAME,
        "directory": str(MODEL_DIR.relative_to(OUT_DIR)),
        "generator": "tools/parity/wan_vae_fixture.py",
        "mirrors": "Wan2.1 VAE (AutoencoderKLWan), scaled down",
        "config": {**CONFIG, "latents_mean": mean, "latents_std": std},
        "versions": versions(),
        "computed_in": "float64 from the f32 weights and inputs, stored as float32",
        "tolerance": "max abs difference <= 1e-4 (f32), reported relative to the reference's max abs value",
        "output_std": stds,
        "decode_clamped_fraction": clamped,
        **tensor_tables(r, tensors, is_input, describe),
    }
    (OUT_DIR / f"{NAME}.reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"{NAME}: wrote {MODEL_DIR.relative_to(REPO)} and its reference ({len(tensors)} tensors); "
        f"stds {stds}; decode clamped {clamped:.2%}"
    )


def check() -> bool:
    ref = safetensors.torch.load_file(str(OUT_DIR / f"{NAME}.reference.safetensors"))
    model = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(MODEL_DIR))
    weights = safetensors.torch.load_file(str(MODEL_DIR / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict(weights, strict=True)
    model.eval()
    inputs = {k: v for k, v in ref.items() if is_input(k)}
    r = compute_reference(model, inputs)
    missing = set(ref) - set(inputs) - set(r)
    if missing:
        print(f"{NAME}: reference tensors not reproduced: {sorted(missing)}")
        return False
    return compare_outputs(NAME, ref, r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="reload the saved fixture and verify it")
    args = ap.parse_args()
    if int(torch.__version__.split(".")[0]) < 2:
        raise SystemExit(f"torch {torch.__version__}: this fixture is made with torch 2 (see the docstring)")
    torch.set_num_threads(1)
    if args.check:
        if not check():
            raise SystemExit(1)
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    generate()


if __name__ == "__main__":
    main()

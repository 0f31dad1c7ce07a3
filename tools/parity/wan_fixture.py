#!/usr/bin/env python3
"""Parity fixture for the Wan2.1 video transformer (issue 17, step 3).

Builds a tiny random-weight ``WanTransformer3DModel`` with diffusers, saves it in the
diffusers layout under ``tests/fixtures/wan/wan-tiny/transformer/`` and writes, beside it,
``wan-tiny.reference.safetensors`` (fixed inputs and the reference outputs) and
``wan-tiny.reference.json`` (config, versions, what each tensor is). The Rust test
(``src/families/wan/tests.rs``) loads the directory with fewstep's own code and compares.
It also writes ``flow-match.reference.json``: the timesteps, sigmas and Euler steps of
``FlowMatchEulerDiscreteScheduler`` at Wan's shifts (``src/families/wan/scheduler.rs``
compares); ``--scheduler-only`` writes or checks just that file.

Wan needs diffusers >= 0.33, whose Stable Diffusion pipelines no longer run on the Debian
torch 1.13 that make_fixtures.py uses; so this script runs on its own overlay of pins
(``tools/parity/.pydeps-wan``, see setup.sh) in a separate process:

    PYTHONPATH=tools/parity/.pydeps-wan:tools/parity/.pydeps /usr/bin/python3 tools/parity/wan_fixture.py
    PYTHONPATH=tools/parity/.pydeps-wan:tools/parity/.pydeps /usr/bin/python3 tools/parity/wan_fixture.py --check

Generation is seeded and deterministic; ``--check`` writes nothing, reloads the saved
directory (its config and a strict load of its weights) and recomputes every output from the stored inputs.
"""

from __future__ import annotations

import argparse
import json
import math
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
import torch.nn.functional as F  # noqa: E402

from parity_common import compare_outputs, describe_in, randomize, tensor_tables, wan_transformer_extra  # noqa: E402


def torch_1_13_shims() -> None:
    """What diffusers 0.33's Wan transformer needs of torch 2 on torch 1.13: the float8 dtype
    names its quantizer module lists at import (never used here), and
    ``F.scaled_dot_product_attention``, which for Wan (no mask, no dropout, not causal) is
    softmax(q k^T / sqrt(d)) v, what torch 2's math backend computes."""
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if not hasattr(torch, name):
            setattr(torch, name, None)
    if hasattr(F, "scaled_dot_product_attention"):
        return

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        if attn_mask is not None or dropout_p != 0.0 or is_causal:
            raise NotImplementedError("the shim covers Wan's unmasked attention only")
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return torch.softmax(q @ k.transpose(-2, -1) * s, dim=-1) @ v

    F.scaled_dot_product_attention = sdpa


torch_1_13_shims()
import diffusers  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "wan"
NAME = "wan-tiny"
SEEDS = dict(weights=501, inputs=5001)
STD_RANGE = (0.1, 5.0)

# Wan2.1-T2V-1.3B's structure scaled down: 2 layers, 2 heads of 16 (rotary pairs t 4, h 2,
# w 2), patch (1, 2, 2), cross-attention norm. in != out channels so a swap shows.
CONFIG = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=6,
    out_channels=4,
    text_dim=24,
    freq_dim=16,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
# B = 2 latents [B, C, F, H, W] with F = 3 frames and a non-square 2 x 3 patch grid.
LATENT_SHAPE = (2, 6, 3, 4, 6)
TEXT_SHAPE = (2, 5, 24)
# Each case gives the two rows different timesteps; fractional ones as the shifted
# flow-matching schedule produces.
TIMESTEPS = [[999.0, 250.0], [937.5, 13.25]]

DESCRIPTIONS = {
    "transformer.latents": "[2,6,3,4,6] input latents [B, C, F, H, W]",
    "transformer.text": "[2,5,24] input text states [B, L, text_dim] (UMT5 output in Wan)",
    "transformer.timesteps.K": "[2] input timesteps of case K, one per row (0..1000 scale)",
    "transformer.out.K": "[2,4,3,4,6] WanTransformer3DModel(latents, timesteps.K, text).sample",
}


def describe(name: str) -> str:
    return describe_in(DESCRIPTIONS, name)


def is_input(name: str) -> bool:
    return name in ("transformer.latents", "transformer.text") or name.startswith("transformer.timesteps.")


def build() -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**CONFIG)
    randomize(model, SEEDS["weights"], extra=wan_transformer_extra(model))
    return model.eval()


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEEDS["inputs"])
    x = {
        "transformer.latents": torch.randn(LATENT_SHAPE, generator=g),
        "transformer.text": torch.randn(TEXT_SHAPE, generator=g),
    }
    for k, ts in enumerate(TIMESTEPS):
        x[f"transformer.timesteps.{k}"] = torch.tensor(ts, dtype=torch.float32)
    return x


def compute_reference(model: WanTransformer3DModel, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In float64 from the f32 weights and inputs, stored as f32. diffusers keeps some steps
    in f32 even then (`FP32LayerNorm`, `temb.float()`, the residual's `.float()`), as an f32
    implementation does."""
    m = model.to(torch.float64)
    r = {}
    with torch.no_grad():
        for k in range(len(TIMESTEPS)):
            out = m(
                x["transformer.latents"].double(),
                x[f"transformer.timesteps.{k}"].double(),
                x["transformer.text"].double(),
            ).sample
            r[f"transformer.out.{k}"] = out.float()
    return r


def std_check(r: dict[str, torch.Tensor]) -> dict[str, float]:
    stds = {}
    for k, v in r.items():
        if not torch.isfinite(v).all():
            raise SystemExit(f"{NAME}: {k} has non-finite values")
        stds[k] = round(float(v.std()), 4)
        if not STD_RANGE[0] <= stds[k] <= STD_RANGE[1]:
            raise SystemExit(f"{NAME}: {k} std {stds[k]} is outside {STD_RANGE}: fix the init scale")
    return stds


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
    model_dir = OUT_DIR / NAME
    # Only the transformer (the pipeline components live in wan-tiny-t2v/, written by other scripts).
    if (model_dir / "transformer").exists():
        shutil.rmtree(model_dir / "transformer")
    # Saved in f32 before compute_reference casts the model to f64.
    model.save_pretrained(model_dir / "transformer", safe_serialization=True)
    r = compute_reference(model, x)
    stds = std_check(r)
    tensors = {k: v.detach().clone().contiguous() for k, v in sorted({**x, **r}.items())}
    safetensors.torch.save_file(tensors, str(OUT_DIR / f"{NAME}.reference.safetensors"))
    meta = {
        "model": NAME,
        "directory": NAME,
        "generator": "tools/parity/wan_fixture.py",
        "mirrors": "Wan2.1-T2V-1.3B transformer (WanTransformer3DModel), scaled down",
        "config": CONFIG,
        "timesteps": TIMESTEPS,
        "versions": versions(),
        "computed_in": "float64 from the f32 weights and inputs (diffusers' f32 islands kept), stored as float32",
        "tolerance": "max abs difference <= 1e-4 (f32), reported relative to the reference's max abs value",
        "output_std": stds,
        **tensor_tables(r, tensors, is_input, describe),
    }
    (OUT_DIR / f"{NAME}.reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{NAME}: wrote {model_dir.relative_to(REPO)} and its reference ({len(tensors)} tensors); stds {stds}")


# The flow-matching schedule: diffusers' FlowMatchEulerDiscreteScheduler with Wan's shifts
# (3.0 for 480p, 5.0 for 720p) at a student's and a teacher's step count.
SCHEDULER_NAME = "flow-match"
SCHEDULER_CASES = [(shift, steps) for shift in (3.0, 5.0) for steps in (4, 50)]
# The Euler chain: a fixed [2, 3] sample and one fixed "velocity" per step of the 4-step
# shift-3.0 schedule, stepped by the scheduler itself.
EULER_CASE = (3.0, 4)
EULER_SAMPLE = [[0.5, -1.25, 2.0], [-0.75, 0.125, 1.5]]
EULER_VELOCITY = [[0.3, -0.7, 1.1], [-1.6, 0.45, 0.05]]


def scheduler_reference() -> dict:
    """Timesteps and sigmas of `set_timesteps` for each case (f32 values, written as the
    exact decimal of each), and the samples of a 4-step Euler chain."""
    cases = []
    for shift, steps in SCHEDULER_CASES:
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(steps)
        cases.append(
            dict(shift=shift, steps=steps, timesteps=s.timesteps.tolist(), sigmas=s.sigmas.tolist())
        )
    shift, steps = EULER_CASE
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(steps)
    x = torch.tensor(EULER_SAMPLE, dtype=torch.float32)
    samples = []
    for k, t in enumerate(s.timesteps):
        # A different velocity each step (rolled), so a step that reuses the last one shows.
        v = torch.tensor(EULER_VELOCITY, dtype=torch.float32).roll(k, dims=1)
        x = s.step(v, t, x).prev_sample
        samples.append(x.tolist())
    euler = dict(
        shift=shift,
        steps=steps,
        sample=EULER_SAMPLE,
        velocity=EULER_VELOCITY,
        velocity_rule="step k uses velocity rolled by k along the last axis (torch.roll(v, k, 1))",
        samples=samples,
    )
    return dict(
        scheduler="FlowMatchEulerDiscreteScheduler",
        generator="tools/parity/wan_fixture.py",
        num_train_timesteps=1000,
        versions=versions(),
        cases=cases,
        euler=euler,
    )


def scheduler_path() -> Path:
    return OUT_DIR / f"{SCHEDULER_NAME}.reference.json"


def generate_scheduler() -> None:
    scheduler_path().write_text(json.dumps(scheduler_reference(), indent=1) + "\n")
    print(f"{SCHEDULER_NAME}: wrote {scheduler_path().relative_to(REPO)}")


def check_scheduler() -> bool:
    stored = json.loads(scheduler_path().read_text())
    fresh = json.loads(json.dumps(scheduler_reference()))
    stored.pop("versions"), fresh.pop("versions")
    if stored != fresh:
        print(f"{SCHEDULER_NAME}: the stored schedule differs from diffusers'")
        return False
    print(f"{SCHEDULER_NAME}: identical")
    return True


def check() -> bool:
    ref = safetensors.torch.load_file(str(OUT_DIR / f"{NAME}.reference.safetensors"))
    # from_pretrained needs `accelerate` for Wan's `_keep_in_fp32_modules`; the saved config
    # and a strict load of the saved weights are the same proof.
    model_dir = OUT_DIR / NAME / "transformer"
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(model_dir))
    weights = safetensors.torch.load_file(str(model_dir / "diffusion_pytorch_model.safetensors"))
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
    ap.add_argument("--scheduler-only", action="store_true", help="only the flow-matching schedule fixture")
    args = ap.parse_args()
    major, minor = (int(v) for v in diffusers.__version__.split(".")[:2])
    if (major, minor) < (0, 33):
        raise SystemExit(
            f"diffusers {diffusers.__version__} has no WanTransformer3DModel: "
            "put tools/parity/.pydeps-wan first on PYTHONPATH (see setup.sh)"
        )
    torch.set_num_threads(1)
    if args.check:
        ok = check_scheduler()
        if not args.scheduler_only:
            ok = check() and ok
        if not ok:
            raise SystemExit(1)
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    generate_scheduler()
    if not args.scheduler_only:
        generate()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Parity fixture for a whole Wan2.1 text-to-video generation: diffusers' ``WanPipeline``
from fixed initial noise, 4 Euler steps with classifier-free guidance, then the VAE.

Completes ``tests/fixtures/wan/wan-tiny-t2v/`` as a diffusers directory: it adds a tiny random
``WanTransformer3DModel`` that fits the VAE (``wan_vae_fixture.py``: 4 latent channels) and the
text encoder (``umt5_fixture.py``: width 32), ``scheduler/scheduler_config.json``
(``FlowMatchEulerDiscreteScheduler``, shift 3.0) and ``model_index.json``. Run those two
scripts first. Writes ``wan-tiny-t2v.reference.{safetensors,json}``: the initial latents,
the final latents and the decoded video of two prompts (one with a negative prompt).

Runs in the torch 2 environment of ``setup_torch2.sh``:

    tools/parity/.venv-torch2/bin/python tools/parity/wan_pipeline_fixture.py
    tools/parity/.venv-torch2/bin/python tools/parity/wan_pipeline_fixture.py --check

Seeded and deterministic; ``--check`` loads every component from the directory and recomputes
every output from the stored latents.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import T5Tokenizer, UMT5EncoderModel  # noqa: E402

from parity_common import compare_outputs, fixture_main, randomize, wan_transformer_extra  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "wan"
NAME = "wan-tiny-t2v"
MODEL_DIR = OUT_DIR / NAME
SEEDS = dict(weights=701, latents=7001)
STD_RANGE = (0.05, 5.0)

SHIFT = 3.0
STEPS = 4
GUIDANCE = 5.0
MAX_LEN = 16
FRAMES = 5
HEIGHT, WIDTH = 32, 48
PROMPTS = ["a red cat walks on the beach", "a blue dog jumps over a fence"]
NEGATIVE = ["", "the city at night"]

# The T2V transformer scaled down to fit the other components: z_dim 4 in and out, text
# width 32 (umT5's d_model); 2 layers, 2 heads of 16, patch (1, 2, 2).
TRANSFORMER = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
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

MODEL_INDEX = {
    "_class_name": "WanPipeline",
    "_diffusers_version": diffusers.__version__,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def build_transformer() -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TRANSFORMER)
    randomize(model, SEEDS["weights"], extra=wan_transformer_extra(model))
    return model.eval()


def latent_shape() -> tuple[int, ...]:
    return (len(PROMPTS), 4, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)


def run(pipe: WanPipeline, latents: torch.Tensor, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The pipeline to its final latents, then the VAE as the pipeline decodes them."""
    with torch.no_grad():
        final = pipe(
            prompt=PROMPTS,
            negative_prompt=NEGATIVE,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            latents=latents.clone(),
            max_sequence_length=MAX_LEN,
            output_type="latent",
        ).frames
        vae = pipe.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(final.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(final.dtype)
        video = vae.decode((final / inv_std + mean).to(vae.dtype), return_dict=False)[0]
    return {"pipeline.final_latents": final.float(), "pipeline.video": video.float()}


def components() -> dict:
    return dict(
        tokenizer=T5Tokenizer.from_pretrained(str(MODEL_DIR / "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(str(MODEL_DIR / "text_encoder")).eval(),
        vae=AutoencoderKLWan.from_pretrained(str(MODEL_DIR / "vae")).eval(),
    )


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def generate() -> None:
    for part in ("vae", "text_encoder", "tokenizer"):
        if not (MODEL_DIR / part).is_dir():
            raise SystemExit(f"{NAME}: {part}/ missing: run wan_vae_fixture.py and umt5_fixture.py first")
    transformer = build_transformer()
    tdir = MODEL_DIR / "transformer"
    if tdir.exists():
        shutil.rmtree(tdir)
    transformer.save_pretrained(str(tdir), safe_serialization=True)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.save_pretrained(str(MODEL_DIR / "scheduler"))
    (MODEL_DIR / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")

    pipe = WanPipeline(transformer=transformer, scheduler=scheduler, **components())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(SEEDS["latents"])
    latents = torch.randn(latent_shape(), generator=g)
    r = run(pipe, latents)
    stds = {k: round(float(v.std()), 4) for k, v in r.items()}
    for k, s in stds.items():
        if not torch.isfinite(r[k]).all() or not STD_RANGE[0] <= s <= STD_RANGE[1]:
            raise SystemExit(f"{NAME}: {k} std {s} is outside {STD_RANGE}")
    tensors = {"pipeline.latents": latents, **r}
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(OUT_DIR / f"{NAME}.reference.safetensors")
    )
    meta = {
        "model": NAME,
        "generator": "tools/parity/wan_pipeline_fixture.py",
        "mirrors": "WanPipeline.__call__ (Wan2.1 T2V) on tiny random components",
        "transformer": TRANSFORMER,
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": SHIFT, "num_train_timesteps": 1000},
        "call": {
            "prompts": PROMPTS,
            "negative_prompts": NEGATIVE,
            "height": HEIGHT,
            "width": WIDTH,
            "num_frames": FRAMES,
            "num_inference_steps": STEPS,
            "guidance_scale": GUIDANCE,
            "max_sequence_length": MAX_LEN,
        },
        "versions": versions(),
        "computed_in": "float32 (the pipeline keeps its latents in f32)",
        "tolerance": "max abs difference <= 1e-4 relative to the reference's max abs value",
        "output_std": stds,
        "output_max_abs": {k: round(float(v.abs().max()), 4) for k, v in r.items()},
        "tensors": {
            "pipeline.latents": f"{list(latent_shape())} input: the initial noise (normalised latents)",
            "pipeline.final_latents": f"{list(latent_shape())} the latents after {STEPS} steps",
            "pipeline.video": f"[{len(PROMPTS)}, 3, {FRAMES}, {HEIGHT}, {WIDTH}] the VAE's decode, in [-1, 1]",
        },
    }
    (OUT_DIR / f"{NAME}.reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{NAME}: wrote transformer/, scheduler/, model_index.json and the reference; stds {stds}")


def check() -> bool:
    ref = safetensors.torch.load_file(str(OUT_DIR / f"{NAME}.reference.safetensors"))
    # from_pretrained needs `accelerate` for the transformer's `_keep_in_fp32_modules`; its
    # saved config and a strict load of its weights are the same proof.
    tdir = MODEL_DIR / "transformer"
    transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(tdir))
    weights = safetensors.torch.load_file(str(tdir / "diffusion_pytorch_model.safetensors"))
    transformer.load_state_dict(weights, strict=True)
    pipe = WanPipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(MODEL_DIR / "scheduler")),
        **components(),
    )
    pipe.set_progress_bar_config(disable=True)
    r = run(pipe, ref["pipeline.latents"])
    return compare_outputs(NAME, ref, r)


def main() -> None:
    fixture_main(__doc__, generate, check)


if __name__ == "__main__":
    main()

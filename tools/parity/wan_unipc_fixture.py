"""Reference outputs of diffusers' ``WanPipeline`` sampling with ``UniPCMultistepScheduler``,
the scheduler Wan2.1 ships, on the tiny random pipeline of ``wan_pipeline_fixture.py``.

The scheduler is Wan-AI/Wan2.1-T2V-1.3B-Diffusers' ``scheduler/scheduler_config.json`` (flow
prediction over shifted flow sigmas, UniPC-bh2 with data prediction, solver order 2), saved
beside the reference as ``wan-unipc-scheduler.json``. From the stored initial latents of
``wan-tiny-t2v.reference.safetensors`` it runs 6 steps with CFG 5 at order 2, and again at
order 3 (the 2x2 and 3x3 solves), and records the final latents and the scheduler's sigmas
and (integer) timesteps. Writes ``wan-tiny-t2v-unipc.reference.{safetensors,json}``.

    bash tools/parity/setup_torch2.sh
    tools/parity/.venv-torch2/bin/python tools/parity/wan_unipc_fixture.py [--check]

Deterministic; ``--check`` recomputes every output and compares (max abs <= 1e-6).
"""

from __future__ import annotations

import json

import safetensors.torch
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from parity_common import compare_outputs, fixture_main
from wan_pipeline_fixture import (
    FRAMES,
    GUIDANCE,
    HEIGHT,
    MAX_LEN,
    MODEL_DIR,
    NAME,
    NEGATIVE,
    OUT_DIR,
    PROMPTS,
    WIDTH,
    components,
    versions,
)
from wan_pipeline_fixture import run as run_pipeline

REF = f"{NAME}-unipc"
STEPS = 6
ORDERS = (2, 3)

# Wan2.1-T2V-1.3B-Diffusers' scheduler_config.json, key for key.
SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}


def scheduler(order: int) -> UniPCMultistepScheduler:
    cfg = {k: v for k, v in SCHEDULER.items() if not k.startswith("_")}
    return UniPCMultistepScheduler(**{**cfg, "solver_order": order})


def transformer() -> WanTransformer3DModel:
    tdir = MODEL_DIR / "transformer"
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(tdir))
    weights = safetensors.torch.load_file(str(tdir / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict(weights, strict=True)
    return model.eval()


def run(latents: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = components()
    model = transformer()
    out = {}
    for order in ORDERS:
        sched = scheduler(order)
        pipe = WanPipeline(transformer=model, scheduler=sched, **parts)
        pipe.set_progress_bar_config(disable=True)
        final = run_pipeline(pipe, latents, STEPS)["pipeline.final_latents"]
        out[f"order{order}.final_latents"] = final
        out[f"order{order}.sigmas"] = sched.sigmas.float()
        out[f"order{order}.timesteps"] = sched.timesteps.float()
    return out


def stored_latents() -> torch.Tensor:
    ref = safetensors.torch.load_file(str(OUT_DIR / f"{NAME}.reference.safetensors"))
    return ref["pipeline.latents"]


def generate() -> None:
    r = run(stored_latents())
    for k, v in r.items():
        if not torch.isfinite(v).all():
            raise SystemExit(f"{REF}: {k} is not finite")
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in r.items()}, str(OUT_DIR / f"{REF}.reference.safetensors")
    )
    (OUT_DIR / "wan-unipc-scheduler.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    meta = {
        "model": NAME,
        "generator": "tools/parity/wan_unipc_fixture.py",
        "mirrors": "WanPipeline.__call__ with UniPCMultistepScheduler (Wan2.1's scheduler config)",
        "scheduler": "wan-unipc-scheduler.json (solver_order overridden per run)",
        "call": {
            "prompts": PROMPTS,
            "negative_prompts": NEGATIVE,
            "height": HEIGHT,
            "width": WIDTH,
            "num_frames": FRAMES,
            "num_inference_steps": STEPS,
            "guidance_scale": GUIDANCE,
            "max_sequence_length": MAX_LEN,
            "latents": f"{NAME}.reference.safetensors: pipeline.latents",
        },
        "solver_orders": list(ORDERS),
        "versions": versions(),
        "tolerance": "max abs difference <= 1e-4 relative to the reference's max abs value",
        "output_max_abs": {k: round(float(v.abs().max()), 4) for k, v in r.items()},
        "tensors": {
            "orderK.final_latents": f"the latents after {STEPS} UniPC steps of order K",
            "orderK.sigmas": f"the scheduler's {STEPS + 1} sigmas (the last 0)",
            "orderK.timesteps": "the network's timesteps (int64 in diffusers, stored as f32)",
        },
    }
    (OUT_DIR / f"{REF}.reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{REF}: wrote the reference and wan-unipc-scheduler.json")


def check() -> bool:
    ref = safetensors.torch.load_file(str(OUT_DIR / f"{REF}.reference.safetensors"))
    return compare_outputs(REF, ref, run(stored_latents()))


def main() -> None:
    fixture_main(__doc__, generate, check)


if __name__ == "__main__":
    main()

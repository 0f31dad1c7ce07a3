"""fewstep against diffusers on one GPU: the SDXL UNet through a 4-step denoising at 1024x1024.

Run by `tools/gpu-bench.sh run` on the device. Both sides get the same random weights (made
here with diffusers and saved as safetensors, which fewstep loads) and the same inputs. The
order is: fewstep (a subprocess), diffusers eager, diffusers with torch.compile, so the two
eager-style runs sit side by side and compilation time cannot leak into them. One UNet
evaluation and the whole denoising of the first batch are compared with an f32 reference, so
the table is known to time the same function.

Writes bench.json and prints the table last.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the SDXL-DMD2 and SDXL-Lightning
# students share it).
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def make_inputs(batch, latent, device):
    g = torch.Generator().manual_seed(1)
    px = float(latent * 8)
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=g),
        "encoder_hidden_states": torch.randn(batch, 77, 2048, generator=g),
        "text_embeds": torch.randn(batch, 1280, generator=g),
        "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]]).repeat(batch, 1),
    }


def cut(inputs, batch, dtype, device):
    return {k: v[:batch].to(device=device, dtype=dtype) for k, v in inputs.items()}


def forward(unet, x, sample, t):
    ts = torch.full((sample.shape[0],), t, device=sample.device, dtype=torch.float32)
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    return unet(sample, ts, encoder_hidden_states=x["encoder_hidden_states"],
                added_cond_kwargs=added, return_dict=False)[0]


def denoise(unet, x, steps):
    """The loop of src/bench/unet.rs: t from 999 evenly down, an Euler-style update."""
    sample = x["sample"]
    for i in range(steps):
        t = 999.0 * (1.0 - i / steps)
        sample = sample - forward(unet, x, sample, t) * (1.0 / steps)
    return sample


@torch.no_grad()
def time_rounds(unet, x, steps, reps, warmup):
    for _ in range(warmup):
        denoise(unet, x, steps)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        denoise(unet, x, steps)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rel_err(a, ref):
    a, ref = a.double().cpu(), ref.double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - ref).norm() / ref.norm()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fewstep", required=True, help="the CUDA build of fewstep")
    p.add_argument("--work", default="/tmp/gpu-bench")
    p.add_argument("--out", default=".")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile-budget-s", type=float, default=300,
                   help="skip torch.compile for further batches once this much time went to it")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "steps": args.steps, "latent": args.latent, "rows": {}, "parity": {}}
    import diffusers
    result["diffusers"] = diffusers.__version__
    log("device", result["device"], "torch", torch.__version__, "diffusers", diffusers.__version__)

    # 1. Weights and inputs, shared by both sides.
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
    unet = unet.to(bf16).eval()
    unet_dir = os.path.join(args.work, "unet")
    unet.save_pretrained(unet_dir, safe_serialization=True)
    inputs = make_inputs(max(batches), args.latent, dev)
    inputs_file = os.path.join(args.work, "inputs.safetensors")
    save_file(inputs, inputs_file)
    log(f"weights: {sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B parameters")

    # 2. fewstep, in its own process.
    fs_json = os.path.join(args.out, "fewstep.json")
    fs_out = os.path.join(args.work, "fewstep-out.safetensors")
    cmd = [args.fewstep, "bench", "--unet", unet_dir, "--device", "cuda", "--dtype", "bf16",
           "--latent-size", str(args.latent), "--batches", args.batches,
           "--steps", str(args.steps), "--reps", str(args.reps), "--inputs", inputs_file,
           "--outputs", fs_out, "--json", fs_json]
    log("running", " ".join(cmd))
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    log(f"fewstep exited {run.returncode} after {time.perf_counter() - start:.1f} s")
    print(run.stdout[-3000:], run.stderr[-3000:], flush=True)
    fewstep_rows = {}
    if run.returncode == 0:
        fewstep_rows = {r["batch"]: r for r in json.load(open(fs_json))}

    # 3. diffusers eager, and the parity check on the first batch.
    eager = {}
    with torch.no_grad():
        for b in batches:
            eager[b] = time_rounds(unet, cut(inputs, b, bf16, dev), args.steps, args.reps, 1)
            log(f"eager batch {b}: {eager[b]:.1f} ms")
        b0 = batches[0]
        x = cut(inputs, b0, bf16, dev)
        d_fwd = forward(unet, x, x["sample"], 999.0).float()
        d_den = denoise(unet, x, args.steps).float()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        ref = copy.deepcopy(unet).float().eval()
        x32 = cut(inputs, b0, torch.float32, dev)
        # The f32 reference starts from the same bf16-rounded inputs.
        x32 = {k: v.to(bf16).float() for k, v in x32.items()}
        r_fwd = forward(ref, x32, x32["sample"], 999.0)
        r_den = denoise(ref, x32, args.steps)
        del ref
        torch.cuda.empty_cache()
        parity = {"diffusers_bf16_forward": rel_err(d_fwd, r_fwd),
                  "diffusers_bf16_denoised": rel_err(d_den, r_den)}
        if os.path.exists(fs_out):
            f = load_file(fs_out)
            parity["fewstep_bf16_forward"] = rel_err(f["forward"], r_fwd)
            parity["fewstep_bf16_denoised"] = rel_err(f["denoised"], r_den)
            parity["fewstep_vs_diffusers_forward"] = rel_err(f["forward"], d_fwd)
        result["parity"] = parity
        log("parity (relative L2 error against the f32 reference):", json.dumps(parity))

    # 4. diffusers with torch.compile, one compilation per batch size, within a budget.
    compiled = {}
    compile_s = 0.0
    cunet = torch.compile(unet, fullgraph=True)
    for b in batches:
        if compile_s > args.compile_budget_s:
            log(f"compile budget spent ({compile_s:.0f} s): no torch.compile at batch {b}")
            continue
        x = cut(inputs, b, bf16, dev)
        start = time.perf_counter()
        with torch.no_grad():
            denoise(cunet, x, args.steps)
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        compile_s += took
        compiled[b] = time_rounds(cunet, x, args.steps, args.reps, 1)
        log(f"compiled batch {b}: {compiled[b]:.1f} ms (first call {took:.0f} s)")

    # 5. The table.
    rows = []
    for b in batches:
        fs = fewstep_rows.get(b)
        row = {"batch": b,
               "fewstep_ms": fs["round_ms"] if fs else None,
               "eager_ms": eager[b], "compile_ms": compiled.get(b)}
        rows.append(row)
    result["rows"] = rows
    json.dump(result, open(os.path.join(args.out, "bench.json"), "w"), indent=1)

    def ips(b, ms):
        return "-" if ms is None else f"{b * 1e3 / ms:.2f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{b / a:.2f}"

    print(f"\nSDXL UNet, {args.steps}-step denoising of {args.latent * 8}x{args.latent * 8} "
          f"images (latents {args.latent}x{args.latent}), bf16, {result['device']}, "
          f"torch {result['torch']}, diffusers {result['diffusers']}, median of {args.reps}")
    print("batch  fewstep img/s  eager img/s  compile img/s  fewstep/eager  fewstep/compile")
    for r in rows:
        b = r["batch"]
        print(f"{b:>5}  {ips(b, r['fewstep_ms']):>13}  {ips(b, r['eager_ms']):>11}  "
              f"{ips(b, r['compile_ms']):>13}  {ratio(r['fewstep_ms'], r['eager_ms']):>13}  "
              f"{ratio(r['fewstep_ms'], r['compile_ms']):>15}")
    print("parity:", json.dumps(result["parity"]))
    return 0 if fewstep_rows else 1


if __name__ == "__main__":
    sys.exit(main())

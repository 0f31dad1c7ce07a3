"""fewstep against PyTorch on the same networks, with the same weights and inputs, in one run.

One script for both machines:
- GPU (`tools/gpu-bench.sh run`): the SDXL UNet through a 4-step denoising at 1024x1024 in
  bf16, fewstep against diffusers eager and torch.compile.
- CPU (`tools/cpu-bench.sh`): the SD1.5- and SDXL-shaped UNets at 64x64 latents in f32, and
  the tiny teacher and student (our DiT, mirrored in PyTorch by tools/tiny_torch.py): forward
  samples/s and, for the tiny ones, the training step, with both sides pinned to --threads.

A UNet gets random weights made here with diffusers and saved as safetensors, which fewstep
loads; a tiny model's weights are its own file under models/. The order for a UNet is:
PyTorch eager (and the outputs for the parity check), fewstep in its own process, then
torch.compile, so compilation cannot leak into the eager-style runs. With --sequential (the
CPU default: the SDXL UNet is 10 GB in f32) torch's copy of the weights is dropped while
fewstep runs and loaded back after, so the two are never in memory at once. The tiny models,
cheap to load, alternate fewstep, eager and compiled over --rounds rounds. Every network's
outputs are compared across the runtimes, so the table is known to time the same function.

Each side's time is taken twice: wall time, and the CPU time of its own process (all its
threads). On a machine shared with other work the second is what the work cost, whatever share
of the cores the rest left it; with one thread per side the two agree on an idle machine.

Writes bench.json (and fewstep's own JSON per network) to --out and prints the tables last.
"""

import argparse
import copy
import gc
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch
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

# runwayml/stable-diffusion-v1-5, unet/config.json (what SD1.5 students such as the DMD2 and
# Hyper-SD ones keep).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

UNETS = {"sdxl": SDXL_UNET, "sd15": SD15_UNET}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# fewstep's src/bench/model.rs PROMPT: every row of its denoiser table.
TINY_PROMPT = "a small red circle on the left"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, reps, warmup, dev):
    """Median wall and median CPU milliseconds (this process, all threads: what the work cost
    whatever share of the cores other processes left it) of `fn` over `reps` calls after
    `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(dev)
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(dev)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def rel_err(a, ref):
    a, ref = a.double().cpu(), ref.double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - ref).norm() / ref.norm()).item()


class Budget(Exception):
    pass


def describe(e):
    """One line for a failed compile: the budget running out (raised inside inductor, it comes
    back wrapped), or the error's first line."""
    c = e
    while c is not None:
        if isinstance(c, Budget):
            return str(c)
        c = c.__cause__ or c.__context__
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def within(seconds, fn):
    """`fn()`, or Budget once it has run `seconds` (SIGALRM: the main thread only)."""
    def expire(*_):
        raise Budget(f"over the {seconds:.0f} s compile budget")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_fewstep(args, cmd, label, timeout=None):
    """fewstep in its own process, its threads pinned like torch's; None when it failed or
    ran past `timeout` seconds (then it is killed)."""
    env = dict(os.environ)
    if args.threads:
        env["RAYON_NUM_THREADS"] = env["CANDLE_NUM_THREADS"] = str(args.threads)
    log("running", " ".join(cmd))
    start = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log(f"fewstep ({label}) killed after {timeout:.0f} s")
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out[-3000:], flush=True)
        return None
    log(f"fewstep ({label}) exited {run.returncode} after {time.perf_counter() - start:.1f} s")
    print(run.stdout[-3000:], run.stderr[-3000:], flush=True)
    return run if run.returncode == 0 else None


# ---------------------------------------------------------------------------------------------
# The diffusers UNets.

def make_inputs(cfg, batch, latent):
    g = torch.Generator().manual_seed(1)
    x = {"sample": torch.randn(batch, cfg["in_channels"], latent, latent, generator=g),
         "encoder_hidden_states": torch.randn(batch, 77, cfg["cross_attention_dim"], generator=g)}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        px = float(latent * 8)
        x["text_embeds"] = torch.randn(batch, pooled, generator=g)
        x["time_ids"] = torch.tensor([[px, px, 0.0, 0.0, px, px]]).repeat(batch, 1)
    return x


def cut(inputs, batch, dtype, device):
    return {k: v[:batch].to(device=device, dtype=dtype) for k, v in inputs.items()}


def forward(unet, x, sample, t):
    ts = torch.full((sample.shape[0],), t, device=sample.device, dtype=torch.float32)
    added = {k: x[k] for k in ("text_embeds", "time_ids") if k in x}
    return unet(sample, ts, encoder_hidden_states=x["encoder_hidden_states"],
                added_cond_kwargs=added or None, return_dict=False)[0]


def denoise(unet, x, steps):
    """The loop of src/bench/unet.rs: t from 999 evenly down, an Euler-style update."""
    sample = x["sample"]
    for i in range(steps):
        t = 999.0 * (1.0 - i / steps)
        sample = sample - forward(unet, x, sample, t) * (1.0 / steps)
    return sample


def time_rounds(unet, x, steps, reps, dev):
    with torch.no_grad():
        return median_ms(lambda: denoise(unet, x, steps), reps, 1, dev)


def load_unet(unet_dir, cfg, dtype, dev):
    """The saved UNet back, its tensors becoming the parameters (no second copy in memory)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    state = {}
    for f in sorted(glob.glob(os.path.join(unet_dir, "*.safetensors"))):
        state.update(load_file(f, device=str(dev)))
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.to(dtype).eval()


def bench_unet(name, batches, args, dev, dtype):
    from diffusers import UNet2DConditionModel
    cfg = UNETS[name]
    work = os.path.join(args.work, name)
    os.makedirs(work, exist_ok=True)
    result = {"net": name, "steps": args.steps, "latent": args.latent, "notes": []}

    # 1. Weights and inputs, shared by both sides.
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(dev):
        unet = UNet2DConditionModel.from_config(cfg)
    unet = unet.to(dtype).eval()
    unet_dir = os.path.join(work, "unet")
    # Shards of 1 GB: safetensors copies a whole file's tensors into bytes while saving.
    unet.save_pretrained(unet_dir, safe_serialization=True, max_shard_size="1GB")
    inputs = make_inputs(cfg, max(batches), args.latent)
    inputs_file = os.path.join(work, "inputs.safetensors")
    save_file(inputs, inputs_file)
    result["params_b"] = sum(p.numel() for p in unet.parameters()) / 1e9
    log(f"{name}: {result['params_b']:.2f} B parameters, made and saved in "
        f"{time.perf_counter() - start:.0f} s")

    # 2. PyTorch eager, and the outputs of the first batch for the parity check.
    eager = {}
    for b in batches:
        x = cut(inputs, b, dtype, dev)
        eager[b] = time_rounds(unet, x, args.steps, args.unet_reps, dev)
        log(f"{name} eager batch {b}: {eager[b][0]:.1f} ms, CPU {eager[b][1]:.1f} ms")
    with torch.no_grad():
        x = cut(inputs, batches[0], dtype, dev)
        d_fwd = forward(unet, x, x["sample"], 999.0).float().cpu()
        d_den = denoise(unet, x, args.steps).float().cpu()
        ref = None
        if dtype != torch.float32:
            # A reduced-precision run is compared with an f32 reference too.
            if dev.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            ref_net = copy.deepcopy(unet).float().eval()
            x32 = {k: v.float() for k, v in x.items()}
            ref = (forward(ref_net, x32, x32["sample"], 999.0).cpu(),
                   denoise(ref_net, x32, args.steps).cpu())
            del ref_net
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.sequential:
        del unet
        gc.collect()

    # 3. fewstep, in its own process.
    fs_json = os.path.join(args.out, f"fewstep-{name}.json")
    fs_out = os.path.join(work, "fewstep-out.safetensors")
    cmd = [args.fewstep, "bench", "--unet", unet_dir, "--device", args.device,
           "--dtype", args.dtype, "--latent-size", str(args.latent),
           "--batches", ",".join(map(str, batches)), "--steps", str(args.steps),
           "--reps", str(args.unet_reps), "--inputs", inputs_file, "--outputs", fs_out,
           "--json", fs_json]
    fewstep = {}
    if run_fewstep(args, cmd, name):
        fewstep = {r["batch"]: (r["round_ms"], r["cpu_round_ms"]) for r in json.load(open(fs_json))}
    else:
        result["notes"].append("fewstep failed")
    parity = {}
    if ref is not None:
        parity["torch_forward_vs_f32"] = rel_err(d_fwd, ref[0])
        parity["torch_denoised_vs_f32"] = rel_err(d_den, ref[1])
    if os.path.exists(fs_out):
        f = load_file(fs_out)
        parity["fewstep_vs_torch_forward"] = rel_err(f["forward"], d_fwd)
        parity["fewstep_vs_torch_denoised"] = rel_err(f["denoised"], d_den)
        parity["fewstep_vs_torch_forward_max_abs"] = (f["forward"] - d_fwd).abs().max().item()
        if ref is not None:
            parity["fewstep_forward_vs_f32"] = rel_err(f["forward"], ref[0])
            parity["fewstep_denoised_vs_f32"] = rel_err(f["denoised"], ref[1])
    result["parity"] = parity
    log(f"{name} parity (relative L2):", json.dumps(parity))

    # 4. torch.compile, one compilation per batch size, within a budget.
    if args.sequential:
        unet = load_unet(unet_dir, cfg, dtype, dev)
    compiled = {}
    spent = 0.0
    cunet = torch.compile(unet, fullgraph=True)
    for b in batches:
        if spent > args.compile_budget_s:
            result["notes"].append(f"compile budget spent ({spent:.0f} s): none at batch {b}")
            log(result["notes"][-1])
            continue
        x = cut(inputs, b, dtype, dev)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                within(args.compile_budget_s - spent, lambda: denoise(cunet, x, args.steps))
                sync(dev)
        except Exception as e:  # noqa: BLE001 - a compile failure is a result to report
            spent += time.perf_counter() - start
            result["notes"].append(f"torch.compile at batch {b}: {describe(e)}")
            log(result["notes"][-1])
            spent = args.compile_budget_s + 1
            continue
        took = time.perf_counter() - start
        spent += took
        result.setdefault("compile_first_call_s", {})[b] = took
        compiled[b] = time_rounds(cunet, x, args.steps, args.unet_reps, dev)
        log(f"{name} compiled batch {b}: {compiled[b][0]:.1f} ms, CPU {compiled[b][1]:.1f} ms "
            f"(first call {took:.0f} s)")
    del cunet, unet
    torch._dynamo.reset()
    gc.collect()
    if not args.keep_weights:
        shutil.rmtree(unet_dir)

    result["rows"] = [row(name, "unet", b, {"fewstep": fewstep.get(b), "eager": eager[b],
                                            "compile": compiled.get(b)}) for b in batches]
    return result


# ---------------------------------------------------------------------------------------------
# The tiny models (fewstep's own DiT).

def bench_tiny(name, batches, args, dev):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_torch
    model_dir = os.path.join(args.models_dir, name)
    model = tiny_torch.load(model_dir).to(dev)
    cfg = model.cfg
    work = os.path.join(args.work, name)
    os.makedirs(work, exist_ok=True)
    result = {"net": name, "frames": args.frames, "notes": []}
    g = torch.Generator().manual_seed(2)
    size, n = cfg["image_size"], max(batches + [args.parity_batch])
    inputs = {"x": torch.randn(n, args.frames, cfg["channels"], size, size, generator=g),
              "t": 0.01 + 0.98 * torch.rand(n, generator=g)}
    inputs_file = os.path.join(work, "inputs.safetensors")
    save_file(inputs, inputs_file)

    def rows(b):
        x, t = inputs["x"][:b].to(dev), inputs["t"][:b].to(dev)
        ids, mask = model.tokenizer.encode_batch([TINY_PROMPT] * b, cfg["text_max_len"])
        return x, t, ids.to(dev), mask.to(dev)

    def fewstep_cmd(bs, reps, extra):
        return [args.fewstep, "bench", "--model", name, "--models-dir", args.models_dir,
                "--batches", ",".join(map(str, bs)), "--frames", str(args.frames),
                "--reps", str(reps), "--inputs", inputs_file] + extra

    # 1. Parity, on the weights as shipped (before any training step on either side).
    p = args.parity_batch
    fs_out = os.path.join(work, "fewstep-out.safetensors")
    parity = {}
    if run_fewstep(args, fewstep_cmd([p], 1, ["--outputs", fs_out]), f"{name} parity"):
        x, t, ids, mask = rows(p)
        v = model(x, t, ids, mask)
        loss = (v - x).pow(2).mean()
        loss.backward()
        grad_norm = torch.sqrt(sum(q.grad.double().pow(2).sum() for q in model.parameters()
                                   if q.grad is not None)).item()
        model.zero_grad(set_to_none=True)
        f = load_file(fs_out)
        v = v.detach().cpu()
        parity = {"batch": p,
                  "velocity_rel_l2": rel_err(f["velocity"], v),
                  "velocity_max_abs": (f["velocity"] - v).abs().max().item(),
                  "velocity_abs_max": v.abs().max().item(),
                  "loss_rel": abs(f["loss"].item() - loss.item()) / abs(loss.item()),
                  "grad_norm_rel": abs(f["grad_norm"].item() - grad_norm) / grad_norm}
    else:
        result["notes"].append("fewstep parity run failed")
    result["parity"] = parity
    log(f"{name} parity:", json.dumps(parity))

    # 2. Timed rounds: fewstep, eager, compiled, in turn.
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def forward_fn(velocity, b):
        x, t, ids, mask = rows(b)
        with torch.no_grad():
            text = model.text(ids, mask)

        def go():
            with torch.no_grad():
                velocity(x, t, text)
        return go

    def train_fn(net, b):
        x, t, ids, mask = rows(b)

        def go():
            # src/bench/model.rs: encode + velocity, MSE against x, backward, clipped AdamW.
            loss = (net(x, t, ids, mask) - x).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return go

    sides = {"fewstep": {}, "eager": {}, "compile": {}}
    cvel, cnet = torch.compile(model.dit), torch.compile(model)
    spent, compile_ok = 0.0, True
    for r in range(args.rounds):
        fs_json = os.path.join(args.out, f"fewstep-{name}.json")
        if run_fewstep(args, fewstep_cmd(batches, args.reps, ["--json", fs_json]),
                       f"{name} round {r + 1}"):
            for fr in json.load(open(fs_json)):
                b = fr["batch"]
                for what in ("forward", "train"):
                    sides["fewstep"].setdefault((what, b), []).append(
                        (1e3 * b / fr[f"{what}_samples_per_s"],
                         1e3 * b / fr[f"{what}_cpu_samples_per_s"]))
        for b in batches:
            sides["eager"].setdefault(("forward", b), []).append(
                median_ms(forward_fn(model.dit, b), args.reps, 1, dev))
            sides["eager"].setdefault(("train", b), []).append(
                median_ms(train_fn(model, b), args.reps, 1, dev))
        for b in batches:
            for what, fn in (("forward", forward_fn(cvel, b)), ("train", train_fn(cnet, b))):
                if not compile_ok:
                    continue
                start = time.perf_counter()
                try:
                    within(max(args.compile_budget_s - spent, 1), fn)
                except Exception as e:  # noqa: BLE001 - a compile failure is a result
                    compile_ok = False
                    result["notes"].append(f"torch.compile ({what}, batch {b}): {describe(e)}")
                    log(result["notes"][-1])
                    continue
                spent += time.perf_counter() - start
                sides["compile"].setdefault((what, b), []).append(
                    median_ms(fn, args.reps, 1, dev))
        log(f"{name} round {r + 1} (wall/CPU ms): " + ", ".join(
            f"{s} {w} b{b} {v[-1][0]:.2f}/{v[-1][1]:.2f}"
            for s, d in sides.items() for (w, b), v in sorted(d.items())))
    result["compile_s"] = spent
    del cvel, cnet
    torch._dynamo.reset()

    def med(side, key):
        v = sides[side].get(key)
        if not v:
            return None
        return statistics.median(w for w, _ in v), statistics.median(c for _, c in v)

    result["rows"] = [dict(row(name, what, b, {s: med(s, (what, b)) for s in sides}),
                           rounds={s: sides[s].get((what, b), []) for s in sides})
                      for what in ("forward", "train") for b in batches]
    return result


# ---------------------------------------------------------------------------------------------

def row(net, what, batch, times):
    """A table row from each side's (wall ms, CPU ms), None where a side has no number."""
    r = {"net": net, "what": what, "batch": batch, "samples": batch}
    for side in ("fewstep", "eager", "compile"):
        t = times.get(side)
        r[f"{side}_ms"], r[f"{side}_cpu_ms"] = t if t else (None, None)
    return r


def print_table(result, args):
    def per_s(row, key):
        ms = row[key]
        return "-" if ms is None else f"{row['samples'] * 1e3 / ms:.4g}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{b / a:.2f}"

    def table(clock, suffix):
        print(f"\nsamples/s by {clock}")
        print(f"{'network':<21} {'what':<8} {'batch':>5} {'fewstep':>9} {'eager':>9} "
              f"{'compile':>9} {'fewstep/eager':>13} {'fewstep/compile':>15}")
        for net in result["nets"]:
            for r in net.get("rows", []):
                fs, ea, co = (f"{side}{suffix}" for side in ("fewstep", "eager", "compile"))
                print(f"{r['net']:<21} {r['what']:<8} {r['batch']:>5} {per_s(r, fs):>9} "
                      f"{per_s(r, ea):>9} {per_s(r, co):>9} {ratio(r[fs], r[ea]):>13} "
                      f"{ratio(r[fs], r[co]):>15}")

    print(f"\nfewstep against PyTorch on {result['device']}, {args.dtype}, "
          f"torch {result['torch']}, diffusers {result['diffusers']}"
          + (f", {args.threads} thread(s) per side" if args.threads else ""))
    print(f"UNet rows: images/s of a {args.steps}-step denoising at {args.latent}x{args.latent} "
          f"latents (1 step: UNet forward samples/s), median of {args.unet_reps}; tiny rows: "
          f"samples/s of the denoiser forward and of a training step, {args.frames} frame(s), "
          f"median over {args.rounds} alternating rounds of medians of {args.reps}")
    print(f"load average at the start {result['loadavg_start']}, at the end "
          f"{result.get('loadavg_end')}")
    table("process CPU time (what each side's work cost, whatever else ran)", "_cpu_ms")
    table("wall time", "_ms")
    for net in result["nets"]:
        print(f"{net['net']} parity: {json.dumps(net.get('parity', {}))}")
        for note in net.get("notes", []):
            print(f"{net['net']} note: {note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fewstep", required=True, help="the fewstep binary (a CUDA build on a GPU)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, f32 on cpu")
    p.add_argument("--nets", help="comma-separated: sdxl, sd15 and tiny model names under "
                   "--models-dir (default: sdxl on cuda; tiny-shapes-teacher,tiny-shapes,sd15,"
                   "sdxl on cpu)")
    p.add_argument("--work", default="/tmp/torch-bench")
    p.add_argument("--keep-weights", action="store_true",
                   help="keep each UNet's saved weights under --work (SDXL: 10 GB in f32)")
    p.add_argument("--out", default=".")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--batches", default="1,4,8", help="UNet batch sizes")
    p.add_argument("--sdxl-batches", help="for the SDXL UNet (default --batches)")
    p.add_argument("--tiny-batches", default="1,4,16")
    p.add_argument("--steps", type=int, default=4, help="UNet evaluations per timed denoising")
    p.add_argument("--latent", type=int, help="UNet latent side (default: 128 cuda, 64 cpu)")
    p.add_argument("--frames", type=int, default=1, help="tiny models: frames per sample")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--unet-reps", type=int, help="timed rounds for a UNet (default --reps)")
    p.add_argument("--rounds", type=int, default=3, help="tiny models: alternating rounds")
    p.add_argument("--parity-batch", type=int, default=4, help="tiny models")
    p.add_argument("--threads", type=int, help="pin both sides to this many threads")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction,
                   help="never hold a UNet's weights in both runtimes (default: on cpu)")
    p.add_argument("--compile-budget-s", type=float, default=300,
                   help="per network: skip torch.compile once this much time went to it")
    args = p.parse_args()
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("f32" if cpu else "bf16")
    args.latent = args.latent or (64 if cpu else 128)
    args.sequential = cpu if args.sequential is None else args.sequential
    args.unet_reps = args.unet_reps or args.reps
    default_nets = "tiny-shapes-teacher,tiny-shapes,sd15,sdxl" if cpu else "sdxl"
    nets = (args.nets or default_nets).split(",")
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
        import torch._inductor.config as inductor
        inductor.compile_threads = args.threads
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    import diffusers
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "dtype": args.dtype, "threads": args.threads, "steps": args.steps,
              "latent": args.latent, "reps": args.reps, "unet_reps": args.unet_reps,
              "rounds": args.rounds, "frames": args.frames,
              "loadavg_start": os.getloadavg(), "nets": []}
    log("device", name, "torch", torch.__version__, "diffusers", diffusers.__version__,
        "threads", torch.get_num_threads(), "load average", os.getloadavg())
    batches = [int(b) for b in args.batches.split(",")]
    for net in nets:
        start = time.perf_counter()
        if net in UNETS:
            bs = batches
            if net == "sdxl" and args.sdxl_batches:
                bs = [int(b) for b in args.sdxl_batches.split(",")]
            r = bench_unet(net, bs, args, dev, dtype)
        else:
            r = bench_tiny(net, [int(b) for b in args.tiny_batches.split(",")], args, dev)
        r["seconds"] = time.perf_counter() - start
        result["nets"].append(r)
        result["loadavg_end"] = os.getloadavg()
        json.dump(result, open(os.path.join(args.out, "bench.json"), "w"), indent=1)
        log(f"{net} done in {r['seconds']:.0f} s")
    print_table(result, args)
    ok = all(r["fewstep_ms"] is not None for n in result["nets"] for r in n["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""fewstep against diffusers on Wan2.1 text-to-video: one few-step generation, same weights, same
inputs, one run.

What each side runs is what `WanPipeline.__call__` runs minus the text encoder: the text states
(`prompt_embeds`, and `negative_prompt_embeds` with CFG) are inputs that both sides share, so
neither needs the 5.7 B umT5-XXL. diffusers runs its own `WanTransformer3DModel` and
`AutoencoderKLWan`: latents kept in f32 and handed to the transformer in its dtype, the
transformer called once per branch (WanPipeline's CFG), then `latents / (1 / std) + mean` and
`vae.decode`. fewstep runs `fewstep bench --wan` (src/bench/wan.rs: the server's sampler over
the Wan family's transformer and schedule, then its VAE, which decodes one latent frame at a
time as diffusers does). Neither side converts the video to images (WanPipeline's
`postprocess_video`).

The sampler (`--sampler`) is fewstep's, over the scheduler config saved with the weights
(Wan2.1's `UniPCMultistepScheduler`, `flow_shift` 3.0):
- `student` (default: what a distilled 4-step student runs, no CFG): sigmas shift(1 - i/n),
  i.e. timesteps [1000, 750, 500, 250] through the shift; x0 = x - sigma v, re-noised to the
  next sigma with fresh noise that is part of the inputs (`step_noise`), x0 after the last;
- `euler`: diffusers' `FlowMatchEulerDiscreteScheduler` with `shift`;
- `unipc`: diffusers' `UniPCMultistepScheduler` from the saved config (WanPipeline's default).
For `euler` and `unipc` the diffusers side steps with diffusers' own scheduler.

Weights: random, drawn here with diffusers' classes and tools/parity's `randomize` (activations
O(1) through every layer), saved in the diffusers layout under --work, loaded by fewstep. The
configs: `--config 1.3b` is Wan-AI/Wan2.1-T2V-1.3B-Diffusers (transformer/config.json: 12 heads
of 128, 30 layers, ffn 8960; diffusers' `WanTransformer3DModel` defaults are the 14B's) with
`AutoencoderKLWan`'s defaults (Wan2.1's VAE); `--config tiny` is the parity fixture's shapes
(tests/fixtures/wan/wan-tiny-t2v), with fresh weights.

Each side: one warm-up (one transformer evaluation and the decode of one latent frame), then
--reps timed generations; per round the total (initial noise on the device to decoded video),
each transformer step and the decode, the device synchronised around each. Order: diffusers
eager, fewstep (its own process, killed when it outruns the budget), then, with --compile,
diffusers with `torch.compile` on the transformer. Peak memory, on a GPU: for diffusers torch's
max_memory_allocated / max_memory_reserved over its rounds (weights included), and for both
sides the device's used memory polled by `nvidia-smi -lms 100`, peak minus what was used just
before the side started (the side's whole process: its CUDA context, weights, activations,
allocator pools; fewstep reports nothing itself, candle 0.11 has no peak counter). On the CPU:
peak RSS (VmHWM) of each side's process: fewstep's, and this one's, which also drew the
weights and holds torch and diffusers.

Parity: the relative L2 difference of fewstep's final latents and decoded video against
diffusers' (and, for bf16/f16 runs with --f32-reference, of each side against diffusers in f32).

Writes wan-bench.json (and fewstep-wan.json) to --out and prints the table last.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# diffusers warns about every `.to(dtype)` of a model with fp32 modules; we keep those in f32.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "parity"))
from parity_common import randomize, wan_transformer_extra, wan_vae_extra  # noqa: E402
from torch_bench import DTYPES, describe, log, rel_err, run_fewstep, sync, within  # noqa: E402

REPO = os.path.dirname(HERE)
TINY_DIR = os.path.join(REPO, "tests", "fixtures", "wan", "wan-tiny-t2v")

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json.
T2V_1_3B = dict(
    patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024,
)
# Wan2.1's scheduler/scheduler_config.json (480p: flow_shift 3.0).
SCHEDULER = dict(num_train_timesteps=1000, flow_shift=3.0, use_flow_sigmas=True,
                 prediction_type="flow_prediction", solver_order=2, solver_type="bh2",
                 predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
SEEDS = dict(transformer=711, vae=712, inputs=7101)
CONFIG_KEYS_DROPPED = ("_class_name", "_diffusers_version", "_name_or_path")


def configs(name):
    """(transformer kwargs, VAE kwargs) of a --config."""
    if name == "1.3b":
        return dict(T2V_1_3B), {}
    def read(part):
        cfg = json.load(open(os.path.join(TINY_DIR, part, "config.json")))
        return {k: v for k, v in cfg.items() if k not in CONFIG_KEYS_DROPPED}
    return read("transformer"), read("vae")


def to_dtype_keeping_fp32(model, dtype):
    """`model`'s parameters in `dtype` as `from_pretrained(torch_dtype=...)` loads them: but
    those of `_keep_in_fp32_modules` (the time embedder, the modulation tables, the norms),
    which stay f32, and the buffers (RoPE's f64 tables), which `Module.to` would round."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, p in model.named_parameters():
            kept = any(k in name.split(".") for k in keep)
            p.data = p.data.to(torch.float32 if kept else dtype)
    return model


# ---------------------------------------------------------------------------------------------
# Peak memory.

class DeviceMemory:
    """The device's used memory (MiB, nvidia-smi every 100 ms) from `start()` to `stop()`:
    the peak, and what was used at the start. None where nvidia-smi is missing."""

    def __init__(self, index=0):
        self.index = index
        self.proc = None

    def used_now(self):
        try:
            out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10)
            return float(out.stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def start(self):
        self.base = self.used_now()
        self.peak = self.base
        if self.base is None:
            return self
        self.proc = subprocess.Popen(["nvidia-smi", "-i", str(self.index), "-lms", "100",
                                      "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     stdout=subprocess.PIPE, text=True)

        def read():
            for line in self.proc.stdout:
                try:
                    self.peak = max(self.peak, float(line.strip()))
                except ValueError:
                    pass
        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        """Peak used MiB minus the start's, or None."""
        if self.proc is None:
            return None
        time.sleep(0.3)
        self.proc.terminate()
        self.proc.wait()
        self.thread.join(timeout=2)
        return self.peak - self.base


def peak_rss_mib():
    """This process's peak resident set (Linux VmHWM), or None."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Weights and inputs, shared by both sides.

def build(args, dev, dtype, vae_dtype):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    tcfg, vcfg = configs(args.config)
    gen_device = "cuda" if dev.type == "cuda" else "cpu"
    start = time.perf_counter()
    with torch.device(dev):
        transformer = WanTransformer3DModel(**tcfg)
        vae = AutoencoderKLWan(**vcfg)
    randomize(transformer, SEEDS["transformer"], extra=wan_transformer_extra(transformer),
              device=gen_device)
    randomize(vae, SEEDS["vae"], extra=wan_vae_extra(vae), device=gen_device)
    transformer = to_dtype_keeping_fp32(transformer, dtype).eval()
    vae = to_dtype_keeping_fp32(vae, vae_dtype).eval()
    sync(dev)
    made = time.perf_counter() - start
    model_dir = os.path.join(args.work, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    transformer.save_pretrained(os.path.join(model_dir, "transformer"), safe_serialization=True)
    vae.save_pretrained(os.path.join(model_dir, "vae"), safe_serialization=True)
    UniPCMultistepScheduler(**SCHEDULER).save_pretrained(os.path.join(model_dir, "scheduler"))
    params = sum(p.numel() for p in transformer.parameters()) / 1e9
    vparams = sum(p.numel() for p in vae.parameters()) / 1e9
    log(f"weights: transformer {params * 1e9:,.0f}, VAE {vparams * 1e9:,.0f} parameters; drawn in "
        f"{made:.1f} s, saved to {model_dir} in {time.perf_counter() - start - made:.1f} s")
    return transformer, vae, model_dir, {"transformer_params_b": params, "vae_params_b": vparams}


def latent_shape(args, transformer, vae):
    z, s, tf = vae.config.z_dim, vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    p = transformer.config.patch_size
    if (args.frames - 1) % tf or args.width % (s * p[2]) or args.height % (s * p[1]):
        raise SystemExit(f"{args.frames} frames at {args.width}x{args.height}: frames must be "
                         f"{tf}k+1, sizes multiples of {s * p[1]}")
    return [z, (args.frames - 1) // tf + 1, args.height // s, args.width // s]


def make_inputs(args, transformer, vae):
    """Batch-first, as `fewstep bench --wan --inputs` reads them. The text states are padded
    with zeros after --prompt-tokens, as WanPipeline pads umT5's output to 512."""
    g = torch.Generator().manual_seed(SEEDS["inputs"])
    latent = latent_shape(args, transformer, vae)
    b, text_dim = args.batch, transformer.config.text_dim

    def text():
        t = torch.zeros(b, args.text_len, text_dim)
        n = min(args.prompt_tokens, args.text_len)
        t[:, :n] = torch.randn(b, n, text_dim, generator=g)
        return t
    x = {"latents": torch.randn(b, *latent, generator=g), "prompt_embeds": text()}
    if args.guidance > 1:
        x["negative_prompt_embeds"] = text()
    if args.sampler == "student" and args.steps > 1:
        x["step_noise"] = torch.randn(b, args.steps - 1, *latent, generator=g)
    return x, latent


# ---------------------------------------------------------------------------------------------
# diffusers.

def shifted(sigma, shift):
    return shift * sigma / (1 + (shift - 1) * sigma)


class Diffusers:
    """WanPipeline's denoising loop and decode over given components, each step timed."""

    def __init__(self, transformer, vae, model_dir, args, dev):
        self.transformer, self.vae, self.args, self.dev = transformer, vae, args, dev
        # The patch embedding's, as WanPipeline takes `transformer.dtype` (no f32 module).
        self.dtype = transformer.patch_embedding.weight.dtype
        self.model_dir = model_dir
        z = vae.config.z_dim
        self.mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)

    def velocity(self, net, x, t, x_in):
        """The (guided) velocity at timestep `t`: one transformer call per branch."""
        b = x.shape[0]
        ts = (t.expand(b) if torch.is_tensor(t) else torch.full((b,), t, device=x.device))
        v = net(hidden_states=x.to(self.dtype), timestep=ts,
                encoder_hidden_states=x_in["prompt_embeds"], return_dict=False)[0]
        if self.args.guidance > 1:
            vu = net(hidden_states=x.to(self.dtype), timestep=ts,
                     encoder_hidden_states=x_in["negative_prompt_embeds"], return_dict=False)[0]
            v = vu + self.args.guidance * (v - vu)
        return v

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
        if self.args.sampler == "unipc":
            s = UniPCMultistepScheduler.from_pretrained(os.path.join(self.model_dir, "scheduler"))
        else:
            s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                shift=SCHEDULER["flow_shift"])
        s.set_timesteps(self.args.steps, device=self.dev)
        return s

    def timed(self, times, fn):
        sync(self.dev)
        start = time.perf_counter()
        out = fn()
        sync(self.dev)
        times.append(time.perf_counter() - start)
        return out

    def sample(self, net, x_in, times):
        x = x_in["latents"]
        if self.args.sampler == "student":
            n = self.args.steps
            sigmas = [shifted(1 - i / n, SCHEDULER["flow_shift"]) for i in range(n)]
            for i, s in enumerate(sigmas):
                v = self.timed(times, lambda: self.velocity(net, x, s * 1000.0, x_in))
                x0 = x - s * v.float()
                if i + 1 == n:
                    return x0
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * x_in["step_noise"][:, i]
        sched = self.scheduler()
        for t in sched.timesteps:
            v = self.timed(times, lambda: self.velocity(net, x, t, x_in))
            x = sched.step(v, t, x, return_dict=False)[0]
        return x

    def decode(self, latents):
        lat = latents.to(self.vae.dtype)
        lat = lat / self.inv_std.to(lat) + self.mean.to(lat)
        return self.vae.decode(lat, return_dict=False)[0]

    def generate(self, net, x_in):
        """(final latents, video, {total_s, step_s, decode_s})."""
        with torch.no_grad():
            steps = []
            sync(self.dev)
            start = time.perf_counter()
            latents = self.sample(net, x_in, steps)
            dec = []
            video = self.timed(dec, lambda: self.decode(latents))
            total = time.perf_counter() - start
        return latents, video, {"total_s": total, "step_s": steps, "decode_s": dec[0]}

    def warm_up(self, net, x_in):
        """One transformer call at the first step's timestep, passed as the rounds pass it
        (a scheduler's tensor, or a float: torch.compile would compile again for another
        type), and the decode of one latent frame."""
        first = (1000.0 * shifted(1.0, SCHEDULER["flow_shift"]) if self.args.sampler == "student"
                 else self.scheduler().timesteps[0])
        with torch.no_grad():
            start = time.perf_counter()
            v = self.velocity(net, x_in["latents"], first, x_in)
            self.decode((x_in["latents"] - v.float())[:, :, :1])
            sync(self.dev)
        return time.perf_counter() - start

    def bench(self, net, x_in, label):
        side = {"warmup_s": self.warm_up(net, x_in), "rounds": []}
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        mem = DeviceMemory().start() if self.dev.type == "cuda" else None
        for r in range(self.args.reps):
            latents, video, t = self.generate(net, x_in)
            side["rounds"].append(t)
            log(f"{label} round {r + 1}: total {t['total_s']:.3f} s, steps "
                + ", ".join(f"{s:.3f}" for s in t["step_s"]) + f" s, decode {t['decode_s']:.3f} s")
        if self.dev.type == "cuda":
            side["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            side["torch_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
            side["device_peak_mib"] = mem.stop()
        else:
            side["peak_rss_mib"] = peak_rss_mib()
        summarize(side)
        return side, latents.float().cpu(), video.float().cpu()


def summarize(side):
    import statistics
    rounds = side["rounds"]
    side["total_s"] = statistics.median(r["total_s"] for r in rounds)
    side["step_s"] = statistics.median(s for r in rounds for s in r["step_s"])
    side["decode_s"] = statistics.median(r["decode_s"] for r in rounds)


# ---------------------------------------------------------------------------------------------

def plan(args, tcfg, latent, dev):
    """Rough seconds of each phase, printed before they run: the transformer's FLOPs at an
    assumed rate (a guess until the first measured round replaces it)."""
    dim = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2) * args.batch
    per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * tcfg["ffn_dim"]) \
        + 4 * tokens * tokens / args.batch * dim + 2 * tokens * args.text_len * dim * 2
    flops = per_layer * tcfg["num_layers"] * (2 if args.guidance > 1 else 1)
    rate = 4e14 if dev.type == "cuda" else 3e10
    step = flops / rate
    log(f"plan: {tokens} tokens a step, {flops / 1e9:.4g} GFLOP a transformer step, "
        f"~{step:.3g} s at an assumed {rate / 1e9:.0f} GFLOP/s; {args.reps} rounds of "
        f"{args.steps} steps a side")
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fewstep", required=True, help="the fewstep binary (a CUDA build on a GPU)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--config", choices=["1.3b", "tiny"], help="default: 1.3b on cuda, tiny on cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, f32 on cpu")
    p.add_argument("--vae-dtype", choices=sorted(DTYPES), help="default --dtype")
    p.add_argument("--width", type=int, help="default: 832 on cuda, 64 on cpu")
    p.add_argument("--height", type=int, help="default: 480 on cuda, 64 on cpu")
    p.add_argument("--frames", type=int, help="4k+1; default: 81 on cuda, 9 on cpu")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="student", choices=["student", "euler", "unipc"])
    p.add_argument("--guidance", type=float, default=1.0, help="above 1: CFG")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=512, help="text states' length (Wan: 512)")
    p.add_argument("--prompt-tokens", type=int, default=24, help="nonzero text states")
    p.add_argument("--reps", type=int, default=2, help="timed rounds a side")
    p.add_argument("--compile", action="store_true", help="also diffusers with torch.compile")
    p.add_argument("--f32-reference", action=argparse.BooleanOptionalAction,
                   help="for bf16/f16: also diffusers in f32 (default: on where the budget "
                   "allows)")
    p.add_argument("--budget-s", type=float, default=540,
                   help="wall seconds for the whole run: fewstep is killed at what is left, "
                   "optional phases are skipped when they would not fit")
    p.add_argument("--threads", type=int, help="pin both sides to this many threads")
    p.add_argument("--work", default="/tmp/wan-bench")
    p.add_argument("--keep-weights", action="store_true", help="keep --work/model (1.3b: 2.8 GB)")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    t0 = time.perf_counter()
    cpu = args.device == "cpu"
    args.config = args.config or ("tiny" if cpu else "1.3b")
    args.dtype = args.dtype or ("f32" if cpu else "bf16")
    args.vae_dtype = args.vae_dtype or args.dtype
    args.width = args.width or (64 if cpu else 832)
    args.height = args.height or (64 if cpu else 480)
    args.frames = args.frames or (9 if cpu else 81)
    dev, dtype, vae_dtype = torch.device(args.device), DTYPES[args.dtype], DTYPES[args.vae_dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    left = lambda: args.budget_s - (time.perf_counter() - t0)  # noqa: E731
    import diffusers
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "config": args.config, "dtype": args.dtype, "vae_dtype": args.vae_dtype,
              "width": args.width, "height": args.height, "frames": args.frames,
              "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
              "batch": args.batch, "reps": args.reps, "budget_s": args.budget_s,
              "phases_s": {}, "notes": [], "loadavg_start": os.getloadavg()}
    out_json = os.path.join(args.out, "wan-bench.json")

    def phase(name, start):
        result["phases_s"][name] = time.perf_counter() - start
        log(f"phase {name}: {result['phases_s'][name]:.1f} s; {left():.0f} s of the budget left")
        json.dump(result, open(out_json, "w"), indent=1)

    log("device", name, "torch", torch.__version__, "diffusers", diffusers.__version__,
        "threads", torch.get_num_threads())

    # 1. Weights and inputs.
    start = time.perf_counter()
    transformer, vae, model_dir, sizes = build(args, dev, dtype, vae_dtype)
    result.update(sizes)
    x_cpu, latent = make_inputs(args, transformer, vae)
    inputs_file = os.path.join(args.work, "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in x_cpu.items()}, inputs_file)
    result["latent"] = latent
    step_guess = plan(args, configs(args.config)[0], latent, dev)
    phase("weights_and_inputs", start)

    # 2. diffusers eager.
    start = time.perf_counter()
    x = {k: v.to(dev) for k, v in x_cpu.items()}
    for k in ("prompt_embeds", "negative_prompt_embeds"):
        if k in x:
            x[k] = x[k].to(dtype)
    d = Diffusers(transformer, vae, model_dir, args, dev)
    result["eager"], d_lat, d_vid = d.bench(transformer, x, "diffusers eager")
    phase("diffusers_eager", start)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    e = result["eager"]
    eager_round = e["total_s"]
    weights_gb = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(model_dir)
                     for f in fs) / 1e9
    log(f"estimates from the eager rounds ({eager_round:.2f} s each): fewstep ~{weights_gb / 1.0:.0f} s "
        f"loading {weights_gb:.1f} GB, then {args.reps + 1} rounds of ~{eager_round:.2f}-"
        f"{3 * eager_round:.2f} s (if 1-3x eager); f32 reference ~{3 * eager_round:.0f} s; "
        f"compile ~60-180 s plus {args.reps + 1} rounds")

    # 3. fewstep, in its own process, on what is left of the budget (less a reserve for the
    # parity check and the table).
    start = time.perf_counter()
    fs_json = os.path.join(args.out, "fewstep-wan.json")
    fs_out = os.path.join(args.work, "fewstep-out.safetensors")
    for f in (fs_json, fs_out):
        if os.path.exists(f):
            os.remove(f)
    cmd = [args.fewstep, "bench", "--wan", model_dir, "--device", args.device,
           "--dtype", args.dtype, "--vae-dtype", args.vae_dtype, "--sampler", args.sampler,
           "--width", str(args.width), "--height", str(args.height),
           "--frames", str(args.frames), "--steps", str(args.steps),
           "--guidance", str(args.guidance), "--batches", str(args.batch),
           "--reps", str(args.reps), "--inputs", inputs_file, "--outputs", fs_out,
           "--json", fs_json]
    mem = DeviceMemory().start() if dev.type == "cuda" else None
    timeout = max(left() - 30, 30)
    ok = run_fewstep(args, cmd, "wan", timeout=timeout)
    fewstep = None
    if ok:
        report = json.load(open(fs_json))
        fewstep = dict(report["rows"][0], load_s=report["load_s"])
        if mem:
            fewstep["device_peak_mib"] = mem.stop()
        else:
            fewstep["peak_rss_mib"] = report.get("peak_rss_mib")
    else:
        if mem:
            mem.stop()
        result["notes"].append(f"fewstep failed or ran past {timeout:.0f} s")
    result["fewstep"] = fewstep
    phase("fewstep", start)

    # 4. Parity.
    parity = {}
    if os.path.exists(fs_out):
        f = load_file(fs_out)
        parity["latents_rel_l2"] = rel_err(f["latents"], d_lat)
        parity["video_rel_l2"] = rel_err(f["video"], d_vid)
        parity["video_max_abs"] = (f["video"] - d_vid).abs().max().item()
    want_ref = args.f32_reference if args.f32_reference is not None else dtype != torch.float32
    if want_ref and dtype != torch.float32:
        # An f32 copy runs about 2-4x the bf16 round (no flash attention in f32).
        if left() > 6 * eager_round + 60:
            start = time.perf_counter()
            if dev.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            t32 = to_dtype_keeping_fp32(transformer, torch.float32)
            v32 = to_dtype_keeping_fp32(vae, torch.float32)
            ref = Diffusers(t32, v32, model_dir, args, dev)
            x32 = {k: v.float() for k, v in x.items()}
            r_lat, r_vid, _ = ref.generate(t32, x32)
            r_lat, r_vid = r_lat.float().cpu(), r_vid.float().cpu()
            parity["diffusers_latents_vs_f32"] = rel_err(d_lat, r_lat)
            parity["diffusers_video_vs_f32"] = rel_err(d_vid, r_vid)
            if os.path.exists(fs_out):
                parity["fewstep_latents_vs_f32"] = rel_err(f["latents"], r_lat)
                parity["fewstep_video_vs_f32"] = rel_err(f["video"], r_vid)
            del ref, x32, r_lat, r_vid
            transformer = to_dtype_keeping_fp32(t32, dtype)
            vae = to_dtype_keeping_fp32(v32, vae_dtype)
            d = Diffusers(transformer, vae, model_dir, args, dev)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            phase("f32_reference", start)
        else:
            result["notes"].append(f"f32 reference skipped: {left():.0f} s left")
    result["parity"] = parity
    log("parity (relative L2):", json.dumps(parity))

    # 5. torch.compile of the transformer, within what is left.
    if args.compile:
        start = time.perf_counter()
        need = 3 * eager_round * (args.reps + 1)
        if left() < need + 60:
            result["notes"].append(f"torch.compile skipped: {left():.0f} s left, ~{need:.0f} s "
                                   "needed besides compiling")
        else:
            cnet = torch.compile(transformer, fullgraph=True)
            try:
                first = time.perf_counter()
                within(left() - need, lambda: d.warm_up(cnet, x))
                result["compile_first_call_s"] = time.perf_counter() - first
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                result["compile"], _, _ = d.bench(cnet, x, "diffusers compile")
            except Exception as e:  # noqa: BLE001 - a compile failure is a result to report
                result["notes"].append(f"torch.compile: {describe(e)}")
            del cnet
            torch._dynamo.reset()
        phase("compile", start)

    result["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t0
    json.dump(result, open(out_json, "w"), indent=1)
    print_table(result, step_guess)
    if not args.keep_weights:
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0 if fewstep else 1


def print_table(result, step_guess):
    r = result
    print(f"\nWan2.1 T2V ({r['config']}: {r['transformer_params_b'] * 1e9:,.0f}-parameter transformer, random "
          f"weights) on {r['device']}, {r['dtype']} (VAE {r['vae_dtype']}), torch {r['torch']}, "
          f"diffusers {r['diffusers']}")
    print(f"{r['frames']} frames at {r['width']}x{r['height']} (latents {r['latent']}), batch "
          f"{r['batch']}, {r['steps']} {r['sampler']} steps, guidance {r['guidance']}; median of "
          f"{r['reps']} rounds after a warm-up (assumed step before measuring: {step_guess:.2f} s)")
    sides = [(k, r.get(k)) for k in ("fewstep", "eager", "compile")]
    mem_key = "device_peak_mib" if r["device"] != "cpu" else "peak_rss_mib"
    mem_name = "device peak MiB" if r["device"] != "cpu" else "peak RSS MiB"
    print(f"\n{'side':<10} {'end-to-end s':>12} {'transformer s/step':>18} {'VAE decode s':>12} "
          f"{mem_name:>16}")
    for name, s in sides:
        if s is None:
            print(f"{name:<10} {'-':>12}")
            continue
        mem = s.get(mem_key)
        print(f"{name:<10} {s['total_s']:>12.4f} {s['step_s']:>18.4f} {s['decode_s']:>12.4f} "
              f"{'-' if mem is None else f'{mem:.0f}':>16}")
    fs = r.get("fewstep")
    for name, s in sides[1:]:
        if fs and s:
            print(f"fewstep/{name}: end-to-end {fs['total_s'] / s['total_s']:.3f}, transformer "
                  f"step {fs['step_s'] / s['step_s']:.3f}, VAE decode "
                  f"{fs['decode_s'] / s['decode_s']:.3f} (time ratios: below 1 is fewstep faster)")
    if r.get("eager", {}).get("torch_max_allocated_mib") is not None:
        e = r["eager"]
        print(f"diffusers eager, torch's counters: max allocated {e['torch_max_allocated_mib']:.0f} "
              f"MiB, max reserved {e['torch_max_reserved_mib']:.0f} MiB")
    if fs:
        print(f"fewstep loaded the weights in {fs['load_s']:.1f} s, warm-up {fs['warmup_s']:.1f} s")
    print("parity (relative L2): " + json.dumps(r.get("parity", {})))
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items())
          + f"; total {r['seconds']:.1f} of a {r['budget_s']:.0f} s budget")
    for note in r["notes"]:
        print("note:", note)


if __name__ == "__main__":
    sys.exit(main())

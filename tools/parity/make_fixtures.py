#!/usr/bin/env python3
"""Parity fixtures for the Stable Diffusion family (issue 6, item 4).

Builds three tiny random-weight SD models and a tiny CLIP with the reference implementation
(diffusers and transformers), saves each SD model in the diffusers directory layout under
``tests/fixtures/sd/<name>/``
and writes, beside it, ``<name>.reference.safetensors`` (fixed inputs and the reference outputs)
and ``<name>.reference.json`` (prompts, timesteps, package versions, what each tensor is).
The Rust tests load the directory with the project's own code and compare against the
reference file. ``tests/fixtures/sd/README.md`` documents every tensor.

    sd15-tiny   SD1.5 / DMD2-SD1.5 structure, epsilon, quick_gelu CLIP, conv projections
    sd2-tiny    SD2.1 / SD-Turbo structure, v_prediction, gelu CLIP, linear projections
    sdxl-tiny   SDXL / SDXL-Turbo / DMD2-SDXL structure, two text encoders, text_time embedding
    clip-tiny   a transformers CLIPModel (text and vision towers, projections, logit_scale) with
                its CLIPProcessor files, for the CLIP-score reward (PickScore / HPSv2 are CLIP-H)
    openclip-tiny  an open_clip CLIP saved as laion's hub repos ship it, and an HPSv2-style
                copy (openclip-tiny-hps/), for the same reward (tools/parity/openclip_fixture.py)

Usage (after ``bash tools/parity/setup.sh``), from the repository root:

    PYTHONPATH=tools/parity/.pydeps /usr/bin/python3 tools/parity/make_fixtures.py
    PYTHONPATH=tools/parity/.pydeps /usr/bin/python3 tools/parity/make_fixtures.py --check

The CLIP fixture is a flat transformers model directory instead (``clip-tiny/``), with raw 8-bit
images and the pixel values CLIPImageProcessor makes of them, so that the Rust side also proves
its own resize, crop and normalization.

``--check`` writes nothing: it reloads every saved directory with ``from_pretrained`` (and the
tokenizer.json with the ``tokenizers`` library alone), recomputes every output from the inputs
stored in the reference file and fails if anything differs, which proves that the saved layout
alone reproduces the reference. Generation is seeded and deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Nothing is ever downloaded: every model is built here from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPTokenizerFast,
    CLIPVisionConfig,
)
from transformers.models.clip.tokenization_clip import bytes_to_unicode  # noqa: E402

# Shared with wan_fixture.py, which runs on another diffusers (see README.md).
from parity_common import compare_outputs, describe_in, randomize, tensor_tables  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "sd"

# Two prompts of different lengths; upper case and punctuation exercise the normalizer.
PROMPTS = ["A photo of a cat, 4k!", "an astronaut riding a horse on the moon"]
MAX_LEN = 77
BATCH = len(PROMPTS)
LATENT_SHAPE = (BATCH, 4, 16, 16)
# One timestep per row, different rows different: the UNet must embed each row's own t.
UNET_TIMESTEPS = [[999.0, 249.0], [500.0, 10.0], [0.0, 750.0]]
PIPELINE_TIMESTEPS = [999, 749, 499, 249]
# Every output std must lie in this range, or the random init is degenerate or blows up.
STD_RANGE = (0.1, 5.0)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that BPE merges fully into one token, and sub-word pieces that it only partly
# merges (so that "astronaut" and "moon" come out as several tokens).
FULL_WORDS = ["a", "photo", "of", "cat", "an", "riding", "horse", "on", "the"]
PIECES = ["as", "tr", "au", "moo", "ph", "ri"]

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
)


def clip_text_config(vocab_size, hidden, act, heads, eos_id, pad_id, bos_id, projection_dim=None):
    """A 2-layer CLIP text config with the real models' shape ratios (MLP = 4 x hidden)."""
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LEN,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if projection_dim is not None:
        cfg["projection_dim"] = projection_dim
    return CLIPTextConfig(**cfg)


# --------------------------------------------------------------------------------------------
# The tiny byte-level CLIP BPE vocabulary
# --------------------------------------------------------------------------------------------


def _merge_chain(word: str, end_of_word: bool) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word` (with `</w>` on its last symbol if end_of_word)."""
    symbols = list(word)
    if end_of_word:
        symbols[-1] += "</w>"
    merges, acc = [], symbols[0]
    for s in symbols[1:]:
        merges.append((acc, s))
        acc += s
    return merges


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout in miniature: the 256 byte symbols, their `</w>` forms, one
    token per merge in merge order, then `<|startoftext|>` and `<|endoftext|>` (largest id)."""
    merges: list[tuple[str, str]] = []
    for piece in PIECES:
        merges += _merge_chain(piece, end_of_word=False)
    for word in FULL_WORDS:
        merges += _merge_chain(word, end_of_word=True)
    seen, unique = set(), []
    for m in merges:
        if m not in seen:
            seen.add(m)
            unique.append(m)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    for a, b in unique:
        assert a in tokens and b in tokens, (a, b)
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, unique


def build_tokenizer(pad_token: str, workdir: Path) -> CLIPTokenizerFast:
    """Slow and fast CLIP tokenizers from the tiny vocab; fails unless they agree."""
    vocab, merges = build_vocab()
    workdir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = workdir / "vocab.json", workdir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The slow tokenizer skips the first line of merges.txt (a version header).
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    kw = dict(pad_token=pad_token, model_max_length=MAX_LEN)
    slow = CLIPTokenizer(str(vocab_file), str(merges_file), **kw)
    fast = CLIPTokenizerFast(str(vocab_file), str(merges_file), **kw)
    probes = PROMPTS + ["", "photo " * 100, "The cat's horse: riding ON the moon?"]
    for text in probes:
        a = slow(text, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        b = fast(text, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        if a != b:
            raise SystemExit(f"slow and fast CLIP tokenizers disagree on {text!r}:\n{a}\n{b}")
    # Calls leave their padding/truncation in the backend; a hub tokenizer.json has neither,
    # so the saved one must not either (the pad token is named in tokenizer_config.json).
    fast.backend_tokenizer.no_padding()
    fast.backend_tokenizer.no_truncation()
    return fast


def tokenize(tok, prompts=PROMPTS) -> torch.Tensor:
    return tok(
        prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    ).input_ids.to(torch.int64)


# --------------------------------------------------------------------------------------------
# The three models
# --------------------------------------------------------------------------------------------


def tiny_vae(scaling_factor: float, seed: int) -> AutoencoderKL:
    """Two-level KL autoencoder (8x real downsampling becomes 2x): 16x16 latent <-> 32x32 image,
    with the real VAE's mid-block attention and quant convs."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
    )
    randomize(vae, seed)
    return vae.eval()


def build_sd15(workdir: Path) -> dict:
    vocab, _ = build_vocab()
    tok = build_tokenizer(EOS, workdir / "tok")
    eos_id = vocab[EOS]
    # Legacy CLIP config (eos_token_id 2, as in the real SD1.5 text encoder): pooled = argmax(ids).
    te = CLIPTextModel(clip_text_config(len(vocab), 32, "quick_gelu", 4, 2, eos_id, vocab[BOS]))
    randomize(te, 101)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 24),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
        use_linear_projection=False,
    )
    randomize(unet, 102)
    sched = DDPMScheduler(**SCHEDULER, prediction_type="epsilon", clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(0.18215, 103),
        text_encoder=te.eval(),
        tokenizer=tok,
        unet=unet.eval(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return dict(pipe=pipe, kind="sd", input_seed=1001)


def build_sd2(workdir: Path) -> dict:
    vocab, _ = build_vocab()
    tok = build_tokenizer("!", workdir / "tok")
    # Real eos id: pooled = first position of eos_token_id.
    te = CLIPTextModel(
        clip_text_config(len(vocab), 32, "gelu", 2, vocab[EOS], vocab["!"], vocab[BOS])
    )
    randomize(te, 201)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
    )
    randomize(unet, 202)
    sched = EulerDiscreteScheduler(
        **SCHEDULER, prediction_type="v_prediction", timestep_spacing="trailing"
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(0.18215, 203),
        text_encoder=te.eval(),
        tokenizer=tok,
        unet=unet.eval(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return dict(pipe=pipe, kind="sd", input_seed=2001)


SDXL_H1, SDXL_H2, SDXL_TIME_DIM = 32, 48, 8


def build_sdxl(workdir: Path) -> dict:
    vocab, _ = build_vocab()
    tok1 = build_tokenizer(EOS, workdir / "tok1")
    tok2 = build_tokenizer("!", workdir / "tok2")
    # Encoder 1 mirrors CLIP ViT-L (quick_gelu, legacy eos id); encoder 2 mirrors OpenCLIP
    # bigG (gelu, projection), with the real eos id.
    te1 = CLIPTextModel(
        clip_text_config(len(vocab), SDXL_H1, "quick_gelu", 4, 2, vocab[EOS], vocab[BOS])
    )
    randomize(te1, 301)
    te2 = CLIPTextModelWithProjection(
        clip_text_config(
            len(vocab), SDXL_H2, "gelu", 4, vocab[EOS], vocab["!"], vocab[BOS],
            projection_dim=SDXL_H2,
        )
    )
    randomize(te2, 302)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=2,
        transformer_layers_per_block=[1, 2],
        norm_num_groups=4,
        cross_attention_dim=SDXL_H1 + SDXL_H2,
        attention_head_dim=[1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_H2 + 6 * SDXL_TIME_DIM,
    )
    randomize(unet, 303)
    sched = EulerDiscreteScheduler(
        **SCHEDULER, prediction_type="epsilon", timestep_spacing="trailing"
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025, 304),
        text_encoder=te1.eval(),
        text_encoder_2=te2.eval(),
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet.eval(),
        scheduler=sched,
    )
    return dict(pipe=pipe, kind="sdxl", input_seed=3001)


BUILDERS = {"sd15-tiny": build_sd15, "sd2-tiny": build_sd2, "sdxl-tiny": build_sdxl}


# --------------------------------------------------------------------------------------------
# Inputs and reference outputs
# --------------------------------------------------------------------------------------------


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def pipe_time_ids(vae) -> list[int]:
    """SDXL's time_ids row: [orig H, orig W, crop top, crop left, target H, target W] in pixels."""
    s = vae_scale(vae)
    h, w = LATENT_SHAPE[2] * s, LATENT_SHAPE[3] * s
    return [h, w, 0, 0, h, w]


def make_inputs(kind: str, vae, seed: int) -> dict[str, torch.Tensor]:
    """Fixed, seeded inputs; every one of them is stored in the reference file."""
    g = torch.Generator().manual_seed(seed)
    s = vae_scale(vae)
    b, _, h, w = LATENT_SHAPE
    x = {"unet.sample": torch.randn(LATENT_SHAPE, generator=g)}
    for k, ts in enumerate(UNET_TIMESTEPS):
        x[f"unet.timesteps.{k}"] = torch.tensor(ts, dtype=torch.float32)
    if kind == "sdxl":
        # [orig H, orig W, crop top, crop left, target H, target W] in pixels, per row.
        x["unet.time_ids"] = torch.tensor([pipe_time_ids(vae)] * b, dtype=torch.float32)
    x["vae.latents"] = torch.randn(LATENT_SHAPE, generator=g)
    x["vae.image"] = torch.rand((b, 3, h * s, w * s), generator=g) * 2 - 1
    x["pipeline.timesteps"] = torch.tensor(PIPELINE_TIMESTEPS, dtype=torch.int64)
    for k in range(len(PIPELINE_TIMESTEPS)):
        x[f"pipeline.noise.{k}"] = torch.randn(LATENT_SHAPE, generator=g)
    return x


def compute_reference(kind: str, c: dict, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every reference output, from components `c` (pipeline.components) and inputs `x`.

    The arithmetic runs in float64 (the modules are cast in place, exactly, from their f32
    weights; the f32 inputs likewise) and the outputs are rounded to f32. The reference is then
    the exact result to within f32 storage, so a Rust f32 run is compared with the truth and
    not with torch's own f32 rounding. diffusers still computes the sinusoidal timestep
    embedding and the VAE attention softmax in f32, as the Rust side does."""
    for m in c.values():
        if isinstance(m, torch.nn.Module):
            m.to(torch.float64)
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    default = torch.get_default_dtype()
    # transformers builds its causal mask with torch.full(finfo(dtype).min), which torch 1.13
    # only accepts in float64 when that is the default dtype.
    torch.set_default_dtype(torch.float64)
    try:
        r = _compute(kind, c, x64)
    finally:
        torch.set_default_dtype(default)
    return {k: v.float() if v.is_floating_point() else v for k, v in r.items()}


@torch.no_grad()
def _compute(kind: str, c: dict, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r: dict[str, torch.Tensor] = {}
    ids = tokenize(c["tokenizer"])
    o = c["text_encoder"](ids, output_hidden_states=True)
    r["text.input_ids"] = ids
    r["text.hidden_states"] = torch.stack(o.hidden_states)
    r["text.last_hidden_state"] = o.last_hidden_state
    r["text.pooled"] = o.pooler_output
    added = None
    if kind == "sdxl":
        ids2 = tokenize(c["tokenizer_2"])
        o2 = c["text_encoder_2"](ids2, output_hidden_states=True)
        r["text2.input_ids"] = ids2
        r["text2.hidden_states"] = torch.stack(o2.hidden_states)
        r["text2.last_hidden_state"] = o2.last_hidden_state
        r["text2.pooled"] = c["text_encoder_2"].text_model(ids2).pooler_output
        r["text2.text_embeds"] = o2.text_embeds
        cond = torch.cat([o.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        r["unet.text_embeds"] = o2.text_embeds
        added = {"text_embeds": o2.text_embeds, "time_ids": x["unet.time_ids"]}
    else:
        cond = o.last_hidden_state
    r["unet.encoder_hidden_states"] = cond

    unet, vae = c["unet"], c["vae"]

    def eps(sample, t):
        return unet(sample, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample

    for k in range(len(UNET_TIMESTEPS)):
        r[f"unet.out.{k}"] = eps(x["unet.sample"], x[f"unet.timesteps.{k}"])

    r["vae.decoded"] = vae.decode(x["vae.latents"]).sample
    post = vae.encode(x["vae.image"]).latent_dist
    r["vae.posterior_mean"] = post.mean
    r["vae.posterior_logvar"] = post.logvar

    # The DMD2-style student sampler (AMD.md section 2), written out without a scheduler so the
    # arithmetic is exactly what the contract states.
    # alphas_cumprod as diffusers computes it (f32), then used in f64.
    a32 = c["scheduler"].alphas_cumprod.to(torch.float32)
    a = a32.double()
    v_pred = c["scheduler"].config.prediction_type == "v_prediction"
    ts = x["pipeline.timesteps"]
    xt = x["pipeline.noise.0"]
    for k, t in enumerate(ts.tolist()):
        out = eps(xt, torch.full((BATCH,), float(t)))
        at = a[t]
        if v_pred:
            x0 = at.sqrt() * xt - (1 - at).sqrt() * out
        else:
            x0 = (xt - (1 - at).sqrt() * out) / at.sqrt()
        r[f"pipeline.x0.{k}"] = x0
        if k + 1 < len(ts):
            an = a[int(ts[k + 1])]
            xt = an.sqrt() * x0 + (1 - an).sqrt() * x[f"pipeline.noise.{k + 1}"]
    r["pipeline.image"] = vae.decode(x0 / vae.config.scaling_factor).sample
    r["pipeline.alphas_cumprod"] = a32
    return r


DESCRIPTIONS = {
    "text.input_ids": "i64 [2,77]: tokenizer/ output for the prompts, padded/truncated to 77",
    "text.hidden_states": "[L+1,2,77,hidden]: text_encoder output_hidden_states stacked (0 = embeddings)",
    "text.last_hidden_state": "[2,77,hidden]: text_encoder last_hidden_state (after final_layer_norm)",
    "text.pooled": "[2,hidden]: text_encoder pooler_output",
    "text2.input_ids": "i64 [2,77]: tokenizer_2/ output for the prompts (pad '!')",
    "text2.hidden_states": "[L+1,2,77,hidden2]: text_encoder_2 output_hidden_states stacked",
    "text2.last_hidden_state": "[2,77,hidden2]: text_encoder_2 last_hidden_state",
    "text2.pooled": "[2,hidden2]: text_encoder_2.text_model pooler_output (before text_projection; extra)",
    "text2.text_embeds": "[2,proj]: text_encoder_2 text_embeds = text_projection(pooled)",
    "unet.sample": "input [2,4,16,16]: latent fed to the UNet",
    "unet.encoder_hidden_states": "[2,77,cross_dim]: the conditioning the UNet gets (sd: text.last_hidden_state; sdxl: cat(text.hidden_states[-2], text2.hidden_states[-2]))",
    "unet.text_embeds": "[2,proj]: sdxl added_cond_kwargs text_embeds (= text2.text_embeds)",
    "unet.time_ids": "input [2,6]: sdxl added_cond_kwargs time_ids = [H_px, W_px, 0, 0, H_px, W_px]",
    "unet.timesteps.K": "input [2] f32: one timestep per row for call K",
    "unet.out.K": "[2,4,16,16]: unet(unet.sample, unet.timesteps.K, unet.encoder_hidden_states[, added_cond]).sample",
    "vae.latents": "input [2,4,16,16]",
    "vae.decoded": "[2,3,32,32]: vae.decode(vae.latents).sample (no scaling, no clamp)",
    "vae.image": "input [2,3,32,32] uniform in [-1,1]",
    "vae.posterior_mean": "[2,4,16,16]: vae.encode(vae.image).latent_dist.mean",
    "vae.posterior_logvar": "[2,4,16,16]: vae.encode(vae.image).latent_dist.logvar (clamped to [-30,20])",
    "pipeline.timesteps": "input i64 [4] = [999,749,499,249]",
    "pipeline.noise.K": "input [2,4,16,16] for K = 0..3 (noise.0 is the starting latent)",
    "pipeline.x0.K": "[2,4,16,16]: the student's x0 prediction at step K = 0..3",
    "pipeline.image": "[2,3,32,32]: vae.decode(pipeline.x0.3 / scaling_factor).sample (no clamp)",
    "pipeline.alphas_cumprod": "[1000] f32: the scheduler's alphas_cumprod used by the sampler (extra)",
}


def describe(name: str) -> str:
    return describe_in(DESCRIPTIONS, name)


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def is_input(name: str) -> bool:
    return name in ("unet.sample", "unet.time_ids", "vae.latents", "vae.image", "pipeline.timesteps") or (
        name.startswith(("unet.timesteps.", "pipeline.noise."))
    )


def summary(name: str, pipe, kind: str) -> dict:
    c = pipe.components
    s = {
        "mirrors": {"sd15-tiny": "SD1.5 / DMD2-SD1.5", "sd2-tiny": "SD2.1 / SD-Turbo",
                    "sdxl-tiny": "SDXL / SDXL-Turbo / DMD2-SDXL"}[name],
        "prediction_type": c["scheduler"].config.prediction_type,
        "vae_scaling_factor": c["vae"].config.scaling_factor,
        "vae_scale": vae_scale(c["vae"]),
        "text_conditioning": "cat(text.hidden_states[-2], text2.hidden_states[-2]) on features"
        if kind == "sdxl" else "text.last_hidden_state",
        "tokenizer_pad_id": c["tokenizer"].pad_token_id,
        "text_encoder_eos_token_id": c["text_encoder"].config.eos_token_id,
        "eos_id": c["tokenizer"].eos_token_id,
        "bos_id": c["tokenizer"].bos_token_id,
    }
    if kind == "sdxl":
        s["tokenizer_2_pad_id"] = c["tokenizer_2"].pad_token_id
        s["text_encoder_2_eos_token_id"] = c["text_encoder_2"].config.eos_token_id
        s["pooled"] = "text2.text_embeds"
        s["time_ids_row"] = [float(v) for v in pipe_time_ids(c["vae"])]
    return s


def std_check(name: str, r: dict[str, torch.Tensor]) -> dict[str, float]:
    stds = {}
    for k, v in r.items():
        if v.dtype != torch.float32 or k == "pipeline.alphas_cumprod":
            continue
        if not torch.isfinite(v).all():
            raise SystemExit(f"{name}: {k} has non-finite values")
        std = float(v.std())
        stds[k] = round(std, 4)
        # An epsilon student's x0 is (x - sqrt(1-a) eps) / sqrt(a): with a random eps it is
        # ~15x the noise at t=999, by the arithmetic and not by an unstable network.
        if k.startswith("pipeline.x0."):
            continue
        if not STD_RANGE[0] <= std <= STD_RANGE[1]:
            raise SystemExit(f"{name}: {k} std {std:.4g} is outside {STD_RANGE}: fix the init scale")
    return stds


def generate(name: str) -> None:
    model_dir = OUT_DIR / name
    with tempfile.TemporaryDirectory() as tmp:
        built = BUILDERS[name](Path(tmp))
        pipe, kind = built["pipe"], built["kind"]
        comps = pipe.components
        x = make_inputs(kind, comps["vae"], built["input_seed"])
        # Saved in f32 before compute_reference casts the modules to f64.
        if model_dir.exists():
            shutil.rmtree(model_dir)
        pipe.save_pretrained(model_dir, safe_serialization=True)
    r = compute_reference(kind, comps, x)
    stds = std_check(name, r)

    tensors = {**x, **r}
    tensors = {k: v.detach().clone().contiguous() for k, v in sorted(tensors.items())}
    safetensors.torch.save_file(tensors, str(OUT_DIR / f"{name}.reference.safetensors"))
    meta = {
        "model": name,
        "directory": name,
        "generator": "tools/parity/make_fixtures.py",
        "prompts": PROMPTS,
        "max_length": MAX_LEN,
        "unet_timesteps": UNET_TIMESTEPS,
        "pipeline_timesteps": PIPELINE_TIMESTEPS,
        "versions": versions(),
        "model_summary": summary(name, pipe, kind),
        "computed_in": "float64 from the f32 weights and inputs, stored as float32",
        "tolerance": "max abs difference <= 1e-4 (f32), reported relative to the reference's max abs value",
        "output_std": stds,
        **tensor_tables(r, tensors, is_input, describe),
    }
    (OUT_DIR / f"{name}.reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: wrote {model_dir.relative_to(REPO)} and its reference ({len(tensors)} tensors)")
    for k in ("text.last_hidden_state", "unet.out.0", "unet.out.1", "unet.out.2", "vae.decoded",
              "pipeline.x0.3", "pipeline.image"):
        print(f"  std {k}: {stds[k]}")


# --------------------------------------------------------------------------------------------
# --check: reload the saved layout and reproduce the reference
# --------------------------------------------------------------------------------------------


def check(name: str) -> bool:
    model_dir = OUT_DIR / name
    ref = safetensors.torch.load_file(str(OUT_DIR / f"{name}.reference.safetensors"))
    meta = json.loads((OUT_DIR / f"{name}.reference.json").read_text())
    kind = "sdxl" if "text2.input_ids" in ref else "sd"
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir)
    comps = pipe.components
    ok = True
    for sub, key in (("tokenizer", "text"), ("tokenizer_2", "text2")):
        if sub not in comps or comps[sub] is None:
            continue
        if not isinstance(comps[sub], CLIPTokenizerFast):
            print(f"{name}: {sub} did not load as a fast tokenizer")
            ok = False
        # The Rust side reads tokenizer.json with the tokenizers library alone (no padding there).
        raw = tokenizers.Tokenizer.from_file(str(model_dir / sub / "tokenizer.json"))
        if raw.padding is not None or raw.truncation is not None:
            print(f"{name}: {sub}/tokenizer.json carries padding or truncation")
            ok = False
        ids = ref[f"{key}.input_ids"]
        for i, p in enumerate(meta["prompts"]):
            enc = raw.encode(p).ids
            if enc != ids[i, : len(enc)].tolist():
                print(f"{name}: {sub}/tokenizer.json encodes {p!r} as {enc}")
                ok = False
        for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                  "special_tokens_map.json"):
            if not (model_dir / sub / f).is_file():
                print(f"{name}: missing {sub}/{f}")
                ok = False
    inputs = {k: v for k, v in ref.items() if meta["tensors"][k]["role"] == "input"}
    r = compute_reference(kind, comps, inputs)
    missing = set(ref) - set(inputs) - set(r)
    if missing:
        print(f"{name}: reference tensors not reproduced: {sorted(missing)}")
        ok = False
    return compare_outputs(name, ref, r) and ok


# --------------------------------------------------------------------------------------------
# clip-tiny: a CLIPModel for the CLIP-score reward (PickScore and HPSv2 are CLIP ViT-H models)
# --------------------------------------------------------------------------------------------

CLIP_NAME = "clip-tiny"
# Vision tower: a 5 x 5 patch grid plus the class token (ViT-H/14: 16 x 16 at 224 px).
CLIP_IMAGE, CLIP_PATCH = 30, 6
# Differs from both towers' widths (32, 40), so a transposed projection cannot pass.
CLIP_PROJ = 24
# Trained CLIP models sit at the clamp of the learned temperature: exp(logit_scale) = 100.
CLIP_LOGIT_SCALE = math.log(100.0)
# Raw 8-bit images (H, W): a landscape scaled down (shortest side 45 -> 30, through PIL's
# antialiasing filter) and cropped on its width (30 x 42 -> 30 x 30), and a portrait scaled up
# (17 -> 30) and cropped on its height (35 x 30 -> 30 x 30). Different shapes, so each is its
# own tensor.
CLIP_RAW_SIZES = [(45, 64), (20, 17)]
CLIP_SEEDS = dict(weights=401, inputs=4001)


def build_clip(workdir: Path) -> tuple[CLIPModel, CLIPProcessor]:
    """A tiny CLIPModel shaped like OpenCLIP ViT-H (gelu in both towers, pre-LN vision tower with
    a class token) and its processor: the tiny tokenizer plus a CLIPImageProcessor with the
    library defaults (bicubic resize of the shortest side, center crop, OpenAI mean/std)."""
    vocab, _ = build_vocab()
    tok = build_tokenizer(EOS, workdir / "tok")
    # Legacy eos_token_id 2, as in the converted laion CLIP-H configs: pooled at argmax(ids).
    text = clip_text_config(len(vocab), 32, "gelu", 4, 2, vocab[EOS], vocab[BOS])
    vision = CLIPVisionConfig(
        hidden_size=40,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=CLIP_IMAGE,
        patch_size=CLIP_PATCH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    # The text config keeps its default projection_dim (512): CLIPModel uses the top-level one.
    cfg = CLIPConfig.from_text_vision_configs(text, vision, projection_dim=CLIP_PROJ)
    model = CLIPModel(cfg)
    randomize(
        model,
        CLIP_SEEDS["weights"],
        extra={
            "vision_model.embeddings.class_embedding": (0.0, 0.5),
            "logit_scale": (CLIP_LOGIT_SCALE, 0.0),
        },
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}
    )
    return model.eval(), CLIPProcessor(image_processor=images, tokenizer=tok)


def clip_raw_images(seed: int, sizes=CLIP_RAW_SIZES) -> list[torch.Tensor]:
    """uint8 [H, W, 3] images of `sizes`: a smooth colour pattern, noise, and a saturated block
    whose hard edges make the bicubic filter overshoot (so PIL's clipping to 0..255 is
    exercised)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        yy = torch.linspace(0.0, 1.0, h)[:, None, None]
        xx = torch.linspace(0.0, 1.0, w)[None, :, None]
        phase = torch.tensor([0.0, 2.0, 4.0])
        base = 255.0 * (0.5 + 0.4 * torch.sin(6.0 * xx + 3.0 * yy + phase))
        img = base + 40.0 * torch.randn((h, w, 3), generator=g)
        img[h // 4 : h // 2, w // 3 : 2 * w // 3] = torch.tensor([255.0, 0.0, 255.0])
        out.append(img.round().clamp(0, 255).to(torch.uint8))
    return out


def clip_reference(model: CLIPModel, processor: CLIPProcessor, raw: list[torch.Tensor]) -> dict:
    """Preprocessing as CLIPImageProcessor does it (its own f32 numpy arithmetic), then every
    model output in float64 from the f32 weights, stored as f32."""
    pil = [Image.fromarray(im.numpy(), mode="RGB") for im in raw]
    pixels = processor.image_processor(pil, return_tensors="pt").pixel_values
    ids = tokenize(processor.tokenizer)
    model.to(torch.float64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # transformers' causal mask, as in compute_reference
    try:
        with torch.no_grad():
            v = model.vision_model(pixels.double(), output_hidden_states=True)
            t = model.text_model(ids)
            out = model(input_ids=ids, pixel_values=pixels.double())
            r = {
                "pixel_values": pixels,
                "text.input_ids": ids,
                "vision.hidden_states": torch.stack(v.hidden_states),
                "vision.last_hidden_state": v.last_hidden_state,
                "vision.pooled": v.pooler_output,
                "clip.image_embeds": model.visual_projection(v.pooler_output),
                "clip.text_embeds": model.text_projection(t.pooler_output),
                "clip.logits_per_image": out.logits_per_image,
            }
            # CLIPModel's own embeds are the normalized projections: the same arithmetic.
            unit = r["clip.image_embeds"] / r["clip.image_embeds"].norm(dim=-1, keepdim=True)
            assert torch.allclose(unit, out.image_embeds, atol=1e-12)
    finally:
        torch.set_default_dtype(default)
    return {k: v.float() if v.is_floating_point() else v for k, v in r.items()}


CLIP_DESCRIPTIONS = {
    "images.raw.K": "input u8 [H,W,3]: raw RGB image K before preprocessing (K = 0: 45x64, 1: 20x17)",
    "pixel_values": "[2,3,30,30]: CLIPImageProcessor(images.raw.*).pixel_values (bicubic shortest-side resize to 30, center crop 30x30, x/255, (x-mean)/std), the vision tower's input",
    "text.input_ids": "i64 [2,77]: the tokenizer's ids for the prompts, padded/truncated to 77",
    "vision.hidden_states": "[L+1,2,26,40]: vision_model output_hidden_states stacked (0 = embeddings after pre_layrnorm, 1-2 = after each layer)",
    "vision.last_hidden_state": "[2,26,40]: vision_model last_hidden_state (no post_layernorm; token 0 is the class token)",
    "vision.pooled": "[2,40]: vision_model pooler_output = post_layernorm(last_hidden_state[:, 0])",
    "clip.image_embeds": "[2,24]: visual_projection(vision.pooled) = get_image_features, not normalized",
    "clip.text_embeds": "[2,24]: text_projection(text pooler_output) = get_text_features, not normalized",
    "clip.logits_per_image": "[2,2]: exp(logit_scale) * cos(image i, prompt j) (CLIPModel's logits_per_image)",
}


def clip_describe(name: str) -> str:
    if name.startswith("images.raw."):
        return CLIP_DESCRIPTIONS["images.raw.K"]
    return CLIP_DESCRIPTIONS[name]


def clip_summary(model: CLIPModel, processor: CLIPProcessor) -> dict:
    ip = processor.image_processor
    return {
        "mirrors": "CLIPModel / OpenCLIP ViT-H (PickScore, HPSv2) scaled down",
        "projection_dim": model.config.projection_dim,
        "text_projection_dim_in_text_config": model.config.text_config.projection_dim,
        "logit_scale": float(model.logit_scale),
        "logit_scale_exp": float(model.logit_scale.exp()),
        "vision_image_size": model.config.vision_config.image_size,
        "vision_patch_size": model.config.vision_config.patch_size,
        "text_eos_token_id": model.config.text_config.eos_token_id,
        "resample": int(ip.resample),
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
    }


def generate_clip() -> None:
    model_dir = OUT_DIR / CLIP_NAME
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_clip(Path(tmp))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        # Saved in f32 before clip_reference casts the model to f64.
        model.save_pretrained(model_dir, safe_serialization=True)
        processor.save_pretrained(model_dir)
    summary_ = clip_summary(model, processor)
    raw = clip_raw_images(CLIP_SEEDS["inputs"])
    r = clip_reference(model, processor, raw)
    stds = {}
    for k, v in r.items():
        if v.dtype != torch.float32:
            continue
        if not torch.isfinite(v).all():
            raise SystemExit(f"{CLIP_NAME}: {k} has non-finite values")
        stds[k] = round(float(v.std()), 4)
        # logits are cos x 100 by the arithmetic; pixel_values are an input.
        if k not in ("clip.logits_per_image", "pixel_values") and not (
            STD_RANGE[0] <= stds[k] <= STD_RANGE[1]
        ):
            raise SystemExit(f"{CLIP_NAME}: {k} std {stds[k]} is outside {STD_RANGE}")
    tensors = {f"images.raw.{i}": im for i, im in enumerate(raw)}
    tensors.update(r)
    tensors = {k: v.detach().clone().contiguous() for k, v in sorted(tensors.items())}
    safetensors.torch.save_file(tensors, str(OUT_DIR / f"{CLIP_NAME}.reference.safetensors"))
    meta = {
        "model": CLIP_NAME,
        "directory": CLIP_NAME,
        "generator": "tools/parity/make_fixtures.py",
        "prompts": PROMPTS,
        "max_length": MAX_LEN,
        "raw_image_sizes": [list(s) for s in CLIP_RAW_SIZES],
        "versions": versions(),
        "model_summary": summary_,
        "computed_in": "pixel_values: CLIPImageProcessor (PIL + f32 numpy); the rest in float64 from the f32 weights and pixel_values, stored as float32",
        "tolerance": "max abs difference <= 1e-4 (f32), reported relative to the reference's max abs value",
        "output_std": stds,
        **tensor_tables(r, tensors, lambda k: k.startswith("images.raw."), clip_describe),
    }
    (OUT_DIR / f"{CLIP_NAME}.reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{CLIP_NAME}: wrote {model_dir.relative_to(REPO)} and its reference ({len(tensors)} tensors)")
    for k in ("vision.last_hidden_state", "clip.image_embeds", "clip.text_embeds", "clip.logits_per_image"):
        print(f"  std {k}: {stds[k]}")


def check_clip() -> bool:
    model_dir = OUT_DIR / CLIP_NAME
    ref = safetensors.torch.load_file(str(OUT_DIR / f"{CLIP_NAME}.reference.safetensors"))
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    ok = True
    if not isinstance(processor.tokenizer, CLIPTokenizerFast):
        print(f"{CLIP_NAME}: the tokenizer did not load as a fast tokenizer")
        ok = False
    raw_tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if raw_tok.padding is not None or raw_tok.truncation is not None:
        print(f"{CLIP_NAME}: tokenizer.json carries padding or truncation")
        ok = False
    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
              "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if not (model_dir / f).is_file():
            print(f"{CLIP_NAME}: missing {f}")
            ok = False
    raw = [ref[f"images.raw.{i}"] for i in range(len(CLIP_RAW_SIZES))]
    r = clip_reference(model, processor, raw)
    return compare_outputs(CLIP_NAME, ref, r) and ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="reload the saved fixtures and verify them")
    # Imported here: openclip_fixture imports this module for its shared helpers.
    import openclip_fixture

    makers = {n: (lambda n=n: generate(n), lambda n=n: check(n)) for n in BUILDERS}
    makers[CLIP_NAME] = (generate_clip, check_clip)
    makers[openclip_fixture.NAME] = (openclip_fixture.generate, openclip_fixture.check)
    known = list(makers)
    ap.add_argument("names", nargs="*", default=known, help="which fixtures (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise SystemExit(f"unknown fixture(s) {unknown}; known: {known}")
    if args.check:
        results = [makers[n][1]() for n in args.names]
        if not all(results):
            raise SystemExit(1)
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for n in args.names:
        makers[n][0]()


if __name__ == "__main__":
    main()

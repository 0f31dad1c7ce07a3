"""fewstep's tiny family (src/families/tiny/) in PyTorch, loading our safetensors as they are.

A line-for-line mirror of the tokenizer (tokenizer.rs), the text encoder (text.rs), the
conditioning (cond.rs) and the DiT with its conv refiner (dit.rs), written the way a PyTorch
user would (nn.Linear, F.layer_norm, F.scaled_dot_product_attention, nn.Conv2d), so that
`tools/torch_bench.py` can time the same network with the same weights in both runtimes. The
parameter names are those of our weights files, so `load_state_dict(strict=True)` checks that
every tensor is used. Only the DiT denoiser with a velocity prediction is mirrored (what the
shipped tiny models are); anything else is refused.
"""

import json
import math
import os
import re
import tomllib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

REFINER_FEATURES = 8  # config.rs
DIT_EPS = 1e-6  # dit.rs
TEXT_EPS = 1e-5  # text.rs
NEG_INF = -1e9  # text.rs: the key bias of padding


class Tokenizer:
    """tokenizer.rs: lower-cased words (the `Whitespace` pre-tokenizer's `\\w+|[^\\w\\s]+`),
    `[BOS]` first, truncated and padded to `max_len`."""

    def __init__(self, path):
        spec = json.load(open(path))
        assert spec["model"]["type"] == "WordLevel", spec["model"]["type"]
        self.vocab = spec["model"]["vocab"]
        self.unk = self.vocab[spec["model"]["unk_token"]]
        self.pad, self.bos = self.vocab["[PAD]"], self.vocab["[BOS]"]

    def encode_batch(self, prompts, max_len):
        ids, mask = [], []
        for p in prompts:
            words = re.findall(r"\w+|[^\w\s]+", p.lower())
            row = [self.bos] + [self.vocab.get(w, self.unk) for w in words][: max_len - 1]
            n = len(row)
            ids.append(row + [self.pad] * (max_len - n))
            mask.append([1.0] * n + [0.0] * (max_len - n))
        return torch.tensor(ids), torch.tensor(mask)


def sincos_1d(positions, dim, max_period):
    """embed.rs: `[n, dim]`, half cosines then sines, in f32."""
    half = dim // 2
    j = torch.arange(half, dtype=torch.float32)
    freq = torch.exp(-math.log(max_period) * j / half)
    a = positions.to(torch.float32)[:, None] * freq[None]
    return torch.cat([a.cos(), a.sin()], 1)


def video_pos_embedding(frames, rows, cols, dim):
    """embed.rs: row (a quarter), column (a quarter), frame (the rest), frame-major."""
    quarter, half = dim // 4, dim // 2
    row = sincos_1d(torch.arange(rows), quarter, 100.0)
    col = sincos_1d(torch.arange(cols), quarter, 100.0)
    frame = sincos_1d(torch.arange(frames), dim - half, 100.0)
    return torch.cat([
        row[None, :, None].expand(frames, rows, cols, quarter),
        col[None, None, :].expand(frames, rows, cols, quarter),
        frame[:, None, None].expand(frames, rows, cols, dim - half),
    ], -1).reshape(frames * rows * cols, dim)


def layer_norm(x, eps):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x, shift, scale, eps=DIT_EPS):
    """fused.rs `layer_norm_modulate`: LN(x) * (1 + scale) + shift, per row of the batch."""
    return layer_norm(x, eps) * (1 + scale[:, None]) + shift[:, None]


def attend(q, k, v, heads, bias=None):
    """attention.rs `sdpa` on `[B, T, H*Dh]`; `bias` is `[B, 1, 1, L]` (added to the scores)."""
    b, tq, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
    return o.transpose(1, 2).reshape(b, tq, d)


class Attention(nn.Module):
    """attention.rs `Attention`: fused QKV projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x, bias=None):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(attend(q, k, v, self.heads, bias))

    def across_frames(self, x, frames):
        b, fn, d = x.shape
        n = fn // frames
        across = x.view(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d)
        return self(across).view(b, n, frames, d).transpose(1, 2).reshape(b, fn, d)


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(context_dim, 2 * dim)
        self.out, self.heads = nn.Linear(dim, dim), heads

    def forward(self, x, context, bias):
        k, v = self.kv(context).chunk(2, -1)
        return self.out(attend(self.q(x), k, v, self.heads, bias))


class TextBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class TextEncoder(nn.Module):
    """text.rs: returns (tokens `[B, L, Dt]`, key bias `[B, 1, 1, L]`, pooled `[B, Dt]`)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg["text_dim"]
        self.embed = nn.Embedding(cfg["vocab_size"], d)
        self.pos = nn.Parameter(torch.zeros(cfg["text_max_len"], d))
        self.blocks = nn.ModuleList(TextBlock(d, cfg["heads"]) for _ in range(cfg["text_depth"]))
        # text_mix = k: [x_t, x_{t-1}, ..., x_{t-k}] -> D, added to x_t.
        self.mix_k = cfg.get("text_mix", 0)
        self.mix = nn.Linear((self.mix_k + 1) * d, d) if self.mix_k else None

    def forward(self, ids, mask):
        l = ids.shape[1]
        key_bias = ((mask - 1.0) * -NEG_INF)[:, None, None, :]
        x = self.embed(ids) + self.pos[:l]
        for blk in self.blocks:
            x = x + blk.attn(layer_norm(x, TEXT_EPS), key_bias)
            x = x + blk.fc2(F.silu(blk.fc1(layer_norm(x, TEXT_EPS))))
        if self.mix is not None:
            # Token t gets tokens t-1..t-k, zeros before the start (text.rs's shift_right).
            shifted = [F.pad(x, (0, 0, s, 0))[:, :l] for s in range(1, self.mix_k + 1)]
            x = x + self.mix(torch.cat([x] + shifted, 2))
        x = layer_norm(x, TEXT_EPS)
        m = mask[:, :, None]
        return x, key_bias, (x * m).sum(1) / m.sum(1)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, h = cfg["dim"], cfg["heads"]
        self.ada = nn.Linear(d, 6 * d)
        self.spatial, self.temporal = Attention(d, h), Attention(d, h)
        self.cross = CrossAttention(d, cfg["text_dim"], h)
        self.fc1, self.fc2 = nn.Linear(d, cfg["mlp_ratio"] * d), nn.Linear(cfg["mlp_ratio"] * d, d)


class Refiner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, r, p = cfg["channels"], cfg["refiner"], cfg["patch"]
        self.features = nn.Linear(cfg["dim"], REFINER_FEATURES * p * p)
        self.conv1 = nn.Conv2d(c + REFINER_FEATURES, r, 3, padding=1)
        self.conv2 = nn.Conv2d(r, c, 3, padding=1)


class Dit(nn.Module):
    """dit.rs, with cond.rs's conditioning (`t_fc1`, `t_fc2`, `text_proj`) under the same prefix."""

    def __init__(self, cfg):
        super().__init__()
        d, p = cfg["dim"], cfg["patch"]
        pd = p * p * cfg["channels"]
        self.cfg = cfg
        self.patch_in = nn.Linear(pd, d)
        self.t_fc1, self.t_fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.text_proj = nn.Linear(cfg["text_dim"], d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["depth"]))
        self.final_ada, self.patch_out = nn.Linear(d, 2 * d), nn.Linear(d, pd)
        self.refiner = Refiner(cfg) if cfg.get("refiner", 0) > 0 else None

    def patchify(self, x):
        b, f, c, h, w = x.shape
        p = self.cfg["patch"]
        x = x.reshape(b * f, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, f * (h // p) * (w // p), c * p * p)

    def unpatchify(self, x, f, h, w):
        b, _, cpp = x.shape
        p = self.cfg["patch"]
        c = cpp // (p * p)
        x = x.reshape(b * f, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, f, c, h, w)

    def forward(self, x, t, text):
        tokens, key_bias, pooled = text
        b, f, c, h, w = x.shape
        p, d = self.cfg["patch"], self.cfg["dim"]
        n = (h // p) * (w // p)
        pos = video_pos_embedding(f, h // p, w // p, d).to(x)
        tok = self.patch_in(self.patchify(x)) + pos
        temb = sincos_1d(t * 1000.0, d, 10000.0).to(x)
        cond = F.silu(self.t_fc2(F.silu(self.t_fc1(temb))) + self.text_proj(pooled))
        for blk in self.blocks:
            m = blk.ada(cond).chunk(6, 1)
            hs = blk.spatial(modulate(tok, m[0], m[1]).reshape(b * f, n, d)).reshape(b, f * n, d)
            tok = tok + m[2][:, None] * hs
            if f > 1:
                tok = tok + blk.temporal.across_frames(layer_norm(tok, DIT_EPS), f)
            tok = tok + blk.cross(layer_norm(tok, DIT_EPS), tokens, key_bias)
            hm = blk.fc2(F.silu(blk.fc1(modulate(tok, m[3], m[4]))))
            tok = tok + m[5][:, None] * hm
        fm = self.final_ada(cond).chunk(2, 1)
        out = modulate(tok, fm[0], fm[1])
        v = self.unpatchify(self.patch_out(out), f, h, w)
        if self.refiner is not None:
            r = self.refiner
            feats = self.unpatchify(r.features(out), f, h, w)
            inp = torch.cat([x, feats], 2).reshape(b * f, c + REFINER_FEATURES, h, w)
            v = v + r.conv2(F.silu(r.conv1(inp))).reshape(b, f, c, h, w)
        return v


class TinyModel(nn.Module):
    """mod.rs `TinyModel`: `encode` (prompts to conditioning) and `velocity`."""

    def __init__(self, cfg, tokenizer):
        super().__init__()
        if cfg.get("denoiser", "dit") != "dit" or cfg.get("prediction", "velocity") != "velocity":
            raise ValueError("tiny_torch mirrors the DiT with a velocity prediction only")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.text, self.dit = TextEncoder(cfg), Dit(cfg)

    def encode(self, prompts):
        ids, mask = self.tokenizer.encode_batch(prompts, self.cfg["text_max_len"])
        device = self.text.pos.device
        return self.text(ids.to(device), mask.to(device))

    def velocity(self, x, t, text):
        return self.dit(x, t, text)

    def forward(self, x, t, ids, mask):
        """Encode + velocity from token ids: one traceable function for torch.compile."""
        return self.dit(x, t, self.text(ids, mask))


def load(model_dir):
    """The model of `models/<name>/` (manifest.toml's architecture, weights and tokenizer)."""
    manifest = tomllib.load(open(os.path.join(model_dir, "manifest.toml"), "rb"))
    tokenizer = Tokenizer(os.path.join(model_dir, manifest["tokenizer"]))
    model = TinyModel(manifest["architecture"], tokenizer)
    model.load_state_dict(load_file(os.path.join(model_dir, manifest["weights"])), strict=True)
    return model

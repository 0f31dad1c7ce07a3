"""Helpers shared by the parity fixture scripts (make_fixtures.py, openclip_fixture.py,
wan_fixture.py, wan_vae_fixture.py): random weights, the reference JSON's tensor tables, and
the --check comparison. Imports torch only, so a script on another diffusers version (or
another torch) can use it."""

from __future__ import annotations

import math

import torch


def randomize(model: torch.nn.Module, seed: int, extra: dict | None = None, device: str = "cpu") -> None:
    """Re-draws every parameter so that nothing is an identity or a zero (norm affine params
    included) while activations stay O(1): weights N(0, 1/fan_in), biases N(0, 0.1^2), norm
    weights N(1, 0.25^2), norm biases N(0, 0.25^2), embeddings N(0, 0.5^2). `extra` maps the
    names of bare parameters (no module type above knows them) to their (mean, std); they are
    drawn last, in name order, so that models without any draw exactly what they always did.
    `device` is where the numbers are drawn (a GPU's generator draws other numbers than the
    CPU's, fast: tools/wan_bench.py draws its 1.3 B parameters there)."""
    g = torch.Generator(device=device).manual_seed(seed)
    done: set[int] = set()

    def draw(p, mean, std):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g, device=device) * std + mean)
        done.add(id(p))

    for name, m in sorted(model.named_modules(), key=lambda x: x[0]):
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = m.weight[0].numel()
            draw(m.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                draw(m.bias, 0.0, 0.1)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                draw(m.weight, 1.0, 0.25)
            if m.bias is not None:
                draw(m.bias, 0.0, 0.25)
        elif isinstance(m, torch.nn.Embedding):
            draw(m.weight, 0.0, 0.5)
    params = dict(model.named_parameters())
    for name, (mean, std) in sorted((extra or {}).items()):
        draw(params[name], mean, std)
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise SystemExit(f"randomize: parameters of unknown modules left untouched: {missed}")


def tensor_tables(r, tensors, is_input, describe):
    """The reference JSON's tables: each float32 output's max abs value, and every stored
    tensor's shape, dtype, role (`is_input(key)`) and `describe(key)`."""
    return {
        "output_max_abs": {
            k: round(float(v.abs().max()), 4) for k, v in sorted(r.items()) if v.dtype == torch.float32
        },
        "tensors": {
            k: {
                "shape": list(v.shape),
                "dtype": str(v.dtype).replace("torch.", ""),
                "role": "input" if is_input(k) else "output",
                "description": describe(k),
            }
            for k, v in tensors.items()
        },
    }


def compare_outputs(name, ref, r):
    """Reproduced outputs `r` against the stored `ref`: same shapes and dtypes, max abs
    difference <= 1e-6. Prints what differs and a summary line; returns whether all matched."""
    ok = True
    worst = 0.0
    for k, v in r.items():
        if ref[k].shape != v.shape or ref[k].dtype != v.dtype:
            print(f"{name}: {k}: {tuple(v.shape)} {v.dtype} != stored {tuple(ref[k].shape)} {ref[k].dtype}")
            ok = False
            continue
        d = float((ref[k].double() - v.double()).abs().max())
        worst = max(worst, d)
        if d > 1e-6:
            print(f"{name}: {k} differs from the reference by {d:.3g}")
            ok = False
    print(f"{name}: {'ok' if ok else 'FAILED'} ({len(r)} outputs, worst max abs diff {worst:.3g})")
    return ok


def describe_in(table: dict[str, str], name: str) -> str:
    """`table[name]`, where a key ending in `.K` stands for every `<prefix>.<K>`."""
    for key, text in table.items():
        if key == name or (key.endswith(".K") and name.rsplit(".", 1)[0] == key[:-2]):
            return text
    raise KeyError(name)


def wan_vae_extra(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """`randomize`'s `extra` for an `AutoencoderKLWan`: the causal Conv3d layers (weights
    N(0, 1/fan_in), biases N(0, 0.1^2)) and every RMS norm's gamma, N(1, 0.25^2) so that a norm
    applied over the wrong axis, without its sqrt(C) scale or without gamma cannot pass."""
    params = dict(model.named_parameters())
    extra = {}
    for name, p in params.items():
        if name.endswith(".gamma"):
            extra[name] = (1.0, 0.25)
        elif p.dim() == 5:
            extra[name] = (0.0, 1.0 / math.sqrt(p[0].numel()))
            bias = name.removesuffix("weight") + "bias"
            if bias in params:
                extra[bias] = (0.0, 0.1)
    return extra


def wan_transformer_extra(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """`randomize`'s `extra` for a `WanTransformer3DModel`: the Conv3d patch embedding
    N(0, 1/fan_in) and its bias N(0, 0.1^2), the RMS q/k norm weights N(1, 0.25^2) and the
    modulation tables N(0, 0.5^2), wider than diffusers' init so that every shift, scale and
    gate matters."""
    extra = {}
    for name, p in model.named_parameters():
        if name == "patch_embedding.weight":
            extra[name] = (0.0, 1.0 / math.sqrt(p[0].numel()))
        elif name == "patch_embedding.bias":
            extra[name] = (0.0, 0.1)
        elif name.endswith(("norm_q.weight", "norm_k.weight")):
            extra[name] = (1.0, 0.25)
        elif name.endswith("scale_shift_table"):
            extra[name] = (0.0, 0.5)
    return extra


def fixture_main(doc: str, generate, check, threads: int | None = 1) -> None:
    """The command line every single-fixture script shares: write the fixture, or with
    `--check` recompute it from the saved files and exit 1 if it no longer matches."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="recompute from the saved files; write nothing")
    args = ap.parse_args()
    if threads is not None:
        torch.set_num_threads(threads)
    if args.check:
        sys.exit(0 if check() else 1)
    generate()


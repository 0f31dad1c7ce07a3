"""OpenCLIP parity fixtures for the `clip` reward (issue 6, item 5), used by make_fixtures.py.

Builds a tiny random `open_clip.CLIP` (the architecture of laion's OpenCLIP ViT-H-14, of
PickScore and of HPSv2, scaled down) with the real ``open_clip`` package and saves it twice:

    openclip-tiny/      as the laion hub repositories ship it, written by open_clip's own
                        ``save_for_hf``: ``open_clip_config.json`` (``model_cfg`` plus
                        ``preprocess_cfg``), ``open_clip_pytorch_model.bin`` (a pickled state
                        dict) and the CLIP BPE tokenizer files of clip-tiny
    openclip-tiny-hps/  as an HPSv2 checkpoint is used: a bare model config (the form of
                        open_clip's ``model_configs/ViT-H-14.json``) saved as
                        ``open_clip_config.json``, and ``HPS_v2-tiny_compressed.pt``, the same
                        weights in float16 wrapped as ``{"state_dict": {"module.<name>": ...}}``
                        with other training-checkpoint entries, plus the tokenizer files

``openclip-tiny.reference.safetensors`` holds the raw images, the pixel values open_clip's
preprocessing makes of them, the ids open_clip's tokenizer makes of the prompts, and image
features, text features and scores of both directories, computed in float64.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import shutil
import tempfile
from pathlib import Path

import open_clip  # noqa: E402
import open_clip.version  # noqa: E402
import safetensors.torch  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from open_clip.push_to_hf_hub import save_for_hf  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict  # noqa: E402
from PIL import Image  # noqa: E402

import make_fixtures as mf  # noqa: E402

NAME = "openclip-tiny"
HPS_DIR = "openclip-tiny-hps"
WEIGHTS = "open_clip_pytorch_model.bin"
HPS_WEIGHTS = "HPS_v2-tiny_compressed.pt"
CONFIG = "open_clip_config.json"

# ViT-H-14 scaled down: gelu (no quick_gelu) in both towers, a class token, argmax pooling of
# the text at EOT, projections without bias. The vision MLP ratio is not 4 (ViT-bigG's is
# 4.9231), so the loader must compute int(width * mlp_ratio); heads = width / head_width.
VISION_CFG = dict(image_size=30, patch_size=6, width=40, head_width=10, layers=2, mlp_ratio=3.5)
TEXT_CFG = dict(context_length=mf.MAX_LEN, vocab_size=None, width=32, heads=4, layers=2)
EMBED_DIM = 24
# Not OpenAI's mean/std, so that a loader which ignores preprocess_cfg fails; the HPS copy
# has no preprocess_cfg and gets open_clip's defaults (OpenAI's, bicubic, shortest side).
PREPROCESS = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic",
                  resize_mode="shortest")
# Raw (H, W): after the shortest-side resize to 30 px both are cropped from an odd excess
# (50 -> 37 wide: 7 px; 17 -> 30 wide, 19 -> 33 high: 3 px), where torchvision's centre crop
# (round half to even: 3.5 -> 4, 1.5 -> 2) and transformers' (floor: 3, 1) differ.
RAW_SIZES = [(40, 50), (19, 17)]
# Tokenizer probes besides the prompts: empty, truncated (EOT kept last), case and punctuation.
PROBES = ["", "photo " * 100, "The cat's horse: riding ON the moon?"]
SEEDS = dict(weights=501, inputs=5001)
LOGIT_SCALE = math.log(100.0)


def model_cfg() -> dict:
    vocab, _ = mf.build_vocab()
    return dict(embed_dim=EMBED_DIM, vision_cfg=dict(VISION_CFG),
                text_cfg={**TEXT_CFG, "vocab_size": len(vocab)})


def bare_params(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """(mean, std) of the parameters that are no module's weight: attention in-projections,
    positional and class embeddings, the two projections, logit_scale."""
    extra = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "in_proj_weight":
            extra[name] = (0.0, 1.0 / math.sqrt(p.shape[1]))
        elif leaf == "in_proj_bias":
            extra[name] = (0.0, 0.1)
        elif leaf in ("positional_embedding", "class_embedding"):
            extra[name] = (0.0, 0.5)
        elif leaf in ("proj", "text_projection"):
            extra[name] = (0.0, 1.0 / math.sqrt(p.shape[0]))
        elif leaf == "logit_scale":
            extra[name] = (LOGIT_SCALE, 0.0)
    return extra


def build_model() -> torch.nn.Module:
    model = open_clip.CLIP(**model_cfg())
    mf.randomize(model, SEEDS["weights"], extra=bare_params(model))
    return model.eval()


def gz_merges(merges_txt: Path, out: Path) -> Path:
    """open_clip's BPE file from a tokenizer's merges.txt: the header line, then the merges.
    SimpleTokenizer keeps lines 1..48894 and makes a vocabulary entry of each, so a trailing
    newline would add an empty token and shift the special ids."""
    text = merges_txt.read_text(encoding="utf-8").rstrip("\n")
    path = out / "bpe_tiny.txt.gz"
    # mtime=0: the archive bytes do not depend on when it was written.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode("utf-8"))
    return path


def open_clip_tokenizer(model_dir: Path, tmp: Path) -> open_clip.SimpleTokenizer:
    tok = open_clip.SimpleTokenizer(str(gz_merges(model_dir / "merges.txt", tmp)))
    vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
    # The same ids as the HF vocabulary (the specials are only named differently).
    assert tok.vocab_size == len(vocab), (tok.vocab_size, len(vocab))
    assert (tok.sot_token_id, tok.eot_token_id) == (vocab[mf.BOS], vocab[mf.EOS])
    return tok


def hf_ids_padded_with_zero(hf_tok, texts: list[str]) -> torch.Tensor:
    """The HF fast tokenizer's ids with everything after the first EOT set to 0 (OpenCLIP's
    padding)."""
    ids = mf.tokenize(hf_tok, texts).clone()
    eot = hf_tok.eos_token_id
    for row in ids:
        first = int((row == eot).nonzero()[0])
        row[first + 1 :] = 0
    return ids


def preprocess_of(model: torch.nn.Module, preprocess_cfg: dict | None):
    """open_clip's inference transform, as create_model_and_transforms builds it."""
    base = PreprocessCfg(size=model.visual.image_size)
    return image_transform_v2(PreprocessCfg(**merge_preprocess_dict(base, preprocess_cfg or {})),
                              is_train=False)


@torch.no_grad()
def reference(model, preprocess, tok, raw: list[torch.Tensor], prefix: str = "") -> dict:
    """Pixel values (open_clip's transform, f32), ids, and features and scores in float64 from
    the model's f32 weights, stored as f32. `model` is cast to float64 in place."""
    pil = [Image.fromarray(im.numpy(), mode="RGB") for im in raw]
    pixels = torch.stack([preprocess(im) for im in pil])
    ids = tok(mf.PROMPTS, context_length=mf.MAX_LEN)
    model.double()
    img = model.encode_image(pixels.double())
    txt = model.encode_text(ids)
    logits = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    # The model's own forward: the same normalized features and temperature.
    u, v, scale = model(pixels.double(), ids)
    assert torch.allclose(scale * u @ v.T, logits, atol=1e-12)
    r = {
        f"{prefix}pixel_values": pixels,
        f"{prefix}image_features": img,
        f"{prefix}text_features": txt,
        f"{prefix}logits_per_image": logits,
    }
    if not prefix:
        r["text.input_ids"] = ids
        r["tokenizer.probe_ids"] = tok(PROBES, context_length=mf.MAX_LEN)
    return {k: t.float() if t.is_floating_point() else t for k, t in r.items()}


DESCRIPTIONS = {
    "images.raw.K": "input u8 [H,W,3]: raw RGB image K (K = 0: 40x50, 1: 19x17)",
    "pixel_values": "[2,3,30,30]: open_clip's inference transform of images.raw.* with openclip-tiny's preprocess_cfg (torchvision: PIL bicubic shortest-side resize to 30, center crop with round-half-even offsets, ToTensor, Normalize mean/std 0.5)",
    "text.input_ids": "i64 [2,77]: open_clip's SimpleTokenizer ids of the prompts (BOS, text, EOT, zeros)",
    "tokenizer.probe_ids": "i64 [3,77]: open_clip's ids of the probe_prompts (empty; 100 words, truncated with EOT last; mixed case and punctuation)",
    "image_features": "[2,24]: openclip-tiny encode_image(pixel_values), not normalized (class token, ln_post, @ visual.proj)",
    "text_features": "[2,24]: openclip-tiny encode_text(text.input_ids), not normalized (ln_final at the argmax id, @ text_projection)",
    "logits_per_image": "[2,2]: exp(logit_scale) * cos(image i, prompt j), openclip-tiny",
    "hps.pixel_values": "[2,3,30,30]: open_clip's default transform (OpenAI mean/std) of images.raw.*, openclip-tiny-hps's input",
    "hps.image_features": "[2,24]: openclip-tiny-hps (the same weights rounded to f16) encode_image(hps.pixel_values)",
    "hps.text_features": "[2,24]: openclip-tiny-hps encode_text(text.input_ids)",
    "hps.logits_per_image": "[2,2]: exp(logit_scale) * cos(image i, prompt j), openclip-tiny-hps",
}


def describe(name: str) -> str:
    return DESCRIPTIONS["images.raw.K" if name.startswith("images.raw.") else name]


def fp16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every parameter rounded to float16 (the HPS checkpoint's precision)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


def save_dirs(model, hf_tok) -> None:
    main, hps = mf.OUT_DIR / NAME, mf.OUT_DIR / HPS_DIR
    for d in (main, hps):
        if d.exists():
            shutil.rmtree(d)
    # What create_model records for a pretrained config, and save_for_hf writes back.
    model.visual.image_mean, model.visual.image_std = PREPROCESS["mean"], PREPROCESS["std"]
    model.visual.preprocess_cfg = dict(PREPROCESS)
    save_for_hf(model, hf_tok, model_cfg(), main, safe_serialization=False)
    # HPSv2's form: a training checkpoint (DDP names) in half precision and a bare config.
    hf_tok.save_pretrained(hps)
    (hps / CONFIG).write_text(json.dumps(model_cfg(), indent=4) + "\n")
    state = {f"module.{k}": v.half() for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "name": "tiny", "state_dict": state}, hps / HPS_WEIGHTS)


def check_tokenizer(hf_tok, tok) -> None:
    for texts in (mf.PROMPTS, PROBES):
        a, b = tok(texts, context_length=mf.MAX_LEN), hf_ids_padded_with_zero(hf_tok, texts)
        if not torch.equal(a, b):
            raise SystemExit(f"{NAME}: open_clip and the HF tokenizer disagree on {texts}:\n{a}\n{b}")


def generate() -> None:
    model = build_model()
    with tempfile.TemporaryDirectory() as tmp:
        hf_tok = mf.build_tokenizer(mf.EOS, Path(tmp) / "tok")
        save_dirs(model, hf_tok)
        tok = open_clip_tokenizer(mf.OUT_DIR / NAME, Path(tmp))
        check_tokenizer(hf_tok, tok)
        raw = mf.clip_raw_images(SEEDS["inputs"], RAW_SIZES)
        hps_model = fp16_copy(model)
        r = reference(model, preprocess_of(model, PREPROCESS), tok, raw)
        r.update(reference(hps_model, preprocess_of(hps_model, None), tok, raw, prefix="hps."))
    stds = {}
    for k, v in r.items():
        if v.dtype != torch.float32:
            continue
        if not torch.isfinite(v).all():
            raise SystemExit(f"{NAME}: {k} has non-finite values")
        stds[k] = round(float(v.std()), 4)
        if k.endswith(("_features",)) and not mf.STD_RANGE[0] <= stds[k] <= mf.STD_RANGE[1]:
            raise SystemExit(f"{NAME}: {k} std {stds[k]} is outside {mf.STD_RANGE}")
    tensors = {f"images.raw.{i}": im for i, im in enumerate(raw)}
    tensors.update(r)
    tensors = {k: v.detach().clone().contiguous() for k, v in sorted(tensors.items())}
    safetensors.torch.save_file(tensors, str(mf.OUT_DIR / f"{NAME}.reference.safetensors"))
    meta = {
        "model": NAME,
        "directory": NAME,
        "hps_directory": HPS_DIR,
        "generator": "tools/parity/make_fixtures.py (tools/parity/openclip_fixture.py)",
        "prompts": mf.PROMPTS,
        "probe_prompts": PROBES,
        "max_length": mf.MAX_LEN,
        "raw_image_sizes": [list(s) for s in RAW_SIZES],
        "versions": {**mf.versions(), "open_clip": open_clip.version.__version__,
                     "torchvision": torchvision.__version__},
        "model_summary": {
            "mirrors": "OpenCLIP ViT-H-14 (laion CLIP-H, PickScore, HPSv2) scaled down",
            "model_cfg": model_cfg(),
            "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in PREPROCESS.items()},
            "hps_preprocess": "open_clip defaults: OpenAI mean/std, bicubic, shortest side",
            "logit_scale": float(model.logit_scale),
            "logit_scale_exp": float(model.logit_scale.exp()),
            "hps_logit_scale_exp": float(hps_model.logit_scale.exp()),
        },
        "computed_in": "pixel_values: open_clip's transform (PIL + torchvision, f32); ids: open_clip's SimpleTokenizer; features and scores in float64 from the stored weights (hps: the f16 weights), stored as float32",
        "tolerance": "max abs difference <= 1e-4 (f32), reported relative to the reference's max abs value",
        "output_std": stds,
        **mf.tensor_tables(r, tensors, lambda k: k.startswith("images.raw."), describe),
    }
    (mf.OUT_DIR / f"{NAME}.reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{NAME}: wrote {NAME}/, {HPS_DIR}/ and the reference ({len(tensors)} tensors)")
    for k in ("image_features", "text_features", "logits_per_image", "hps.logits_per_image"):
        print(f"  std {k}: {stds[k]}")


def load_dir(model_dir: Path) -> tuple[torch.nn.Module, dict | None]:
    """A saved directory loaded with open_clip alone: the config (either form) builds
    open_clip.CLIP, load_checkpoint reads the weights (unwrapping state_dict and module.)."""
    cfg = json.loads((model_dir / CONFIG).read_text())
    mcfg, pcfg = (cfg["model_cfg"], cfg.get("preprocess_cfg")) if "model_cfg" in cfg else (cfg, None)
    model = open_clip.CLIP(**mcfg)
    weights = [p for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".safetensors")]
    assert len(weights) == 1, weights
    open_clip.load_checkpoint(model, str(weights[0]))
    return model.eval(), pcfg


def check() -> bool:
    ref = safetensors.torch.load_file(str(mf.OUT_DIR / f"{NAME}.reference.safetensors"))
    meta = json.loads((mf.OUT_DIR / f"{NAME}.reference.json").read_text())
    ok = True
    for d, files in ((NAME, (CONFIG, WEIGHTS)), (HPS_DIR, (CONFIG, HPS_WEIGHTS))):
        for f in files + ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                          "special_tokens_map.json"):
            if not (mf.OUT_DIR / d / f).is_file():
                print(f"{NAME}: missing {d}/{f}")
                ok = False
    main, pcfg = load_dir(mf.OUT_DIR / NAME)
    hps, hps_pcfg = load_dir(mf.OUT_DIR / HPS_DIR)
    if hps_pcfg is not None:
        print(f"{HPS_DIR}: the config should be a bare model config")
        ok = False
    raw = [ref[f"images.raw.{i}"] for i in range(len(RAW_SIZES))]
    with tempfile.TemporaryDirectory() as tmp:
        tok = open_clip_tokenizer(mf.OUT_DIR / NAME, Path(tmp))
        r = reference(main, preprocess_of(main, pcfg), tok, raw)
        r.update(reference(hps, preprocess_of(hps, hps_pcfg), tok, raw, prefix="hps."))
    # The Rust side reads tokenizer.json with the tokenizers library (no padding there).
    raw_tok = tokenizers.Tokenizer.from_file(str(mf.OUT_DIR / NAME / "tokenizer.json"))
    for i, p in enumerate(meta["prompts"]):
        enc = raw_tok.encode(p).ids
        if enc != ref["text.input_ids"][i, : len(enc)].tolist():
            print(f"{NAME}: tokenizer.json encodes {p!r} as {enc}")
            ok = False
    return mf.compare_outputs(NAME, ref, r) and ok

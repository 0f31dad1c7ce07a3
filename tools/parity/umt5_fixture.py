#!/usr/bin/env python3
"""Parity fixture for Wan2.1's text path: the umT5 tokenizer and transformers'
``UMT5EncoderModel``, driven the way diffusers' ``WanPipeline._get_t5_prompt_embeds`` drives
them (issue 17, step 3).

Writes, under ``tests/fixtures/wan/wan-tiny-t2v/``:
- ``tokenizer/``: a tiny sentencepiece unigram model (trained here on a fixed corpus, with
  sentencepiece's ``nmt_nfkc`` normalisation, as umT5's) turned into transformers'
  ``T5Tokenizer`` and saved with ``save_pretrained`` (``tokenizer.json`` is what fewstep reads);
- ``text_encoder/``: a tiny random ``UMT5EncoderModel`` (``config.json``, ``model.safetensors``);
and beside the directory ``umt5-tiny.reference.{safetensors,json}``: the token ids and the
prompt embeddings of a batch of prompts, padded the pipeline's way (each row's states up to
its length, zeros after it, up to ``max_sequence_length``).

umT5 differs from T5 in one place that matters here: every layer has its own relative
attention bias table (T5 shares layer 0's). The config's bucket count and max distance are
small so that both the logarithmic buckets and the last (clamped) bucket are used.

Runs on PyTorch 2.x from PyPI with transformers 5, in the virtualenv that
``tools/parity/setup_torch2.sh`` makes:

    tools/parity/.venv-torch2/bin/python tools/parity/umt5_fixture.py
    tools/parity/.venv-torch2/bin/python tools/parity/umt5_fixture.py --check

Generation is seeded and deterministic; ``--check`` writes nothing, reloads the saved
tokenizer and model and recomputes every output from the stored prompts.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel  # noqa: E402

from parity_common import compare_outputs, fixture_main, randomize  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "wan"
MODEL_DIR = OUT_DIR / "wan-tiny-t2v"
NAME = "umt5-tiny"
SEED = 601
STD_RANGE = (0.1, 5.0)
# The pipeline's `max_sequence_length` (512 in Wan) scaled down, so that one prompt is cut.
MAX_LEN = 16

CONFIG = dict(
    d_model=32,
    d_kv=8,
    d_ff=40,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=12,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=True,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

WORDS = (
    "a the red blue green white black small large cat dog bird car house tree river beach "
    "fence city street night sunset walks runs jumps flies over under on in near with and "
    "slowly quickly camera pans zooms close-up wide shot of two three"
).split()
# Typed prompts: plain; runs of whitespace and a tab (the pipeline's whitespace_clean and
# the tokenizer's WhitespaceSplit); full-width letters and an accent (NFKC in the charsmap);
# an HTML entity (the pipeline unescapes); the empty prompt (CFG's default negative); one
# longer than MAX_LEN tokens (cut, keeping the end-of-sequence token).
PROMPTS = [
    "a red cat walks on the beach",
    "  A blue   dog,\tjumps over a fence.  ",
    "ｗｉｄｅ shot of a café at night",
    "the river &amp; the city",
    "",
    "a camera pans slowly over two white houses near a river at sunset and three birds fly over the trees",
]


def corpus(n: int = 400) -> list[str]:
    g = torch.Generator().manual_seed(SEED)
    lines = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        lines.append(" ".join(WORDS[i] for i in idx))
    return lines


def build_tokenizer(out: Path) -> T5Tokenizer:
    """A unigram model trained like umT5's (ids 0/1/2 = pad/eos/unk, no bos, NFKC), handed to
    transformers' T5Tokenizer as a vocabulary and charsmap, as its converter does."""
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n".join(corpus()) + "\n")
        prefix = str(Path(tmp) / "spm")
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=prefix,
            model_type="unigram",
            vocab_size=64,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            normalization_rule_name="nmt_nfkc",
            character_coverage=1.0,
            seed_sentencepiece_size=2000,
            num_threads=1,
            minloglevel=2,
        )
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(prefix + ".model").read_bytes())
    vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = T5Tokenizer(
        vocab=vocab,
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
        extra_ids=0,
    )
    if out.exists():
        shutil.rmtree(out)
    tok.save_pretrained(str(out))
    return tok


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean` without ftfy (not installed; the identity on these
    prompts): HTML unescaping twice, then runs of whitespace to one space, stripped."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def build_model(vocab_size: int) -> UMT5EncoderModel:
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **CONFIG))
    norms = {n: (1.0, 0.25) for n, _ in model.named_parameters() if n.endswith("layer_norm.weight")}
    randomize(model, SEED, extra=norms)
    return model.eval()


def encode(tok, model, prompts: list[str]) -> dict[str, torch.Tensor]:
    """`_get_t5_prompt_embeds`: pad to MAX_LEN with a mask, encode, keep each row's first
    `seq_len` states and zero the rest. In float64 from the f32 weights, stored as f32."""
    cleaned = [prompt_clean(p) for p in prompts]
    t = tok(
        cleaned,
        padding="max_length",
        max_length=MAX_LEN,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = t.input_ids, t.attention_mask
    seq_lens = mask.gt(0).sum(dim=1).long()
    m = model.to(torch.float64)
    with torch.no_grad():
        states = m(ids, mask).last_hidden_state
    rows = [torch.cat([u[:v], u.new_zeros(MAX_LEN - int(v), u.size(1))]) for u, v in zip(states, seq_lens)]
    return {
        "umt5.input_ids": ids.to(torch.int64),
        "umt5.seq_lens": seq_lens.to(torch.int64),
        "umt5.prompt_embeds": torch.stack(rows).float(),
    }


def xxl_buckets() -> dict:
    """The relative-position buckets of umt5-xxl's config (32 buckets, max distance 128) for
    offsets -600..600, from transformers' own `_relative_position_bucket`: its f32 logarithm
    puts some offsets on an exact bucket boundary, where f64 arithmetic would round the
    other way."""
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    cfg = UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128, is_decoder=False)
    attn = UMT5Attention(cfg, has_relative_attention_bias=True)
    offsets = torch.arange(-600, 601)
    return dict(
        num_buckets=32, max_distance=128, first_offset=-600, buckets=attn._relative_position_bucket(offsets).tolist()
    )


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": spm.__version__,
        "safetensors": safetensors.__version__,
    }


def generate() -> None:
    tok = build_tokenizer(MODEL_DIR / "tokenizer")
    model = build_model(len(tok))
    enc_dir = MODEL_DIR / "text_encoder"
    if enc_dir.exists():
        shutil.rmtree(enc_dir)
    model.save_pretrained(str(enc_dir), safe_serialization=True)
    r = encode(tok, model, PROMPTS)
    e = r["umt5.prompt_embeds"]
    std = round(float(e[e.abs().sum(-1) > 0].std()), 4)
    if not torch.isfinite(e).all() or not STD_RANGE[0] <= std <= STD_RANGE[1]:
        raise SystemExit(f"{NAME}: prompt embeddings std {std} is outside {STD_RANGE}")
    safetensors.torch.save_file({k: v.contiguous() for k, v in r.items()}, str(OUT_DIR / f"{NAME}.reference.safetensors"))
    meta = {
        "model": NAME,
        "directories": ["wan-tiny-t2v/tokenizer", "wan-tiny-t2v/text_encoder"],
        "generator": "tools/parity/umt5_fixture.py",
        "mirrors": "Wan2.1's text path: umT5 tokenizer + UMT5EncoderModel (google/umt5-xxl), scaled down; "
        "diffusers' WanPipeline._get_t5_prompt_embeds",
        "config": CONFIG,
        "vocab_size": len(tok),
        "max_sequence_length": MAX_LEN,
        "prompts": PROMPTS,
        "cleaned_prompts": [prompt_clean(p) for p in PROMPTS],
        "tokens": [tok.convert_ids_to_tokens(row[: int(n)]) for row, n in zip(r["umt5.input_ids"].tolist(), r["umt5.seq_lens"])],
        "versions": versions(),
        "computed_in": "float64 from the f32 weights, stored as float32",
        "tolerance": "max abs difference <= 1e-4 (f32), reported relative to the reference's max abs value",
        "output_std": std,
        "xxl_buckets": xxl_buckets(),
        "output_max_abs": round(float(e.abs().max()), 4),
        "tensors": {
            "umt5.input_ids": f"[{len(PROMPTS)},{MAX_LEN}] int64 token ids of the cleaned prompts, padded with 0 (<pad>)",
            "umt5.seq_lens": f"[{len(PROMPTS)}] int64 tokens per prompt (the attention mask's sum), end-of-sequence included",
            "umt5.prompt_embeds": f"[{len(PROMPTS)},{MAX_LEN},{CONFIG['d_model']}] encoder states, zero after each row's length",
        },
    }
    (OUT_DIR / f"{NAME}.reference.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"{NAME}: wrote {MODEL_DIR.relative_to(REPO)}/{{tokenizer,text_encoder}} and the reference; std {std}")
    print("tokens:", meta["tokens"])


def check() -> bool:
    ref = safetensors.torch.load_file(str(OUT_DIR / f"{NAME}.reference.safetensors"))
    tok = T5Tokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"))
    model = UMT5EncoderModel.from_pretrained(str(MODEL_DIR / "text_encoder")).eval()
    r = encode(tok, model, PROMPTS)
    same_ids = all(torch.equal(ref[k], r[k]) for k in ("umt5.input_ids", "umt5.seq_lens"))
    stored = json.loads((OUT_DIR / f"{NAME}.reference.json").read_text())
    if stored["xxl_buckets"] != xxl_buckets():
        print(f"{NAME}: the stored umt5-xxl buckets differ from transformers'")
        same_ids = False
    if not same_ids:
        print(f"{NAME}: token ids differ from the stored ones")
    return compare_outputs(NAME, ref, {"umt5.prompt_embeds": r["umt5.prompt_embeds"]}) and same_ids


def main() -> None:
    fixture_main(__doc__, generate, check, threads=None)


if __name__ == "__main__":
    main()

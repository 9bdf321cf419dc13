"""Tiny CLIP + T5 encoders for tests and the CPU demo, built offline and saved to disk.

They are saved in the same layout a real model uses (open_clip ``local-dir`` with
open_clip_config.json + safetensors; a transformers ``save_pretrained`` directory with a
tokenizer.json) and loaded back through ``load_clip`` / ``load_t5``, so tests cover the real
loading path. Weights are a function of the seed only, so every worker that builds them gets
the same encoders.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import torch

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    # vocab_size must match open_clip's bundled BPE tokenizer (offline, ships with the package).
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_CLIP_PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                        "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                        "resize_mode": "shortest"}
TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
_DONE = "TINY_OK"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"

# Words the demo captions are made of; every lowercase letter/digit is also in the alphabet,
# so any caption tokenises (unknown words fall back to characters, never to <unk> only).
_DEMO_WORDS = (
    "a an the one two three four of on in with and at near above below left right small large big tiny "
    "red green blue yellow orange purple pink white black gray brown cyan magenta dark light bright "
    "circle square triangle star ring cross stripe stripes dot dots disk box shape shapes pattern "
    "photo picture image drawing painting render background foreground center corner top bottom "
    "sky sea grass sand snow night day sun moon tree house car dog cat bird flower mountain river"
).split()


def _corpus() -> list[str]:
    w = _DEMO_WORDS
    return [" ".join(w[(i * 7 + j * 3) % len(w)] for j in range(3 + i % 6)) for i in range(600)] + [" ".join(w)]


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**json.loads(json.dumps(TINY_CLIP_CFG)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_CLIP_PREPROCESS}, indent=2))
    return out


def build_tiny_t5_tokenizer(out_dir: str | Path):
    """A SentencePiece-style Unigram tokenizer over the demo vocabulary, with T5's special ids.

    The vocabulary is written out, not trained: the ``tokenizers`` Unigram trainer is
    multi-threaded and its piece order varies run to run, which would give a rebuilt 'tiny:'
    encoder different token ids. Here pieces are whole demo words (scored by corpus frequency)
    plus every character alone and after the word boundary '▁' (scored low), so known words
    are one token and anything else still tokenises.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for line in _corpus() for w in line.split())
    total = sum(counts.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5: pad 0, eos 1, unk 2
    vocab += [("\u2581" + w, math.log(counts[w] / total)) for w in sorted(counts)]
    vocab += [("\u2581", -12.0)]
    vocab += [(p, -15.0) for c in _ALPHABET for p in (c, "\u2581" + c) if p not in dict(vocab)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                 model_max_length=512)
    hf.save_pretrained(str(out_dir))
    return hf


def build_tiny_t5(out_dir: str | Path, seed: int = 0) -> Path:
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_t5_tokenizer(out)
    cfg = HFT5Config(vocab_size=len(tok), feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                     decoder_start_token_id=0, tie_word_embeddings=False, **TINY_T5)
    torch.manual_seed(seed)
    model = T5EncoderModel(cfg)
    model.save_pretrained(str(out))
    return out


def ensure_tiny_encoders(root: str | Path, seed: int = 0) -> tuple[str, str]:
    """(clip_dir, t5_dir) under ``root``, built once. Safe against concurrent builders.

    Each encoder is built in a private temp dir and renamed into place; a second builder racing
    us loses the rename and uses the winner's copy (identical: same seed).
    """
    root = Path(os.path.expanduser(str(root))).resolve()
    dirs = []
    for name, build in (("tiny-clip", build_tiny_clip), ("tiny-t5", build_tiny_t5)):
        final = root / name
        if not (final / _DONE).exists():
            tmp = root / f".tmp-{name}-{uuid.uuid4().hex}"
            build(tmp, seed=seed)
            (tmp / _DONE).write_text(json.dumps({"seed": seed}))
            try:
                if final.exists() and not (final / _DONE).exists():
                    shutil.rmtree(final, ignore_errors=True)  # a half-built leftover from a crash
                os.replace(tmp, final)
            except OSError:
                if not (final / _DONE).exists():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        dirs.append(str(final))
    return dirs[0], dirs[1]

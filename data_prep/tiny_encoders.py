"""Tiny CLIP + T5 encoders for tests and the CPU demo, built offline and saved to disk.

They are saved in the same layout a real model uses (open_clip ``local-dir`` with
open_clip_config.json + safetensors; a transformers ``save_pretrained`` directory with a
tokenizer.json) and loaded back through ``load_clip`` / ``load_t5``, so tests cover the real
loading path.

The tiny CLIP is *trained*: a random CLIP's image embedding says little about colour or
position, so an unCLIP prior + decoder conditioned on it would have nothing to learn from. It is
trained contrastively (open_clip's own model and ``ClipLoss``) on images drawn exactly as the demo
corpus draws them, captions minus the demo check's held-out prompts, for about 40 s on two
threads (a fixed count, ``TINY_CLIP_TRAIN["threads"]``: the weights are then a function of the
seed and the recipe, whatever the caller's thread count; it runs before any training, when the
demo's two cores are otherwise idle). A trained copy is kept in a per-user cache keyed by config, recipe
and seed (``T2I_CACHE_DIR``, default ``~/.cache/t2i-pipeline``), like a hub cache keeps a
pretrained model, so each machine pays for it once; ``T2I_CACHE_DIR=off`` disables the cache.
The T5 encoder stays random: its token features already tell tokens apart, which is all the
Imagen path needs from it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data_prep import demo_corpus
from data_prep.image_decode import preprocess_image

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    # vocab_size must match open_clip's bundled BPE tokenizer (offline, ships with the package).
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_CLIP_PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                        "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                        "resize_mode": "shortest"}
# Contrastive training of the tiny CLIP (see the module docstring). Batches hold distinct captions
# (a repeated caption would be a false negative of itself).
# minimal_pairs: every other batch is made of captions that differ in one of these attributes only
# (hard negatives), so the image embedding encodes each. Measured with a linear probe on the image
# embeddings of 800 training renders (chance 0.11): position 0.21 (400 random batches) -> 0.35
# (400 steps with minimal pairs) -> 0.78 (800 steps); colour 0.99-1.0 throughout. The unCLIP
# decoder places shapes from this embedding (the prior predicts it), so position must be in it.
TINY_CLIP_TRAIN = {"steps": 800, "batch_size": 128, "lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.1,
                   "renders_per_caption": 2, "render_size": 128,
                   "minimal_pairs": ["position", "background", "color", "shape", "size"], "threads": 2, "version": 2}
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


def build_tiny_clip(out_dir: str | Path, seed: int = 0, train: bool = True) -> Path:
    """Write the tiny CLIP into ``out_dir``: trained on the demo corpus (``train=True``, from the
    cache when present) or with its random initial weights."""
    import open_clip  # open_clip: loaded only when a CLIP is built or read
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "open_clip_model.safetensors"
    cached = _clip_cache_path(seed) if train else None
    if cached is not None and cached.is_file():
        shutil.copyfile(cached, weights)
    else:
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**json.loads(json.dumps(TINY_CLIP_CFG)))
        if train:
            train_tiny_clip(model, seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        if cached is not None:
            _store_in_cache(weights, cached)
    load_file(str(weights))  # a truncated cache copy fails here, not at load time in a worker
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_CLIP_PREPROCESS}, indent=2))
    return out


def clip_recipe_key(seed: int) -> str:
    """Everything the trained tiny CLIP depends on: architecture, preprocessing, recipe, seed, and
    the captions/pixels the corpus draws (its tables and the held-out prompts)."""
    key = json.dumps([TINY_CLIP_CFG, TINY_CLIP_PREPROCESS, TINY_CLIP_TRAIN, seed, demo_corpus.COLORS,
                      demo_corpus.BACKGROUNDS, demo_corpus.SHAPES, demo_corpus.POSITIONS, demo_corpus.SIZES,
                      demo_corpus.demo_prompts(), torch.__version__.split("+")[0]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _clip_cache_path(seed: int) -> Path | None:
    root = os.environ.get("T2I_CACHE_DIR", "~/.cache/t2i-pipeline")
    if root.strip().lower() in ("", "off", "0", "none"):
        return None
    return Path(os.path.expanduser(root)) / f"tiny-clip-{clip_recipe_key(seed)}.safetensors"


def _store_in_cache(weights: Path, cached: Path) -> None:
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}")
        shutil.copyfile(weights, tmp)
        os.replace(tmp, cached)  # atomic: a concurrent builder sees the old or the whole new file
    except OSError:
        pass  # a read-only home only costs the next build its training time


def _training_pool(seed: int, image_size: int):
    """(pixels [N, 3, S, S] normalised like the embed stage, caption ids [N, 77], caption index [N]).

    Images go through the corpus's own path: render (with its jitter), JPEG, then the embed
    stage's CLIP preprocessing, so the CLIP is trained on what it will embed."""
    import open_clip  # open_clip: loaded only when a CLIP is built or read

    attrs = demo_corpus.training_attrs()
    reps, size = TINY_CLIP_TRAIN["renders_per_caption"], TINY_CLIP_TRAIN["render_size"]
    pp = dict(TINY_CLIP_PREPROCESS, size=[image_size, image_size])
    pix, which = [], []
    for r in range(reps):
        for i, a in enumerate(attrs):
            img = demo_corpus.render(a, size, np.random.default_rng([seed, r, i]))
            pix.append(preprocess_image(demo_corpus._jpeg_bytes(img), pp))
            which.append(i)
    ids = open_clip.tokenize([demo_corpus.caption_of(a) for a in attrs], context_length=77)
    return torch.from_numpy(np.stack(pix)), ids, torch.tensor(which), len(attrs)


def _minimal_pair_groups(field: str) -> list[list[int]]:
    """Indices into ``training_attrs()`` grouped by everything but ``field``: each group's captions
    differ only in that attribute ("... in the top left ..." vs "... in the center ...")."""
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(demo_corpus.training_attrs()):
        key = tuple(getattr(a, f) for f in ("color", "shape", "position", "size", "background") if f != field)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _contrastive_batch(step: int, n_caps: int, batch: int, groups: dict[str, list[list[int]]],
                       g: torch.Generator) -> torch.Tensor:
    """Distinct caption indices for one step. Random batches are all but solved by colour and
    shape alone (few pairs in 128 share both), so the embedding would never need the position
    or background; every other step is instead made of whole minimal-pair groups for one
    attribute in turn (hard negatives), which makes the embedding encode each attribute."""
    fields = list(groups)
    if step % 2 == 0 or not fields:
        return torch.randperm(n_caps, generator=g)[:batch]
    field_groups = groups[fields[(step // 2) % len(fields)]]
    out: list[int] = []
    for gi in torch.randperm(len(field_groups), generator=g).tolist():
        out += field_groups[gi][: batch - len(out)]
        if len(out) >= batch:
            break
    return torch.tensor(out)


def _encode_text_trimmed(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` over the first max-length positions only: with its causal
    mask a token never sees later positions, so this is the full 77-position pass (the same
    identity data_prep.encoders.ClipEncoder.encode_text relies on), at a fraction of the cost."""
    from open_clip.transformer import text_global_pool  # open_clip: loaded only when a CLIP is built or read

    L = int((ids != 0).sum(1).max())
    ids = ids[:, :L]
    x = model.token_embedding(ids) + model.positional_embedding[:L]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:L, :L]))
    x = text_global_pool(x, ids, model.text_pool_type)
    return torch.nn.functional.normalize(x @ model.text_projection, dim=-1)


def train_tiny_clip(model, seed: int = 0, log=None) -> dict[str, float]:
    """Contrastive training of ``model`` (an open_clip CLIP) on the demo corpus, in place.
    Returns {"loss": last loss, "accuracy": image->text top-1 over a batch, "seconds": time}."""
    from open_clip.loss import ClipLoss  # open_clip: loaded only when a CLIP is built or read

    cfg = TINY_CLIP_TRAIN
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.get("threads", 1)))
    t0 = time.time()
    try:
        pix, ids, which, n_caps = _training_pool(seed, TINY_CLIP_CFG["vision_cfg"]["image_size"])
        g = torch.Generator().manual_seed(seed)
        loss_fn = ClipLoss()
        # The token table stays at its random init: 49k x 64 rows of which the demo uses ~40, and
        # random rows already tell words apart; AdamW over it was a third of each step.
        model.token_embedding.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-6)
        steps, warm = cfg["steps"], cfg["warmup_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / steps))))
        reps = len(which) // n_caps
        groups = {f: _minimal_pair_groups(f) for f in cfg.get("minimal_pairs", ())}
        model.train()
        stats: dict[str, float] = {}
        for step in range(steps):
            caps = _contrastive_batch(step, n_caps, cfg["batch_size"], groups, g)  # distinct captions
            rows = caps + n_caps * torch.randint(reps, (len(caps),), generator=g)
            img_f = model.encode_image(pix[rows], normalize=True)
            txt_f = _encode_text_trimmed(model, ids[caps])
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # open_clip's training clamp
            if step == steps - 1 or (log and step % 50 == 0):
                acc = float(((img_f @ txt_f.T).argmax(1) == torch.arange(len(caps))).float().mean())
                stats = {"loss": float(loss.detach()), "accuracy": acc, "seconds": time.time() - t0}
                if log:
                    log(f"tiny CLIP step {step}: loss {stats['loss']:.3f}, batch top-1 {acc:.2f}")
        model.token_embedding.requires_grad_(True)
        model.eval()
        return stats
    finally:
        torch.set_num_threads(threads)


def build_tiny_t5_tokenizer(out_dir: str | Path):
    """A SentencePiece-style Unigram tokenizer over the demo vocabulary, with T5's special ids.

    The vocabulary is written out, not trained: the ``tokenizers`` Unigram trainer is
    multi-threaded and its piece order varies run to run, which would give a rebuilt 'tiny:'
    encoder different token ids. Here pieces are whole demo words (scored by corpus frequency)
    plus every character alone and after the word boundary '▁' (scored low), so known words
    are one token and anything else still tokenises.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast  # transformers: loaded only when a T5 is built or read

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
    from transformers import T5Config as HFT5Config  # transformers: loaded only when a T5 is built or read
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
        # The marker names the recipe: a directory built by an older recipe (e.g. a random CLIP) is rebuilt.
        done = json.dumps({"seed": seed, **({"clip_recipe": clip_recipe_key(seed)} if name == "tiny-clip" else {})},
                          sort_keys=True)
        if not _built(final, done):
            tmp = root / f".tmp-{name}-{uuid.uuid4().hex}"
            build(tmp, seed=seed)
            (tmp / _DONE).write_text(done)
            try:
                if final.exists() and not _built(final, done):
                    shutil.rmtree(final, ignore_errors=True)  # a half-built leftover or an older recipe
                os.replace(tmp, final)
            except OSError:
                if not _built(final, done):
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        dirs.append(str(final))
    return dirs[0], dirs[1]


def _built(d: Path, done: str) -> bool:
    try:
        return json.loads((d / _DONE).read_text()) == json.loads(done)
    except (OSError, ValueError):
        return False


def warm_cache(seed: int = 0) -> str:
    """Train the demo's tiny CLIP into the per-user cache now, as installing a real model would
    download it (``make venv`` runs this): the first demo run then spends its time on the pipeline.
    Returns where the cached weights are (or why there are none)."""
    cached = _clip_cache_path(seed)
    if cached is None:
        return "T2I_CACHE_DIR is off: nothing cached"
    if not cached.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_clip(Path(tmp) / "tiny-clip", seed=seed)
    return str(cached)


if __name__ == "__main__":  # python -m data_prep.tiny_encoders
    print(f"tiny CLIP for the demo: {warm_cache()}")

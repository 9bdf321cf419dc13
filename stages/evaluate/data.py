"""What the evaluate stage reads: the held-out samples (captions, images, their stored embeddings)
and the shipped prompt suite.

Held-out samples are the embed stage's split (data_prep/holdout.py), read in shard order and
row order, so the same run always evaluates the same samples. Images are decoded by the same
decoder as training (data_prep/image_decode.py) and centre-cropped square at the size asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from data_prep.embed_format import pad_ids, pad_sequences, read_embedding_shard
from data_prep.holdout import HoldoutRule
from data_prep.image_decode import decode_rgb
from data_prep.shards import iter_shard
from stages.evaluate.prompt_suite import SUITE
from stages.training.loader import pair_shards
from stages.sampling.loading import PromptFeatures


@dataclass
class HoldoutSet:
    keys: list[str]
    captions: list[str]
    images: list[Any]              # PIL RGB, square at the size asked for ([] when not asked)
    clip_image: torch.Tensor       # [N, Dc] stored CLIP image embeddings (fp16 -> fp32)
    features: PromptFeatures       # the stored text features, as sampling would compute them

    def __len__(self) -> int:
        return len(self.keys)


def _square(img, size: int):
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BICUBIC) if s != size else img


def read_holdout(download_shards: str | None, embed_shards: str, rule: HoldoutRule, limit: int,
                 image_size: int | None = None) -> HoldoutSet:
    """The first ``limit`` held-out samples. Captions (and images when ``image_size``) come from
    the download shards; without ``download_shards`` captions are empty and only embeddings are read."""
    keys, caps, imgs, ci, ct, ctok, t5 = [], [], [], [], [], [], []
    ids: dict[str, list[np.ndarray]] | None = {"clip": [], "t5": []}  # None once a shard has no ids
    for pair in pair_shards(download_shards, embed_shards):
        if len(keys) >= limit:
            break
        emb = read_embedding_shard(pair.npz_uri)
        rows = {str(k): j for j, k in enumerate(emb.keys) if rule.is_held_out(str(k))}
        if not rows:
            continue
        found: dict[str, tuple[str, Any]] = {}
        if pair.tar_uri is not None:
            for smp in iter_shard(pair.tar_uri, on_corrupt="raise"):
                if smp.key in rows and smp.caption is not None:
                    img = None
                    if image_size is not None:
                        try:
                            img = _square(decode_rgb(smp.image_bytes), image_size)
                        except (OSError, ValueError):
                            continue  # undecodable now (it embedded then): not evaluated, like training skips it
                    found[smp.key] = (smp.caption, img)
        for key, j in rows.items():
            if len(keys) >= limit:
                break
            if pair.tar_uri is not None and key not in found:
                continue
            cap, img = found.get(key, ("", None))
            keys.append(key)
            caps.append(cap)
            if img is not None:
                imgs.append(img)
            ci.append(emb.clip_image[j])
            ct.append(emb.clip_text[j])
            ctok.append(emb.clip_tokens_of(j))
            t5.append(emb.t5_of(j))
            if ids is not None and emb.clip_ids is not None and emb.t5_ids is not None:
                ids["clip"].append(emb.ids_of("clip", j))
                ids["t5"].append(emb.ids_of("t5", j))
            else:  # written before the embed stage stored ids: the features stay without them
                ids = None
    if not keys:
        raise ValueError(f"no held-out samples under {embed_shards} (rule: fraction {rule.fraction})")
    return HoldoutSet(keys, caps, imgs, _f32(np.stack(ci)), _features(ct, ctok, t5, ids))


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _padded(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    out, mask = pad_sequences(seqs, max(1, max(len(s) for s in seqs)), seqs[0].shape[-1])
    return _f32(out), torch.from_numpy(mask).bool()


def _features(clip_text: list[np.ndarray], clip_tokens: list[np.ndarray], t5: list[np.ndarray],
              ids: dict[str, list[np.ndarray]] | None = None) -> PromptFeatures:
    """The stored features (and token ids, when the shards have them) padded as a training batch:
    the ids are the ones GLIDE trained on, and the ones sampling re-tokenizes the captions into
    (tests/stages/test_evaluate.py checks that the two agree)."""
    ctok, cmask = _padded(clip_tokens)
    t5tok, t5mask = _padded(t5)
    extra: list[torch.Tensor | None] = [None] * 4
    if ids is not None:
        (cid, cidm), (tid, tidm) = pad_ids(ids["clip"]), pad_ids(ids["t5"])
        extra = [torch.from_numpy(x) for x in (cid, cidm, tid, tidm)]
    return PromptFeatures(_f32(np.stack(clip_text)), ctok, cmask, t5tok, t5mask, *extra)


def load_prompt_suite(name: str | None, per_category: int = 0) -> list[tuple[str, str]]:
    """(category, prompt) pairs of the prompt suite: 'default' = the shipped one
    (stages/evaluate/prompt_suite.py), else a YAML file ``categories: {name: [prompt, ...]}``;
    the first ``per_category`` of each (0 = all)."""
    if not name:
        return []
    if name == "default":
        cats: Any = {k: list(v) for k, v in SUITE.items()}
        where = "the shipped suite"
    else:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"evaluate.prompt_suite: {path} does not exist ('default' is the shipped suite)")
        cats = (yaml.safe_load(path.read_text()) or {}).get("categories")
        where = str(path)
        if not isinstance(cats, dict) or not cats:
            raise ValueError(f"evaluate.prompt_suite {path}: expected 'categories: {{name: [prompt, ...]}}'")
    out = []
    for cat, prompts in cats.items():
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"evaluate.prompt_suite {where}: category {cat!r} must be a list of non-empty prompts")
        out += [(str(cat), p) for p in (prompts[:per_category] if per_category else prompts)]
    return out

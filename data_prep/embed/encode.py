"""Embed stage, step 2 (GPU/CPU): a decoded chunk -> its CLIP image/text/token and T5 embeddings,
and the token ids of both tokenizers (what GLIDE's own text transformer reads).

Rows with any non-finite value (after the fp16 cast) are dropped and counted; T5 runs
length-bucketed (see ``T5Encoder.encode``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep.embed.decode import DecodedChunk
from data_prep.embed_format import EmbeddingShard
from data_prep.encoders import ClipEncoder, T5Encoder, load_clip, load_t5


@dataclass
class Encoders:
    clip: ClipEncoder
    t5: T5Encoder

    @property
    def dims(self) -> dict[str, int]:
        return {"clip_dim": self.clip.dim, "clip_token_dim": self.clip.token_dim, "t5_dim": self.t5.dim}


def load_encoders(cfg: Any, device: Any = None) -> Encoders:
    """Both encoders of an EmbedConfig (its ``clip``, ``t5`` and ``image_size``)."""
    return Encoders(load_clip(cfg.clip, device=device, image_size=cfg.image_size), load_t5(cfg.t5, device=device))


def encode_chunk(enc: Encoders, chunk: DecodedChunk, t5_micro_batch: int | None = None) -> tuple[EmbeddingShard, dict[str, int]]:
    """Embed one decoded chunk; rows with any non-finite value (after the fp16 cast) are dropped."""
    counts = dict(chunk.counts)
    # Captions longer than each encoder's context are cut when encoded: counted per encoder.
    counts.update(n_truncated_clip=enc.clip.count_truncated(chunk.captions),
                  n_truncated_t5=enc.t5.count_truncated(chunk.captions))
    if not chunk.keys:
        counts.update(n_embedded=0, n_nonfinite=0)
        d = enc.dims
        return EmbeddingShard.empty(d["clip_dim"], d["clip_token_dim"], d["t5_dim"]), counts
    img = enc.clip.encode_image(torch.from_numpy(chunk.pixels)).numpy().astype(np.float16)
    txt, ctoks, clens = enc.clip.encode_text(chunk.captions)
    t5toks, t5lens = enc.t5.encode(chunk.captions, micro_batch=t5_micro_batch)
    # Tokenizing again is cheap beside the forwards; the ids line up with the trimmed features.
    cids, clens_ids = enc.clip.tokenize(chunk.captions)
    t5ids = enc.t5.token_ids(chunk.captions)
    if not torch.equal(clens_ids, clens) or [len(x) for x in t5ids] != t5lens.tolist():
        raise RuntimeError("embed: token ids and token features disagree on caption lengths")
    txt = txt.numpy().astype(np.float16)
    ctoks = [t.numpy().astype(np.float16) for t in ctoks]
    t5toks = [t.numpy().astype(np.float16) for t in t5toks]
    ok = [bool(np.isfinite(img[i]).all() and np.isfinite(txt[i]).all() and np.isfinite(ctoks[i]).all()
               and np.isfinite(t5toks[i]).all()) for i in range(len(chunk.keys))]
    keep = [i for i, g in enumerate(ok) if g]
    counts.update(n_embedded=len(keep), n_nonfinite=len(ok) - len(keep))
    if not keep:
        d = enc.dims
        return EmbeddingShard.empty(d["clip_dim"], d["clip_token_dim"], d["t5_dim"]), counts
    part = EmbeddingShard(
        keys=np.array([chunk.keys[i] for i in keep], dtype=np.str_),
        clip_image=img[keep], clip_text=txt[keep],
        clip_tokens=np.concatenate([ctoks[i] for i in keep]), clip_lengths=clens.numpy()[keep],
        t5_tokens=np.concatenate([t5toks[i] for i in keep]), t5_lengths=t5lens.numpy()[keep],
        clip_ids=np.concatenate([cids[i, : int(clens[i])].numpy() for i in keep]).astype(np.int32),
        t5_ids=np.concatenate([np.asarray(t5ids[i], dtype=np.int32) for i in keep]),
        columns={c: [v[i] for i in keep] for c, v in chunk.columns.items()})
    return part, counts

"""How close does the embed pipeline get to the encoders' own speed?

Measures, in one process and one run: (a) end to end — generated shards -> decode -> encode ->
write, through the same in-process driver the stage uses — and (b) the raw encoder forward on
pre-made tensors at the same batch size. The ratio (a)/(b) says how much the pipeline around
the encoders costs (decode-bound on a GPU host with few cores, ~1.0 on CPU where the encoders
dominate).

    python -m data_prep.bench.embed --model-size tiny --batch-size 16 --num-batches 4 --device cpu
    python -m data_prep.bench.embed --model-size vit-l-14+t5-xxl --batch-size 64 --device cuda

The large size builds ViT-L/14 and a T5-v1.1-XXL-shaped encoder with random weights, directly
on the device in bf16 (a real forward: never the meta device). Its T5 tokenizer is the tiny
offline one, so token counts per caption are higher than with the real SentencePiece vocab:
the T5 numbers are a pessimistic bound.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_prep.embed.config import EmbedConfig
from data_prep.embed.encode import Encoders
from data_prep.embed.stage import embed_shards
from data_prep.encoders import ClipConfig, ClipEncoder, T5Config, T5Encoder, load_clip, load_t5
from data_prep.tiny_encoders import ensure_tiny_encoders

MODEL_SIZES = ("tiny", "vit-l-14+t5-xxl")
_T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128,
           "feed_forward_proj": "gated-gelu"}
_WORDS = "a the red green blue yellow small large circle square star photo of on in near sky sea tree dog".split()


def _captions(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(6, 20)))) for _ in range(n)]


def _write_shards(root: str, n: int, per_shard: int, image_px: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    shards = os.path.join(root, "shards")
    os.makedirs(shards, exist_ok=True)
    caps = _captions(rng, n)
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(shards, f"{s // per_shard:05d}.tar"), "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                key = f"{s // per_shard:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (image_px, image_px, 3), dtype=np.uint8)).save(buf, "JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", caps[i].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return shards


def _large_encoders(device: torch.device, tok_root: str) -> tuple[Encoders, EmbedConfig]:
    import open_clip  # open_clip: loaded only when a CLIP is built or read
    from transformers import AutoTokenizer, T5EncoderModel  # transformers: loaded only when a T5 is built or read
    from transformers import T5Config as HFT5Config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clip_model = open_clip.create_model("ViT-L-14", pretrained=None, precision="bf16" if device.type == "cuda" else "fp32",
                                        device=device).eval().requires_grad_(False)
    clip = ClipEncoder(clip_model, open_clip.get_tokenizer("ViT-L-14"), device, dtype,
                       {k: (list(v) if isinstance(v, tuple) else v) for k, v in clip_model.visual.preprocess_cfg.items()})
    with torch.device(device):
        t5_model = T5EncoderModel._from_config(HFT5Config(**_T5_XXL), dtype=dtype).eval().requires_grad_(False)
    _, t5_dir = ensure_tiny_encoders(tok_root)
    t5 = T5Encoder(t5_model, AutoTokenizer.from_pretrained(t5_dir), device, max_length=128)
    cfg = EmbedConfig(clip=ClipConfig(model="ViT-L-14", pretrained=None), t5=T5Config(model="google/t5-v1_1-xxl"))
    return Encoders(clip, t5), cfg


def bench_embed(model_size: str = "tiny", batch_size: int = 16, num_batches: int = 4, device: str | None = None,
                image_px: int = 256) -> dict[str, Any]:
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {MODEL_SIZES}, got {model_size!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as root:
        if model_size == "tiny":
            ensure_tiny_encoders(os.path.join(root, "enc"))
            tiny = f"tiny:{os.path.join(root, 'enc')}"
            cfg = EmbedConfig(clip=ClipConfig(model=tiny), t5=T5Config(model=tiny))
            enc = Encoders(load_clip(cfg.clip, device=dev), load_t5(cfg.t5, device=dev))
        else:
            enc, cfg = _large_encoders(dev, os.path.join(root, "enc"))
        cfg = cfg.model_copy(update={"batch_size": batch_size})
        n = batch_size * num_batches
        shards = _write_shards(root, n, per_shard=max(batch_size, n // 2), image_px=image_px)

        # Raw forward on pre-made tensors (one warm-up batch, then timed).
        size = enc.clip.preprocess_cfg["size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        pixels = torch.randn(batch_size, 3, *hw)
        caps = _captions(np.random.default_rng(1), batch_size)

        def forward() -> None:
            enc.clip.encode_image(pixels)
            enc.clip.encode_text(caps)
            enc.t5.encode(caps, micro_batch=cfg.t5_micro_batch)

        forward()
        t0 = time.perf_counter()
        for _ in range(num_batches):
            forward()
        raw_s = time.perf_counter() - t0

        # End to end through the stage's in-process driver (warm encoders, cold shards).
        t0 = time.perf_counter()
        summary = embed_shards(shards, os.path.join(root, "out"), cfg, encoders=enc)
        e2e_s = time.perf_counter() - t0
    done = summary["counts"]["n_embedded"]
    res = {"model_size": model_size, "device": str(dev), "batch_size": batch_size, "num_batches": num_batches,
           "samples": n, "embedded": done,
           "e2e_images_per_s": done / e2e_s, "e2e_captions_per_s": done / e2e_s,
           "raw_images_per_s": n / raw_s, "raw_captions_per_s": n / raw_s,
           "bytes_per_sample": summary["metrics"]["bytes_per_sample"]}
    res["e2e_over_raw"] = res["e2e_images_per_s"] / res["raw_images_per_s"]
    return res


def format_result(r: dict[str, Any]) -> str:
    return (f"{r['model_size']} on {r['device']}, batch {r['batch_size']} x {r['num_batches']}: "
            f"end-to-end {r['e2e_images_per_s']:.1f} img/s ({r['e2e_captions_per_s']:.1f} cap/s), "
            f"raw encoders {r['raw_images_per_s']:.1f} img/s -> ratio {r['e2e_over_raw']:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", choices=MODEL_SIZES, default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-batches", type=int, default=4)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    r = bench_embed(a.model_size, a.batch_size, a.num_batches, a.device)
    print(json.dumps(r, indent=2))
    print(format_result(r))


if __name__ == "__main__":
    main()

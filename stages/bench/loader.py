"""Can the training loader keep the step fed?

Measures, in one run: the training loader's samples/s (``stages.training.loader.make_loader`` over
download shards + embedding shards: tar streaming, JPEG decode, resize/crop, token padding,
collate, worker processes, pinned memory on a GPU host) and the training step's consumption
rate (``stages.bench.train_step``, plain PyTorch, same stage/flavor/batch), and prints their ratio.
The target is >= 3x: the loader then never shows in the step time even when decode speed
varies across shards.

The data is either an existing run (``run_uri``: its ``download/`` and ``embed/`` stages) or a
synthetic shard set built in a temp dir in the real on-store formats: img2dataset-style tars of
JPEGs at the flavor's resolution (non-square, so resize and crop do work) and matching
``NNNNN.npz`` written by ``data_prep.embed_format.write_embedding_shard``.

    python -m stages.bench.loader --stage base --flavor debug --workers 2
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

from data_prep.embed_format import EmbeddingShard, write_embedding_shard
from pipeline import layout, store
from stages.bench.train_step import bench_train, default_cond_dims, stage_parts
from stages.nets.flavors import get_flavor
from stages.training.loader import LoaderSpec, make_loader, pair_shards
from stages.training.trainer import read_cond_dims


def write_synthetic_shards(root: str, *, image_size: int | None, cond_dims: dict[str, int], n_shards: int = 2,
                           per_shard: int = 64, text_len: int = 77, seed: int = 0) -> tuple[str | None, str]:
    """``<root>/download/shards/*.tar`` (None when ``image_size`` is None) + ``<root>/embed/shards/*.npz``.

    ``image_size`` is the stored JPEGs' short side (what the download stage wrote), not
    necessarily the training resolution.
    """
    rng = np.random.default_rng(seed)
    download = os.path.join(root, "download") if image_size else None
    embed = os.path.join(root, "embed")
    f16 = np.float16
    for s in range(n_shards):
        keys = [f"{s:05d}{i:04d}" for i in range(per_shard)]
        if download:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for key in keys:
                    # Smooth gradients + noise: JPEG sizes like photos', not like flat colour.
                    h, w = image_size, image_size * 5 // 4
                    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)
                    img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                    jb = io.BytesIO()
                    Image.fromarray(img).save(jb, format="JPEG", quality=90)
                    for ext, data in (("jpg", jb.getvalue()), ("txt", f"caption {key}".encode()),
                                      ("json", json.dumps({"key": key, "status": "success"}).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            store.write_bytes_atomic(layout.shard_file(os.path.join(download, layout.SHARDS), f"{s:05d}", layout.SHARD_TAR),
                                     buf.getvalue())
        t5_len = rng.integers(max(1, text_len // 4), text_len + 1, per_shard).astype(np.int32)
        clip_len = rng.integers(max(1, text_len // 4), text_len + 1, per_shard).astype(np.int32)

        def unit(n: int, d: int) -> np.ndarray:
            v = rng.normal(size=(n, d))
            return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(f16)

        write_embedding_shard(layout.shard_file(os.path.join(embed, layout.SHARDS), f"{s:05d}", layout.EMBED_NPZ), EmbeddingShard(
            keys=np.array(keys, dtype=np.str_),
            clip_image=unit(per_shard, cond_dims["clip_dim"]), clip_text=unit(per_shard, cond_dims["clip_dim"]),
            clip_tokens=rng.normal(size=(int(clip_len.sum()), cond_dims["clip_token_dim"])).astype(f16),
            clip_lengths=clip_len,
            t5_tokens=rng.normal(size=(int(t5_len.sum()), cond_dims["t5_dim"])).astype(f16),
            t5_lengths=t5_len))
    # No encoders.json: no encoder made these embeddings (it names them). Readers of the widths take
    # them from a shard instead (stages/training/trainer.py read_cond_dims).
    return download, embed


def loader_rate(download_uri: str | None, embed_uri: str, *, image_size: int | None, batch: int, workers: int,
                batches: int, pin_memory: bool, seed: int = 0) -> dict[str, float]:
    """Samples/s of the training DataLoader over ``batches`` batches after the first (worker start-up)."""
    shards = pair_shards(download_uri and store.join(download_uri, layout.SHARDS), store.join(embed_uri, layout.SHARDS))
    loader = make_loader(shards, LoaderSpec(image_size, batch, seed), None, workers, pin_memory=pin_memory)
    it = iter(loader)
    t_start = time.perf_counter()
    next(it)
    first_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["keys"])
    dt = time.perf_counter() - t0
    del it, loader
    return {"samples_per_s": n / dt, "first_batch_s": first_s, "samples": n}


def bench_loader(stage: str = "base", flavor: str = "debug", *, batch: int = 4, workers: int = 1, batches: int = 20,
                 run_uri: str | None = None, step_steps: int = 3, step_warmup: int = 1, device: str | None = None,
                 n_shards: int = 2, per_shard: int = 64, text_len: int = 77, step_zero: int | None = None,
                 step_result: dict | None = None, source_size: int | None = None) -> dict[str, Any]:
    """Loader samples/s vs the training step's samples/s; ``loader_over_step`` is the ratio.

    ``source_size``: short side of the synthetic JPEGs (default: the flavor's resolution). The
    shipped LAION spec downloads at 1024 px for every stage, so base64's loader decodes 1024 px
    JPEGs to train at 64 px: pass 1024 to measure that.

    ``step_zero``: measure the step with DeepSpeed at that ZeRO stage instead of plain PyTorch.
    ``step_result``: reuse a ``bench_train`` result instead of measuring the step again.
    """
    spec, _ = stage_parts(stage)
    fl = get_flavor(spec.net_role, flavor)
    image_size = fl.image_size if spec.needs_images else None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if workers < 0 or batches < 1 or batch < 1:
        raise ValueError(f"workers must be >= 0, batches and batch >= 1 (got {workers}, {batches}, {batch})")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if run_uri:
            download = layout.finished_stage_dir(run_uri, "download") if spec.needs_images else None
            embed = layout.finished_stage_dir(run_uri, "embed")
            if embed is None or (spec.needs_images and download is None):
                raise ValueError(f"{run_uri} has no finished download/embed stages to read")
            dims = read_cond_dims(embed)
            source = run_uri
        else:
            dims = default_cond_dims(flavor)
            src_px = (source_size or image_size) if image_size else None
            download, embed = write_synthetic_shards(tmp, image_size=src_px, cond_dims=dims, n_shards=n_shards,
                                                     per_shard=per_shard, text_len=text_len)
            source = f"synthetic: {n_shards} shards x {per_shard}" + (f", {src_px} px JPEGs" if src_px else "")
        load = loader_rate(download, embed, image_size=image_size, batch=batch, workers=workers, batches=batches,
                           pin_memory=dev.type == "cuda")
    if step_result is None:
        step_result = bench_train(stage, flavor, zero_stages=() if step_zero is None else (step_zero,), batch=batch,
                                  steps=step_steps, warmup=step_warmup, device=str(dev), plain=step_zero is None,
                                  text_len=text_len, cond_dims=dims, count_flops_=False)
    step_sps = step_result["runs"][0]["samples_per_s"]
    return {"stage": stage, "flavor": flavor, "batch": batch, "workers": workers, "device": str(dev),
            "data": source, "image_size": image_size,
            "loader_samples_per_s": load["samples_per_s"], "loader_first_batch_s": load["first_batch_s"],
            "step_samples_per_s": step_sps, "step_mode": step_result["runs"][0]["mode"],
            "loader_over_step": load["samples_per_s"] / step_sps, "target": 3.0}


def format_result(r: dict[str, Any]) -> str:
    return (f"loader {r['stage']}/{r['flavor']} batch {r['batch']} x {r['workers']} workers on {r['device']}: "
            f"{r['loader_samples_per_s']:.1f} samples/s vs step {r['step_samples_per_s']:.1f} samples/s "
            f"-> ratio {r['loader_over_step']:.2f} (target >= {r['target']:.0f})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="base")
    p.add_argument("--flavor", default="debug")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--run", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--source-size", type=int, default=None, help="stored JPEG size (default: the flavor's)")
    p.add_argument("--step-samples-per-s", type=float, default=None,
                   help="the step's rate from an earlier bench train run (skips measuring it again)")
    a = p.parse_args(argv)
    step = None if a.step_samples_per_s is None else \
        {"runs": [{"samples_per_s": a.step_samples_per_s, "mode": "given"}]}
    r = bench_loader(a.stage, a.flavor, batch=a.batch, workers=a.workers, batches=a.batches, run_uri=a.run,
                     device=a.device, step_result=step, source_size=a.source_size)
    print(json.dumps(r))
    print(format_result(r))


if __name__ == "__main__":
    main()

"""Small training data for the loop/loader/checkpoint tests, in the real on-store formats.

Download shards are webdataset tars exactly as img2dataset writes them ({key}.jpg/.txt/.json,
9-digit keys); embedding shards are written by the real ``write_embedding_shard``. Images are
coloured rectangles (non-square, so the random crop does something); embeddings are random
but deterministic per key.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from data_prep.embed_format import EmbeddingShard, write_embedding_shard
from data_prep.encoders_doc import EncodersDoc, encoders_doc_uri, write_encoders_doc
from pipeline import layout, store
from pipeline.context import StageContext
from pipeline.executors import LocalExecutor

DIMS = {"t5_dim": 8, "clip_dim": 8, "clip_token_dim": 8}
# The encoders the training data claims (the loop reads only the widths: they are never loaded).
ENCODERS = {"clip": {"model": "tiny:/nonexistent/encoders", "pretrained": None},
            "t5": {"model": "tiny:/nonexistent/encoders", "max_length": 32}}


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 2, x0:x0 + w // 2] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_dataset(root_uri: str, *, n_shards: int = 2, per_shard: int = 6, image_size: tuple[int, int] = (24, 20),
                 not_embedded: tuple[str, ...] = (), corrupt: tuple[str, ...] = (), seed: int = 0,
                 write_encoders_json: bool = True) -> tuple[str, str]:
    """Write ``<root>/download/shards/*.tar`` and ``<root>/embed/shards/*.npz``; return both stage URIs.

    ``not_embedded``: keys present in the tar but absent from the npz (skipped at embed time).
    ``corrupt``: keys whose JPEG bytes are garbage (the loader must skip them).
    """
    download, embed = store.join(root_uri, "download"), store.join(root_uri, "embed")
    rng = np.random.default_rng(seed)
    w, h = image_size
    for s in range(n_shards):
        buf = io.BytesIO()
        keys = []
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                img = b"not a jpeg" if key in corrupt else _jpeg(rng, w, h)
                _add(tar, f"{key}.jpg", img)
                _add(tar, f"{key}.txt", f"caption {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                if key not in not_embedded:
                    keys.append(key)
        store.write_bytes_atomic(store.join(download, "shards", f"{s:05d}.tar"), buf.getvalue())
        write_embedding_shard(store.join(embed, "shards", f"{s:05d}.npz"), embedding_shard(keys))
    if write_encoders_json:
        write_encoders_doc(embed, EncodersDoc(**ENCODERS, **DIMS))
    return download, embed


def embedding_shard(keys: list[str]) -> EmbeddingShard:
    n = len(keys)
    per_key = [np.random.default_rng(int(k)) for k in keys]
    clip_len = np.array([int(r.integers(2, 6)) for r in per_key], np.int32)
    t5_len = np.array([int(r.integers(1, 7)) for r in per_key], np.int32)
    f = np.float16

    def unit(v):
        return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(f)

    return EmbeddingShard(
        keys=np.array(keys, dtype=np.str_),
        clip_image=unit(np.stack([r.normal(size=DIMS["clip_dim"]) for r in per_key]) if n else np.zeros((0, 8))),
        clip_text=unit(np.stack([r.normal(size=DIMS["clip_dim"]) for r in per_key]) if n else np.zeros((0, 8))),
        clip_tokens=np.random.default_rng(1).normal(size=(int(clip_len.sum()), DIMS["clip_token_dim"])).astype(f),
        clip_lengths=clip_len,
        t5_tokens=np.random.default_rng(2).normal(size=(int(t5_len.sum()), DIMS["t5_dim"])).astype(f),
        t5_lengths=t5_len,
    )


def upstream(uri: str, **outputs: str) -> dict:
    """What a finished upstream stage's manifest tells its downstream: its folder and outputs."""
    return {"out_uri": uri, "outputs": {"shards": store.join(uri, layout.SHARDS), **outputs}}


def stage_ctx(root_uri: str, stage: str, download: str, embed: str, ray_enabled: bool = False) -> StageContext:
    inputs = {"embed": upstream(embed, encoders=encoders_doc_uri(embed))}
    if stage != "train_prior":
        inputs["download"] = upstream(download)
    executor = LocalExecutor()
    if ray_enabled:
        from pipeline.run.ray_executor import RayExecutor

        executor = RayExecutor()
    return StageContext(run_uri=root_uri, out_uri=store.join(root_uri, stage), inputs=inputs, executor=executor)


def tiny_train_kwargs(**over) -> dict:
    """Fast settings for the debug flavors."""
    kw = dict(flavor="debug", steps=2, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=1, log_every=1,
              checkpoint_every_steps=0, keep_last=2, loader_workers=0, ema_decay=0.9)
    kw.update(over)
    return kw


def smoke_spec(**sections) -> dict:
    """The shipped smoke spec as a plain dict, with ``sections`` replaced (None: removed)."""
    from pathlib import Path

    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipeline/configs/smoke.yaml").read_text())
    data = json.loads(json.dumps(data))  # the YAML anchors share dicts: copy them apart
    for k, v in sections.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    return data


def loader_batch(n: int = 2, size: int = 16, clip_dim: int = 16, clip_token_dim: int = 12) -> dict:
    """A micro-batch as stages/training/loader.collate makes it: images, CLIP embeddings and token ids."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (n, 5), generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return {"image": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            "clip_image": torch.randn(n, clip_dim, generator=g),
            "clip_tokens": torch.randn(n, 5, clip_token_dim, generator=g), "clip_mask": mask,
            "clip_ids": ids, "clip_id_mask": mask, "t5_ids": ids % 50, "t5_id_mask": mask}

"""Data in the real on-store formats: webdataset tars as img2dataset writes them, and the
training data (download shards + embedding shards) of the loop/loader/checkpoint tests.

Download shards are webdataset tars exactly as img2dataset writes them ({key}.jpg/.txt/.json,
9-digit keys); embedding shards are written by the real ``write_embedding_shard``. Images are
coloured rectangles (non-square, so the random crop does something); embeddings are random
but deterministic per key.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from data_prep.embed_format import EmbeddingShard, write_embedding_shard
from data_prep.encoders_doc import EncodersDoc, write_encoders_doc
from pipeline import layout, store

DIMS = {"t5_dim": 8, "clip_dim": 8, "clip_token_dim": 8}
# The encoders the training data claims (the loop reads only the widths: they are never loaded).
ENCODERS = {"clip": {"model": "tiny:/nonexistent/encoders", "pretrained": None},
            "t5": {"model": "tiny:/nonexistent/encoders", "max_length": 32}}


# ----------------------------------------------------------------------------- webdataset tars
def sample_members(key: str, jpg: bytes | None = None, txt: str | bytes | None = None,
                   meta: dict | None = None) -> list[tuple[str, bytes]]:
    """One sample's tar members in img2dataset's order ({key}.jpg, .txt, .json); None: no such member."""
    out = []
    if jpg is not None:
        out.append((f"{key}.jpg", jpg))
    if txt is not None:
        out.append((f"{key}.txt", txt.encode() if isinstance(txt, str) else txt))
    if meta is not None:
        out.append((f"{key}.json", json.dumps(meta).encode()))
    return out


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding ``members`` ((name, bytes) pairs) in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(dest: str | Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write a tar of ``members`` to a local path or a store URI (``file://``, ``s3://``), atomically."""
    store.write_bytes_atomic(str(dest), tar_bytes(members))


# ----------------------------------------------------------------------------- training data
def rectangle_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A flat background with a rectangle of another colour, as JPEG."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 2, x0:x0 + w // 2] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


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
        members, keys = [], []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            img = b"not a jpeg" if key in corrupt else rectangle_jpeg(rng, w, h)
            members += sample_members(key, img, f"caption {key}", {"key": key, "status": "success"})
            if key not in not_embedded:
                keys.append(key)
        write_tar(store.join(download, "shards", f"{s:05d}.tar"), members)
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

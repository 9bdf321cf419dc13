"""Embed stage, step 1 (CPU): a download shard -> chunks of decoded, CLIP-preprocessed images.

Images are decoded, resized and normalised with the CLIP model's own preprocess config, in tar
order, ``batch_size`` raw samples per chunk. A sample without a caption or with an undecodable
image is skipped and counted in its chunk's counts.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from data_prep.encoder_config import caption_counts  # null and empty captions counted apart
from data_prep.image_decode import preprocess_image
from data_prep.shards import iter_shard, shard_id


@dataclass
class DecodedChunk:
    shard: str  # "00000"
    chunk: int  # 0-based index within the shard
    last: bool  # the final chunk of the shard (its counts include shard-level losses)
    keys: list[str]
    captions: list[str]
    pixels: np.ndarray  # [b, 3, H, W] float16, normalised
    counts: dict[str, int] = field(default_factory=dict)
    columns: dict[str, list[str]] = field(default_factory=dict)  # extra list columns, JSON per sample


def _try_preprocess(data: bytes, pp: dict[str, Any]) -> np.ndarray | Exception:
    try:
        return preprocess_image(data, pp)
    except Exception as e:  # PIL raises many types for corrupt data
        return e


def decode_shard(shard_uri: str, pp: dict[str, Any], batch_size: int, skip_bad_images: bool = True,
                 workers: int = 1, columns: tuple[str, ...] = ()) -> Iterator[DecodedChunk]:
    """Decode one shard into chunks of ``batch_size`` raw samples, in tar order.

    Streams the tar (never holds more than one chunk of pixels). Always yields at least one
    chunk, so a shard where every image is bad still gets its (empty) npz and done marker.
    ``workers`` > 1 decodes a chunk's images on a thread pool (PIL releases the GIL while
    decoding and resizing); order and results are unchanged.
    """
    name = shard_id(shard_uri)
    tar_counts: dict[str, int] = {}
    pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def build(samples: list[Any], chunk: int) -> DecodedChunk:
        keys, caps, pix = [], [], []
        cols: dict[str, list[str]] = {name_: [] for name_ in columns}
        c = {"n_total": len(samples), "n_bad_image": 0, "n_missing_caption": 0,
             **caption_counts([s.caption for s in samples])}
        samples_c = [s for s in samples if s.caption and s.caption.strip()]
        c["n_missing_caption"] = len(samples) - len(samples_c)
        datas = [s.image_bytes for s in samples_c]
        decoded = pool.map(_try_preprocess, datas, [pp] * len(datas)) if pool else (_try_preprocess(d, pp) for d in datas)
        for s, x in zip(samples_c, decoded):
            if isinstance(x, Exception):
                if not skip_bad_images:
                    raise ValueError(f"shard {shard_uri}: image of key {s.key!r} cannot be decoded ({x}); "
                                     "set embed.skip_bad_images: true to skip and count such samples") from x
                c["n_bad_image"] += 1
                continue
            keys.append(s.key)
            caps.append(s.caption.strip())
            for col in columns:  # img2dataset put the list's extra columns in the sample's json
                cols[col].append(json.dumps(s.meta.get(col)))
            pix.append(x)
        size = pp["size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        arr = np.stack(pix).astype(np.float16) if pix else np.zeros((0, 3, *hw), np.float16)
        return DecodedChunk(name, chunk, False, keys, caps, arr, c, cols)

    try:
        yield from _chunks(iter_shard(shard_uri, counts=tar_counts), batch_size, build, tar_counts)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _chunks(samples: Iterator[Any], batch_size: int, build: Callable[[list[Any], int], DecodedChunk],
            tar_counts: dict[str, int]) -> Iterator[DecodedChunk]:
    buf: list[Any] = []
    pending: DecodedChunk | None = None
    idx = 0
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            if pending is not None:
                yield pending
            pending, buf, idx = build(buf, idx), [], idx + 1
    if buf or pending is None:
        if pending is not None:
            yield pending
        pending = build(buf, idx)
    pending.last = True
    # Members without an image never became samples: count them as bad images of this shard.
    missing = int(tar_counts.get("incomplete_samples", 0))
    pending.counts["n_total"] += missing
    pending.counts["n_bad_image"] += missing
    yield pending

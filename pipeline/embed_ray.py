"""Ray Data wiring of the embed stage (the steps themselves live in data_prep/embed.py).

    shard rows ──map_batches(decode, CPU tasks)──► chunk rows ──map_batches(encoder actors)──► part files
                                                                                              │
    driver: counts finished chunks per shard ──► merge task: join parts -> NNNNN.npz + done marker

Why chunk rows and part files: a download shard holds ~10k samples, far too many decoded
pixels for one row, and Ray Data has no "group by shard, then write" that avoids a shuffle. So
decode tasks stream a shard as chunk rows of ``batch_size`` samples (tagged shard/chunk/last),
encoder actors write each chunk's embeddings straight to the store and return only a tiny
metadata row, and a small Ray task joins a shard's parts once all its chunks are back. Neither
pixels nor embeddings pass through the driver, only counts.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator

import numpy as np
import ray

from data_prep.embed import (DecodedChunk, EmbedConfig, decode_shard, encode_chunk, finalize_from_parts, load_encoders,
                             part_uri)
from data_prep.embed_format import write_embedding_shard
from pipeline import store


@contextlib.contextmanager
def ray_session(address: str | None):
    """Connect to Ray for the length of a block unless already connected (then leave it be)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _decode_batches(batch: dict[str, np.ndarray], pp: dict[str, Any], batch_size: int,
                    skip_bad_images: bool, workers: int) -> Iterator[dict[str, np.ndarray]]:
    """One shard row in, one row per decoded chunk out (a generator, so a shard streams)."""
    for uri in batch["uri"]:
        for ch in decode_shard(str(uri), pp, batch_size, skip_bad_images, workers=workers):
            # Fixed-shape tensor column: pad the last chunk to batch_size, carry the real count.
            pix = np.zeros((batch_size, *ch.pixels.shape[1:]), np.float16)
            pix[: len(ch.keys)] = ch.pixels
            yield {"shard": np.array([ch.shard]), "chunk": np.array([ch.chunk]), "last": np.array([ch.last]),
                   "n": np.array([len(ch.keys)]), "keys": np.array([json.dumps(ch.keys)]),
                   "captions": np.array([json.dumps(ch.captions)]), "counts": np.array([json.dumps(ch.counts)]),
                   "pixels": pix[None]}


class _EncodeActor:
    """Holds both encoders on its device; writes each chunk's part file, returns metadata."""

    def __init__(self, cfg_json: str, out_shards: str, device: str):
        self.cfg = EmbedConfig.model_validate_json(cfg_json)
        self.out_shards = out_shards
        self.enc = load_encoders(self.cfg, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"shard": [], "chunk": [], "last": [], "counts": []}
        for i in range(len(batch["shard"])):
            n = int(batch["n"][i])
            ch = DecodedChunk(shard=str(batch["shard"][i]), chunk=int(batch["chunk"][i]), last=bool(batch["last"][i]),
                              keys=json.loads(str(batch["keys"][i])), captions=json.loads(str(batch["captions"][i])),
                              pixels=np.asarray(batch["pixels"][i])[:n], counts=json.loads(str(batch["counts"][i])))
            part, counts = encode_chunk(self.enc, ch, self.cfg.t5_micro_batch)
            write_embedding_shard(part_uri(self.out_shards, ch.shard, ch.chunk), part)
            out["shard"].append(ch.shard)
            out["chunk"].append(ch.chunk)
            out["last"].append(ch.last)
            out["counts"].append(json.dumps(counts))
        return {k: np.array(v) for k, v in out.items()}


def _actors_and_gpus(cfg: EmbedConfig, n_shards: int, progress: Callable[[str], None]) -> tuple[int, float]:
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    g = cfg.gpus_per_actor
    if g > 0 and gpus == 0:
        progress(f"embed: embed.gpus_per_actor={g} but the Ray cluster has no GPUs; encoding on CPU")
        g = 0.0
    if cfg.num_actors != "auto":
        return int(cfg.num_actors), g
    n = int(gpus // g) if g > 0 else int(cpus // 4)
    return max(1, min(n, 4 * n_shards)), g


def embed_shards_ray(todo: list[dict[str, Any]], out_shards: str, cfg: EmbedConfig, pp: dict[str, Any],
                     identity: dict[str, Any], *, progress: Callable[[str], None] | None = None,
                     on_shard_done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Embed ``todo`` shards on the connected Ray cluster; returns their done markers."""
    progress = progress or (lambda msg: None)
    for src in todo:  # parts left by an interrupted run are redone with their shard
        store.remove(store.join(out_shards, "_parts", src["shard"]))
    n_actors, gpus = _actors_and_gpus(cfg, len(todo), progress)
    progress(f"embed: Ray Data over {len(todo)} shards, {n_actors} encoder actor(s), {gpus} GPU(s) each")

    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.map_batches(_decode_batches, batch_size=1, batch_format="numpy", num_cpus=cfg.cpus_per_decode_task,
                        fn_kwargs={"pp": pp, "batch_size": cfg.batch_size, "skip_bad_images": cfg.skip_bad_images,
                                   "workers": max(1, int(cfg.cpus_per_decode_task))})
    ds = ds.map_batches(_EncodeActor, batch_size=1, batch_format="numpy", concurrency=n_actors,
                        num_gpus=gpus if gpus > 0 else None, num_cpus=1 if gpus == 0 else None,
                        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "out_shards": out_shards,
                                               "device": "cuda" if gpus > 0 else "cpu"})

    by_name = {s["shard"]: s for s in todo}
    counts: dict[str, dict[int, dict[str, int]]] = {}
    n_chunks: dict[str, int] = {}
    merge = ray.remote(num_cpus=0.1)(finalize_from_parts)
    pending: list[Any] = []
    merged: set[str] = set()
    markers: list[dict[str, Any]] = []

    def collect(timeout: float | None) -> None:
        nonlocal pending
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout)
        try:
            done = ray.get(ready)
        except ray.exceptions.RayTaskError as e:  # e.g. StageFailed over max_bad_fraction: keep its type
            raise e.as_instanceof_cause() from None
        for marker in done:
            markers.append(marker)
            progress(f"embed: shard {marker['shard']} done ({marker['counts']['n_embedded']} samples)")
            if on_shard_done is not None:
                on_shard_done(marker)

    for row in ds.iter_rows():
        name = str(row["shard"])
        counts.setdefault(name, {})[int(row["chunk"])] = json.loads(str(row["counts"]))
        if bool(row["last"]):
            n_chunks[name] = int(row["chunk"]) + 1
        # Ray Data may re-run a failed decode task, re-emitting chunks already seen: keying by chunk
        # index absorbs the duplicates, and each shard is merged exactly once.
        if name in n_chunks and len(counts[name]) == n_chunks[name] and name not in merged:
            merged.add(name)
            ordered = [counts[name][i] for i in range(n_chunks[name])]
            pending.append(merge.remote(out_shards, by_name[name], ordered, identity, cfg.max_bad_fraction))
        if pending:
            collect(timeout=0)
    while pending:
        collect(timeout=None)
    missing = sorted(set(by_name) - {m["shard"] for m in markers})
    if missing:
        raise RuntimeError(f"embed (Ray): shards {missing} produced no output")
    return markers

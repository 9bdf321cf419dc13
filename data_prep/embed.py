"""Embedding precompute stage: download shards -> CLIP image/text/tokens + T5 tokens per shard.

The per-batch pieces live here and are shared by both drivers:

* :func:`decode_shard` (CPU): read one tar, decode + resize + normalise images with the CLIP
  model's own preprocess config, yield :class:`DecodedChunk` s of ``batch_size`` raw samples.
* :func:`encode_chunk` (GPU/CPU): one chunk -> an :class:`EmbeddingShard` part, dropping rows
  with non-finite values; T5 runs length-bucketed (see ``T5Encoder.encode``).
* :func:`finalize_shard`: join a shard's parts in order, write ``NNNNN.npz`` then
  ``NNNNN.done.json`` (the marker is written last, so a crash never leaves a shard looking done).

The in-process driver (:func:`embed_shards`) runs them in a loop on this host; with Ray,
``pipeline/embed_ray.py`` wires the same functions into Ray Data. Resume is per shard: a shard
whose done marker matches the encoders is skipped, so a re-run starts at the first unfinished
shard and a finished run is a no-op (levanter's shard ledger).
"""
from __future__ import annotations

from typing import ClassVar

import io
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
from pydantic import Field, field_validator

from data_prep.embed_format import EmbeddingShard, write_embedding_shard
from data_prep.encoders import (ClipConfig, ClipEncoder, T5Config, T5Encoder, clip_preprocess_cfg, encoder_identity,
                                load_clip, load_t5)
from data_prep.shards import iter_shard, list_shards, shard_id
from pipeline import store
from pipeline.configbase import StrictModel, TaskPlacement
from pipeline.context import StageContext, StageFailed, StageResult

COUNT_KEYS = ("n_total", "n_embedded", "n_bad_image", "n_missing_caption", "n_nonfinite")


class EmbedConfig(TaskPlacement):
    """Embedding precompute (runs once per dataset; training reads only its output)."""

    fingerprint_exclude: ClassVar[tuple[str, ...]] = ("num_actors", "gpus_per_actor", "cpus_per_decode_task", "resources")

    clip: ClipConfig = Field(default_factory=ClipConfig, description="CLIP encoder (image/text embeddings, text tokens).")
    t5: T5Config = Field(default_factory=T5Config, description="T5 encoder (per-token text conditioning).")
    batch_size: int = Field(64, ge=1, le=65536, description="Samples per encoder batch (and per decoded chunk).")
    t5_micro_batch: int | None = Field(None, ge=1, description=(
        "Captions per T5 forward after sorting a batch by length; null = the whole batch padded to its "
        "longest caption. Smaller values cut padding further on mixed-length captions."))
    num_actors: int | Literal["auto"] = Field("auto", description=(
        "Ray: encoder actors. 'auto' = cluster GPUs / gpus_per_actor (one per 4 CPUs, at least 1, on CPU)."))
    gpus_per_actor: float = Field(1.0, ge=0, description=(
        "Ray: GPUs per encoder actor (fractions share a GPU). 0 = run the encoders on CPU. On a cluster "
        "without GPUs the stage falls back to CPU and says so."))
    cpus_per_decode_task: float = Field(1.0, gt=0, description="Ray: CPUs reserved by each decode task.")
    image_size: int | None = Field(None, ge=8, description="CLIP input size override; null = the model's own.")
    skip_bad_images: bool = Field(True, description="Skip and count undecodable images (false: stop on the first).")
    max_bad_fraction: float = Field(0.5, ge=0, le=1, description=(
        "Stop the stage if a shard loses more than this fraction of its samples (bad image, missing caption, "
        "non-finite embedding)."))

    @field_validator("num_actors")
    @classmethod
    def _check_actors(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 1:
            raise ValueError(f"num_actors must be 'auto' or an integer >= 1, got {v!r}")
        return v


# ----------------------------------------------------------------------------------------- decode


@dataclass
class DecodedChunk:
    shard: str  # "00000"
    chunk: int  # 0-based index within the shard
    last: bool  # the final chunk of the shard (its counts include shard-level losses)
    keys: list[str]
    captions: list[str]
    pixels: np.ndarray  # [b, 3, H, W] float16, normalised
    counts: dict[str, int] = field(default_factory=dict)


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "random": 3}  # PIL.Image.Resampling values


def preprocess_image(data: bytes, pp: dict[str, Any]) -> np.ndarray:
    """Encoded image bytes -> [3, H, W] float32 normalised as the CLIP model expects (raises on bad data)."""
    from PIL import Image

    size = pp["size"]
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    resample = _RESAMPLE.get(pp.get("interpolation", "bicubic"), 3)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = im.convert("RGB")
    w, h = im.size
    mode = pp.get("resize_mode", "shortest")
    if mode == "squash":
        im = im.resize((tw, th), resample)
    elif mode == "longest":  # fit inside, pad with fill_color
        s = min(tw / w, th / h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("RGB", (tw, th), (int(pp.get("fill_color", 0)),) * 3)
        canvas.paste(im.resize((nw, nh), resample), ((tw - nw) // 2, (th - nh) // 2))
        im = canvas
    else:  # "shortest": resize the short side, centre crop (open_clip's eval transform)
        s = max(tw / w, th / h)
        nw, nh = max(tw, round(w * s)), max(th, round(h * s))
        im = im.resize((nw, nh), resample)
        left, top = (nw - tw) // 2, (nh - th) // 2
        im = im.crop((left, top, left + tw, top + th))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(pp["mean"], np.float32)) / np.asarray(pp["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _try_preprocess(data: bytes, pp: dict[str, Any]) -> np.ndarray | Exception:
    try:
        return preprocess_image(data, pp)
    except Exception as e:  # PIL raises many types for corrupt data
        return e


def decode_shard(shard_uri: str, pp: dict[str, Any], batch_size: int, skip_bad_images: bool = True,
                 workers: int = 1) -> Iterator[DecodedChunk]:
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
        c = {"n_total": len(samples), "n_bad_image": 0, "n_missing_caption": 0}
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
            pix.append(x)
        size = pp["size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        arr = np.stack(pix).astype(np.float16) if pix else np.zeros((0, 3, *hw), np.float16)
        return DecodedChunk(name, chunk, False, keys, caps, arr, c)

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


def prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run a generator ``depth`` items ahead on a thread: decode the next chunk while the
    encoder works on this one (the single-host path's only overlap of CPU and GPU work).
    Exceptions surface in the consumer; abandoning the iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in it:
                if not put((x, None)):
                    return
            put((end, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put((end, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # runs the generator's cleanup (decode thread pool) on this thread

    t = threading.Thread(target=work, daemon=True, name="embed-prefetch")
    t.start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()
        t.join()


# ----------------------------------------------------------------------------------------- encode


@dataclass
class Encoders:
    clip: ClipEncoder
    t5: T5Encoder

    @property
    def dims(self) -> dict[str, int]:
        return {"clip_dim": self.clip.dim, "clip_token_dim": self.clip.token_dim, "t5_dim": self.t5.dim}


def load_encoders(cfg: EmbedConfig, device: Any = None) -> Encoders:
    return Encoders(load_clip(cfg.clip, device=device, image_size=cfg.image_size), load_t5(cfg.t5, device=device))


def encode_chunk(enc: Encoders, chunk: DecodedChunk, t5_micro_batch: int | None = None) -> tuple[EmbeddingShard, dict[str, int]]:
    """Embed one decoded chunk; rows with any non-finite value (after the fp16 cast) are dropped."""
    import torch

    counts = dict(chunk.counts)
    if not chunk.keys:
        counts.update(n_embedded=0, n_nonfinite=0)
        d = enc.dims
        return EmbeddingShard.empty(d["clip_dim"], d["clip_token_dim"], d["t5_dim"]), counts
    img = enc.clip.encode_image(torch.from_numpy(chunk.pixels)).numpy().astype(np.float16)
    txt, ctoks, clens = enc.clip.encode_text(chunk.captions)
    t5toks, t5lens = enc.t5.encode(chunk.captions, micro_batch=t5_micro_batch)
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
        t5_tokens=np.concatenate([t5toks[i] for i in keep]), t5_lengths=t5lens.numpy()[keep])
    return part, counts


# ------------------------------------------------------------------------------------------ write


def npz_uri(out_shards_uri: str, name: str) -> str:
    return store.join(out_shards_uri, f"{name}.npz")


def done_uri(out_shards_uri: str, name: str) -> str:
    return store.join(out_shards_uri, f"{name}.done.json")


def embed_identity(cfg: EmbedConfig) -> dict[str, Any]:
    """What a done marker must match for its shard to count as done for this config."""
    return {**encoder_identity(cfg.clip, cfg.t5), "image_size": cfg.image_size}


def finalize_shard(out_shards_uri: str, source: dict[str, Any], parts: list[EmbeddingShard],
                   counts: list[dict[str, int]], identity: dict[str, Any], max_bad_fraction: float) -> dict[str, Any]:
    """Join a shard's parts (in chunk order), write the npz, then its done marker; returns the marker."""
    name = source["shard"]
    total = {k: sum(int(c.get(k, 0)) for c in counts) for k in COUNT_KEYS}
    lost = total["n_total"] - total["n_embedded"]
    if total["n_total"] and lost / total["n_total"] > max_bad_fraction:
        raise StageFailed(
            f"shard {source['uri']}: {lost} of {total['n_total']} samples could not be embedded "
            f"(bad images {total['n_bad_image']}, missing captions {total['n_missing_caption']}, non-finite "
            f"{total['n_nonfinite']}) which exceeds embed.max_bad_fraction={max_bad_fraction}")
    shard = EmbeddingShard.concat(parts)
    nbytes = write_embedding_shard(npz_uri(out_shards_uri, name), shard)
    marker = {"shard": name, "source": source["uri"], "source_size": source["size"], "counts": total,
              "npz_bytes": nbytes, "dims": shard.dims, "encoders": identity}
    store.write_json(done_uri(out_shards_uri, name), marker)
    return marker


# ----------------------------------------------------------------------------------------- driver


def part_uri(out_shards_uri: str, name: str, chunk: int) -> str:
    """Where a distributed encoder writes one chunk's embeddings before the shard is joined."""
    return store.join(out_shards_uri, "_parts", name, f"{chunk:05d}.npz")


def finalize_from_parts(out_shards_uri: str, source: dict[str, Any], counts: list[dict[str, int]],
                        identity: dict[str, Any], max_bad_fraction: float) -> dict[str, Any]:
    """finalize_shard over the part files of ``counts`` (chunk order), then delete the parts."""
    from data_prep.embed_format import read_embedding_shard

    name = source["shard"]
    parts = [read_embedding_shard(part_uri(out_shards_uri, name, i)) for i in range(len(counts))]
    marker = finalize_shard(out_shards_uri, source, parts, counts, identity, max_bad_fraction)
    store.remove(store.join(out_shards_uri, "_parts", name))
    return marker


def list_sources(shards_uri: str) -> list[dict[str, Any]]:
    srcs = [{"shard": shard_id(u), "uri": u, "size": store.size(u)} for u in list_shards(shards_uri)]
    if not srcs:
        raise StageFailed(f"no download shards (NNNNN.tar) found under {shards_uri}")
    return srcs


def is_done(out_shards_uri: str, src: dict[str, Any], identity: dict[str, Any]) -> bool:
    d = done_uri(out_shards_uri, src["shard"])
    if not store.exists(d) or not store.exists(npz_uri(out_shards_uri, src["shard"])):
        return False
    m = store.read_json(d)
    return m.get("encoders") == identity and m.get("source_size") == src["size"]


def embed_shards(shards_uri: str, out_uri: str, cfg: EmbedConfig, *, use_ray: bool = False,
                 progress: Callable[[str], None] | None = None,
                 on_shard_done: Callable[[dict[str, Any]], None] | None = None,
                 encoders: Encoders | None = None, device: Any = None) -> dict[str, Any]:
    """Embed every unfinished shard of ``shards_uri`` into ``<out_uri>/shards``; returns a summary.

    ``on_shard_done(marker)`` is called after each shard's marker is written (progress bars,
    and the tests' kill-after-shard-k hook). ``use_ray`` runs the same steps on Ray Data; the
    caller must have connected to Ray (the runner does; :func:`embed_offline` does for the CLI).
    """
    progress = progress or (lambda msg: None)
    out_shards = store.join(out_uri, "shards")
    identity = embed_identity(cfg)
    sources = list_sources(shards_uri)
    todo = [s for s in sources if not is_done(out_shards, s, identity)]
    progress(f"embed: {len(sources) - len(todo)}/{len(sources)} shards already done, {len(todo)} to go")
    pp = clip_preprocess_cfg(cfg.clip, cfg.image_size)
    if todo and use_ray:
        from pipeline.embed_ray import embed_shards_ray  # Ray stays behind this call (DESIGN invariant 2)

        embed_shards_ray(todo, out_shards, cfg, pp, identity, progress=progress, on_shard_done=on_shard_done)
    elif todo:
        enc = encoders or load_encoders(cfg, device=device)
        for src in todo:
            parts, counts = [], []
            workers = min(8, os.cpu_count() or 1)
            for chunk in prefetch(decode_shard(src["uri"], pp, cfg.batch_size, cfg.skip_bad_images, workers)):
                p, c = encode_chunk(enc, chunk, cfg.t5_micro_batch)
                parts.append(p)
                counts.append(c)
            marker = finalize_shard(out_shards, src, parts, counts, identity, cfg.max_bad_fraction)
            progress(f"embed: shard {src['shard']} done ({marker['counts']['n_embedded']} samples)")
            if on_shard_done is not None:
                on_shard_done(marker)
    summary = _summarize(out_uri, sources, identity, pp, cfg, embedded_now=[s["shard"] for s in todo])
    return summary


def _summarize(out_uri: str, sources: list[dict[str, Any]], identity: dict[str, Any], pp: dict[str, Any],
               cfg: EmbedConfig, embedded_now: list[str]) -> dict[str, Any]:
    out_shards = store.join(out_uri, "shards")
    markers = [store.read_json(done_uri(out_shards, s["shard"])) for s in sources]
    missing = [s["shard"] for s, m in zip(sources, markers) if m.get("encoders") != identity]
    if missing:
        raise StageFailed(f"embed: shards {missing} have no matching done marker after the run")
    counts = {k: sum(int(m["counts"][k]) for m in markers) for k in COUNT_KEYS}
    nbytes = sum(int(m["npz_bytes"]) for m in markers)
    dims = markers[0]["dims"]
    doc = {"identity": identity, "clip": {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained},
           "t5": {"model": cfg.t5.model, "max_length": cfg.t5.max_length}, **dims,
           "clip_preprocess": pp, "shards": [{"shard": s["shard"], "size": s["size"]} for s in sources],
           "counts": counts}
    store.write_json(store.join(out_uri, "encoders.json"), doc)
    return {"counts": {**counts, "shards": len(sources), "shards_embedded_now": len(embedded_now)},
            "metrics": {**{k: float(v) for k, v in dims.items()}, "npz_bytes_total": float(nbytes),
                        "bytes_per_sample": nbytes / max(1, counts["n_embedded"])},
            "dims": dims, "embedded_now": embedded_now, "encoders_uri": store.join(out_uri, "encoders.json")}


def run(cfg: EmbedConfig, ctx: StageContext) -> StageResult:
    shards_uri = store.join(ctx.input_uri("download"), "shards")
    s = embed_shards(shards_uri, ctx.out_uri, cfg, use_ray=ctx.ray_enabled, progress=ctx.progress)
    return StageResult(
        counts=s["counts"], metrics=s["metrics"],
        outputs={"shards": store.join(ctx.out_uri, "shards"), "encoders": s["encoders_uri"],
                 "clip_model": cfg.clip.model, "clip_pretrained": str(cfg.clip.pretrained),
                 "t5_model": cfg.t5.model})


def embed_offline(shards_uri: str, out_uri: str, cfg: EmbedConfig, address: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """``t2i embed``: embed a shard folder outside a run (in-process, or on Ray when ``address`` is given)."""
    from rich.progress import Progress

    n = len(list_sources(shards_uri))
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("embedding shards", total=n)
        msg = (lambda m: bar.console.log(m)) if progress else None
        hook = lambda marker: bar.advance(task)  # noqa: E731
        if address is None:
            s = embed_shards(shards_uri, out_uri, cfg, progress=msg, on_shard_done=hook)
        else:
            from pipeline.embed_ray import ray_session

            with ray_session(address):
                s = embed_shards(shards_uri, out_uri, cfg, use_ray=True, progress=msg, on_shard_done=hook)
        bar.update(task, completed=n)
    return s


def load_encoders_for(embed_out_uri: str, device: Any = None) -> tuple[Encoders, dict[str, Any]]:
    """Reload the encoders an embedding set was made with (sampling encodes new prompts with them)."""
    doc = store.read_json(store.join(embed_out_uri, "encoders.json"))
    cfg = EmbedConfig(clip=ClipConfig(**doc["clip"]), t5=T5Config(**doc["t5"]),
                      image_size=doc["identity"].get("image_size"))
    return load_encoders(cfg, device=device), doc


def find_compatible_embedding(out_uri: str, shards_uri: str, cfg: EmbedConfig) -> bool:
    """True if ``out_uri`` holds a complete embedding of exactly these shards with these encoders."""
    enc_uri = store.join(out_uri, "encoders.json")
    if not store.exists(enc_uri):
        return False
    doc = store.read_json(enc_uri)
    identity = embed_identity(cfg)
    if doc.get("identity") != identity:
        return False
    try:
        sources = list_sources(shards_uri)
    except StageFailed:
        return False
    if doc.get("shards") != [{"shard": s["shard"], "size": s["size"]} for s in sources]:
        return False
    return all(is_done(store.join(out_uri, "shards"), s, identity) for s in sources)

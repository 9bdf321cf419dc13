"""Embedding precompute stage: download shards -> CLIP image/text/tokens + T5 tokens per shard.

Three steps, each in its own module so each can run in its own process:

* decode (CPU, data_prep/embed/decode.py): one tar -> chunks of CLIP-preprocessed images;
* encode (GPU/CPU, data_prep/embed/encode.py): one chunk -> its embeddings, written as a part;
* finish (data_prep/embed/ledger.py): a shard's parts -> ``NNNNN.npz``, then its done marker.

:class:`EmbedProcessor` hands these to the executor the runner gave the stage
(pipeline/executors.py): in this process one shard after another, or on Ray with decode tasks
feeding encoder actors. The stage never knows which. Resume is per shard (the ledger).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from data_prep.embed.decode import DecodedChunk, decode_shard
from data_prep.embed.encode import Encoders, encode_chunk, load_encoders
from data_prep.embed_format import write_embedding_shard
from data_prep.holdout import split_rule
from data_prep.embed.ledger import (COUNT_KEYS, done_uri, embed_identity, finalize_from_parts, is_done,
                                    list_sources, npz_uri, part_uri)
from data_prep.encoders_doc import EncodersDoc, read_encoders_doc, write_encoders_doc
from data_prep.embed.config import EmbedConfig
from data_prep.encoders import clip_preprocess_cfg
from pipeline import layout, store
from pipeline.context import StageContext, StageFailed, StageResult
from pipeline.executors import Executor, LocalExecutor, ShardPlacement


@dataclass
class EmbedProcessor:
    """The embed stage as a :class:`pipeline.executors.ShardProcessor` (picklable: it travels to
    Ray workers). ``encoders``: already loaded encoders for in-process use (tests, benchmarks)."""

    cfg: EmbedConfig
    out_shards: str
    pp: dict[str, Any]
    identity: dict[str, Any]
    encoders: Encoders | None = None
    columns: tuple[str, ...] = ()  # download.save_additional_columns, carried into the npz

    def prepare(self, source: dict) -> None:
        store.remove(store.join(self.out_shards, layout.EMBED_PARTS, source["shard"]))  # an interrupted run's parts

    def decode(self, source: dict, threads: int):
        return decode_shard(source["uri"], self.pp, self.cfg.batch_size, self.cfg.skip_bad_images, workers=threads,
                            columns=self.columns)

    def to_row(self, ch: DecodedChunk) -> dict[str, np.ndarray]:
        # Fixed-shape tensor column: pad the last chunk to batch_size, carry the real count.
        pix = np.zeros((self.cfg.batch_size, *ch.pixels.shape[1:]), np.float16)
        pix[: len(ch.keys)] = ch.pixels
        return {"shard": np.array([ch.shard]), "chunk": np.array([ch.chunk]), "last": np.array([ch.last]),
                "n": np.array([len(ch.keys)]), "keys": np.array([json.dumps(ch.keys)]),
                "captions": np.array([json.dumps(ch.captions)]), "counts": np.array([json.dumps(ch.counts)]),
                "columns": np.array([json.dumps(ch.columns)]), "pixels": pix[None]}

    def from_row(self, row: dict[str, Any]) -> DecodedChunk:
        n = int(row["n"])
        return DecodedChunk(shard=str(row["shard"]), chunk=int(row["chunk"]), last=bool(row["last"]),
                            keys=json.loads(str(row["keys"])), captions=json.loads(str(row["captions"])),
                            pixels=np.asarray(row["pixels"])[:n], counts=json.loads(str(row["counts"])),
                            columns=json.loads(str(row["columns"])))

    def open_encoder(self, device: str) -> Callable[[DecodedChunk], dict]:
        enc = self.encoders or load_encoders(self.cfg, device=device)

        def encode(ch: DecodedChunk) -> dict:
            part, counts = encode_chunk(enc, ch, self.cfg.t5_micro_batch)
            write_embedding_shard(part_uri(self.out_shards, ch.shard, ch.chunk), part)
            return counts
        return encode

    def finish(self, source: dict, results: list[dict]) -> dict:
        return finalize_from_parts(self.out_shards, source, results, self.identity, self.cfg.max_bad_fraction)


def embed_shards(shards_uri: str, out_uri: str, cfg: EmbedConfig, *, executor: Executor | None = None,
                 progress: Callable[[str], None] | None = None,
                 on_shard_done: Callable[[dict[str, Any]], None] | None = None,
                 encoders: Encoders | None = None, columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Embed every unfinished shard of ``shards_uri`` into ``<out_uri>/shards``; returns a summary.

    ``on_shard_done(marker)`` is called after each shard's marker is written (progress bars,
    and the tests' kill-after-shard-k hook). ``executor`` decides where the work runs (default:
    this process).
    """
    progress = progress or (lambda msg: None)
    executor = executor or LocalExecutor()
    out_shards = store.join(out_uri, layout.SHARDS)
    identity = embed_identity(cfg)
    sources = list_sources(shards_uri)
    todo = [s for s in sources if not is_done(out_shards, s, identity)]
    progress(f"embed: {len(sources) - len(todo)}/{len(sources)} shards already done, {len(todo)} to go")
    pp = clip_preprocess_cfg(cfg.clip, cfg.image_size)
    if todo:
        processor = EmbedProcessor(cfg, out_shards, pp, identity, encoders if executor.kind == "local" else None,
                                   tuple(columns))
        placement = ShardPlacement(cfg.num_actors, cfg.gpus_per_actor, cfg.cpus_per_decode_task)

        def done(marker: dict) -> None:
            progress(f"embed: shard {marker['shard']} done ({marker['counts']['n_embedded']} samples)")
            if on_shard_done is not None:
                on_shard_done(marker)
        executor.map_shards(processor, todo, placement, progress=progress, on_done=done)
    return _summarize(out_uri, sources, identity, pp, cfg, embedded_now=[s["shard"] for s in todo])


def _summarize(out_uri: str, sources: list[dict[str, Any]], identity: dict[str, Any], pp: dict[str, Any],
               cfg: EmbedConfig, embedded_now: list[str]) -> dict[str, Any]:
    out_shards = store.join(out_uri, layout.SHARDS)
    markers = [store.read_json(done_uri(out_shards, s["shard"])) for s in sources]
    missing = [s["shard"] for s, m in zip(sources, markers) if m.get("encoders") != identity]
    if missing:
        raise StageFailed(f"embed: shards {missing} have no matching done marker after the run")
    counts = {k: sum(int(m["counts"].get(k, 0)) for m in markers) for k in COUNT_KEYS}  # older markers lack new keys
    nbytes = sum(int(m["npz_bytes"]) for m in markers)
    dims = markers[0]["dims"]
    rule = split_rule([npz_uri(out_shards, s["shard"]) for s in sources], counts["n_embedded"],
                      cfg.holdout_fraction, cfg.holdout_min, cfg.holdout_max_fraction)
    # Encoder locations as absolute paths: sampling reloads them from any working directory.
    doc = EncodersDoc(
        identity=identity, clip={"model": absolute_location(cfg.clip.model), "pretrained": cfg.clip.pretrained},
        t5={"model": absolute_location(cfg.t5.model), "max_length": cfg.t5.max_length}, **dims,
        clip_preprocess=pp, shards=[{"shard": s["shard"], "size": s["size"]} for s in sources],
        counts=counts, holdout=rule.to_doc(cfg.holdout_fraction, cfg.holdout_min, cfg.holdout_max_fraction,
                                           counts["n_embedded"]))
    enc_uri = write_encoders_doc(out_uri, doc)
    return {"counts": {**counts, "shards": len(sources), "shards_embedded_now": len(embedded_now),
                       "n_holdout": rule.count, "n_train": counts["n_embedded"] - rule.count},
            "metrics": {**{k: float(v) for k, v in dims.items()}, "npz_bytes_total": float(nbytes),
                        "bytes_per_sample": nbytes / max(1, counts["n_embedded"]),
                        "holdout_fraction": rule.fraction},
            "dims": dims, "embedded_now": embedded_now, "encoders_uri": enc_uri}


def absolute_location(model: str) -> str:
    """``tiny:./runs/_encoders`` -> ``tiny:/abs/runs/_encoders``; a relative local directory ->
    its absolute path; hub names and URIs unchanged."""
    prefix = "tiny:" if model.startswith("tiny:") else ""
    path = model[len(prefix):]
    if "://" in path or not (prefix or path.startswith(".") or os.path.isdir(path)):
        return model
    return prefix + os.path.abspath(path)


def run(cfg: EmbedConfig, ctx: StageContext) -> StageResult:
    shards_uri = ctx.input_output("download", "shards")
    total = len(list_sources(shards_uri))
    t0, done = time.perf_counter(), {"shards": 0, "rows": 0}

    def live(marker: dict) -> None:  # the driver's progress line: shards done/total, rows/s
        done["shards"] += 1
        done["rows"] += int(marker["counts"]["n_total"])
        rate = done["rows"] / max(time.perf_counter() - t0, 1e-9)
        ctx.report(done=done["shards"], total=total, unit="shards", rows_per_s=rate)
    # The list's extra columns (LAION similarity, punsafe, ...) travel into the embedding shards.
    columns = ((ctx.inputs.get("download", {}).get("config") or {}).get("save_additional_columns") or ())
    s = embed_shards(shards_uri, ctx.out_uri, cfg, executor=ctx.executor, progress=ctx.progress, on_shard_done=live,
                     columns=tuple(columns))
    landed = (ctx.inputs.get("download", {}).get("counts") or {}).get("successes")
    if landed is not None and int(landed) != s["counts"]["n_total"]:
        raise StageFailed(f"embed: read {s['counts']['n_total']} samples from the download shards but the download "
                          f"stage counted {landed} successes: samples were lost between the stages; re-run download")
    return StageResult(
        counts=s["counts"], metrics=s["metrics"],
        outputs={"shards": store.join(ctx.out_uri, layout.SHARDS), "encoders": s["encoders_uri"],
                 "clip_model": cfg.clip.model, "clip_pretrained": str(cfg.clip.pretrained),
                 "t5_model": cfg.t5.model})


def embed_offline(shards_uri: str, out_uri: str, cfg: EmbedConfig, executor: Executor | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """``t2i embed``: embed a shard folder outside a run, on ``executor`` (default: this process)."""
    from rich.progress import Progress

    n = len(list_sources(shards_uri))
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("embedding shards", total=n)
        msg = (lambda m: bar.console.log(m)) if progress else None
        hook = lambda marker: bar.advance(task)  # noqa: E731
        s = embed_shards(shards_uri, out_uri, cfg, executor=executor, progress=msg, on_shard_done=hook)
        bar.update(task, completed=n)
    return s


def load_encoders_for(embed_out_uri: str, device: Any = None) -> tuple[Encoders, EncodersDoc]:
    """Reload the encoders an embedding set was made with (sampling encodes new prompts with them)."""
    doc = read_encoders_doc(embed_out_uri)
    if doc is None:
        raise StageFailed(f"{embed_out_uri} holds no {layout.ENCODERS}: not a finished embedding")
    cfg = EmbedConfig(clip=doc.clip_config(), t5=doc.t5_config(), image_size=(doc.identity or {}).get("image_size"))
    return load_encoders(cfg, device=device), doc


def find_compatible_embedding(out_uri: str, shards_uri: str, cfg: EmbedConfig) -> bool:
    """True if ``out_uri`` holds a complete embedding of exactly these shards with these encoders."""
    doc = read_encoders_doc(out_uri)
    if doc is None:
        return False
    identity = embed_identity(cfg)
    if doc.identity != identity:
        return False
    try:
        sources = list_sources(shards_uri)
    except StageFailed:
        return False
    if doc.shards != [{"shard": s["shard"], "size": s["size"]} for s in sources]:
        return False
    held = doc.holdout or {}
    if (held.get("requested_fraction"), held.get("min"), held.get("max_fraction")) != (
            cfg.holdout_fraction, cfg.holdout_min, cfg.holdout_max_fraction):
        return False  # another split: training would read other samples
    return all(is_done(store.join(out_uri, layout.SHARDS), s, identity) for s in sources)

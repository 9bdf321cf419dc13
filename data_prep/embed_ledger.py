"""Embed stage, step 3, and its ledger: what is written where, and what counts as done.

Per download shard ``NNNNN.tar`` the stage writes ``shards/NNNNN.npz`` then
``shards/NNNNN.done.json`` (written last: a crash never leaves a shard looking done); encoder
workers write chunk parts under ``shards/_parts/NNNNN/`` first, joined in chunk order by
:func:`finalize_from_parts`. A shard whose done marker matches the encoders is skipped, so a
re-run starts at the first unfinished shard (levanter's shard ledger). ``encoders.json`` says
which encoders made the set; :func:`read_encoders_doc` is its one reader.
"""
from __future__ import annotations

from typing import Any

from data_prep.embed_format import EmbeddingShard, write_embedding_shard
from data_prep.encoders import encoder_identity
from data_prep.shards import list_shards, shard_id
from pipeline import layout, store
from pipeline.context import StageFailed

COUNT_KEYS = ("n_total", "n_embedded", "n_bad_image", "n_missing_caption", "n_nonfinite", "n_null_caption",
              "n_empty_caption", "n_truncated_clip", "n_truncated_t5")


def npz_uri(out_shards_uri: str, name: str) -> str:
    return store.join(out_shards_uri, f"{name}.npz")


def done_uri(out_shards_uri: str, name: str) -> str:
    return store.join(out_shards_uri, f"{name}.done.json")


def embed_identity(cfg: Any) -> dict[str, Any]:
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


def encoders_doc_uri(embed_uri: str) -> str:
    return store.join(embed_uri, layout.ENCODERS)


def write_encoders_doc(embed_uri: str, doc: dict[str, Any]) -> str:
    uri = encoders_doc_uri(embed_uri)
    store.write_json(uri, doc)
    return uri


def read_encoders_doc(embed_uri: str) -> dict[str, Any] | None:
    """The embed stage's ``encoders.json`` (which encoders, their dims, preprocess), or None."""
    uri = encoders_doc_uri(embed_uri)
    return store.read_json(uri) if store.exists(uri) else None

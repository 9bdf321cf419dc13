"""Embed stage, step 3, and its ledger: what is written where, and what counts as done.

Per download shard ``NNNNN.tar`` the stage writes ``shards/NNNNN.npz`` then
``shards/NNNNN.done.json`` (written last: a crash never leaves a shard looking done); encoder
workers write chunk parts under ``shards/_parts/NNNNN/`` first, joined in chunk order by
:func:`finalize_from_parts`. A shard whose done marker matches the encoders is skipped, so a
re-run starts at the first unfinished shard (levanter's shard ledger). ``encoders.json``
(which encoders made the set) has its own home, data_prep/encoders_doc.py.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from data_prep.embed_format import EmbeddingShard, read_embedding_shard, write_embedding_shard
from data_prep.encoders import encoder_identity
from data_prep.shards import is_shard_name, list_shards, shard_id
from pipeline import layout, store
from pipeline.context import StageFailed

COUNT_KEYS = ("n_total", "n_embedded", "n_bad_image", "n_missing_caption", "n_nonfinite", "n_null_caption",
              "n_empty_caption", "n_truncated_clip", "n_truncated_t5")


def npz_uri(out_shards_uri: str, name: str) -> str:
    return layout.shard_file(out_shards_uri, name, layout.EMBED_NPZ)


def done_uri(out_shards_uri: str, name: str) -> str:
    return layout.shard_file(out_shards_uri, name, layout.EMBED_DONE)


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
    return store.join(out_shards_uri, layout.EMBED_PARTS, name, f"{chunk:05d}{layout.EMBED_NPZ}")


def finalize_from_parts(out_shards_uri: str, source: dict[str, Any], counts: list[dict[str, int]],
                        identity: dict[str, Any], max_bad_fraction: float) -> dict[str, Any]:
    """finalize_shard over the part files of ``counts`` (chunk order), then delete the parts."""
    name = source["shard"]
    parts = [read_embedding_shard(part_uri(out_shards_uri, name, i)) for i in range(len(counts))]
    marker = finalize_shard(out_shards_uri, source, parts, counts, identity, max_bad_fraction)
    store.remove(store.join(out_shards_uri, layout.EMBED_PARTS, name))
    return marker


def list_sources(shards_uri: str) -> list[dict[str, Any]]:
    """The download shards (``NNNNN.tar``) under ``shards_uri`` with their sizes, from one listing
    (not one size request per shard: 20,000 round trips on an object store)."""
    srcs = [{"shard": shard_id(uri), "uri": uri, "size": size} for uri, size in _tars_with_sizes(shards_uri)]
    srcs.sort(key=lambda s: s["uri"])
    _scan[0] += 1   # the is_done calls after this listing are one scan (see _markers)
    if not srcs:
        raise StageFailed(f"no download shards (NNNNN.tar) found under {shards_uri}")
    return srcs


def _tars_with_sizes(shards_uri: str) -> list[tuple[str, int]]:
    """(uri, size) of the shard tars directly under ``shards_uri``: one listing. A local folder
    is scanned directly (fsspec's detailed listing stats and re-parses every entry, the stats
    files included: 2 x 20,000 for 20,000 shards)."""
    local = store.local_path(shards_uri)
    if local is not None:
        try:
            with os.scandir(local) as it:
                return [("file://" + e.path, e.stat().st_size) for e in it
                        if e.name.endswith(layout.SHARD_TAR) and e.is_file() and is_shard_name(e.name)]
        except FileNotFoundError:
            return []
    fs, path = store.fs_and_path(shards_uri)
    prefix = shards_uri.split("://", 1)[0] + "://"
    try:
        entries = store.with_retries(lambda: fs.ls(path, detail=True), what=f"list {shards_uri}")
    except FileNotFoundError:
        return []
    return [(prefix + e["name"].rstrip("/"), int(e.get("size") or 0)) for e in entries
            if e.get("type") == "file" and e["name"].endswith(layout.SHARD_TAR) and is_shard_name(e["name"])]


# A resume asks is_done of every shard in turn. Each question used to cost 2 existence checks and
# a read (60,000 round trips at 20,000 shards); now one listing of the output folder answers the
# "not there" cases and one batched read (concurrent on an object store) fetches every marker.
# The snapshot serves the is_done calls that follow one list_sources call (a scan: embed's todo
# list, find_compatible_embedding), for at most _LEDGER_TTL_S; the next list_sources starts a new
# scan. Staleness can only say "not done" of a shard finished since (embedded again: safe): a
# marker never changes for an identity (another identity is another attempt folder).
_LEDGER_TTL_S = 10.0
_scan = [0]
_ledger: dict[str, tuple[int, float, dict[str, Any]]] = {}


def _markers(out_shards_uri: str) -> dict[str, Any]:
    hit = _ledger.get(out_shards_uri)
    if hit is not None and hit[0] == _scan[0] and time.monotonic() - hit[1] < _LEDGER_TTL_S:
        return hit[2]
    names = {u.rsplit("/", 1)[-1] for u in store.listdir(out_shards_uri)}
    done = [n[: -len(layout.EMBED_DONE)] for n in names if n.endswith(layout.EMBED_DONE)]
    paths = [store.fs_and_path(done_uri(out_shards_uri, s))[1] for s in sorted(done) if s + layout.EMBED_NPZ in names]
    raw: dict[str, bytes] = {}
    if store.local_path(out_shards_uri) is not None:   # plain reads: no URL parsing per file
        for p in paths:
            try:
                with open(p, "rb") as f:
                    raw[p] = f.read()
            except FileNotFoundError:
                continue
    elif paths:                                         # concurrent GETs on an object store
        fs, _ = store.fs_and_path(out_shards_uri)
        raw = store.with_retries(lambda: fs.cat(paths, on_error="omit"), what=f"read done markers under {out_shards_uri}")
    markers = {}
    for p, data in raw.items():
        try:
            markers[p.rstrip("/").rsplit("/", 1)[-1][: -len(layout.EMBED_DONE)]] = json.loads(data)
        except ValueError:
            continue   # an unreadable marker is not a finished shard
    _ledger[out_shards_uri] = (_scan[0], time.monotonic(), markers)
    return markers


def is_done(out_shards_uri: str, src: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether ``src``'s embedding is finished for ``identity`` (npz and matching done marker)."""
    m = _markers(out_shards_uri).get(src["shard"])
    return m is not None and m.get("encoders") == identity and m.get("source_size") == src["size"]

"""Reading the download stage's webdataset shards (img2dataset output) over any fsspec URI.

A shard ``NNNNN.tar`` holds, per sample, ``{key}.jpg`` + ``{key}.txt`` (caption) + ``{key}.json``
(img2dataset metadata), contiguous in the tar. Next to it img2dataset writes ``NNNNN_stats.json``
(counts and error strings) and ``NNNNN.parquet`` (metadata of every row, failures included).

This reader uses :mod:`tarfile` directly rather than ``webdataset``: importing webdataset pulls
in torch (a second of start-up per process), and we want an explicit, documented policy for
broken tars instead of webdataset's warn-and-continue handlers.

Truncated or corrupt tar policy (``iter_shard``): every *complete* sample before the damage is
yielded, then, by default, :class:`ShardCorruptError` is raised naming the shard and how many
samples were read. With ``on_corrupt="stop"`` the iterator ends quietly instead and the damage is
recorded in the ``counts`` dict the caller passed (``corrupt_shards``, ``incomplete_samples``).
Samples without an image member are skipped and counted as ``incomplete_samples``.
"""
from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from pipeline import layout, store

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    key: str  # img2dataset key, e.g. "000010042" (shard id digits + index digits)
    image_bytes: bytes  # the encoded image exactly as stored (JPEG for the download stage)
    caption: str | None  # None when the shard has no .txt member for this key, or the list's caption was null
    meta: dict[str, Any] = field(default_factory=dict)  # the parsed .json member ({} if absent)
    image_ext: str = "jpg"


class ShardCorruptError(RuntimeError):
    """A shard could not be read to its end (truncated upload, bit rot, not a tar)."""


def shard_id(uri: str) -> str:
    """``.../00042.tar`` (or ``00042_stats.json``, ``00042.parquet``, ``00042.npz``) -> ``"00042"``."""
    base = posixpath.basename(uri.rstrip("/"))
    stem = base.split(".", 1)[0]
    if stem.endswith("_stats"):
        stem = stem[: -len("_stats")]
    if not stem.isdigit():
        raise ValueError(f"not a shard file name (expected NNNNN.tar): {uri!r}")
    return stem


def list_shards(shards_uri: str) -> list[str]:
    """Sorted URIs of the ``*.tar`` shards directly under ``shards_uri`` (empty if none)."""
    return sorted(u for u in store.glob(store.join(shards_uri, "*" + layout.SHARD_TAR)) if is_shard_name(u))


def is_shard_name(uri: str) -> bool:
    """Whether a file name is an img2dataset shard (NNNNN.tar), not another tar."""
    try:
        shard_id(uri)
        return True
    except ValueError:
        return False


def read_shard_stats(shards_uri: str) -> dict[str, dict[str, Any]]:
    """``{"00000": stats, ...}`` from img2dataset's ``NNNNN_stats.json`` files under ``shards_uri``."""
    out = {}
    for u in store.glob(store.join(shards_uri, "*" + layout.SHARD_STATS)):
        out[shard_id(u)] = store.read_json(u)
    return dict(sorted(out.items()))


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def _make_sample(key: str, parts: dict[str, bytes], counts: dict[str, int] | None) -> Sample | None:
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None:
        if counts is not None:
            counts["incomplete_samples"] = counts.get("incomplete_samples", 0) + 1
        return None
    caption = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
    meta = json.loads(parts["json"]) if "json" in parts else {}
    if caption == "" and "caption" in meta and meta["caption"] is None:
        caption = None  # img2dataset writes a null caption as an empty .txt; its json keeps the null
    return Sample(key=key, image_bytes=parts[img_ext], caption=caption, meta=meta, image_ext=img_ext)


def iter_shard(
    uri: str,
    *,
    on_corrupt: Literal["raise", "stop"] = "raise",
    counts: dict[str, int] | None = None,
) -> Iterator[Sample]:
    """Stream the samples of one shard in tar order (see the module docstring for the policy on
    damaged shards). ``counts``, if given, is updated in place."""
    if on_corrupt not in ("raise", "stop"):
        raise ValueError(f"on_corrupt must be 'raise' or 'stop', got {on_corrupt!r}")
    n = 0
    cur_key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with store.open_uri(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                data = tar.extractfile(member).read()
                if key != cur_key:
                    if cur_key is not None:
                        s = _make_sample(cur_key, parts, counts)
                        if s is not None:
                            n += 1
                            yield s
                    cur_key, parts = key, {}
                parts[ext] = data
        if cur_key is not None:
            s = _make_sample(cur_key, parts, counts)
            if s is not None:
                n += 1
                yield s
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        # The pending sample may be cut short; it is dropped, never yielded half-read.
        if counts is not None:
            counts["corrupt_shards"] = counts.get("corrupt_shards", 0) + 1
            if cur_key is not None:
                counts["incomplete_samples"] = counts.get("incomplete_samples", 0) + 1
        if on_corrupt == "raise":
            raise ShardCorruptError(
                f"shard {uri} is truncated or corrupt: read {n} complete samples before "
                f"{type(e).__name__}: {e}"
            ) from e


def count_samples(uri: str) -> int:
    """Samples (members with an image) in one ``.tar`` shard, or summed over every shard under a
    folder. Reads the tars (authoritative); raises ShardCorruptError on a damaged shard."""
    uris = [uri] if uri.endswith(layout.SHARD_TAR) else list_shards(uri)
    total = 0
    for u in uris:
        for _ in iter_shard(u):
            total += 1
    return total


def count_tar_samples(uri: str) -> int:
    """Samples (distinct keys with an image member) in one ``.tar``, from its member headers only:
    the tar is opened seekable, so image bytes are skipped, not read (the download stage checks
    every shard it wrote against img2dataset's stats this way). Raises ShardCorruptError."""
    keys: set[str] = set()
    try:
        with store.open_uri(uri, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = _split_name(member.name)
                    if ext in IMAGE_EXTS:
                        keys.add(key)
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ShardCorruptError(f"shard {uri} is truncated or corrupt: {type(e).__name__}: {e}") from e
    return len(keys)

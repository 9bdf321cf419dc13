"""Retry only what failed: the rows of a finished img2dataset pass whose download failed for a
transient reason (data_prep.download_verify.retryable), plus every row of its shards that did
not finish, written as a new URL list that the next pass downloads into new shards after the
existing ones (img2dataset's ``incremental_mode: extend``). Nothing that succeeded is fetched
again, and nothing rejected for what it is (a 404, an icon, a bomb) is asked for twice.
"""
from __future__ import annotations

import math
import os

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.download_verify import Pass, drop_unfinished, retryable
from data_prep.shards import read_shard_stats
from pipeline import store


def _list_shards(list_folder: str, per_shard: int) -> list[tuple[str, int, int]]:
    """(file, first row, rows) of every shard img2dataset cuts a list folder into (files sorted,
    each cut into per_shard-row shards), in shard order."""
    out = []
    for name in sorted(f for f in os.listdir(list_folder) if f.endswith(".parquet")):
        path = os.path.join(list_folder, name)
        n = pq.ParquetFile(path).metadata.num_rows
        out += [(path, k * per_shard, min(per_shard, n - k * per_shard)) for k in range(math.ceil(n / per_shard))]
    return out


def build_retry_list(shards_uri: str, done: Pass, list_folder: str, per_shard: int, columns: list[str],
                     out_folder: str) -> list[int]:
    """Write the rows of pass ``done`` worth fetching again to ``out_folder/00000.parquet``
    (columns url, caption, then ``columns``); returns the new pass's rows per shard ([] if none)."""
    keep = ["url", "caption", *columns]
    parts: list[pa.Table] = []
    unfinished = set(drop_unfinished(shards_uri, done.ids()))
    layout = _list_shards(list_folder, per_shard)
    for s in done.ids():
        if s in unfinished:  # nothing of it landed: all its rows, from the list it was cut from
            path, first, n = layout[int(s) - done.first_id]
            parts.append(pq.read_table(path, columns=keep).slice(first, n))
            continue
        with store.open_uri(store.join(shards_uri, f"{s}.parquet"), "rb") as f:
            t = pq.read_table(f, columns=[*keep, "status", "error_message"])
        mask = [retryable(a, b or "") for a, b in zip(t["status"].to_pylist(), t["error_message"].to_pylist())]
        if any(mask):
            parts.append(t.filter(pa.array(mask)).select(keep))
    if not parts:
        return []
    table = pa.concat_tables(parts, promote_options="permissive")
    os.makedirs(out_folder, exist_ok=True)
    pq.write_table(table, os.path.join(out_folder, "00000.parquet"))
    n = table.num_rows
    return [min(per_shard, n - k * per_shard) for k in range(math.ceil(n / per_shard))]


def next_first_id(shards_uri: str) -> int:
    """The shard id img2dataset's extend mode starts from: one past the highest finished shard."""
    return max((int(s) for s in read_shard_stats(shards_uri)), default=-1) + 1

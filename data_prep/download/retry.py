"""Retry only what failed: the rows of a finished img2dataset pass whose download failed for a
transient reason (data_prep.download.verify.retryable), plus every row of its shards that did
not finish, written as a new URL list that the next pass downloads into new shards after the
existing ones (img2dataset's ``incremental_mode: extend``). Nothing that succeeded is fetched
again, and nothing rejected for what it is (a 404, an icon, a bomb) is asked for twice.
"""
from __future__ import annotations

import math
import os

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.download.verify import Pass, drop_unfinished, retryable
from data_prep.shards import read_shard_stats
from pipeline import layout, store


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
    slices = _list_shards(list_folder, per_shard)
    for s in done.ids():
        if s in unfinished:  # nothing of it landed: all its rows, from the list it was cut from
            path, first, n = slices[int(s) - done.first_id]
            parts.append(pq.read_table(path, columns=keep).slice(first, n))
            continue
        with store.open_uri(layout.shard_file(shards_uri, s, layout.SHARD_PARQUET), "rb") as f:
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


# What a later resume needs, kept with the stage's output (small next to the shards): the
# normalised list of every pass (to find the rows of a shard that did not finish) and the passes.
STATE = layout.DOWNLOAD_STATE


def _pass_dict(p: Pass) -> dict:
    return {"first_id": p.first_id, "rows_per_shard": list(p.rows_per_shard)}


def _upload(folder: str, uri: str) -> None:
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            store.write_bytes_atomic(store.join(uri, name), f.read())


def save_list(out_uri: str, list_folder: str, list_counts: dict[str, int], first: Pass) -> dict:
    """Keep the first pass's normalised list under ``<out>/url_list/pass0`` and start the state."""
    store.remove(store.join(out_uri, layout.URL_LIST))
    _upload(list_folder, layout.url_list_pass(out_uri, 0))
    state: dict = {"list_counts": dict(list_counts), "passes": []}
    save_pass(out_uri, state, None, first)
    return state


def save_pass(out_uri: str, state: dict, list_folder: str | None, p: Pass) -> None:
    """Record a pass (and upload its list, unless it is the first pass's, already kept)."""
    n = len(state["passes"])
    if list_folder is not None and n > 0:
        _upload(list_folder, layout.url_list_pass(out_uri, n))
    state["passes"].append(_pass_dict(p))
    store.write_json(store.join(out_uri, STATE), {k: v for k, v in state.items() if k != "log_tail"})


def load_state(out_uri: str) -> dict | None:
    uri = store.join(out_uri, STATE)
    return store.read_json(uri) if store.exists(uri) else None


def fetch_list(out_uri: str, n: int, folder: str) -> str:
    """Pass ``n``'s normalised list, copied to a local folder (img2dataset and pyarrow read it there)."""
    os.makedirs(folder, exist_ok=True)
    src = layout.url_list_pass(out_uri, n)
    for uri in store.glob(store.join(src, "*.parquet")):
        with open(os.path.join(folder, uri.rsplit("/", 1)[-1]), "wb") as f:
            f.write(store.read_bytes(uri))
    return folder

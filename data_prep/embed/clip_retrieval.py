"""``t2i export RUN --embeddings``: a run's CLIP embeddings in clip-retrieval's layout.

Why this layout: it is what the tools around CLIP embeddings read. autofaiss builds kNN indexes
from it, DALLE2-pytorch trains its diffusion prior from it, and embedding-reader (which both use)
streams it in order: ``file_format="parquet_npy"`` pairs ``img_emb/*.npy`` with
``metadata/*.parquet`` by their sorted position. So every file of a shard carries that shard's
own 5-digit number::

    OUT/img_emb/img_emb_NNNNN.npy           [N, Dc] float16: the npz's ``clip_image``, as stored
    OUT/text_emb/text_emb_NNNNN.npy         [N, Dc] float16: the npz's ``clip_text``, as stored
    OUT/metadata/metadata_NNNNN.parquet     N rows, the same order
    OUT/_EXPORT.json                        written last: rows, shards, dims, source attempts

Metadata columns: ``key`` (the sample's key, the join with the download tar and the npz),
``caption`` (the caption as the download stage stored it; the text embedding is of it, stripped),
``url`` (where the image came from), then each of the download list's kept additional columns
(``download.save_additional_columns``: similarity, punsafe, ...), decoded from the npz's JSON.
Rows are the npz's: only the samples that embedded, in tar order. Lexical file order is shard
order, and each metadata file pairs with the npy of the same number.

Every file is written atomically and ``_EXPORT.json`` is removed first and written last, so a
partial export never looks complete. A shard in which nothing embedded gets no files at all:
embedding-reader skips empty npy files but not their parquet, which would misalign the rest.
Files of an earlier export into the same folder that this one did not write are removed.
"""
from __future__ import annotations

import io
import json
import re
from typing import Any, Callable

import numpy as np

from data_prep.embed_format import EmbeddingFormatError, read_embedding_shard
from data_prep.shards import is_shard_name, shard_id
from pipeline import layout, store
from pipeline import manifest as mf

IMG_EMB, TEXT_EMB, METADATA = "img_emb", "text_emb", "metadata"
SUMMARY = "_EXPORT.json"
BASE_COLUMNS = ("key", "caption", "url")
_OURS = re.compile(r"^(img_emb|text_emb|metadata)_\d+\.(npy|parquet)$")


def matching_download(run_uri: str, embed_attempt: str) -> str | None:
    """The download attempt this embed attempt read (its manifest records the download's output
    id), or None where the manifest does not say or no attempt of the run has that id."""
    wanted = ((mf.read_manifest(embed_attempt) or {}).get("inputs") or {}).get("download")
    if not wanted:
        return None
    for _, uri in layout.list_attempts(run_uri, "download"):
        if (mf.read_manifest(uri) or {}).get("output_id") == wanted:
            return uri
    return None


def _shard_ids(embed_shards: str) -> list[str]:
    uris = store.glob(store.join(embed_shards, "*" + layout.EMBED_NPZ))
    return sorted(shard_id(u) for u in uris if is_shard_name(u))


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)  # C order: embedding-reader reads raw rows
    return buf.getvalue()


def _read_base_columns(parquet_uri: str) -> dict[str, tuple[Any, Any]]:
    """key -> (caption, url) from img2dataset's per-shard parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq  # heavy: only when exporting

    if not store.exists(parquet_uri):
        raise EmbeddingFormatError(f"download shard parquet {parquet_uri} is missing: it holds the captions and "
                                   "urls of the shard's samples")
    t = pq.read_table(pa.BufferReader(store.read_bytes(parquet_uri)), columns=list(BASE_COLUMNS)).to_pydict()
    return {str(k): (c, u) for k, c, u in zip(t["key"], t["caption"], t["url"]) if k is not None}


def _column(values: list[Any]):
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types (a number here, a string there)
        return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())


def _metadata_bytes(shard, base: dict[str, tuple[Any, Any]], shard_name: str, parquet_uri: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [str(k) for k in shard.keys]
    missing = [k for k in keys if k not in base]
    if missing:
        raise EmbeddingFormatError(
            f"shard {shard_name}: embedded key {missing[0]!r} is not in {parquet_uri} ({len(missing)} keys missing): "
            "the embedding and the download shard do not belong together; re-run embed (t2i rerun RUN --from embed)")
    cols: dict[str, Any] = {"key": pa.array(keys, type=pa.string()),
                            "caption": pa.array([base[k][0] for k in keys], type=pa.string()),
                            "url": pa.array([base[k][1] for k in keys], type=pa.string())}
    for name in sorted(shard.columns):
        if name in cols:
            raise EmbeddingFormatError(f"shard {shard_name}: additional column {name!r} clashes with the metadata's "
                                       f"own {list(BASE_COLUMNS)}")
        cols[name] = _column([json.loads(str(v)) for v in shard.columns[name]])
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


def export_clip_retrieval(embed_attempt: str, download_attempt: str, out_uri: str,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``embed_attempt``'s CLIP embeddings with ``download_attempt``'s captions and urls to
    ``out_uri`` in clip-retrieval's layout (module docstring); returns the ``_EXPORT.json`` summary."""
    embed_shards = store.join(embed_attempt, layout.SHARDS)
    download_shards = store.join(download_attempt, layout.SHARDS)
    names = _shard_ids(embed_shards)
    if not names:
        raise EmbeddingFormatError(f"{embed_shards} holds no embedding shards (NNNNN{layout.EMBED_NPZ})")
    store.remove(store.join(out_uri, SUMMARY))  # from here until the end, the folder is not a complete export
    written: set[str] = set()
    rows, empty, dims, columns = 0, [], None, None
    for name in names:
        shard = read_embedding_shard(layout.shard_file(embed_shards, name, layout.EMBED_NPZ))
        if len(shard) == 0:
            empty.append(name)
            continue
        parquet_uri = layout.shard_file(download_shards, name, layout.SHARD_PARQUET)
        meta = _metadata_bytes(shard, _read_base_columns(parquet_uri), name, parquet_uri)
        d = {"img_emb": int(shard.clip_image.shape[1]), "text_emb": int(shard.clip_text.shape[1])}
        if dims is not None and d != dims:
            raise EmbeddingFormatError(f"shard {name} has embedding widths {d}, earlier shards {dims}")
        cols = [*BASE_COLUMNS, *sorted(shard.columns)]
        if columns is not None and cols != columns:
            raise EmbeddingFormatError(f"shard {name} has metadata columns {cols}, earlier shards {columns}")
        dims, columns = d, cols
        for folder, data in ((IMG_EMB, _npy_bytes(shard.clip_image)), (TEXT_EMB, _npy_bytes(shard.clip_text)),
                             (METADATA, meta)):
            fname = f"{folder}_{name}.{'parquet' if folder == METADATA else 'npy'}"
            store.write_bytes_atomic(store.join(out_uri, folder, fname), data)
            written.add(store.join(folder, fname))
        rows += len(shard)
        if progress:
            progress(f"export: shard {name}: {len(shard)} rows")
    if not rows:
        raise EmbeddingFormatError(f"no sample of {embed_shards} embedded: nothing to export")
    for folder in (IMG_EMB, TEXT_EMB, METADATA):  # an earlier export's files would be read as ours
        for uri in store.glob(store.join(out_uri, folder, "*")):
            base = uri.rstrip("/").rsplit("/", 1)[-1]
            if _OURS.match(base) and store.join(folder, base) not in written:
                store.remove(uri)
    summary = {"format": "clip-retrieval", "rows": rows, "shards": len(names) - len(empty),
               "shard_ids": [n for n in names if n not in empty], "empty_shards": empty, "dims": dims,
               "dtype": "float16", "metadata_columns": columns,
               "source": {"embed": embed_attempt, "download": download_attempt}}
    store.write_json(store.join(out_uri, SUMMARY), summary)
    return summary

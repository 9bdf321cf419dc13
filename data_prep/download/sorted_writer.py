"""img2dataset's webdataset shard writer, made reproducible: a shard's samples in key order,
whatever order the download threads finish in, with fixed tar metadata.

img2dataset writes each sample the moment its thread finishes it, so two downloads of one list
give tars (and per-shard parquets) holding the same samples in different orders, with the write
time in every tar header; the embedding rows, the batches and every weight trained after them
then differ (issue 26). This writer spools the image bytes to a local temp file as they come (a
10,000-sample shard of 1024 px JPEGs is gigabytes: not kept in memory) and keeps only the small
per-sample fields in memory; ``close`` writes the tar in key order with mtime 0 and the parquet
in key order. Same samples -> same bytes. Local disk only: no extra store traffic.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import webdataset as wds
from img2dataset.writer import BufferedParquetWriter

import fsspec


class SortedWebDatasetSampleWriter:
    """Same constructor and calls as ``img2dataset.writer.WebDatasetSampleWriter``."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        shard_name = f"{shard_id:0{oom_shard_count}d}"
        self.shard_id = shard_id
        self.fs, path = fsspec.core.url_to_fs(output_folder)
        self.tar_path = f"{path}/{shard_name}.tar"
        self.parquet_uri = output_folder + "/" + shard_name + ".parquet"
        self.schema, self.save_caption, self.encode_format = schema, save_caption, encode_format
        self.spool = tempfile.TemporaryFile(prefix=f"t2i-shard-{shard_name}-")
        self.samples: dict[str, tuple[int, int, str | None, str]] = {}  # key -> (offset, size, caption, json)
        self.metas: list[dict] = []

    def write(self, img_str, key, caption, meta):
        for k, v in meta.items():  # some metadata is not JSON serializable (as img2dataset's writer does)
            if isinstance(v, np.ndarray):
                meta[k] = v.tolist()
        if img_str is not None:
            offset = self.spool.seek(0, os.SEEK_END)
            self.spool.write(img_str)
            caption_text = (str(caption) if caption is not None else "") if self.save_caption else None
            self.samples[str(key)] = (offset, len(img_str), caption_text, json.dumps(meta, indent=4))
        self.metas.append(meta)

    def close(self):
        try:
            with self.fs.open(self.tar_path, "wb") as fd:
                tar = wds.TarWriter(fd, mtime=0.0, user="", group="")  # no write time, no user in the headers
                for key in sorted(self.samples):
                    offset, size, caption, meta_json = self.samples[key]
                    self.spool.seek(offset)
                    sample = {"__key__": key, self.encode_format: self.spool.read(size)}
                    if caption is not None:
                        sample["txt"] = caption
                    sample["json"] = meta_json
                    tar.write(sample)
                tar.close()
            parquet = BufferedParquetWriter(self.parquet_uri, self.schema, 100)
            for meta in sorted(self.metas, key=lambda m: str(m.get("key"))):
                parquet.write(meta)
            parquet.close()
        finally:
            self.spool.close()

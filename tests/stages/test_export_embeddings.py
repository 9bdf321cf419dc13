"""``t2i export RUN --embeddings``: the run's CLIP embeddings in clip-retrieval's layout
(data_prep/embed/clip_retrieval.py), read back with embedding-reader as autofaiss and
DALLE2-pytorch read it, row for row against the embed stage's npz shards."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_prep.embed.clip_retrieval import export_clip_retrieval, matching_download
from data_prep.embed_format import EmbeddingFormatError, read_embedding_shard
from pipeline import layout, store
from pipeline.run.planning import finished_attempt
from tests.support.cli import t2i

META = ["key", "caption", "url"]


def _attempts(run: str) -> tuple[str, str]:
    embed = finished_attempt(run, "embed")
    return embed, matching_download(run, embed) or finished_attempt(run, "download")


def _expected(embed: str, download: str) -> dict[str, list]:
    """Every embedded row in shard order: key, caption, url and both embeddings, from the npz
    shards and the download parquet."""
    rows: dict[str, list] = {"key": [], "caption": [], "url": [], "clip_image": [], "clip_text": []}
    for npz in store.glob(store.join(embed, layout.SHARDS, "*.npz")):
        shard = read_embedding_shard(npz)
        name = npz.rsplit("/", 1)[-1].split(".")[0]
        t = pq.read_table(io.BytesIO(store.read_bytes(
            layout.shard_file(store.join(download, layout.SHARDS), name, layout.SHARD_PARQUET)))).to_pydict()
        by_key = {k: (c, u) for k, c, u in zip(t["key"], t["caption"], t["url"])}
        rows["key"] += [str(k) for k in shard.keys]
        rows["caption"] += [by_key[str(k)][0] for k in shard.keys]
        rows["url"] += [by_key[str(k)][1] for k in shard.keys]
        rows["clip_image"].append(shard.clip_image)
        rows["clip_text"].append(shard.clip_text)
    rows["clip_image"] = np.concatenate(rows["clip_image"])
    rows["clip_text"] = np.concatenate(rows["clip_text"])
    return rows


def _read_back(out: str, folder: str) -> tuple[np.ndarray, dict[str, list]]:
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(f"{out}/{folder}", file_format="parquet_npy", meta_columns=META,
                             metadata_folder=f"{out}/metadata")
    embs, metas = [], []
    for emb, meta in reader(batch_size=5, show_progress=False):  # batches that straddle shards
        embs.append(emb)
        metas.append(meta)
    meta = {c: [x for m in metas for x in m[c]] for c in META}
    return np.concatenate(embs), meta


def _assert_same_rows(out: str, want: dict[str, list]) -> None:
    for folder, array in (("img_emb", "clip_image"), ("text_emb", "clip_text")):
        emb, meta = _read_back(out, folder)
        assert meta == {c: want[c] for c in META}
        assert want[array].dtype == np.float16
        # the reader upcasts what it reads; equal to the float16 values stored, bit for bit
        assert emb.dtype == np.float32 and np.array_equal(emb, want[array].astype(np.float32))


def test_export_embeddings_reads_back_row_for_row(smoke_run, tmp_path):
    cwd, run = smoke_run
    out = tmp_path / "clip"
    r = t2i("export", run, "--embeddings", "--out", out, cwd=cwd)
    assert r.code == 0, r.output
    want = _expected(*_attempts(run))
    assert f"exported {len(want['key'])} rows" in r.stdout and f"file://{out}" in r.stdout
    _assert_same_rows(str(out), want)
    # on disk: float16 as stored, one file per shard in each folder, each pairing by its number
    names = sorted(p.name for p in (out / "img_emb").iterdir())
    assert names and all(n.startswith("img_emb_") and len(n) == len("img_emb_00000.npy") for n in names)
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == [n.replace("img", "text") for n in names]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [
        n.replace("img_emb", "metadata").replace(".npy", ".parquet") for n in names]
    assert np.load(out / "img_emb" / names[0]).dtype == np.float16
    summary = json.loads((out / "_EXPORT.json").read_text())
    assert summary["rows"] == len(want["key"]) and summary["shards"] == len(names)
    assert summary["source"]["embed"] == _attempts(run)[0]


def _small_copy(smoke_cwd: Path, dest: Path) -> tuple[str, str]:
    """The smoke run's embed and download attempts, copied (they are small): (embed, download)."""
    embed, download = _attempts(f"file://{smoke_cwd}/runs/smoke")
    copies = []
    for uri in (embed, download):
        to = dest / uri.split("/runs/smoke/", 1)[1]
        shutil.copytree(store.local_path(uri), to)
        copies.append(f"file://{to}")
    return copies[0], copies[1]


def test_export_to_an_object_store_with_additional_columns(smoke_run, tmp_path, s3_bucket):
    """To s3:// (moto), with the download list's kept columns decoded from the npz's JSON; files
    an earlier export left there that this one does not write are removed."""
    from data_prep.embed_format import to_npz_bytes

    embed, download = _small_copy(smoke_run[0], tmp_path)
    for npz in store.glob(store.join(embed, layout.SHARDS, "*.npz")):  # as save_additional_columns: [similarity]
        shard = read_embedding_shard(npz)
        shard.columns = {"similarity": np.array([json.dumps(0.25 + i / 100) for i in range(len(shard))])}
        store.write_bytes_atomic(npz, to_npz_bytes(shard))
    out = store.join(s3_bucket, "exports", "clip")
    store.write_bytes_atomic(store.join(out, "img_emb", "img_emb_00099.npy"), b"stale")
    summary = export_clip_retrieval(embed, download, out)
    assert not store.exists(store.join(out, "img_emb", "img_emb_00099.npy"))
    assert summary["metadata_columns"] == [*META, "similarity"]
    want = _expected(embed, download)
    got: dict[str, list] = {"key": [], "similarity": []}
    for uri in store.glob(store.join(out, "metadata", "*.parquet")):
        t = pq.read_table(pa.BufferReader(store.read_bytes(uri))).to_pydict()
        got["key"] += t["key"]
        got["similarity"] += t["similarity"]
    assert got["key"] == want["key"] and all(isinstance(v, float) for v in got["similarity"])
    images = [np.load(io.BytesIO(store.read_bytes(u))) for u in store.glob(store.join(out, "img_emb", "*.npy"))]
    assert np.array_equal(np.concatenate(images), want["clip_image"]) and images[0].dtype == np.float16
    assert store.read_json(store.join(out, "_EXPORT.json"))["rows"] == len(want["key"])


def test_embedded_key_missing_from_the_download_parquet_is_an_error(smoke_run, tmp_path):
    embed, download = _small_copy(smoke_run[0], tmp_path)
    shard = read_embedding_shard(store.join(embed, layout.SHARDS, "00001.npz"))
    parquet = layout.shard_file(store.join(download, layout.SHARDS), "00001", layout.SHARD_PARQUET)
    t = pq.read_table(pa.BufferReader(store.read_bytes(parquet)))
    lost = str(shard.keys[1])
    buf = io.BytesIO()
    pq.write_table(t.filter(pc.not_equal(t["key"], lost)), buf)
    store.write_bytes_atomic(parquet, buf.getvalue())
    out = tmp_path / "out"
    with pytest.raises(EmbeddingFormatError, match=rf"shard 00001: embedded key '{lost}' is not in"):
        export_clip_retrieval(embed, download, f"file://{out}")
    assert not (out / "_EXPORT.json").exists()  # what was written before the error is not an export


def test_export_refuses_a_run_without_a_finished_embed_stage(smoke_run, tmp_path):
    """A run whose download finished but whose embed did not: one clear line, nothing written."""
    cwd, _ = smoke_run
    run = tmp_path / "runs" / "smoke"
    run.mkdir(parents=True)
    # the saved spec names its store: point it here, or the run it names is the smoke run itself
    spec = (cwd / "runs" / "smoke" / "spec.yaml").read_text()
    (run / "spec.yaml").write_text(spec.replace(str(cwd), str(tmp_path)))
    shutil.copytree(cwd / "runs" / "smoke" / "download", run / "download")
    r = t2i("export", "smoke", "--embeddings", "--out", "out", cwd=tmp_path)
    assert r.code != 0 and "no finished embed stage" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, expect", [
    (("--stage", "train_base", "--embeddings"), "exactly one of --stage STAGE"),
    ((), "exactly one of --stage STAGE"),
    (("--stage", "train_base", "--format", "clip-retrieval"), "clip-retrieval goes with --embeddings"),
])
def test_export_flag_mistakes_get_one_clear_line(tmp_path, args, expect):
    r = t2i("export", "RUN", *args, "--out", tmp_path / "out", cwd=tmp_path)
    assert r.code == 2 and expect in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()

"""URL lists as real datasets ship them, through real img2dataset on a loopback server, configured by the snippets of docs/data.md: LAION-style
parquet with metadata filters and extra columns kept, CC3M-style header-less TSV, JSON lines, and
a CSV whose caption column is not UTF-8 (rejected at validation naming the file and row, or decoded
with the declared encoding). Also: a tar holding fewer samples than img2dataset counted fails.
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from data_prep.download.stage import DownloadConfig, run
from data_prep.download.verify import summarize
from data_prep.http_server import DemoHTTPServer
from data_prep.shards import iter_shard, list_shards
from data_prep.download.url_list import prepare_url_list
from pipeline.context import StageContext, StageFailed

from tests.support.data import write_tar
from tests.support.specs import REPO
from tests.support.images import truth_rgb

N = 6


def _ctx(out_uri: str) -> StageContext:
    return StageContext(run_uri=out_uri.rsplit("/", 1)[0], out_uri=out_uri)


def _samples(result) -> list:
    return [s for u in list_shards(result.outputs["shards"]) for s in iter_shard(u)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lists")
    for i in range(N):
        buf = io.BytesIO()
        Image.fromarray(np.roll(truth_rgb(), 7 * i, axis=1)).save(buf, "JPEG")
        (root / f"{i}.jpg").write_bytes(buf.getvalue())
    with DemoHTTPServer(str(root)) as srv:
        yield srv, root


def _quick(**kw) -> dict:
    return dict(image_size=32, thread_count=4, timeout=3, allow_private_addresses=True, **kw)  # served on 127.0.0.1


def _documented_download(which: int) -> dict:
    """The ``download:`` section of docs/data.md's "Lists as they ship" yaml block ``which`` (0 LAION,
    1 CC3M): the tests run exactly what a user would copy."""
    import re

    import yaml

    doc = (REPO / "docs" / "data.md").read_text()
    section = doc.split("## Lists as they ship", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return yaml.safe_load(blocks[which])["download"]


# ---------------------------------------------------------------- non-UTF-8 captions


@pytest.fixture(scope="module")
def latin1_csv(server):
    srv, root = server
    lines = [b"url,caption"] + [f"{srv.url(f'{i}.jpg')},caption {i}".encode() for i in range(N)]
    lines[4] = f"{srv.url('3.jpg')},caf".encode() + b"\xe9 au lait"  # one latin-1 byte on data row 4
    path = root / "urls.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_non_utf8_caption_is_rejected_at_validation_naming_file_and_row(latin1_csv):
    with pytest.raises(ValidationError) as e:
        DownloadConfig(url_list=str(latin1_csv), **_quick())
    msg = str(e.value)
    assert "urls.csv: column 'caption' row 4 is not valid UTF-8" in msg and "caption_encoding" in msg
    with pytest.raises(ValidationError, match="unknown text encoding 'klingon'"):
        DownloadConfig(url_list=str(latin1_csv), caption_encoding="klingon")


def test_non_utf8_list_that_skipped_validation_fails_the_stage_not_silently(latin1_csv, tmp_path):
    """A remote list is checked when the stage reads it: same message, and the stage fails."""
    ok = tmp_path / "ok.csv"
    ok.write_text("url,caption\nhttp://127.0.0.1:1/x.jpg,x\n")
    cfg = DownloadConfig(url_list=str(ok), **_quick()).model_copy(update={"url_list": str(latin1_csv)})
    with pytest.raises(StageFailed, match=r"urls.csv: column 'caption' row 4 is not valid UTF-8"):
        run(cfg, _ctx(str(tmp_path / "run" / "download")))


@pytest.fixture(scope="module")
def latin1_download(latin1_csv, tmp_path_factory):
    cfg = DownloadConfig(url_list=str(latin1_csv), caption_encoding="latin-1", **_quick())
    out = str(tmp_path_factory.mktemp("run") / "download")
    return cfg, run(cfg, _ctx(out))


def test_declared_encoding_decodes_the_captions(latin1_download):
    cfg, result = latin1_download
    assert cfg.caption_encoding == "iso8859-1"
    assert result.counts["successes"] == N
    caps = sorted(s.caption for s in _samples(result))
    assert "café au lait" in caps and len(caps) == N


def test_tar_with_fewer_samples_than_the_stats_fails_naming_the_shard(latin1_download, tmp_path):
    _, result = latin1_download
    copy = tmp_path / "shards"
    shutil.copytree(result.outputs["shards"], copy)
    write_tar(copy / "00000.tar", [])  # what img2dataset leaves when its writer fails every row: an empty tar, stats say 6/6
    with pytest.raises(StageFailed, match=r"shard 00000: img2dataset counted 6 successes but its tar holds 0"):
        summarize(str(copy), [N], min_success_rate=0.5, elapsed=1.0)


# ---------------------------------------------------------------- LAION-style parquet, filters, extra columns


def test_laion_parquet_with_filters_and_extra_columns(server, tmp_path):
    srv, _ = server
    meta = {"similarity": [0.35, 0.20, 0.31, 0.30, 0.40, 0.29],
            "punsafe": [0.01, 0.02, 0.90, None, 0.10, 0.05],
            "pwatermark": [0.1, 0.1, 0.1, 0.1, 0.8, 0.2],
            "aesthetic": [6.1, 5.5, 6.0, 5.2, 5.9, 4.0]}
    table = pa.table({"URL": [srv.url(f"{i}.jpg") for i in range(N)], "TEXT": [f"laion {i}" for i in range(N)],
                      "WIDTH": [64] * N, **meta})
    path = tmp_path / "laion.parquet"
    pq.write_table(table, path)
    spec = _documented_download(0)
    assert spec["filters"] == {"similarity": {"min": 0.28}, "punsafe": {"max": 0.5}, "pwatermark": {"max": 0.5},
                               "aesthetic": {"min": 5.0}}
    cfg = DownloadConfig(**{**spec, "url_list": str(path)}, **_quick())
    result = run(cfg, _ctx(str(tmp_path / "run" / "download")))
    c = result.counts
    # row 1: similarity; row 2: punsafe; row 3: punsafe null; row 4: pwatermark; row 5: aesthetic
    assert (c["filtered_similarity"], c["filtered_punsafe"], c["filtered_pwatermark"], c["filtered_aesthetic"]) == \
        (1, 2, 1, 1)
    assert c["rows_in_list"] == N and c["total"] == 1 and c["successes"] == 1
    (s,) = _samples(result)
    assert s.caption == "laion 0" and s.meta["similarity"] == pytest.approx(0.35)
    assert s.meta["punsafe"] == pytest.approx(0.01) and s.meta["aesthetic"] == pytest.approx(6.1)

    with pytest.raises(ValidationError, match="filters: column 'clip_score' not found"):
        DownloadConfig(url_list=str(path), url_col="URL", caption_col="TEXT", filters={"clip_score": {"min": 1}})
    with pytest.raises(ValidationError, match=r"filters.TEXT: column 'TEXT' .* is string, not a number"):
        DownloadConfig(url_list=str(path), url_col="URL", caption_col="TEXT", filters={"TEXT": {"min": 1}})
    with pytest.raises(ValidationError, match="give min, max or both"):
        DownloadConfig(url_list=str(path), url_col="URL", caption_col="TEXT", filters={"similarity": {}})
    with pytest.raises(ValidationError, match="written by img2dataset itself"):
        DownloadConfig(save_additional_columns=["status"])


# ---------------------------------------------------------------- CC3M-style TSV, JSON lines


def test_cc3m_headerless_tsv(server, tmp_path):
    srv, _ = server
    caps = [f'a "quoted" photo {i}' if i == 2 else f"photo {i}" for i in range(N)]
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text("".join(f"{c}\t{srv.url(f'{i}.jpg')}\n" for i, c in enumerate(caps)))
    with pytest.raises(ValidationError, match=r"url_col: column 'url'.* name its columns with column_names"):
        DownloadConfig(url_list=str(path))  # without column_names the first row is taken as the header
    cfg = DownloadConfig(**{**_documented_download(1), "url_list": str(path)}, **_quick())
    assert cfg.input_format == "tsv"
    result = run(cfg, _ctx(str(tmp_path / "run" / "download")))
    assert result.counts["successes"] == N and result.counts["rows_in_list"] == N
    assert sorted(s.caption for s in _samples(result)) == sorted(caps)
    with pytest.raises(ValidationError, match="column_names is for a header-less csv/tsv"):
        pq.write_table(pa.table({"url": ["x"], "caption": ["y"]}), tmp_path / "l.parquet")
        DownloadConfig(url_list=str(tmp_path / "l.parquet"), column_names=["url", "caption"])


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_json_lists_are_read_null_and_empty_captions_counted(tmp_path, fmt):
    rows = [{"url": "http://127.0.0.1:1/a.jpg", "caption": "a", "score": 1},
            {"url": "http://127.0.0.1:1/b.jpg", "caption": None, "score": 2},
            {"url": "http://127.0.0.1:1/c.jpg", "caption": "", "score": 3},
            {"url": "", "caption": "no url", "score": 4}]
    path = tmp_path / f"urls.{fmt}"
    path.write_text("\n".join(json.dumps(r) for r in rows) if fmt == "jsonl" else json.dumps(rows))
    cfg = DownloadConfig(url_list=str(path), save_additional_columns=["score"], **_quick())
    assert cfg.input_format == fmt
    prep = prepare_url_list(cfg, str(path), fmt, str(tmp_path / "prep"))
    assert prep.rows_per_shard == [3]
    refused = {f"refused_{r}": 0 for r in ("invalid_url", "metadata", "link_local", "loopback", "private", "reserved")}
    assert prep.counts == {"rows_in_list": 4, "rejected_missing_url": 1, "null_captions": 1, "empty_captions": 1,
                           **refused}
    t = pq.read_table(tmp_path / "prep" / "00000000.parquet").to_pylist()
    assert [r["caption"] for r in t] == ["a", None, ""] and [r["score"] for r in t] == [1, 2, 3]


def test_a_folder_of_files_is_sharded_file_by_file(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for name, n in (("b.parquet", 3), ("a.parquet", 5), ("c.parquet", 0)):
        pq.write_table(pa.table({"url": [f"http://127.0.0.1:1/{name}/{i}.jpg" for i in range(n)],
                                 "caption": [f"{name} {i}" for i in range(n)]},
                                schema=pa.schema([("url", pa.string()), ("caption", pa.string())])), folder / name)
    cfg = DownloadConfig(url_list=str(folder), number_sample_per_shard=4, allow_private_addresses=True)
    assert cfg.input_format == "parquet"
    prep = prepare_url_list(cfg, str(folder), "parquet", str(tmp_path / "prep"))
    assert prep.rows_per_shard == [4, 1, 3] and prep.counts["rows_in_list"] == 8  # a: 4+1, b: 3, c: none
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == ["00000000.parquet", "00000001.parquet"]

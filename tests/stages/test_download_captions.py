"""Caption handling, counted: a null caption stays apart from an empty one from the URL list to the
shard reader, and captions longer than an encoder's context are counted per encoder (tiny
CLIP/T5 built offline, loaded through the real loaders)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_prep.download.stage import DownloadConfig, run
from data_prep.encoders import ClipConfig, T5Config, caption_counts, load_clip, load_t5
from data_prep.http_server import DemoHTTPServer
from data_prep.shards import iter_shard, list_shards
from pipeline.context import StageContext

LONG = " ".join(f"word{i}" for i in range(120))  # well past CLIP's 77 and T5's 32 tokens


@pytest.fixture(scope="module")
def encoders(tiny_encoders):
    return (load_clip(ClipConfig(model=f"tiny:{tiny_encoders}"), device="cpu"),
            load_t5(T5Config(model=f"tiny:{tiny_encoders}", max_length=32), device="cpu"))


def test_truncation_counted_per_encoder(encoders):
    clip, t5 = encoders
    caps = ["a red circle", LONG, "x", LONG + " more", None, "", "   "]
    c = caption_counts(caps, clip, t5)
    assert c == {"n_null_caption": 1, "n_empty_caption": 2, "n_truncated_clip": 2, "n_truncated_t5": 2}
    mid = " ".join(["cat"] * 40)  # ~42 tokens: over T5's 32, under CLIP's 77
    assert (clip.count_truncated([mid]), t5.count_truncated([mid])) == (0, 1)
    assert clip.count_truncated([]) == t5.count_truncated([]) == 0


def test_null_and_empty_captions_stay_apart_through_the_download(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(buf, "JPEG")
    (tmp_path / "a.jpg").write_bytes(buf.getvalue())
    with DemoHTTPServer(str(tmp_path)) as srv:
        rows = [{"url": srv.url("a.jpg"), "caption": c} for c in ("kept", None, "")]
        lst = tmp_path / "urls.jsonl"
        lst.write_text("\n".join(json.dumps(r) for r in rows))
        cfg = DownloadConfig(url_list=str(lst), image_size=32, thread_count=2, timeout=3, allow_private_addresses=True)
        result = run(cfg, StageContext(run_uri=str(tmp_path / "run"), out_uri=str(tmp_path / "run" / "download")))
    assert (result.counts["null_captions"], result.counts["empty_captions"]) == (1, 1)
    caps = sorted((s.caption for u in list_shards(result.outputs["shards"]) for s in iter_shard(u)),
                  key=lambda c: (c is not None, c or ""))
    assert caps == [None, "", "kept"]
    assert caption_counts(caps) == {"n_null_caption": 1, "n_empty_caption": 1}

"""A mixed list of odd-but-real good rows and every kind of bad row, through real img2dataset on a
loopback server, with the default config: exactly the good images land, faithfully (checked by
correlation against their ground truth), and every rejected row is counted by reason.
"""
from __future__ import annotations

import io
import json
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.download.stage import DownloadConfig, run
from data_prep.http_server import DemoHTTPServer, Route
from data_prep.shards import iter_shard, list_shards
from pipeline.context import StageContext, StageFailed

from tests.support.images import BACKGROUND, corr, faithful_cases, png_gray

SIZE = 32  # stored side (center_crop)


def _ctx(out_uri: str) -> StageContext:
    msgs: list[str] = []
    ctx = StageContext(run_uri=out_uri.rsplit("/", 1)[0], out_uri=out_uri, progress=msgs.append)
    ctx.messages = msgs  # type: ignore[attr-defined]
    return ctx


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


# Rejected rows: name -> (reason counted in the manifest, how the server serves it).
BAD = {
    "missing.jpg": "http_error",
    "page.jpg": "undecodable",
    "truncated.jpg": "undecodable",
    "empty.jpg": "undecodable",
    "bomb.png": "too_large",
    "pixel.png": "too_small",
    "strip.png": "too_small",
    "banner.png": "aspect_ratio",
    "noai.jpg": "disallowed_by_header",
    "trickle.jpg": "timeout",
    "refused.jpg": "connection_error",
}


def _center_crop_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.asarray(Image.fromarray(rgb[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    good = faithful_cases()
    jpeg = good["jpeg"][0]
    for name, (data, _) in good.items():
        (root / f"{name}.img").write_bytes(data)
    (root / "page.jpg").write_bytes(b"<html><body>Not Found</body></html>")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "bomb.png").write_bytes(png_gray(10_000, 10_000))  # 100 MP, ~100 KB, valid
    (root / "pixel.png").write_bytes(png_gray(1, 1))
    (root / "strip.png").write_bytes(png_gray(8000, 10))
    (root / "banner.png").write_bytes(png_gray(400, 40))  # short side 40 >= 32, ratio 10
    routes = {"/noai.jpg": Route(jpeg, "image/jpeg", {"X-Robots-Tag": "noai, noimageai"}),
              "/trickle.jpg": Route(jpeg[:200], "image/jpeg", trickle_s=0.2)}  # 40 s for the body
    with DemoHTTPServer(str(root), routes=routes) as srv:
        rows = [{"url": srv.url(f"{n}.img"), "caption": f"good {n}"} for n in good]
        for n in BAD:
            url = f"http://127.0.0.1:{_closed_port()}/x.jpg" if n == "refused.jpg" else srv.url(n)
            rows.append({"url": url, "caption": f"bad {n}"})
        rng = np.random.default_rng(0)
        rows = [rows[i] for i in rng.permutation(len(rows))]
        lst = root / "list.parquet"
        pq.write_table(pa.Table.from_pylist(rows), lst)
        cfg = DownloadConfig(url_list=str(lst), image_size=SIZE, number_sample_per_shard=16, thread_count=8,
                             timeout=3, request_deadline=2.0, alpha_background=BACKGROUND, min_success_rate=0.3,
                             allow_private_addresses=True)  # served on 127.0.0.1
        out = str(root / "run" / "download")
        ctx = _ctx(out)
        t0 = time.time()
        result = run(cfg, ctx)
        yield good, result, out, time.time() - t0, ctx


def test_mixed_list_lands_exactly_its_good_images_counted_by_reason(mixed):
    good, result, out, elapsed, ctx = mixed
    c = result.counts
    want = {f"rejected_{r}": 0 for r in ("http_error", "timeout", "connection_error", "disallowed_by_header",
                                          "address_policy", "too_large", "too_small", "aspect_ratio", "undecodable")}
    for reason in BAD.values():
        want[f"rejected_{reason}"] += 1
    assert {k: v for k, v in c.items() if k.startswith("rejected_") and k != "rejected_missing_url"} == want, c
    assert c["successes"] == len(good) and c["total"] == len(good) + len(BAD)
    assert sum(want.values()) == c["total"] - c["successes"]  # every rejected row has a reason
    assert elapsed < 30, elapsed  # the trickling server did not hold the shard for its 40 s
    assert any("rejected:" in m and "too_large 1" in m for m in ctx.messages), ctx.messages
    print("\nrejections by reason on the mixed list:", {k: v for k, v in want.items() if v})


def test_landed_pixels_are_faithful(mixed):
    good, result, out, _, _ = mixed
    samples = {s.caption: s for u in list_shards(result.outputs["shards"]) for s in iter_shard(u)}
    assert sorted(samples) == sorted(f"good {n}" for n in good)
    for name, (_, truth) in good.items():
        s = samples[f"good {name}"]
        got = np.asarray(Image.open(io.BytesIO(s.image_bytes)).convert("RGB"))
        want = _center_crop_resize(truth, SIZE)
        assert got.shape == want.shape == (SIZE, SIZE, 3)
        c = corr(got, want)
        assert c > 0.95, (name, c)
        assert np.abs(got.astype(float).mean((0, 1)) - want.astype(float).mean((0, 1))).max() < 15, name
        assert s.meta["original_width"] == truth.shape[1] and s.meta["original_height"] == truth.shape[0], name


def test_a_list_of_only_bad_rows_fails_instead_of_finishing_empty(tmp_path):
    with DemoHTTPServer(str(tmp_path)) as srv:
        (tmp_path / "pixel.png").write_bytes(png_gray(1, 1))
        lst = tmp_path / "bad.parquet"
        pq.write_table(pa.table({"url": [srv.url("missing.jpg"), srv.url("pixel.png")], "caption": ["a", "b"]}), lst)
        cfg = DownloadConfig(url_list=str(lst), image_size=SIZE, thread_count=2, timeout=3, min_success_rate=0.0,
                             allow_private_addresses=True)
        with pytest.raises(StageFailed, match=r"none of the 2 rows became a sample.*http_error 1, too_small 1"):
            run(cfg, _ctx(str(tmp_path / "run" / "download")))


def test_degenerate_defaults_can_be_turned_off():
    cfg = DownloadConfig(min_image_size=0, max_aspect_ratio=None, max_image_pixels=None,
                         disallowed_header_directives=[])
    assert cfg.min_image_size == 0 and cfg.max_aspect_ratio is None and cfg.max_image_pixels is None
    d = DownloadConfig()
    assert (d.min_image_size, d.max_aspect_ratio, d.max_image_pixels) == (32, 4.0, 90_000_000)
    assert d.disallowed_header_directives == ["noai", "noimageai", "noindex", "noimageindex"]
    with pytest.raises(ValueError, match="demo.image_size 16 is below min_image_size 32"):
        DownloadConfig(demo={"image_size": 16})
    with pytest.raises(ValueError, match="alpha_background"):
        DownloadConfig(alpha_background=(0, 0, 300))
    assert json.loads(d.model_dump_json())["alpha_background"] == [255, 255, 255]


def test_retry_fetches_only_the_transient_failures_into_new_shards(tmp_path):
    jpeg = faithful_cases()["jpeg"][0]
    (tmp_path / "good.jpg").write_bytes(jpeg)
    routes = {"/flaky.jpg": Route(jpeg, "image/jpeg", fail_first=1)}  # 503 once, then the image
    with DemoHTTPServer(str(tmp_path), routes=routes) as srv:
        urls = [srv.url("good.jpg"), srv.url("flaky.jpg"), srv.url("missing.jpg"),
                f"http://127.0.0.1:{_closed_port()}/x.jpg"]
        lst = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": ["good", "flaky", "missing", "refused"]}), lst)
        cfg = DownloadConfig(url_list=str(lst), image_size=SIZE, thread_count=4, timeout=3, retry_failed=1,
                             min_success_rate=0.5, allow_private_addresses=True)
        ctx = _ctx(str(tmp_path / "run" / "download"))
        result = run(cfg, ctx)
    c = result.counts
    assert routes["/flaky.jpg"]._served == 2  # fetched twice; the good row and the 404 only once
    assert (c["retry_passes"], c["retried_rows"], c["retry_successes"]) == (1, 2, 1)  # flaky + refused
    assert (c["successes"], c["rejected_http_error"], c["rejected_connection_error"]) == (2, 1, 1)
    assert c["successes"] + c["failed_to_download"] + c["failed_to_resize"] + c["rows_in_failed_shards"] == 4
    shards = list_shards(result.outputs["shards"])
    assert [os.path.basename(u) for u in shards] == ["00000.tar", "00001.tar"]  # the retry's own shard
    caps = {s.key: s.caption for u in shards for s in iter_shard(u)}
    assert sorted(caps.values()) == ["flaky", "good"] and len(caps) == 2  # keys unique across passes
    assert any("pass 2: fetching again the 2 rows" in m for m in ctx.messages), ctx.messages


def test_a_failed_download_resumes_fetching_only_what_failed(tmp_path):
    """The stage stops on min_success_rate but keeps its shards and its list; resume_failed (what
    `t2i resume` calls) fetches only the failed rows into a new shard; the counts cover both passes."""
    from data_prep.download.stage import resume_failed

    jpeg = faithful_cases()["jpeg"][0]
    for i in range(3):
        (tmp_path / f"good{i}.jpg").write_bytes(jpeg)
    routes = {"/flaky.jpg": Route(jpeg, "image/jpeg", fail_first=1)}
    with DemoHTTPServer(str(tmp_path), routes=routes) as srv:
        urls = [srv.url(f"good{i}.jpg") for i in range(3)] + [srv.url("flaky.jpg")]
        lst = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": ["g0", "g1", "g2", "flaky"]}), lst)
        cfg = DownloadConfig(url_list=str(lst), image_size=SIZE, thread_count=4, timeout=3, min_success_rate=0.9,
                             allow_private_addresses=True)
        ctx = _ctx(str(tmp_path / "run" / "download"))
        with pytest.raises(StageFailed, match=r"success rate 75.0% \(3/4 rows\)"):
            run(cfg, ctx)
        result = resume_failed(cfg, ctx)
    c = result.counts
    assert routes["/flaky.jpg"]._served == 2
    assert (c["successes"], c["total"], c["retry_passes"], c["retried_rows"], c["retry_successes"]) == (4, 4, 1, 1, 1)
    assert c["shards"] == 2 and c["failed_to_download"] == 0
    shards = list_shards(result.outputs["shards"])
    assert sorted(s.caption for u in shards for s in iter_shard(u)) == ["flaky", "g0", "g1", "g2"]
    log = open(tmp_path / "run" / "download" / "img2dataset.log", "rb").read()
    assert log.count(b"Starting the downloading of this file") == 2  # both passes' logs kept


def test_a_stalled_pass_names_its_unfinished_shards(tmp_path, monkeypatch):
    """Progress while img2dataset runs: shards done as they land, and which ones are still open
    when nothing has finished for a while (here 0.6 s instead of 30)."""
    import subprocess

    import data_prep.download.stage as dl

    class SlowChild:  # stands in for the img2dataset child: done after ~3 s, writes shard 00000 at ~0.3 s
        def __init__(self):
            self.t0 = time.monotonic()

        def wait(self, timeout):
            time.sleep(timeout)
            if time.monotonic() - self.t0 > 0.3 and not (tmp_path / "00000_stats.json").exists():
                (tmp_path / "00000_stats.json").write_text("{}")
            if time.monotonic() - self.t0 > 3.0:
                return 0
            raise subprocess.TimeoutExpired("child", timeout)

    monkeypatch.setattr(dl, "_STUCK_AFTER_S", 0.6)
    monkeypatch.setattr(dl, "_POLL_S", 0.2)
    ctx = _ctx(str(tmp_path))
    assert dl._wait_with_progress(SlowChild(), str(tmp_path), ["00000", "00001", "00002"], ctx) == 0
    assert "download: 1/3 shards done" in ctx.messages
    stalled = [m for m in ctx.messages if "no shard finished for" in m]
    assert stalled and stalled[0].endswith("still running or queued: 00001, 00002"), ctx.messages

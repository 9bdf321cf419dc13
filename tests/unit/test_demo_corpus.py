"""Demo corpus: deterministic, captions match pixels, bad rows are what they claim; loopback server."""
from __future__ import annotations

import hashlib
import io
import os
import threading
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.demo_corpus import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    all_attrs,
    caption_of,
    demo_prompts,
    make_demo_corpus,
    nearest_color,
    parse_caption,
)
from data_prep.http_server import DemoHTTPServer


def _digest_dir(d: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_corpus_is_deterministic_from_seed(tmp_path):
    a = make_demo_corpus(str(tmp_path / "a"), 30, 48, seed=3, bad_fraction=0.2, base_url="http://127.0.0.1:1")
    b = make_demo_corpus(str(tmp_path / "b"), 30, 48, seed=3, bad_fraction=0.2, base_url="http://127.0.0.1:1")
    c = make_demo_corpus(str(tmp_path / "c"), 30, 48, seed=4, bad_fraction=0.2, base_url="http://127.0.0.1:1")
    da, db = _digest_dir(a.image_dir), _digest_dir(b.image_dir)
    assert da == db and len(da) > 20
    ta, tb, tc = (pq.read_table(x.parquet_path).to_pydict() for x in (a, b, c))
    assert ta == tb
    assert ta["caption"] != tc["caption"]
    assert (a.num_good, a.num_bad) == (24, 6)
    assert a.bad_kinds == {"missing": 2, "html": 2, "truncated": 1, "empty": 1}
    assert set(ta) == {"url", "caption"} and len(ta["url"]) == 30


def test_captions_describe_the_pixels(tmp_path):
    info = make_demo_corpus(str(tmp_path), 120, 64, seed=11)
    table = pq.read_table(info.parquet_path).to_pydict()
    assert info.num_bad == 0 and len(set(table["caption"])) == 120  # distinct captions
    seen_colors = set()
    for url, cap in zip(table["url"], table["caption"]):
        attrs = parse_caption(cap)
        assert url.startswith("file://")  # no base_url: file URIs, which urllib also fetches
        img = np.asarray(Image.open(url[len("file://"):]).convert("RGB"))
        assert img.shape == (64, 64, 3)
        cx, cy = attrs.center_xy
        centre = img[int(cy * 64), int(cx * 64)]
        assert nearest_color(centre) == attrs.color, (cap, centre)
        # the corner diagonally opposite the shape is always background
        far = img[63 if cy < 0.5 else 0, 63 if cx < 0.5 else 0].astype(int)
        assert np.abs(far - np.array(attrs.background_rgb)).max() < 20, (cap, far)
        seen_colors.add(attrs.color)
    assert seen_colors == set(COLORS)


def test_caption_grammar_round_trips_and_rejects_garbage():
    everything = all_attrs()
    assert len(everything) == len(COLORS) * len(SHAPES) * len(POSITIONS) * len(SIZES) * len(BACKGROUNDS) >= 2000
    for attrs in everything[::37]:
        assert parse_caption(caption_of(attrs)) == attrs
    prompts = demo_prompts()
    assert prompts == demo_prompts() and len(prompts) == len(set(prompts)) >= 8
    assert {parse_caption(p).color for p in prompts} == set(COLORS)
    with pytest.raises(ValueError, match="not a demo caption"):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="unknown color 'mauve'"):
        parse_caption("a small mauve circle in the center on a white background")


def test_server_serves_bad_rows_as_designed_and_stops(tmp_path):
    with DemoHTTPServer(str(tmp_path)) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:") and srv.port > 0
        info = make_demo_corpus(str(tmp_path), 20, 32, seed=1, bad_fraction=0.25, base_url=srv.base_url,
                                include_bomb=True)
        assert info.bad_kinds == {"missing": 1, "html": 1, "truncated": 1, "empty": 1, "bomb": 1}
        rows = pq.read_table(info.parquet_path).to_pylist()
        outcomes: dict[str, int] = {}
        # fetch concurrently: the server is threaded
        results: list[tuple[str, object]] = []

        def fetch(url):
            try:
                results.append((url, urllib.request.urlopen(url, timeout=10).read()))
            except urllib.error.HTTPError as e:
                results.append((url, e.code))

        threads = [threading.Thread(target=fetch, args=(r["url"],)) for r in rows]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for url, body in results:
            if body == 404:
                kind = "404"
            elif body == b"":
                kind = "empty"
            elif body.startswith(b"<!doctype html"):
                kind = "html"
            elif body.startswith(b"\x89PNG"):
                kind = "bomb"
                assert url.endswith(".png") and len(body) < 1_000_000
            else:
                try:
                    Image.open(io.BytesIO(body)).load()
                    kind = "jpeg"
                except OSError:
                    kind = "truncated"
            outcomes[kind] = outcomes.get(kind, 0) + 1
        assert outcomes == {"jpeg": 15, "404": 1, "html": 1, "truncated": 1, "empty": 1, "bomb": 1}
        port = srv.port
    assert not srv.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/urls.parquet", timeout=2)


def test_server_refuses_non_loopback(tmp_path):
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        DemoHTTPServer(str(tmp_path), host="0.0.0.0")


def test_check_prompts_are_held_out_but_their_parts_are_taught(tmp_path):
    from data_prep.demo_corpus import check_attrs, training_attrs

    held = check_attrs()
    assert len(held) == len(set(held)) >= 32 and demo_prompts() == [caption_of(a) for a in held]
    assert {a.color for a in held} == set(COLORS) and {a.position for a in held} == set(POSITIONS)
    taught = training_attrs()
    assert not set(held) & set(taught) and len(taught) + len(held) == len(all_attrs())
    pairs = {(a.color, a.position) for a in taught}
    assert all((a.color, a.position) in pairs for a in held)  # composition, not an unseen pair
    info = make_demo_corpus(str(tmp_path), 400, 32, seed=5)
    captions = set(pq.read_table(info.parquet_path).column("caption").to_pylist())
    assert len(captions) == 400 and not captions & set(demo_prompts())

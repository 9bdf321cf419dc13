"""How close does the download stage get to raw img2dataset's speed?

One run, one URL list (generated JPEGs served on 127.0.0.1), the same processes/threads/image
size for both: (a) raw img2dataset, started the way a user would (``img2dataset.download(...)``
in a fresh interpreter, stock decoding, its own logger process and pool), and (b) the download
stage end to end (list read + decode + filters, img2dataset with the safe decoder and the
per-request deadline, tar verification, counts by reason). The ratio is (b)'s throughput over
(a)'s; each side is timed ``repeats`` times, alternating, and the best time of each is kept.
Start-up weighs on small lists (raw img2dataset spawns a logger process and a pool, each importing
torch); ``fetch_stage_over_raw`` compares only the time spent inside the shards (from img2dataset's
stats files: decode + resize + encode + write per image, network on loopback).

    python -m data_prep.bench.download --images 512 --image-px 256 --processes 1 --threads 16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from data_prep.demo_corpus import make_demo_corpus
from data_prep.download.stage import DownloadConfig, _child_env, _img2dataset_kwargs, run
from data_prep.http_server import DemoHTTPServer
from data_prep.shards import count_samples
from pipeline import layout
from pipeline.context import StageContext

_RAW = ("import json, sys; import img2dataset; "
        "img2dataset.download(**json.load(open(sys.argv[1])))")


def _raw_img2dataset(cfg: DownloadConfig, url_list: str, out: str, tmp: str) -> float:
    kwargs = _img2dataset_kwargs(cfg, url_list, out, "multiprocessing")
    # What a user passes: the list as it is, img2dataset's own decoder and limits.
    kwargs.update(max_image_area=float("inf"))
    args = os.path.join(tmp, "raw_args.json")
    with open(args, "w") as f:
        json.dump(kwargs, f)
    t0 = time.perf_counter()
    with open(os.path.join(tmp, "raw.log"), "wb") as log:
        rc = subprocess.call([sys.executable, "-c", _RAW, args], stdout=log, stderr=subprocess.STDOUT,
                             env=_child_env(cfg), stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"raw img2dataset exited with status {rc}; see {tmp}/raw.log")
    return elapsed


def _fetch_seconds(shards: str) -> float:
    """Wall time img2dataset spent in its shards (first shard start to last shard end, from its
    stats files): the steady-state part, without interpreter start-up."""
    stats = [json.load(open(os.path.join(shards, f))) for f in os.listdir(shards) if f.endswith(layout.SHARD_STATS)]
    return max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)


def bench_download(images: int = 512, image_px: int = 256, processes: int = 1, threads: int = 16,
                   image_size: int = 64, repeats: int = 1, seed: int = 0) -> dict[str, Any]:
    if images < 1 or repeats < 1:
        raise ValueError("images and repeats must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_download_") as root, DemoHTTPServer(os.path.join(root, "www")) as srv:
        info = make_demo_corpus(os.path.join(root, "www"), images, image_px, seed, 0.0, base_url=srv.base_url)
        cfg = DownloadConfig(url_list=info.parquet_path, image_size=image_size, processes_count=processes,
                             thread_count=threads, number_sample_per_shard=max(1, images // max(1, processes)),
                             min_success_rate=0.0, allow_private_addresses=True)  # served on 127.0.0.1
        raw_t, stage_t, raw_fetch, stage_fetch, raw_n, stage_n = [], [], [], [], 0, 0
        for r in range(repeats):
            raw_out = os.path.join(root, f"raw{r}")
            raw_t.append(_raw_img2dataset(cfg, info.parquet_path, raw_out, root))
            raw_n = count_samples(raw_out)
            raw_fetch.append(_fetch_seconds(raw_out))
            out = os.path.join(root, f"stage{r}", "download")
            t0 = time.perf_counter()
            res = run(cfg, StageContext(run_uri=os.path.dirname(out), out_uri=out))
            stage_t.append(time.perf_counter() - t0)
            stage_n = res.counts["successes"]
            stage_fetch.append(_fetch_seconds(os.path.join(out, layout.SHARDS)))
    best_raw, best_stage = min(raw_t), min(stage_t)
    return {"images": images, "image_px": image_px, "image_size": image_size, "processes": processes,
            "threads": threads, "repeats": repeats, "raw_seconds": best_raw, "stage_seconds": best_stage,
            "raw_samples": raw_n, "stage_samples": stage_n, "raw_images_per_s": images / best_raw,
            "stage_images_per_s": images / best_stage, "stage_over_raw": best_raw / best_stage,
            "raw_fetch_seconds": min(raw_fetch), "stage_fetch_seconds": min(stage_fetch),
            "fetch_stage_over_raw": min(raw_fetch) / min(stage_fetch),
            "cpu_count": os.cpu_count()}


def format_result(r: dict[str, Any]) -> str:
    return (f"{r['images']} images of {r['image_px']}px -> {r['image_size']}px, {r['processes']} process(es) x "
            f"{r['threads']} threads: raw img2dataset {r['raw_images_per_s']:.1f} img/s ({r['raw_samples']} samples), "
            f"download stage {r['stage_images_per_s']:.1f} img/s ({r['stage_samples']} samples) "
            f"-> ratio {r['stage_over_raw']:.2f} (target >= 0.9); inside the shards (no start-up) "
            f"{r['fetch_stage_over_raw']:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--image-px", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args(argv)
    r = bench_download(a.images, a.image_px, a.processes, a.threads, a.image_size, a.repeats)
    print(json.dumps(r))
    print(format_result(r))


if __name__ == "__main__":
    main()

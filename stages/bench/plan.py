"""What a run will cost before it starts: samples, FLOPs, GPU-hours, days, bytes, dollars.

``t2i plan SPEC`` (pipeline/cli/plan.py) hands this module the spec's stage configs; nothing
here knows about Ray or the store layout beyond reading one shard of an existing run.

Where each figure comes from (docs/scale.md shows them for the LAION spec):

* **FLOPs per sample** are *counted*, not guessed: one training step of the stage's flavor at
  batch 1 runs on the meta device under ``stages.training.flops.count_flops`` (the FlopCounterMode path
  of ``t2i bench train``), so no memory is allocated even for sr1024-400m. Text is padded to
  the longest caption of a micro-batch, taken as ``min(max_length, 3 x mean tokens)``. The
  encoders of the embed stage are not ours to build offline: their FLOPs use ``2 x params x
  positions`` with the published sizes (T5-v1.1-XXL encoder 4.76B, CLIP ViT-L/14 0.43B).
* **GPU-hours** = samples x FLOPs / (MFU x dense bf16 peak of ``--gpu``). MFU: ``--mfu``, else a
  measured figure (a ``mfu`` metric in the run's training manifest, or the stage's flavor row
  of docs/performance.md once it holds one), else the stated default (the issue-8 targets).
* **Bytes** follow the formats byte for byte: webdataset tars (512-byte headers, the PAX
  header Python's tarfile adds for a float mtime, 512-byte blocks, 10240-byte records),
  trimmed fp16 embeddings in an uncompressed npz, DeepSpeed checkpoints (module weights,
  fp32 master + Adam moments under the ZeRO stage, fp32 EMA). The per-sample inputs (stored
  JPEG bytes, caption bytes, mean caption tokens) come from the run when one exists (its first
  shard), else from the stated defaults below.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep.embed_format import read_embedding_shard
from data_prep.shards import list_shards
from pipeline import layout, store
from stages.models import MODELS, model

GPUS = ("h100", "h200", "a100", "b200")
# Assumed on-demand prices ($/GPU-hour); pass --gpu-hour-price for your own.
DEFAULT_PRICE = {"a100": 1.8, "h100": 2.5, "h200": 3.5, "b200": 5.0}
# Stated default MFU when nothing measured is recorded: each model's target (ModelDef.mfu_target);
# the embed stage's:
EMBED_MFU = 0.30                      # encoder inference (a forward only, mid-size batches)
DOWNLOAD_IMAGES_PER_S_PER_NODE = 1000.0  # img2dataset: ~1,000-1,350 images/s per 16-core node
# Published encoder sizes (their FLOPs are 2 x params x positions: they cannot be built offline).
T5_XXL_ENCODER_PARAMS = 4.76e9
CLIP_L14_IMAGE_PARAMS, CLIP_L14_TEXT_PARAMS, CLIP_L14_IMAGE_TOKENS = 0.304e9, 0.123e9, 257
PAPER_DIMS = {"t5_dim": 4096, "clip_dim": 768, "clip_token_dim": 768}
TINY_DIMS = {"t5_dim": 32, "clip_dim": 32, "clip_token_dim": 64}   # data_prep/tiny_encoders.py
CLIP_ROLES = ("prior", "decoder")
BITS_PER_PIXEL = 2.0                  # a q95 JPEG of a LAION photo (img2dataset's default quality)     # condition on CLIP tokens (<= 77); the rest on T5 tokens


@dataclass
class CorpusFigures:
    """Per-sample inputs of the byte model: measured from a run's first shards, or stated defaults."""

    image_bytes: float | None = None  # None: the stated default, a JPEG q95 photo at ~2 bits/pixel of
    #                                   download.image_size (1024 px: 262 KB)
    caption_bytes: float = 60.0       # LAION-400M captions: ~10 words
    json_bytes: float = 450.0         # img2dataset's per-sample json (url, caption, sizes, extra columns)
    t5_tokens: float = 20.0           # mean T5 tokens per caption (EOS included)
    clip_tokens: float = 19.0         # mean CLIP tokens up to EOT (SOT included)
    url_bytes: float = 100.0
    dims: dict[str, int] = field(default_factory=lambda: dict(PAPER_DIMS))
    source: str = "stated defaults"


@dataclass
class PlanOptions:
    gpu: str = "h100"
    mfu: float | None = None
    price: float | None = None
    rows: int | None = None           # URL rows in the list (LAION-400M: 4e8)
    success_rate: float = 0.65        # fraction of URLs that become samples (the web rots)
    cpu_nodes: int = 10               # 16-core nodes running img2dataset


# ----------------------------------------------------------------------------- FLOPs
def _flavor_key(role: str, flavor: str, dims: dict[str, int], text_len: int, variant: str | None = None) -> str:
    import torch  # torch: only to key the FLOPs cache (importing the cost model stays light)

    from stages.nets.flavors import get_flavor  # torch: as above

    cfg = get_flavor(model(role).network_role, flavor).config(dims, variant)
    return hashlib.sha256(f"{role}|{flavor}|{cfg!r}|{text_len}|{torch.__version__}".encode()).hexdigest()[:16]


def _cache_path() -> Path:
    return Path(os.environ.get("T2I_CACHE", Path.home() / ".cache" / "t2i-pipeline")) / "plan_flops.json"


@functools.lru_cache(maxsize=None)
def flops_per_sample(role: str, flavor: str, dims_items: tuple, text_len: int, variant: str | None = None) -> int:
    """Counted training FLOPs (forward + backward) of one sample: a batch-1 step on the meta device.

    Cached on disk by the network config's repr (an architecture change misses the cache): a
    paper flavor takes ~15 s to count on a busy CPU.
    """
    dims = dict(dims_items)
    key = _flavor_key(role, flavor, dims, text_len, variant)
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return int(cache[key])
    n = _count(role, flavor, dims, text_len, variant=variant)
    cache[key] = n
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home: count again next time
    return n


def _count(role: str, flavor: str, dims: dict[str, int], text_len: int, batch: int = 1,
           device: str = "meta", variant: str | None = None) -> int:
    import torch  # torch: only to count FLOPs (importing the cost model stays light)

    from stages.bench.train_step import stage_parts, synthetic_batch  # torch: as above
    from stages.diffusion import Diffusion  # torch: as above
    from stages.nets.flavors import build_network, get_flavor  # torch: as above
    from stages.training.flops import count_flops  # torch: as above

    spec, cfg_cls = stage_parts(role)
    fl = get_flavor(spec.net_role, flavor)
    # The network variant is chosen by a config field (the decoder's text_encoder): set it back.
    chosen = {"text_encoder": variant} if variant and "text_encoder" in cfg_cls.model_fields else {}
    cfg = cfg_cls(flavor=flavor, batch_size=batch, steps=1, **chosen)
    cpu_batch = synthetic_batch(fl, dims, batch, text_len, seed=0)
    torch.manual_seed(0)
    with torch.device(device):
        net = build_network(spec.net_role, flavor, dims, spec.variant(cfg))   # model FLOPs: no activation recompute
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    dev = torch.device(device)

    def step() -> None:
        x0, cond = spec.build_batch(cpu_batch, cfg, fl, dev, torch.float32)
        loss, _ = spec.training_loss(diffusion, net, x0, cond)
        loss.backward()

    return count_flops(step) // batch


def text_len_for(role: str, corpus: CorpusFigures, t5_max: int) -> int:
    """Padded text length of a micro-batch: its longest caption, taken as 3x the mean (capped)."""
    if role in CLIP_ROLES:
        return int(min(77, math.ceil(3 * corpus.clip_tokens)))
    return int(min(t5_max, math.ceil(3 * corpus.t5_tokens)))


# ----------------------------------------------------------------------------- MFU
def measured_mfu(role: str, flavor: str, run_manifest: dict | None, perf_md: str | None) -> tuple[float, str] | None:
    """A measured MFU: the run's training manifest first, then the flavor's row of docs/performance.md."""
    v = ((run_manifest or {}).get("metrics") or {}).get("mfu")
    if isinstance(v, (int, float)) and 0 < v <= 1:
        return float(v), "measured in the run"
    for line in (perf_md or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 5 and cells[0] == flavor:
            m = re.search(r"(\d+(?:\.\d+)?)\s*%", cells[5])
            if m:
                return float(m.group(1)) / 100, "docs/performance.md"
    return None


def peak_bf16(gpu: str) -> float:
    from stages.training.flops import peak_flops_by_name  # torch: importing the cost model stays light

    if gpu not in GPUS:
        raise ValueError(f"--gpu must be one of {', '.join(GPUS)} (got {gpu!r})")
    return float(peak_flops_by_name(gpu, "bf16"))


# ----------------------------------------------------------------------------- bytes
def _block(n: float) -> float:
    return 512 * math.ceil(n / 512)


def tar_member_bytes(size: float) -> float:
    """One webdataset member: ustar header, PAX header + record (float mtime), data in 512-byte blocks."""
    return 512 + 1024 + _block(size)


def download_shard_bytes(n_rows: float, n_samples: float, c: CorpusFigures) -> float:
    """One download shard: its tar of the samples that downloaded (10240-byte records), the
    parquet of all its rows and its stats json."""
    tar = n_samples * sum(tar_member_bytes(s) for s in (c.image_bytes, c.caption_bytes, c.json_bytes)) + 1024
    tar = 10240 * math.ceil(tar / 10240)
    parquet = 3000 + n_rows * (c.url_bytes + c.caption_bytes + 100)
    return tar + parquet + 260


def key_chars(per_shard: int) -> int:
    return 5 + max(1, math.ceil(math.log10(per_shard)))


def embed_shard_bytes(n: int, c: CorpusFigures, per_shard: int) -> float:
    """One ``NNNNN.npz`` (fp16, trimmed token rows, uncompressed; ~250 B of zip/npy header per array) + done marker."""
    d = c.dims
    per_sample = (4 * key_chars(per_shard) + 2 * 2 * d["clip_dim"] + 2 * c.clip_tokens * d["clip_token_dim"]
                  + 2 * c.t5_tokens * d["t5_dim"] + 8)
    return n * per_sample + 7 * 250 + 22 + 580


def checkpoint_bytes(params: int, zero: int, precision: str, tensors: int = 0, world: int = 1) -> dict[str, float]:
    """Bytes of one checkpoint (all ranks together) by part.

    ZeRO 0 fp32: weights + Adam m, v in DeepSpeed's module file (4 + 8 B/param). bf16, or any
    ZeRO >= 1: fp32 master weights + m + v in the optimizer partitions (12 B), plus the 16-bit
    (bf16) or fp32 module weights (ZeRO 1-2; ZeRO-3 saves no whole module). EMA: fp32 (4 B).
    ``overhead``: what the smoke run's checkpoints hold beyond the tensors (measured there: ~1.2 KB
    per parameter tensor in DeepSpeed's pickle, 80 B per tensor of safetensors header, 12.6 KB of
    per-rank state + RNG, ~50 KB per optimizer-partition file).
    """
    if zero == 0 and precision == "fp32":
        module, optim = 4 * params, 8 * params
    else:
        module = 0 if zero == 3 else (2 if precision == "bf16" else 4) * params
        optim = 12 * params
    partitions = world if (zero >= 1 or precision == "bf16") else 0
    overhead = 1210 * tensors + 80 * tensors + 12_700 * world + 50_000 * partitions + 64
    return {"module": float(module), "optimizer": float(optim), "ema": 4.0 * params, "overhead": float(overhead)}


def restore_traffic(parts: dict[str, float], zero: int, precision: str, world: int) -> tuple[float, float]:
    """(bytes all ``world`` ranks read from the store to restore one checkpoint at the world size
    that wrote it, the same after a change of world size), the rule stages/training/checkpoint.py
    measures (``rank_reads``, ``elastic.elastic_reads``). Module weights M, optimizer state O, EMA E:
    a rank reads its own partitions and the unpartitioned files, never another rank's partition.
    ZeRO-0 in fp32: one file holds module and optimizer, read by every rank: W (M + O + E). ZeRO-1/2
    (and bf16 ZeRO-0, whose optimizer is partitioned): the module file and the EMA on every rank,
    one optimizer partition each: W (M + E) + O. ZeRO-3: everything partitioned: M + O + E.
    After a change of world size every rank converts the whole checkpoint: W x all of it."""
    m, o, e, overhead = parts["module"], parts["optimizer"], parts["ema"], parts["overhead"]
    if zero == 0 and precision == "fp32":
        same = world * (m + o + e)
    elif zero == 3:
        same = m + o + e
    else:
        same = world * (m + e) + o
    return same + overhead, world * (m + o + e + overhead)


def params_of(role: str, flavor: str, dims: dict[str, int], variant: str | None = None) -> tuple[int, int]:
    """(parameters, parameter tensors) of a flavor, built on the meta device."""
    import torch  # torch: only to build the network (importing the cost model stays light)

    from stages.nets.flavors import build_network  # torch: as above

    with torch.device("meta"):
        net = build_network(model(role).network_role, flavor, dims, variant)
    ps = list(net.parameters())
    return sum(p.numel() for p in ps), len(ps)


# ----------------------------------------------------------------------------- the plan
def plan(stage_cfgs: dict[str, Any], opts: PlanOptions, corpus: CorpusFigures,
         manifests: dict[str, dict] | None = None, perf_md: str | None = None) -> dict[str, Any]:
    """``{"stages": {name: figures}, "total": {...}, "assumptions": {...}}`` for a spec's configs.

    ``stage_cfgs`` maps stage names (download, embed, train_*) to their config objects;
    ``manifests`` (optional) the finished manifests of an existing run, for measured MFU.
    """
    peak = peak_bf16(opts.gpu)
    price = opts.price if opts.price is not None else DEFAULT_PRICE[opts.gpu]
    dl, emb = stage_cfgs.get("download"), stage_cfgs.get("embed")
    t5_max = emb.t5.max_length if emb is not None else 128
    out: dict[str, dict[str, Any]] = {}
    rows, rows_source = _rows(dl, opts)
    samples = int(rows * _success(dl, opts))
    per_shard = dl.number_sample_per_shard if dl is not None else 10000
    n_shards = math.ceil(rows / per_shard) if rows else 0
    train_gpus = sum(int(max(1, c.gpus_per_worker) * c.num_workers) for n, c in stage_cfgs.items()
                     if n.startswith("train_"))
    if corpus.image_bytes is None:
        corpus = dataclasses.replace(corpus, image_bytes=BITS_PER_PIXEL / 8 * (dl.image_size if dl else 1024) ** 2)
    success = _success(dl, opts)
    full, rem = divmod(rows, per_shard)   # shards of per_shard rows, the last one shorter
    if dl is not None:
        nbytes = full * download_shard_bytes(per_shard, per_shard * success, corpus) + (
            download_shard_bytes(rem, rem * success, corpus) if rem else 0)
        nbytes += 1500 + 70 * rows        # the normalised URL list the stage keeps (url_list/)
        node_h = rows / DOWNLOAD_IMAGES_PER_S_PER_NODE / 3600
        out["download"] = {"rows": rows, "samples": samples, "shards": n_shards, "gpu_hours": 0.0,
                           "cpu_node_hours": node_h, "days": node_h / opts.cpu_nodes / 24, "bytes": nbytes,
                           "cost": 0.0}
    if emb is not None:
        out["embed"] = _embed(emb, samples, [per_shard * success] * full + ([rem * success] if rem else []),
                              per_shard, corpus, peak, price, train_gpus, t5_max)
    for m in MODELS:
        cfg = stage_cfgs.get(m.stage)
        if cfg is not None:
            out[m.stage] = _train(m.role, cfg, opts, corpus, peak, price, t5_max, (manifests or {}).get(m.stage),
                                  perf_md)
    trains = {n: s for n, s in out.items() if n.startswith("train_")}
    bound = max(trains, key=lambda n: trains[n]["days"]) if trains else None
    days = sum(out[n]["days"] for n in ("download", "embed") if n in out) + (trains[bound]["days"] if bound else 0)
    total = {"gpu_hours": sum(s["gpu_hours"] for s in out.values()), "days": days,
             "bytes": sum(s["bytes"] for s in out.values()), "cost": sum(s["cost"] for s in out.values()),
             "bounds_wall_time": bound}
    return {"stages": out, "total": total,
            "assumptions": {"gpu": opts.gpu, "peak_bf16_tflops": peak / 1e12, "gpu_hour_price": price,
                            "rows": rows, "rows_source": rows_source, "success_rate": _success(dl, opts), "cpu_nodes": opts.cpu_nodes,
                            "corpus": asdict(corpus),
                            "wall_time": "download, then embed, then the trainings side by side "
                                         "(each on its own GPU group); sampling is minutes"}}


LAION_400M_ROWS = 400_000_000   # the stated default when the URL list cannot be read from here


def _rows(dl, opts: PlanOptions) -> tuple[int, str]:
    """(URL rows, where the number comes from): --rows, the demo corpus, a local list, else LAION-400M."""
    if opts.rows is not None:
        return int(opts.rows), "--rows"
    if dl is None:
        return 0, "no download stage"   # a plan of trainings alone
    if dl.url_list == "demo":
        return int(dl.demo.num_images), "the demo corpus"
    counted = _count_local_rows(dl.url_list)
    if counted is not None:
        return counted, f"counted in {dl.url_list}"
    return LAION_400M_ROWS, "stated default (LAION-400M: the list is not readable from here; pass --rows)"


def _count_local_rows(url_list: str) -> int | None:
    """Rows of a local parquet / csv / tsv / jsonl list (a folder: its files), or None."""
    path = url_list.removeprefix("file://")
    if "://" in path or not os.path.exists(path):
        return None
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    total = 0
    for f in files:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq  # heavy: pyarrow, only for a local parquet list

            total += pq.ParquetFile(f).metadata.num_rows
        elif f.endswith((".csv", ".tsv")):
            with open(f, "rb") as fh:
                total += max(0, sum(1 for _ in fh) - 1)   # less the header row
        elif f.endswith(".jsonl"):
            with open(f, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
    return total or None


def _success(dl, opts: PlanOptions) -> float:
    if dl is not None and dl.url_list == "demo" and opts.rows is None:
        return 1.0 - float(dl.demo.bad_fraction)
    return float(opts.success_rate)


def _embed(emb, samples: int, shard_samples: list[float], per_shard: int, corpus: CorpusFigures, peak: float, price: float,
           train_gpus: int, t5_max: int) -> dict[str, Any]:
    t5_pos = min(t5_max, math.ceil(3 * corpus.t5_tokens))
    flops = 2 * (T5_XXL_ENCODER_PARAMS * t5_pos + CLIP_L14_IMAGE_PARAMS * CLIP_L14_IMAGE_TOKENS
                 + CLIP_L14_TEXT_PARAMS * 77)
    gpu_h = samples * flops / (EMBED_MFU * peak) / 3600 if emb.gpus_per_actor > 0 else 0.0
    actors = emb.num_actors if isinstance(emb.num_actors, int) else max(1, train_gpus)
    n_shards = len(shard_samples)
    per = {n: embed_shard_bytes(n, corpus, per_shard) for n in set(shard_samples)}   # 2 sizes at most
    nbytes = sum(per[n] for n in shard_samples) + 1200 + 60 * n_shards  # + encoders.json (one line a shard)
    return {"samples": samples, "flops_per_sample": flops, "flops_source": "2 x params x positions (T5-XXL + CLIP L/14)",
            "mfu": EMBED_MFU, "gpus": actors, "gpu_hours": gpu_h, "days": gpu_h / max(1, actors) / 24,
            "bytes": nbytes, "cost": gpu_h * price}


def _train(role: str, cfg, opts: PlanOptions, corpus: CorpusFigures, peak: float, price: float, t5_max: int,
           manifest: dict | None, perf_md: str | None) -> dict[str, Any]:
    dims = corpus.dims
    world = int(cfg.num_workers)
    gpus = int(max(1, cfg.gpus_per_worker) * world)
    samples = int(cfg.steps) * int(cfg.batch_size) * int(cfg.grad_accum) * world
    text_len = text_len_for(role, corpus, t5_max)
    variant = model(role).stage_spec.variant(cfg)
    fps = flops_per_sample(role, cfg.flavor, tuple(sorted(dims.items())), text_len, variant)
    if opts.mfu is not None:
        mfu, mfu_src = opts.mfu, "--mfu"
    else:
        mfu, mfu_src = measured_mfu(role, cfg.flavor, manifest, perf_md) or (model(role).mfu_target, "stated default")
    gpu_h = samples * fps / (mfu * peak) / 3600
    params, tensors = params_of(role, cfg.flavor, dims, variant)
    precision = cfg.precision          # auto = bf16 on GPU, fp32 on CPU (stages/training/optim.py)
    if precision == "auto":
        precision = "bf16" if cfg.gpus_per_worker > 0 else "fp32"
    parts = checkpoint_bytes(params, cfg.zero_stage, precision, tensors, world)
    ckpt = sum(parts.values())
    restore, restore_resized = restore_traffic(parts, cfg.zero_stage, precision, world)
    saves = math.ceil(cfg.steps / cfg.checkpoint_every_steps) if cfg.checkpoint_every_steps else 1
    hours = gpu_h / gpus
    if cfg.checkpoint_every_minutes:
        saves = max(saves, math.ceil(hours * 60 / cfg.checkpoint_every_minutes))
    kept = min(saves, cfg.keep_last)
    # + final weights (fp32 EMA safetensors + config.json) + metrics, progress and manifest files
    stored = kept * ckpt + 4 * params + 80 * tensors + 1100 + 2000 + 200 * (cfg.steps / cfg.log_every)
    return {"flavor": cfg.flavor, "params": params, "samples": samples, "flops_per_sample": fps,
            "text_len": text_len, "mfu": mfu, "mfu_source": mfu_src, "gpus": gpus, "gpu_hours": gpu_h,
            "days": hours / 24, "zero_stage": cfg.zero_stage, "world_size": world,
            "checkpoint_bytes": ckpt, "checkpoint_parts": parts, "checkpoint_save_traffic": ckpt,
            "checkpoint_restore_traffic": restore, "checkpoint_restore_traffic_resized": restore_resized,
            "checkpoints_saved": saves,
            "checkpoint_write_traffic_total": saves * ckpt, "bytes": stored, "cost": gpu_h * price}


# ----------------------------------------------------------------------------- measured corpus
def measure_corpus(download_shards: str | None, embed_shards: str | None) -> CorpusFigures | None:
    """Per-sample figures of a run's first download shard and first embedding shard (or None)."""
    c = CorpusFigures(source="measured in the run")
    found = False
    if download_shards:
        tars = list_shards(download_shards)
        if tars:
            sizes: dict[str, list[int]] = {}
            with store.open_uri(tars[0]) as f, tarfile.open(fileobj=f, mode="r|") as t:
                for mem in t:
                    ext = mem.name.rsplit(".", 1)[-1]
                    sizes.setdefault(ext, []).append(mem.size)
            mean = {k: sum(v) / len(v) for k, v in sizes.items()}
            c.image_bytes = mean.get("jpg", mean.get("png", mean.get("webp")))
            c.caption_bytes, c.json_bytes = mean.get("txt", c.caption_bytes), mean.get("json", c.json_bytes)
            found = True
    if embed_shards:
        npzs = store.glob(store.join(embed_shards, "*" + layout.EMBED_NPZ))
        if npzs:
            e = read_embedding_shard(npzs[0])
            if len(e):
                c.t5_tokens = float(e.t5_lengths.mean())
                c.clip_tokens = float(e.clip_lengths.mean())
                c.dims = e.dims
                found = True
    return c if found else None

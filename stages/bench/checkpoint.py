"""What does a checkpoint save cost the training loop: synchronous against background upload.

Measures, in one process and one run, the real training step (the stage's batch builder,
``train_step`` on a DeepSpeed engine) with ``CheckpointManager.save`` every ``every`` steps into
``store_uri``, three times on the same network and micro-batch: without saves (the baseline),
with synchronous saves and with background saves. A save's overhead is the extra wall time of
its run over the baseline divided by the number of saves; the figure is their ratio
(synchronous / background). For a background save it also reports the peak local disk its
snapshot holds (DeepSpeed writes the snapshot to a local temp folder; the upload reads from
there) and the peak extra host memory of the process (RSS sampled every 5 ms), against the
budget that would make a save fall back to synchronous (``checkpoint_background_budget_gb``).

The store should be remote to mean anything: ``t2i bench checkpoint`` points it at moto's S3
server behind a throttling proxy on 127.0.0.1, both in child processes (pipeline/cli/slow_proxy.py).
Saves should be further apart than an upload takes: at most one upload is in flight, so a save
that comes sooner waits for the previous one (the bench then measures that back-pressure).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch

from pipeline import store
from pipeline.executors import DistEnv
from stages.bench.train_step import default_cond_dims, stage_parts, synthetic_batch
from stages.diffusion import Diffusion
from stages.nets.flavors import build_network, get_flavor
from stages.training.checkpoint import CheckpointManager
from stages.training.distributed import setup_distributed
from stages.training.engine import build_engine, train_step


class _PeakRss(threading.Thread):
    """Peak resident memory of this process while running (Linux /proc; 0 elsewhere)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = _rss(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def bench_checkpoint(store_uri: str, stage: str = "base", flavor: str = "debug", *, batch: int = 2,
                     steps: int = 60, every: int = 30, zero: int = 2, text_len: int = 16) -> dict[str, Any]:
    """See the module doc. ``store_uri``: where the checkpoints go (a fresh folder per mode)."""
    if steps < every or every < 1:
        raise ValueError(f"steps must be >= every >= 1 (got steps={steps}, every={every})")
    spec, cfg_cls = stage_parts(stage)
    fl = get_flavor(spec.net_role, flavor)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = default_cond_dims(flavor)
    cfg = cfg_cls(flavor=flavor, batch_size=batch, steps=steps + 1, warmup_steps=0, min_lr_ratio=1.0,
                  loader_workers=0, zero_stage=zero)
    cpu_batch = synthetic_batch(fl, dims, batch, text_len, seed=cfg.seed)
    setup_distributed(DistEnv.from_env(), dev)
    torch.manual_seed(cfg.seed)
    engine, precision = build_engine(cfg, build_network(spec.net_role, flavor, dims, spec.variant(cfg)),
                                     device=dev, world_size=1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    ema = {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}

    def step() -> None:
        train_step(engine, diffusion, [spec.build_batch(cpu_batch, cfg, fl, dev, dtype)], loss_fn=spec.loss)

    step()  # warm-up: first-step allocations out of every timing
    runs: dict[str, dict[str, Any]] = {}
    for mode in ("none", "sync", "background"):
        mgr = CheckpointManager(store.join(store_uri, f"bench-{mode}-{int(time.time() * 1000)}"), keep_last=2,
                                every_steps=every, every_minutes=0, rank=0, world_size=1, device=dev)
        snapshot_peak = 0
        rss = _PeakRss()
        rss_before = _rss()
        rss.start()
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            step()
            if mode != "none" and i % every == 0:
                mgr.save(engine, i, {"data": {}}, ema, ema_sharded=False, background=mode == "background")
                snapshot_peak = max(snapshot_peak, mgr.snapshot_bytes)
        loop_s = time.perf_counter() - t0
        mgr.wait()  # the last background upload: after the loop, not in it
        drain_s = time.perf_counter() - t0 - loop_s
        peak = rss.stop()
        saves = steps // every if mode != "none" else 0
        runs[mode] = {"loop_s": loop_s, "step_s": loop_s / steps, "saves": saves, "drain_s": drain_s,
                      "snapshot_bytes": snapshot_peak, "extra_rss_bytes": max(0, peak - rss_before)}
    base = runs["none"]["loop_s"]
    for mode in ("sync", "background"):
        r = runs[mode]
        r["overhead_per_save_s"] = max(0.0, (r["loop_s"] - base) / r["saves"])
    sync, bg = runs["sync"]["overhead_per_save_s"], runs["background"]["overhead_per_save_s"]
    return {"stage": stage, "flavor": flavor, "zero": zero, "precision": precision, "device": str(dev),
            "params": sum(p.numel() for p in engine.module.parameters()), "steps": steps, "every": every,
            "store": store_uri, "runs": runs,
            "sync_over_background": sync / bg if bg > 0 else float("inf")}


def format_result(res: dict[str, Any]) -> str:
    r = res["runs"]
    mib = 1 / 2 ** 20
    lines = [f"checkpoint save overhead, {res['stage']} {res['flavor']} ({res['params']:,} params, ZeRO-{res['zero']}, "
             f"{res['precision']}), a save every {res['every']} of {res['steps']} steps, store {res['store']}",
             f"  step time without saves     {r['none']['step_s'] * 1e3:8.1f} ms",
             f"  synchronous: per save       {r['sync']['overhead_per_save_s'] * 1e3:8.1f} ms  "
             f"(step time {r['sync']['step_s'] * 1e3:.1f} ms)",
             f"  background:  per save       {r['background']['overhead_per_save_s'] * 1e3:8.1f} ms  "
             f"(step time {r['background']['step_s'] * 1e3:.1f} ms; last upload drained after the loop in "
             f"{r['background']['drain_s']:.2f} s)",
             f"  synchronous / background    {res['sync_over_background']:8.1f}x",
             f"  background save holds at its peak: {r['background']['snapshot_bytes'] * mib:.1f} MiB of local disk, "
             f"{r['background']['extra_rss_bytes'] * mib:.1f} MiB of extra host memory"]
    return "\n".join(lines)

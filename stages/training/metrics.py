"""Training observability: metrics.jsonl, TensorBoard event files, optional W&B, sample grids.

What a row holds: the loop's figures (loss, grad_norm, lr, samples_per_s, val_loss, peak_mem_gb on
CUDA), plus what the logger adds itself: ``host_peak_rss_gb`` (the process's peak resident memory:
the one memory figure a CPU run has, and the host side of a GPU run), and on a GPU with a known
peak rate ``mfu`` / ``tflops_per_gpu`` once the loop has counted a step's FLOPs (:class:`MfuMeter`).
TensorBoard groups the scalars by what they are about (:func:`tb_tag`: ``train/``, ``val/``,
``perf/``, ``memory/``); W&B gets the same names and the sample grids as images.

Only rank 0 logs. Object stores cannot append, so records are kept locally and the whole
``metrics.jsonl`` plus the TensorBoard directory are pushed to the store at every checkpoint and
at the end (:meth:`MetricsLogger.sync`). On resume, records after the resumed step (written by
the interrupted attempt after its last checkpoint) are dropped, and TensorBoard is told to
purge them too, so the curves show each step once.
"""
from __future__ import annotations

import io
import json
import os
import resource
import shutil
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from pipeline import layout, store
from stages.training.flops import flop_counter, mfu, peak_flops

_TB_GROUPS = (("val_", "val/"), ("samples_per_s", "perf/"), ("mfu", "perf/"), ("tflops", "perf/"),
              ("peak_mem", "memory/"), ("host_peak_rss", "memory/"))


def tb_tag(key: str) -> str:
    """TensorBoard tag of a metrics key: val_loss -> val/loss, samples_per_s -> perf/samples_per_s,
    peak_mem_gb -> memory/peak_mem_gb, everything else (loss, lr, grad_norm) under train/."""
    for prefix, group in _TB_GROUPS:
        if key.startswith(prefix):
            return group + (key[len(prefix):] if prefix == "val_" else key)
    return f"train/{key}"


def host_peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


class MfuMeter:
    """Model FLOPs utilisation of the training loop, the way the bench measures it
    (stages/bench/train_step.py): FLOPs of one real step counted with ``stages.training.flops.count_flops``'s
    counter, over the step time, over the device's dense peak (``stages.training.flops.mfu``). Only where a
    peak is known (a GPU in the table of stages/training/flops.py); on a CPU it counts nothing.

    The step time comes from the logged ``samples_per_s`` (all ranks): steps/s = samples_per_s /
    samples per step. With activation checkpointing the counted FLOPs include the recomputed
    forward, so the figure is hardware FLOPs utilisation, as the bench notes."""

    def __init__(self, device, precision: str, samples_per_step: int, peak: float | None = None):
        self.peak = peak if peak is not None else peak_flops(device, precision)  # FLOP/s
        self.samples_per_step = samples_per_step  # all ranks: batch_size * grad_accum * world
        self.flops_per_step: float | None = None  # one rank's step

    @property
    def pending(self) -> bool:
        """True until a step has been counted (and never on a device without a known peak)."""
        return self.peak is not None and self.flops_per_step is None

    def step(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` (one training step); the first time on a GPU, under the FLOP counter."""
        if not self.pending:
            return fn()

        counter = flop_counter()
        with counter:
            out = fn()
        self.flops_per_step = float(counter.get_total_flops())
        return out

    def figures(self, samples_per_s: float) -> dict[str, float]:
        """``mfu`` and ``tflops_per_gpu`` at this throughput; empty until a step was counted."""
        if not self.flops_per_step or not samples_per_s or samples_per_s <= 0:
            return {}
        step_s = self.samples_per_step / samples_per_s
        value = mfu(self.flops_per_step, step_s, self.peak)
        if value is None:
            return {}
        return {"mfu": value, "tflops_per_gpu": self.flops_per_step / step_s / 1e12}


class MetricsLogger:
    def __init__(self, out_uri: str, *, enabled: bool, resume_step: int, wandb_project: str | None = None,
                 run_name: str = "", config: dict | None = None, mfu: MfuMeter | None = None):
        self.enabled = enabled
        self.out_uri = out_uri
        self.mfu = mfu  # adds mfu / tflops_per_gpu to rows that carry samples_per_s
        self.records: list[dict[str, Any]] = []
        self._tb = None
        self._wandb = None
        self._tb_dir = None
        if not enabled:
            return
        uri = store.join(out_uri, layout.METRICS)
        if resume_step == 0:  # a fresh start: curves of an attempt that never checkpointed are void
            store.remove(uri)
            store.remove(store.join(out_uri, layout.TENSORBOARD))
        elif store.exists(uri):
            for line in store.read_bytes(uri).decode().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        from torch.utils.tensorboard import SummaryWriter

        self._tb_dir = tempfile.mkdtemp(prefix="tb-")
        # purge_step hides events of steps after the checkpoint we resumed from.
        self._tb = SummaryWriter(self._tb_dir, purge_step=resume_step + 1 if resume_step else None)
        if wandb_project:
            import wandb  # optional dependency (extra "wandb")

            self._wandb = wandb.init(project=wandb_project, name=run_name or None, config=config or {},
                                     resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        if "samples_per_s" in metrics:  # a training row (not a validation-only one): add what we measure
            if self.mfu is not None:
                metrics.update(self.mfu.figures(metrics["samples_per_s"]))
            metrics["host_peak_rss_gb"] = host_peak_rss_gb()
        self.records.append({"step": step, **metrics})
        for k, v in metrics.items():
            self._tb.add_scalar(tb_tag(k), v, step)
        if self._wandb is not None:
            self._wandb.log({tb_tag(k): v for k, v in metrics.items()}, step=step)

    def image(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
        """A [H, W, 3] uint8 image: to TensorBoard and as ``<out>/samples/<name>_<step>.png``."""
        if not self.enabled:
            return
        from PIL import Image

        self._tb.add_image(f"samples/{name}", grid_uint8, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"samples/{name}": wandb.Image(grid_uint8, caption=f"step {step}")}, step=step)
        buf = io.BytesIO()
        Image.fromarray(grid_uint8).save(buf, format="PNG")
        store.write_bytes_atomic(store.join(self.out_uri, layout.TRAIN_SAMPLES, layout.train_sample_name(name, step)), buf.getvalue())

    def sync(self) -> None:
        """Push metrics.jsonl and the TensorBoard files to the store."""
        if not self.enabled:
            return
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records).encode()
        store.write_bytes_atomic(store.join(self.out_uri, layout.METRICS), body)
        self._tb.flush()
        for name in os.listdir(self._tb_dir):
            with open(os.path.join(self._tb_dir, name), "rb") as f:
                store.write_bytes_atomic(store.join(self.out_uri, layout.TENSORBOARD, name), f.read())

    def close(self) -> None:
        if not self.enabled:
            return
        self.sync()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        shutil.rmtree(self._tb_dir, ignore_errors=True)


def image_grid(images: torch.Tensor, cols: int | None = None) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> one [rows*H, cols*W, 3] uint8 grid."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    b, c, h, w = x.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    return grid.permute(1, 2, 0).numpy()

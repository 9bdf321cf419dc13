"""Training observability: metrics.jsonl, TensorBoard event files, optional W&B, sample grids.

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
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

from pipeline import store


class MetricsLogger:
    def __init__(self, out_uri: str, *, enabled: bool, resume_step: int, wandb_project: str | None = None,
                 run_name: str = "", config: dict | None = None):
        self.enabled = enabled
        self.out_uri = out_uri
        self.records: list[dict[str, Any]] = []
        self._tb = None
        self._wandb = None
        self._tb_dir = None
        if not enabled:
            return
        uri = store.join(out_uri, "metrics.jsonl")
        if resume_step == 0:  # a fresh start: curves of an attempt that never checkpointed are void
            store.remove(uri)
            store.remove(store.join(out_uri, "tb"))
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
        rec = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.records.append(rec)
        for k, v in metrics.items():
            self._tb.add_scalar(f"train/{k}", float(v), step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def image(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
        """A [H, W, 3] uint8 image: to TensorBoard and as ``<out>/samples/<name>_<step>.png``."""
        if not self.enabled:
            return
        from PIL import Image

        self._tb.add_image(f"samples/{name}", grid_uint8, step, dataformats="HWC")
        buf = io.BytesIO()
        Image.fromarray(grid_uint8).save(buf, format="PNG")
        store.write_bytes_atomic(store.join(self.out_uri, "samples", f"{name}_{step:08d}.png"), buf.getvalue())

    def sync(self) -> None:
        """Push metrics.jsonl and the TensorBoard files to the store."""
        if not self.enabled:
            return
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records).encode()
        store.write_bytes_atomic(store.join(self.out_uri, "metrics.jsonl"), body)
        self._tb.flush()
        for name in os.listdir(self._tb_dir):
            with open(os.path.join(self._tb_dir, name), "rb") as f:
                store.write_bytes_atomic(store.join(self.out_uri, "tb", name), f.read())

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

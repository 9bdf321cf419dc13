"""Checkpoints in the artifact store that are never picked up half-written.

Layout of one checkpoint (``<out>/checkpoints/step_NNNNNNNN/``; each name spelled in pipeline/layout.py)::

    ds/...                       DeepSpeed's own files (model, optimizer, LR scheduler), from save_checkpoint
    state_rank{r}.json           our per-rank state: step, data position, python RNG, world size, ZeRO stage
    rng_rank{r}.safetensors      torch CPU (+CUDA) RNG states
    ema.safetensors              the EMA (ZeRO 0-2: identical on every rank, written by rank 0)
    ema_rank{r}.safetensors      ... or each rank's EMA partition (ZeRO-3)
    COMPLETE                     written by rank 0 last, after every rank has uploaded everything

Saving: DeepSpeed writes into a local temp dir per rank, each rank uploads what it wrote, all
ranks barrier, then rank 0 writes ``COMPLETE``. A checkpoint without ``COMPLETE`` (a crash, a
preempted node, a half-finished upload) is invisible to :meth:`CheckpointManager.latest`.

Unpickling: everything of ours is JSON or safetensors. DeepSpeed's own files are torch pickles
that ``engine.load_checkpoint`` reads with ``torch.load(weights_only=False)``; that is the one
place pickles from the store are loaded, and it cannot be avoided without re-implementing
DeepSpeed's checkpoint format. Only load checkpoints from a store you trust.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline import layout, store

DS_TAG = layout.CHECKPOINT_DEEPSPEED  # the tag DeepSpeed saves under: its files land in <checkpoint>/ds/
step_dir_name = layout.step_name      # kept: benchmarks import it from here


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able python RNG state, torch RNG state tensors)."""
    v, internal, gauss = random.getstate()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return {"python": [v, list(internal), gauss]}, tensors


def set_rng_state(py: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, internal, gauss = py["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


class CheckpointManager:
    """Decides when to save, saves, finds the latest complete checkpoint, loads it, prunes old ones."""

    def __init__(self, out_uri: str, *, keep_last: int, every_steps: int, every_minutes: float,
                 rank: int, world_size: int, device: torch.device, protect_through: int = -1):
        self.root = store.join(out_uri, layout.CHECKPOINTS)
        # Checkpoints up to this step belong to an earlier *finished* run of the stage (it is
        # being extended): keep_last never prunes them; only ``t2i gc`` may, when asked.
        self.protect_through = protect_through
        self.keep_last, self.every_steps, self.every_minutes = keep_last, every_steps, every_minutes
        self.rank, self.world_size, self.device = rank, world_size, device
        self._last_save_time = time.monotonic()

    # -- discovery -------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        # One glob for every COMPLETE marker, not an existence check per checkpoint folder (an
        # extended run keeps every earlier finished checkpoint: they add up).
        steps = []
        for uri in store.glob(store.join(self.root, "step_*", layout.CHECKPOINT_COMPLETE)):
            step = layout.step_of(uri.rsplit("/", 1)[0])
            if step is not None:
                steps.append(step)
        return sorted(steps)

    def latest(self) -> tuple[int, str] | None:
        """(step, uri) of the newest checkpoint with a COMPLETE marker, or None."""
        steps = self.complete_steps()
        if not steps:
            return None
        return steps[-1], store.join(self.root, step_dir_name(steps[-1]))

    # -- cadence ---------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Same answer on every rank: the time rule is decided by rank 0 and broadcast."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        if self.every_minutes <= 0:
            return by_steps
        flag = torch.tensor([1 if (time.monotonic() - self._last_save_time) >= 60 * self.every_minutes else 0],
                            device=self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast(flag, src=0)
        return by_steps or bool(flag.item())

    # -- save ------------------------------------------------------------------------------
    def save(self, engine, step: int, state: dict[str, Any], ema_tensors: dict[str, torch.Tensor] | None,
             ema_sharded: bool) -> str:
        """Collective. ``state`` is this rank's JSON-able state; EMA as described in the module doc."""
        uri = store.join(self.root, step_dir_name(step))
        if store.exists(store.join(uri, layout.CHECKPOINT_COMPLETE)):
            return uri  # a complete checkpoint of this very step exists already: never overwrite it
        if self.rank == 0 and store.exists(uri):
            store.remove(uri)  # leftovers of a crashed save at this same step (no COMPLETE marker)
        _barrier()
        local = tempfile.mkdtemp(prefix=f"ckpt-r{self.rank}-")
        try:
            engine.save_checkpoint(local, tag=DS_TAG, save_latest=False)
            py_rng, rng_tensors = rng_state()
            state = {**state, **py_rng, "step": step, "world_size": self.world_size, "rank": self.rank}
            with open(os.path.join(local, layout.checkpoint_state(self.rank)), "w") as f:
                json.dump(state, f)
            with open(os.path.join(local, layout.checkpoint_rng(self.rank)), "wb") as f:
                f.write(st_save(rng_tensors))
            if ema_tensors is not None and (ema_sharded or self.rank == 0):
                with open(os.path.join(local, layout.checkpoint_ema(self.rank, ema_sharded)), "wb") as f:
                    f.write(st_save(ema_tensors))
            _upload_dir(local, uri)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        _barrier()
        if self.rank == 0:
            store.write_json(store.join(uri, layout.CHECKPOINT_COMPLETE), {"step": step, "world_size": self.world_size,
                                                           "time": time.time()})
            self._prune()
        _barrier()
        self._last_save_time = time.monotonic()
        return uri

    def _prune(self) -> None:
        complete = self.complete_steps()
        keep = set(complete[-self.keep_last:])
        newest = complete[-1] if complete else -1
        for uri in store.listdir(self.root):
            s = layout.step_of(uri)
            if s is None:
                continue
            # Old complete ones beyond keep_last, and incomplete ones older than the newest complete
            # one; never those of an earlier finished run (see protect_through).
            if s not in keep and s <= newest and s > self.protect_through:
                store.remove(uri)

    # -- load ------------------------------------------------------------------------------
    def read_state(self, uri: str) -> dict[str, Any]:
        """This rank's JSON state of checkpoint ``uri`` (read before the engine exists: data position)."""
        state = store.read_json(store.join(uri, layout.checkpoint_state(self.rank)))
        if state.get("world_size") != self.world_size:
            raise RuntimeError(f"checkpoint {uri} was written by {state.get('world_size')} ranks, this run has "
                               f"{self.world_size}; resume with the same num_workers")
        return state

    def load(self, engine, uri: str, ema_sharded: bool) -> dict[str, torch.Tensor] | None:
        """Restore DeepSpeed state + RNG into the running engine; return the EMA tensors for this rank."""
        local = tempfile.mkdtemp(prefix=f"ckpt-load-r{self.rank}-")
        try:
            _download_dir(store.join(uri, DS_TAG), os.path.join(local, DS_TAG))
            load_path, _ = engine.load_checkpoint(local, tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {uri}")
        finally:
            shutil.rmtree(local, ignore_errors=True)
        state = self.read_state(uri)
        set_rng_state(state, st_load(store.read_bytes(store.join(uri, layout.checkpoint_rng(self.rank)))))
        ema_uri = store.join(uri, layout.checkpoint_ema(self.rank, ema_sharded))
        return st_load(store.read_bytes(ema_uri)) if store.exists(ema_uri) else None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _upload_dir(local: str, uri: str) -> None:
    """Copy every file under ``local`` to ``uri`` (same relative paths); large files stream."""
    fs, root = store.fs_and_path(uri)
    for dirpath, _, files in os.walk(local):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, local)
            dst = f"{root.rstrip('/')}/{rel}"
            if store.scheme_of(uri) == "file":
                os.makedirs(os.path.dirname(dst), exist_ok=True)
            store.with_retries(lambda: fs.put_file(src, dst), what=f"upload {src} -> {uri}/{rel}")


def _download_dir(uri: str, local: str) -> None:
    """Copy every file under ``uri`` into ``local``. All ranks' DeepSpeed files: ZeRO-1/2 loading reads them."""
    fs, root = store.fs_and_path(uri)
    root = root.rstrip("/")
    files = store.with_retries(lambda: fs.find(root), what=f"list {uri}")
    if not files:
        raise FileNotFoundError(f"checkpoint directory {uri} is empty")
    for path in files:
        rel = os.path.relpath(path, root)
        dst = os.path.join(local, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        store.with_retries(lambda: fs.get_file(path, dst), what=f"download {uri}/{rel}")

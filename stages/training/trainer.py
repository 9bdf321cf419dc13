"""The one training loop, shared by every training stage (train_prior, train_decoder, train_base,
train_sr256, train_sr1024).

Reads top to bottom (torchtitan's ``Trainer``): :class:`Trainer` sets up the process group,
finds the latest complete checkpoint, builds the data loader at the saved position, the network
and the DeepSpeed engine, and restores; :meth:`Trainer.train` is the loop, where each component
(checkpointer, metrics window, sample grid, non-finite guard) decides its own cadence. At the
end: a last checkpoint and the consolidated EMA weights in ``final/step_N/``.

A stage module contributes only a :class:`StageSpec` (role, batch builder, what data it needs)
and its config class. Where the ranks run is the executor's business (pipeline/executors.py):
the loop receives its rank and world size in a :class:`DistEnv`.
"""
from __future__ import annotations

import functools
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from data_prep.embed_format import read_embedding_shard
from data_prep.encoders_doc import read_encoders_doc
from data_prep.holdout import NO_HOLDOUT, HoldoutRule, read_rule
from pipeline import layout, store
from pipeline.context import StageContext, StageFailed, StageResult
from pipeline.executors import DistEnv
from pipeline.progress import TRAIN_PROGRESS, StageProgress
from stages.diffusion import Diffusion
from stages.nets.flavors import build_network, get_flavor
from stages.training.checkpoint import CheckpointManager
from stages.training.config import TrainConfig
from stages.training.data_resize import redistribute
from stages.training.distributed import setup_distributed
from stages.training.ema import EMA
from stages.training.engine import build_engine, train_step
from stages.training.final_weights import FinalConfig, network_config, read_final_config, write_final
from stages.training.loader import LoaderSpec, PositionTracker, ShardStream, make_loader, pair_shards
from stages.training.metrics import MetricsLogger, MfuMeter, image_grid
from stages.training.optim import configure_cuda_fast_path, configure_determinism
from stages.training.stage_spec import StageSpec
from stages.training.validation import Validator

LOOP_RESULT = layout.LOOP_RESULT  # kept: tests and tools import it from here


# ----------------------------------------------------------------------------- what a stage gives
@dataclass(frozen=True)
class TrainJob:
    """Where a stage reads and writes; picklable, so it travels to Ray workers."""

    out_uri: str
    download_uri: str | None  # download shards folder; None for the prior: it reads embeddings only
    embed_uri: str            # embedding shards folder
    cond_dims: dict[str, int]
    protect_through: int = -1  # steps of an earlier finished run of this attempt: its checkpoints stay
    holdout: HoldoutRule = NO_HOLDOUT  # the embed stage's held-out split: never trained on, validated on

    @classmethod
    def from_ctx(cls, ctx: StageContext, needs_images: bool) -> "TrainJob":
        embed = ctx.input_output("embed", "shards")
        download = ctx.input_output("download", "shards") if needs_images else None
        finished = int(((ctx.previous or {}).get("extent") or {}).get("steps", -1))
        return cls(ctx.out_uri, download, embed, read_cond_dims(ctx.input_uri("embed")), finished,
                   read_rule(ctx.input_uri("embed")))


def read_cond_dims(embed_attempt: str) -> dict[str, int]:
    """Conditioning widths from the embed stage's ``encoders.json`` (or, failing that, a shard)."""
    doc = read_encoders_doc(embed_attempt)
    if doc is not None:
        return doc.dims

    shards = store.glob(store.join(embed_attempt, layout.SHARDS, "*" + layout.EMBED_NPZ))
    if not shards:
        raise FileNotFoundError(f"neither {layout.ENCODERS} nor any embedding shard under {embed_attempt}")
    return read_embedding_shard(shards[0]).dims


# ----------------------------------------------------------------------------- loop components
class LossWindow:
    """The mean loss since the last log line; decides when a line is due (every ``log_every``)."""

    def __init__(self, every: int, last: int):
        self.every, self.last = every, last
        self.total, self.n, self.samples, self.t0 = None, 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.total = loss if self.total is None else self.total + loss
        self.n += 1
        self.samples += samples

    def due(self, step: int) -> bool:
        return self.n > 0 and (step % self.every == 0 or step == self.last)

    def flush(self, world: int) -> tuple[float, float]:
        """(mean loss over ranks, samples/s); one tiny collective per log line."""
        mean = (self.total / self.n).float().reshape(1)
        dist.all_reduce(mean)
        now = time.perf_counter()
        rate = self.samples / max(now - self.t0, 1e-9)
        self.total, self.n, self.samples, self.t0 = None, 0, 0, now
        return mean.item() / world, rate


class LiveFigures:
    """Rank 0's live line for the driver (pipeline/progress.py): step/total, loss, samples/s, ETA
    from this segment's step rate, last checkpoint. Writes are throttled by StageProgress."""

    def __init__(self, attempt_uri: str, start_step: int, total: int):
        self.progress = StageProgress(attempt_uri, name=TRAIN_PROGRESS, every_s=2.0)
        self.start_step, self.total, self.t0 = start_step, total, time.perf_counter()
        self.progress.update(step=start_step, total=total)

    def step(self, step: int) -> None:
        done = step - self.start_step
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(step=step, total=self.total, eta_s=(self.total - step) / rate if rate > 0 else None)

    def figures(self, **fields) -> None:
        self.progress.update(**fields)

    def done(self) -> None:
        self.progress.update(eta_s=0)
        self.progress.flush()


class NonFiniteGuard:
    """Counts steps skipped for a NaN/inf loss; a streak means the run diverged: stop it before
    anything overwrites the last good checkpoint."""

    def __init__(self, stage: str, limit: int, ckpt: CheckpointManager):
        self.stage, self.limit, self.ckpt = stage, limit, ckpt
        self.streak = self.total = 0

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.streak = 0
            return
        self.streak += 1
        self.total += 1
        if self.streak >= self.limit:
            self.ckpt.wait()  # the last good checkpoint may still be uploading: name it once it is whole
            latest = self.ckpt.latest()
            raise StageFailed(
                f"{self.stage}: loss was NaN/inf for {self.streak} steps in a row (up to step {step}; "
                f"{self.total} non-finite steps in all, limit train.max_nonfinite_steps={self.limit}); the "
                f"last good checkpoint is {latest[1] if latest else 'none'}. Lower lr, check the data, or resume "
                "from it.")


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """One rank of one training stage. ``after_step(step, start_step)``: an extension point called
    after every step's checkpoint (the reliability tests inject faults through it)."""

    def __init__(self, spec: StageSpec, cfg: TrainConfig, job: TrainJob, env: DistEnv, *,
                 after_step: Callable[[int, int], None] | None = None):
        self.spec, self.cfg, self.job, self.after_step = spec, cfg, job, after_step
        self.record_batch = getattr(after_step, "record_batch", None)  # a hook may also see each batch
        device = torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            configure_cuda_fast_path()  # TF32 matmuls, cudnn autotune
            if cfg.deterministic:
                configure_determinism()  # ... autotune off again, deterministic kernels
        setup_distributed(env, device)
        self.device, self.rank, self.world = device, dist.get_rank(), dist.get_world_size()
        self.flavor = get_flavor(spec.net_role, cfg.flavor)
        self.ckpt = CheckpointManager(job.out_uri, keep_last=cfg.keep_last, every_steps=cfg.checkpoint_every_steps,
                                      every_minutes=cfg.checkpoint_every_minutes, rank=self.rank,
                                      world_size=self.world, device=device, protect_through=job.protect_through,
                                      background_budget_bytes=int(cfg.checkpoint_background_budget_gb * 1e9))

        # 1. Where to start: the newest checkpoint every rank fetched and verified (rank 0's listing:
        # it could differ mid-write); damaged ones are skipped and reported.
        self.restore = self.ckpt.restore_point(ema_sharded=cfg.zero_stage == 3)
        self.start_step = self.restore.step if self.restore else -1
        state = self.restore.state if self.restore else {}

        # 2. Data, at the saved position (built before the engine: workers fork a small process).
        self.shards = pair_shards(job.download_uri, job.embed_uri)
        lspec = LoaderSpec(self.flavor.image_size if spec.needs_images else None, cfg.batch_size, cfg.seed,
                           self.rank, self.world, job.holdout, cfg.random_flip)
        data = self._data_state(state)
        self.loader = make_loader(self.shards, lspec, data, cfg.loader_workers, pin_memory=device.type == "cuda")
        self.tracker = PositionTracker(cfg.loader_workers, self.world, data, cfg.batch_size)

        # 3. Network (same init on every rank) and engine.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # Built whole, then partitioned by deepspeed.initialize. Not under deepspeed.zero.Init: it
        # partitions each submodule as soon as its own __init__ returns, so the parent's later
        # re-initialisation (zero_() on output convs, guided-diffusion style) would hit empty
        # partitions and silently leave random weights where zeros belong.
        model = build_network(spec.net_role, cfg.flavor, job.cond_dims, spec.variant(cfg),
                              gradient_checkpointing=cfg.activation_checkpointing)
        self.engine, self.precision = build_engine(cfg, model, device=device, world_size=self.world,
                                                   load_universal=bool(self.restore and self.restore.universal))
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.ema = EMA(self.engine.module, cfg.ema_decay)
        self.diffusion = Diffusion(**cfg.diffusion.model_dump())
        torch.manual_seed(cfg.seed * 1000 + self.rank + 1)  # noise, t and CFG masks differ per rank

        self.step = 0
        if self.restore:
            ema_tensors = self.ckpt.load(self.engine, self.restore, self.ema.zero3)  # also restores the RNG states
            if isinstance(ema_tensors, list):  # ZeRO-3 partitions written by another number of ranks
                self.ema.load_resharded(ema_tensors)
            elif ema_tensors is not None:
                self.ema.load_state_tensors(ema_tensors)
            self.step = int(state["step"])
        # MFU on GPUs with a known peak: rank 0 counts the FLOPs of its first step (stages/training/flops.py).
        self.mfu = (MfuMeter(device, self.precision, cfg.batch_size * cfg.grad_accum * self.world)
                    if self.rank == 0 else None)
        self.logger = MetricsLogger(job.out_uri, enabled=self.rank == 0, resume_step=self.step,
                                    wandb_project=cfg.wandb_project, run_name=spec.stage, config=cfg.model_dump(),
                                    mfu=self.mfu)
        self.grid = SampleGrid.build(self) if cfg.sample_every and spec.needs_images and spec.samples else None
        self.validator = Validator.build(self)  # None without a held-out split
        self.window = LossWindow(cfg.log_every, cfg.steps)
        self.guard = NonFiniteGuard(spec.stage, cfg.max_nonfinite_steps, self.ckpt)
        self.live = LiveFigures(job.out_uri, self.step, cfg.steps) if self.rank == 0 else None

    def _data_state(self, state: dict[str, Any]) -> dict | None:
        """This rank's data position: the saved one, or, when the checkpoint was written by another
        number of ranks or loader workers, its share of what the interrupted epoch still owes
        (stages/training/data_resize.py)."""
        peers = self.restore.peer_states if self.restore else []
        if peers:  # another world size: every old rank's state came with the checkpoint
            saved = [p.get("data") for p in peers]
        else:
            own = state.get("data")
            if own is None or int(own.get("workers", 0)) == max(1, self.cfg.loader_workers):
                return own
            saved = [own]  # same ranks, other loader_workers: each rank has its own state, gathered
            if self.world > 1:
                saved = [None] * self.world
                dist.all_gather_object(saved, own)
        if any(d is None for d in saved):
            return None
        return redistribute(saved, n_shards=len(self.shards), seed=self.cfg.seed, workers=self.cfg.loader_workers,
                            world_size=self.world)[self.rank]

    def next_step_batches(self) -> list[tuple[torch.Tensor, dict]]:
        micro = []
        for _ in range(self.cfg.grad_accum):
            batch = next(self.data)
            self.tracker.update(batch)
            if self.record_batch is not None:
                self.record_batch(self.rank, self.step + 1, batch)
            micro.append(self.spec.build_batch(batch, self.cfg, self.flavor, self.device, self.dtype))
        return micro

    def train(self) -> dict[str, Any]:
        """Train to ``cfg.steps`` from wherever the checkpoints say; returns this rank's result."""
        cfg = self.cfg
        self.engine.train()
        self.data = iter(self.loader)
        while self.step < cfg.steps:
            micro = self.next_step_batches()
            lr = self.engine.get_lr()[0]
            step = functools.partial(train_step, self.engine, self.diffusion, micro, loss_fn=self.spec.loss)
            out = self.mfu.step(step) if self.mfu is not None else step()
            self.step += 1
            self.guard.record(out["finite"], self.step)
            if not out["finite"]:
                continue  # skipped: no optimizer, LR or EMA update, not in the logged mean; counted
            self.ema.update(self.step)
            self.window.add(out["loss"], cfg.batch_size * cfg.grad_accum * self.world)
            val = self.validator.run(self) if self.validator is not None and self.validator.due(self.step) else {}
            if self.window.due(self.step) or val:
                self.log(lr, out["grad_norm"], val)
            if self.grid is not None and self.grid.due(self.step):
                self.grid.write(self)
            if self.ckpt.due(self.step) or self.step == cfg.steps:  # the last step is always saved
                self.save()
            if self.live is not None:
                self.live.step(self.step)
            if self.after_step is not None:
                self.after_step(self.step, self.start_step)
        return self.finish()

    def log(self, lr: float, grad_norm, val: dict[str, float]) -> None:
        """One metrics row: the loss window when it is due, the validation figures when computed."""
        row = dict(val)
        if self.window.due(self.step):
            loss, rate = self.window.flush(self.world)
            row.update({"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "lr": lr, "samples_per_s": rate,
                        **({"nonfinite_steps": self.guard.total} if self.guard.total else {})})
            if self.device.type == "cuda":  # peak memory since the last log line, this rank
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                torch.cuda.reset_peak_memory_stats(self.device)
        if self.live is not None:
            self.live.figures(**{k: row[k] for k in ("loss", "samples_per_s", "val_loss") if k in row})
        self.logger.log(self.step, row)

    def save(self) -> None:
        # Metrics first: a crash after COMPLETE but before the sync lost the rows of the
        # resumed-from checkpoint's interval; rows past an older checkpoint are dropped on resume.
        self.logger.sync()
        self.ckpt.save(self.engine, self.step, {"data": self.tracker.state()}, self.ema.state_tensors(),
                       ema_sharded=self.ema.zero3, background=self.cfg.checkpoint_upload == "background")
        if self.live is not None:
            self.live.figures(last_checkpoint=self.step)

    def finish(self) -> dict[str, Any]:
        """The stage's output: consolidated EMA weights (a collective under ZeRO-3) in final/step_N/."""
        self.ckpt.wait()  # the last checkpoint's upload (and, on rank 0, its COMPLETE)
        weights = self.ema.consolidated_state_dict(self.engine.module)
        final_uri = None
        if self.rank == 0:
            final_uri = write_final(self.job.out_uri, weights, FinalConfig(
                role=self.spec.role, flavor=self.cfg.flavor, cond_dims=dict(self.job.cond_dims),
                image_size=self.flavor.image_size, low_res_size=self.flavor.low_res_size,
                network=network_config(self.engine.module),
                diffusion=self.cfg.diffusion.model_dump(), condaug=self.spec.extra_config(self.cfg),
                step=self.step))
        out = {"step": self.step, "final": final_uri, "resumed_from": self.start_step,
               "resumed_world_size_from": self.restore.written_by if self.restore and self.restore.resized else None,
               "checkpoint_sync_fallbacks": self.ckpt.sync_fallbacks,
               "samples": _sum_over_ranks(self.tracker.samples, self.device),
               "skipped": sum(self.tracker.skipped.values()), "precision": self.precision,
               "nonfinite_steps": self.guard.total, "damaged_checkpoints": self.restore.damaged if self.restore else [],
               "restore_bytes_read": self.restore.bytes_read if self.restore else []}
        if self.rank == 0:
            # Also in the store: Ray Train (v2) keeps reported metrics only alongside a Ray checkpoint,
            # which this loop does not use, so the driver reads the finishing attempt's result here.
            store.write_json(store.join(self.job.out_uri, LOOP_RESULT), out)
        self.logger.close()
        if self.live is not None:
            self.live.done()
        dist.barrier()
        return out


def _sum_over_ranks(n: int, device: torch.device) -> int:
    t = torch.tensor([n], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return int(t.item())


def train_loop(spec: StageSpec, cfg: TrainConfig, job: TrainJob, env: DistEnv, *,
               after_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train one stage to ``cfg.steps``, resuming from the latest complete checkpoint."""
    return Trainer(spec, cfg, job, env, after_step=after_step).train()


class SampleGrid:
    """Every ``sample_every`` steps: the same few training conditionings sampled with the live
    weights, next to their real images (fixed across steps and resumes)."""

    def __init__(self, every: int, x0: torch.Tensor, cond: dict):
        self.every, self.x0, self.cond = every, x0, cond

    @classmethod
    def build(cls, t: "Trainer") -> "SampleGrid":
        return cls(t.cfg.sample_every, *fixed_conditioning(t.spec, t.cfg, t.flavor, t.shards, t.device, t.dtype))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def write(self, t: "Trainer") -> None:
        """Every rank samples (under ZeRO-3 a forward needs all ranks); rank 0 writes."""
        t.engine.eval()
        with torch.random.fork_rng(devices=[t.device] if t.device.type == "cuda" else []):
            g = torch.Generator(device=t.device).manual_seed(t.cfg.seed)
            imgs = t.diffusion.sample(t.engine.module, tuple(self.x0.shape), self.cond, steps=t.cfg.sample_steps,
                                      generator=g, device=t.device)
        t.engine.train()
        t.logger.image(t.step, "grid", image_grid(torch.cat([imgs, self.x0.float()])))


def fixed_conditioning(spec: StageSpec, cfg: TrainConfig, flavor, shards, device, dtype) -> tuple[torch.Tensor, dict]:
    """Conditioning of the first few samples of the first shard (no CFG dropout, no condaug)."""
    n = min(4, max(1, cfg.batch_size))
    batch = next(iter(ShardStream(shards[:1], LoaderSpec(flavor.image_size, n, cfg.seed, 0, 1))))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x0, cond = spec.build_batch(batch, spec.clean_config(cfg), flavor, device, dtype)
    return x0, {k: v for k, v in cond.items() if not k.startswith("drop_")}


# ----------------------------------------------------------------------------- stage entry

def train_stage(spec: StageSpec, cfg: TrainConfig, ctx: StageContext, *,
                after_step: Callable[[int, int], None] | None = None) -> StageResult:
    """``run(cfg, ctx)`` of every training stage: the executor decides where the ranks run."""
    job = TrainJob.from_ctx(ctx, spec.needs_images)
    loop_fn = functools.partial(train_loop, spec, cfg, job, after_step=after_step)
    ctx.progress(f"{spec.stage}: training {cfg.flavor} for {cfg.steps} steps")
    loop_out = ctx.executor.run_workers(loop_fn, cfg.placement(), name=spec.stage, progress=ctx.progress)
    luri = store.join(job.out_uri, LOOP_RESULT)
    if not (loop_out or {}).get("final") and store.exists(luri):
        loop_out = store.read_json(luri)  # Ray Train: rank 0 wrote it (see Trainer.finish)
    if not (loop_out or {}).get("final"):
        raise StageFailed(f"{spec.stage}: training ended without final weights (no {luri})")
    result = stage_result(job.out_uri, loop_out["final"])
    resumed = int(loop_out.get("resumed_from", -1))
    for warning in loop_out.get("damaged_checkpoints") or []:  # skipped at restore: said once, counted
        ctx.progress(f"warning: {spec.stage}: {warning}")
    if loop_out.get("damaged_checkpoints"):
        result.counts["damaged_checkpoints_skipped"] = len(loop_out["damaged_checkpoints"])
    if resumed >= 0:  # the attempt that finished started from this checkpoint (after a restart or resume)
        result.counts["resumed_from_step"] = resumed
        if loop_out.get("resumed_world_size_from"):  # ... written by another number of ranks
            result.counts["resumed_world_size_from"] = int(loop_out["resumed_world_size_from"])
        read = [int(b) for b in loop_out.get("restore_bytes_read") or []]
        if read:  # what the restore fetched from the store: the busiest rank's and all ranks' together
            result.counts["restore_bytes_read_max"], result.counts["restore_bytes_read_total"] = max(read), sum(read)
        ctx.progress(f"{spec.stage}: resumed from checkpoint step {resumed}")
    if loop_out.get("checkpoint_sync_fallbacks"):  # background saves over the disk budget, uploaded in the loop
        result.counts["checkpoint_sync_fallbacks"] = int(loop_out["checkpoint_sync_fallbacks"])
        ctx.progress(f"warning: {spec.stage}: {loop_out['checkpoint_sync_fallbacks']} background checkpoint "
                     "save(s) exceeded checkpoint_background_budget_gb and were uploaded synchronously")
    if "skipped" in loop_out:  # rank 0's undecodable images, this attempt
        result.counts["skipped_samples"] = int(loop_out["skipped"])
    if "nonfinite_steps" in loop_out:  # steps whose update was skipped (NaN/inf loss), this attempt
        result.counts["nonfinite_steps"] = int(loop_out["nonfinite_steps"])
    return result


def stage_result(out_uri: str, final: str) -> StageResult:
    """Read back what the loop wrote (the same whether it ran here or on Ray workers)."""
    config = read_final_config(final)
    metrics: dict[str, float] = {}
    muri = store.join(out_uri, layout.METRICS)
    if store.exists(muri):
        lines = [json.loads(x) for x in store.read_bytes(muri).decode().splitlines() if x.strip()]
        train_rows = [r for r in lines if "loss" in r]  # rows with only validation figures have no loss
        if train_rows:
            metrics = {f"final_{k}": float(v) for k, v in train_rows[-1].items() if k not in ("step", "val_loss")}
        val_rows = [r for r in lines if "val_loss" in r]
        if val_rows:  # the held-out loss at the last step (stages/training/validation.py)
            metrics["val_loss"] = float(val_rows[-1]["val_loss"])
        mfu_rows = [r["mfu"] for r in train_rows[1:] if "mfu" in r]  # the first row holds warm-up and the counted step
        if mfu_rows:  # what stages/bench/plan.measured_mfu reads
            metrics["mfu"] = float(statistics.median(mfu_rows))
    return StageResult(
        counts={"steps": config.step},
        metrics=metrics,
        outputs={"final": final, "weights": store.join(final, layout.FINAL_WEIGHTS),
                 "config": store.join(final, layout.FINAL_CONFIG),
                 "checkpoints": store.join(out_uri, layout.CHECKPOINTS), "tb": store.join(out_uri, layout.TENSORBOARD),
                 "metrics": muri})

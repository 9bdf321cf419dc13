"""The one training loop, shared by train_prior, train_decoder, train_base, train_sr256, train_sr1024.

Reads top to bottom (torchtitan style): set up the process group, find the latest complete
checkpoint, build the data loader at the saved position, build the network and the DeepSpeed
engine, restore, then ``while step < steps``: step, EMA, log, save. At the end: a last checkpoint
and the consolidated EMA weights as ``final/model.safetensors`` + ``final/config.json``.

A stage module contributes only a :class:`StageSpec` (role, batch builder, what data it needs)
and its config class. Ray never appears here (DESIGN invariant 2): the rank and world size
arrive in a :class:`DistEnv`, filled from torchrun's environment, from a single process, or by
``pipeline/train_ray.py`` from ``ray.train.get_context()``.
"""
from __future__ import annotations

import functools
import json
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from pipeline import layout, store
from pipeline.context import StageContext, StageFailed, StageResult
from stages.checkpoint import CheckpointManager
from stages.ema import EMA
from stages.final_weights import write_final
from stages.loader import LoaderSpec, PositionTracker, ShardStream, make_loader, pair_shards
from stages.optim import configure_cuda_fast_path, build_optimizer, build_scheduler, deepspeed_config, resolve_precision
from stages.train_config import TrainConfig
from stages.train_metrics import MetricsLogger, image_grid

Batch = dict[str, Any]


# ----------------------------------------------------------------------------- what a stage gives
@dataclass(frozen=True)
class StageSpec:
    """Everything that differs between the five training stages."""

    stage: str  # graph name, e.g. "train_base"
    role: str  # network role for stages.nets.flavors
    needs_images: bool
    # (loader batch, cfg, flavor, device, compute dtype) -> (x0, cond kwargs of the network)
    build_batch: Callable[[Batch, TrainConfig, Any, torch.device, torch.dtype], tuple[torch.Tensor, dict]]
    # the "condaug" entry of final/config.json (SR only)
    extra_config: Callable[[TrainConfig], dict | None] = lambda cfg: None
    # the config the sample grid builds its fixed conditioning with: no CFG dropout (SR: no condaug)
    clean_config: Callable[[TrainConfig], TrainConfig] = \
        lambda cfg: cfg.model_copy(update={"cfg_drop_text": 0.0, "cfg_drop_image": 0.0})


@dataclass(frozen=True)
class TrainJob:
    """Where a stage reads and writes; picklable, so it travels to Ray workers."""

    out_uri: str
    download_uri: str | None  # None for the prior: it reads embeddings only
    embed_uri: str
    cond_dims: dict[str, int]
    protect_through: int = -1  # steps of an earlier finished run of this attempt: its checkpoints stay

    @classmethod
    def from_ctx(cls, ctx: StageContext, needs_images: bool) -> "TrainJob":
        embed = ctx.input_uri("embed")
        download = ctx.input_uri("download") if needs_images else None
        finished = int(((ctx.previous or {}).get("extent") or {}).get("steps", -1))
        return cls(ctx.out_uri, download, embed, read_cond_dims(embed), finished)


def read_cond_dims(embed_uri: str) -> dict[str, int]:
    """Conditioning widths from ``embed/encoders.json`` (or, failing that, the first shard)."""
    uri = store.join(embed_uri, "encoders.json")
    if store.exists(uri):
        enc = store.read_json(uri)
        return {k: int(enc[k]) for k in ("t5_dim", "clip_dim", "clip_token_dim")}
    from data_prep.embed_format import read_embedding_shard

    shards = store.glob(store.join(embed_uri, "shards", "*.npz"))
    if not shards:
        raise FileNotFoundError(f"neither {uri} nor any embedding shard under {embed_uri}/shards")
    return read_embedding_shard(shards[0]).dims


@dataclass
class DistEnv:
    """This process's place in the job. ``initialized``: someone (Ray Train) already made the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    initialized: bool = False

    @classmethod
    def from_env(cls) -> "DistEnv":
        """torchrun's variables when present, else a single process on a free local port."""
        e = os.environ
        if "RANK" in e and "WORLD_SIZE" in e:
            return cls(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)))
        return cls(0, 1, 0, "127.0.0.1", _free_port())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with the right accelerator; it must be chosen before the first import."""
    if device.type != "cuda":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from deepspeed.accelerator import get_accelerator, set_accelerator

    want = "cuda" if device.type == "cuda" else "cpu"
    if get_accelerator()._name != want:  # imported earlier in this process with another choice
        if want == "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            set_accelerator(CPU_Accelerator())
        else:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

            set_accelerator(CUDA_Accelerator())
    _no_jit_ops(deepspeed)
    return deepspeed


def _no_jit_ops(deepspeed) -> None:
    """Never compile a DeepSpeed C++/CUDA op at run time.

    ``init_distributed`` on the CPU accelerator JIT-builds a shared-memory allreduce op (a C++
    compile: about a minute, and a toolchain on every worker). gloo does the same job. DeepSpeed
    consults ``deepspeed.ops.__compatible_ops__`` before building; marking the op incompatible
    there makes it fall back. We pre-seed the dict rather than reading it, because reading it runs
    DeepSpeed's (slow) compiler probe. Our optimizer is torch's AdamW, so no other op is needed.
    """
    import deepspeed.ops as ds_ops

    compat = ds_ops.__dict__.get("__compatible_ops__")
    if compat is None:
        compat = ds_ops.__dict__["__compatible_ops__"] = {}
    compat["deepspeed_shm_comm"] = False


def setup_distributed(env: DistEnv, device: torch.device) -> bool:
    """Make sure a process group exists and DeepSpeed's comm layer wraps it; True if we created it.

    Under Ray Train torch.distributed is already up; ``deepspeed.init_distributed`` then only
    adopts it (``deepspeed.zero.Init`` reads the world size from DeepSpeed's comm layer, not torch's).
    A group we create stays up for the life of the process: DeepSpeed caches groups derived from
    it (``deepspeed.utils.groups``), so destroying it would break the next stage run in-process.
    """
    created = not dist.is_initialized()
    if created:
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    deepspeed = import_deepspeed(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False,
                               verbose=False)
    return created


# ----------------------------------------------------------------------------- engine + step
def build_engine(cfg: TrainConfig, model: torch.nn.Module, *, device: torch.device, world_size: int = 1):
    """DeepSpeed engine around ``model`` with our AdamW + warmup/cosine LambdaLR. -> (engine, precision)."""
    deepspeed = import_deepspeed(device)
    precision = resolve_precision(cfg, device)
    model.to(device)
    optimizer = build_optimizer(cfg, model.parameters(), device)
    scheduler = build_scheduler(cfg, optimizer)
    ds_cfg = deepspeed_config(cfg, world_size, precision)
    if _clips_itself(cfg, precision):
        ds_cfg["gradient_clipping"] = 0.0  # see train_step: DeepSpeed would clip but not report the norm
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
                                           dist_init_required=False)
    engine.t2i_clip = cfg.grad_clip if _clips_itself(cfg, precision) else None
    engine.t2i_params = [p for p in engine.module.parameters() if p.requires_grad]  # listed once, not per step
    return engine, precision


def _clips_itself(cfg: TrainConfig, precision: str) -> bool:
    # ZeRO-0 in fp32 hands our optimizer the raw grads: DeepSpeed clips them without keeping the norm.
    return cfg.zero_stage == 0 and precision == "fp32"


def train_step(engine, diffusion, micro_batches: list[tuple[torch.Tensor, dict]]) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns detached tensors plus
    ``finite`` (bool): False means the loss was NaN/inf on some rank and the update was skipped.

    The finiteness check is the step's one host sync (one scalar; an all-reduce of it when there
    are several ranks, so every rank skips together and the ZeRO collectives stay in lockstep).
    """
    total = None
    finite = True
    for x0, cond in micro_batches:
        loss, _ = diffusion.training_loss(engine, x0, cond)
        engine.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
        if engine.is_gradient_accumulation_boundary():
            finite = _all_finite(total)
            if not finite:
                _skip_engine_step(engine)
                break
            if getattr(engine, "t2i_clip", None) is not None:
                engine.t2i_norm = torch.nn.utils.clip_grad_norm_(engine.t2i_params, engine.t2i_clip or float("inf"),
                                                                 foreach=True)
        engine.step()
    if not finite:
        return {"loss": total, "grad_norm": None, "finite": False}
    norm = engine.get_global_grad_norm() if getattr(engine, "t2i_clip", None) is None else engine.t2i_norm
    return {"loss": total / len(micro_batches), "grad_norm": norm, "finite": True}


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss).to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _skip_engine_step(engine) -> None:
    """Drop this step's gradients and advance DeepSpeed's micro-step counter without an update.

    What DeepSpeed's own fp16 overflow path does (ZeRO-1/2 ``step`` on overflow): zero the grads,
    forget the reduced partitions, count a skipped step; no optimizer, LR-schedule or EMA update.
    """
    opt = engine.optimizer
    if hasattr(opt, "zero_grad"):
        try:
            opt.zero_grad(set_to_none=True)
        except TypeError:
            opt.zero_grad()
    engine.zero_grad()
    for attr in ("averaged_gradients", "all_grad_tensors"):  # ZeRO-1/2 reduced partitions
        d = getattr(opt, attr, None)
        if isinstance(d, dict):
            for k in d:
                d[k] = None
    engine.micro_steps += 1  # what engine.step() would have done: keeps the accumulation boundary aligned
    engine.skipped_steps += 1


def build_plain(cfg: TrainConfig, model: torch.nn.Module, *, device: torch.device):
    """The same optimizer and schedule without DeepSpeed (the bench's plain-PyTorch baseline)."""
    model.to(device)
    optimizer = build_optimizer(cfg, model.parameters(), device)
    return model, optimizer, build_scheduler(cfg, optimizer)


def plain_train_step(model, optimizer, scheduler, diffusion, micro_batches, *, grad_clip: float,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """:func:`train_step` in plain PyTorch (bf16 via autocast, fp32 weights) for comparison."""
    total = None
    for x0, cond in micro_batches:
        with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = diffusion.training_loss(model, x0, cond)
        (loss / len(micro_batches)).backward()
        total = loss.detach() if total is None else total + loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"), foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"loss": total / len(micro_batches), "grad_norm": norm}


# ----------------------------------------------------------------------------- the loop
def train_loop(spec: StageSpec, cfg: TrainConfig, job: TrainJob, env: DistEnv, *,
               _fault_at_step: int | None = None) -> dict[str, Any]:
    """Train one stage to ``cfg.steps``, resuming from the latest complete checkpoint.

    ``_fault_at_step`` (tests): raise right after that step's checkpoint, like a killed worker,
    unless this attempt resumed at or after that step (so a restarted attempt gets past it).
    """
    from stages.diffusion import Diffusion
    from stages.nets.flavors import build_network, get_flavor

    device = torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        configure_cuda_fast_path()  # TF32 matmuls, cudnn autotune
    setup_distributed(env, device)
    rank, world = dist.get_rank(), dist.get_world_size()
    flavor = get_flavor(spec.role, cfg.flavor)
    ckpt = CheckpointManager(job.out_uri, keep_last=cfg.keep_last, every_steps=cfg.checkpoint_every_steps,
                             every_minutes=cfg.checkpoint_every_minutes, rank=rank, world_size=world,
                             device=device, protect_through=job.protect_through)

    # 1. Where to start: rank 0 decides (the listing could differ mid-write), everyone follows.
    latest = ckpt.latest()
    start = torch.tensor([latest[0] if latest else -1], device=device)
    dist.broadcast(start, src=0)
    start_step = int(start.item())
    resume_uri = store.join(ckpt.root, f"step_{start_step:08d}") if start_step >= 0 else None
    state = ckpt.read_state(resume_uri) if resume_uri else {}

    # 2. Data, at the saved position (built before the engine: workers fork a small process).
    shards = pair_shards(job.download_uri, job.embed_uri)
    lspec = LoaderSpec(flavor.image_size if spec.needs_images else None, cfg.batch_size, cfg.seed, rank, world)
    loader = make_loader(shards, lspec, state.get("data"), cfg.loader_workers, pin_memory=device.type == "cuda")
    tracker = PositionTracker(cfg.loader_workers, world, state.get("data"))

    # 3. Network (same init on every rank) and engine.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # Built whole, then partitioned by deepspeed.initialize. Not under deepspeed.zero.Init: it
    # partitions each submodule as soon as its own __init__ returns, so the parent's later
    # re-initialisation (zero_() on output convs, guided-diffusion style) would hit empty
    # partitions and silently leave random weights where zeros belong.
    model = build_network(spec.role, cfg.flavor, job.cond_dims, gradient_checkpointing=cfg.activation_checkpointing)
    engine, precision = build_engine(cfg, model, device=device, world_size=world)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ema = EMA(engine.module, cfg.ema_decay)
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    torch.manual_seed(cfg.seed * 1000 + rank + 1)  # noise, t and CFG masks differ per rank

    step = 0
    if resume_uri:
        ema_tensors = ckpt.load(engine, resume_uri, ema.zero3)  # also restores the RNG states
        if ema_tensors is not None:
            ema.load_state_tensors(ema_tensors)
        step = int(state["step"])
    logger = MetricsLogger(job.out_uri, enabled=rank == 0, resume_step=step, wandb_project=cfg.wandb_project,
                           run_name=spec.stage, config=cfg.model_dump())
    fixed = _fixed_conditioning(spec, cfg, flavor, shards, device, compute_dtype) \
        if cfg.sample_every and spec.needs_images else None

    # 4. The loop.
    engine.train()
    data = iter(loader)
    loss_sum, n_loss = None, 0
    nonfinite_streak, nonfinite_total = 0, 0
    t_log, samples_since = time.perf_counter(), 0
    while step < cfg.steps:
        micro = []
        for _ in range(cfg.grad_accum):
            batch = next(data)
            tracker.update(batch)
            micro.append(spec.build_batch(batch, cfg, flavor, device, compute_dtype))
        lr = engine.get_lr()[0]
        out = train_step(engine, diffusion, micro)
        step += 1
        samples_since += cfg.batch_size * cfg.grad_accum * world
        if not out["finite"]:
            # Skipped: no optimizer, LR or EMA update, not in the logged mean; counted. A streak
            # means the run has diverged: stop before anything overwrites the last good checkpoint.
            nonfinite_total += 1
            nonfinite_streak += 1
            if nonfinite_streak >= cfg.max_nonfinite_steps:
                latest_ok = ckpt.latest()
                raise StageFailed(
                    f"{spec.stage}: loss was NaN/inf for {nonfinite_streak} steps in a row (up to step {step}; "
                    f"{nonfinite_total} non-finite steps in all, limit train.max_nonfinite_steps="
                    f"{cfg.max_nonfinite_steps}); the last good checkpoint is "
                    f"{latest_ok[1] if latest_ok else 'none'}. Lower lr, check the data, or resume from it.")
            continue
        nonfinite_streak = 0
        ema.update(step)
        loss_sum = out["loss"] if loss_sum is None else loss_sum + out["loss"]
        n_loss += 1

        if (step % cfg.log_every == 0 or step == cfg.steps) and n_loss:
            mean_loss = (loss_sum / n_loss).float().reshape(1)
            dist.all_reduce(mean_loss)  # mean over ranks, one tiny collective per log line
            now = time.perf_counter()
            gn = out["grad_norm"]
            logger.log(step, {"loss": mean_loss.item() / world,
                              "grad_norm": float(gn) if gn is not None else float("nan"),
                              "lr": lr, "samples_per_s": samples_since / max(now - t_log, 1e-9),
                              **({"nonfinite_steps": nonfinite_total} if nonfinite_total else {})})
            loss_sum, n_loss, t_log, samples_since = None, 0, now, 0

        if fixed is not None and step % cfg.sample_every == 0:
            _sample_grid(engine, diffusion, fixed, cfg, flavor, logger, step, device)

        if ckpt.due(step) or step == cfg.steps:  # the last step is always saved: export can then be redone
            # Metrics first: a crash after COMPLETE but before the sync lost the rows of the
            # resumed-from checkpoint's interval; rows past an older checkpoint are dropped on resume.
            logger.sync()
            _save(ckpt, engine, step, tracker, ema)
        if _fault_at_step is not None and step == _fault_at_step > start_step:
            raise RuntimeError(f"injected fault after step {step}")


    # 5. The stage's output: consolidated EMA weights (a collective under ZeRO-3).
    weights = ema.consolidated_state_dict(engine.module)
    final_uri = None
    if rank == 0:
        final_uri = write_final(job.out_uri, weights, {
            "role": spec.role, "flavor": cfg.flavor, "cond_dims": dict(job.cond_dims),
            "image_size": flavor.image_size, "low_res_size": flavor.low_res_size,
            "diffusion": cfg.diffusion.model_dump(), "condaug": spec.extra_config(cfg), "step": step})
    out = {"step": step, "final": final_uri, "resumed_from": start_step, "samples": tracker.consumed * cfg.batch_size * world,
           "skipped": sum(tracker.skipped.values()), "precision": precision, "nonfinite_steps": nonfinite_total}
    if rank == 0:
        # Also in the store: Ray Train (v2) keeps reported metrics only alongside a Ray checkpoint,
        # which this loop does not use, so the driver reads the finishing attempt's result here.
        store.write_json(store.join(job.out_uri, LOOP_RESULT), out)
    logger.close()
    dist.barrier()
    return out


LOOP_RESULT = "loop_result.json"


def _save(ckpt: CheckpointManager, engine, step: int, tracker: PositionTracker, ema: EMA) -> None:
    ckpt.save(engine, step, {"data": tracker.state()}, ema.state_tensors(), ema_sharded=ema.zero3)


# ----------------------------------------------------------------------------- sample grid
def _fixed_conditioning(spec, cfg, flavor, shards, device, dtype) -> tuple[torch.Tensor, dict]:
    """Conditioning of the first few samples of the first shard (fixed across steps and resumes)."""
    n = min(4, max(1, cfg.batch_size))
    stream = ShardStream(shards[:1], LoaderSpec(flavor.image_size, n, cfg.seed, 0, 1))
    batch = next(iter(stream))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x0, cond = spec.build_batch(batch, spec.clean_config(cfg), flavor, device, dtype)
    return x0, {k: v for k, v in cond.items() if not k.startswith("drop_")}


def _sample_grid(engine, diffusion, fixed, cfg, flavor, logger, step, device) -> None:
    """Every rank samples (under ZeRO-3 a forward needs all ranks); rank 0 writes. Live weights."""
    x0, cond = fixed
    engine.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        imgs = diffusion.sample(engine.module, tuple(x0.shape), cond, steps=cfg.sample_steps, generator=g,
                                device=device)
    engine.train()
    logger.image(step, "grid", image_grid(torch.cat([imgs, x0.float()])))


# ----------------------------------------------------------------------------- stage entry
def run_stage(spec: StageSpec, cfg: TrainConfig, ctx: StageContext, **loop_kwargs) -> StageResult:
    """``run(cfg, ctx)`` of every training stage: Ray Train when the runner uses Ray, else in-process."""
    job = TrainJob.from_ctx(ctx, spec.needs_images)
    loop_fn = functools.partial(train_loop, spec, cfg, job, **loop_kwargs)
    ctx.progress(f"{spec.stage}: training {cfg.flavor} for {cfg.steps} steps")
    if ctx.ray_enabled:
        from pipeline.train_ray import launch  # Ray stays in pipeline/

        loop_out = launch(loop_fn, cfg, ctx)
    else:
        loop_out = loop_fn(DistEnv.from_env())
    luri = store.join(job.out_uri, LOOP_RESULT)
    if not (loop_out or {}).get("final") and store.exists(luri):
        loop_out = store.read_json(luri)  # Ray Train: rank 0 wrote it (see train_loop)
    if not (loop_out or {}).get("final"):
        raise StageFailed(f"{spec.stage}: training ended without final weights (no {luri})")
    result = stage_result(job.out_uri, loop_out["final"])
    resumed = int((loop_out or {}).get("resumed_from", -1))
    if resumed >= 0:  # the attempt that finished started from this checkpoint (after a restart or resume)
        result.counts["resumed_from_step"] = resumed
        ctx.progress(f"{spec.stage}: resumed from checkpoint step {resumed}")
    if "skipped" in (loop_out or {}):  # rank 0's undecodable images, this attempt
        result.counts["skipped_samples"] = int(loop_out["skipped"])
    if "nonfinite_steps" in (loop_out or {}):  # steps whose update was skipped (NaN/inf loss), this attempt
        result.counts["nonfinite_steps"] = int(loop_out["nonfinite_steps"])
    return result


def stage_result(out_uri: str, final: str) -> StageResult:
    """Read back what the loop wrote (the same whether it ran here or on Ray workers)."""
    config = store.read_json(store.join(final, layout.FINAL_CONFIG))
    metrics: dict[str, float] = {}
    muri = store.join(out_uri, layout.METRICS)
    if store.exists(muri):
        lines = [json.loads(x) for x in store.read_bytes(muri).decode().splitlines() if x.strip()]
        if lines:
            metrics = {f"final_{k}": float(v) for k, v in lines[-1].items() if k != "step"}
    return StageResult(
        counts={"steps": int(config["step"])},
        metrics=metrics,
        outputs={"final": final, "weights": store.join(final, layout.FINAL_WEIGHTS),
                 "config": store.join(final, layout.FINAL_CONFIG),
                 "checkpoints": store.join(out_uri, layout.CHECKPOINTS), "tb": store.join(out_uri, layout.TENSORBOARD),
                 "metrics": muri})

"""How fast is one training step, and what does DeepSpeed cost over plain PyTorch?

Measures, in one process and one run, the training step of a stage at a flavor and batch for
plain PyTorch (AdamW on fp32 weights, bf16 autocast) and for DeepSpeed at each requested ZeRO
stage (bf16 weights, fp32 master weights in the optimizer), on the same synthetic micro-batch:
step time, samples/s, peak memory, FLOPs per step (counted with FlopCounterMode, stages/training/flops.py)
and MFU against the device's dense peak. Each DeepSpeed run is reported as a ratio to plain.

The step is the real one: the stage's own batch builder (``StageSpec.build_batch``: CFG dropout,
SR conditioning augmentation, host->device copies), ``stages.diffusion.Diffusion.training_loss``
and ``stages.training.engine.train_step`` / ``plain_train_step``. Only the loader is replaced by one
pre-made micro-batch in the loader's format (``bench loader`` measures the loader). Ray is
never imported: this runs on a bare single-GPU host.

    python -m stages.bench.train_step --stage base --flavor base64-2b --zero 0,2,3 --batch 32
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline.executors import DistEnv
from stages.diffusion import Diffusion
from stages.models import MODELS
from stages.nets.flavors import PAPER_COND_DIMS, build_network, get_flavor
from stages.training.distributed import setup_distributed
from stages.training.engine import build_engine, train_step
from stages.training.flops import count_flops, mfu, peak_flops
from stages.training.optim import build_optimizer, build_scheduler, configure_cuda_fast_path, resolve_precision

# The bench's stage names are the model roles; each model's MFU target is in its ModelDef.
STAGES = {m.role: m for m in MODELS}
# Targets of issue 8 on one GPU in bf16: DeepSpeed step time / plain step time per ZeRO stage.
ZERO_RATIO_TARGETS = {0: 1.10, 1: 1.10, 2: 1.10, 3: 1.30}
# Small conditioning widths for the debug/demo flavors (the paper flavors get the paper's widths).
SMALL_COND_DIMS = {"t5_dim": 64, "clip_dim": 64, "clip_token_dim": 64}


@dataclass(frozen=True)
class BenchOptions:
    """Knobs of the fast path that the bench can switch (all off = what training does today)."""

    compile: bool = False          # torch.compile the network (plain) / engine.compile() (DeepSpeed)
    channels_last: bool = False    # UNet activations in NHWC (UNetConfig.channels_last)
    activation_checkpointing: bool = False
    precision: str = "auto"        # bf16 | fp32 | auto (bf16 on GPU)


def stage_parts(stage: str):
    """(StageSpec, config class) of a bench stage name."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)} (got {stage!r})")
    return STAGES[stage].spec, STAGES[stage].config


def default_cond_dims(flavor: str) -> dict[str, int]:
    return dict(SMALL_COND_DIMS if flavor in ("debug", "demo") else PAPER_COND_DIMS)


def synthetic_batch(flavor, cond_dims: dict[str, int], batch: int, text_len: int, seed: int = 0,
                    pin: bool = False) -> dict[str, Any]:
    """One micro-batch in ``stages.training.loader.collate``'s format (uint8 images, fp16 padded tokens).

    Captions get random lengths in [text_len/4, text_len], so attention runs with real padding
    masks as in training.
    """
    g = torch.Generator().manual_seed(seed)

    def tokens(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(max(1, text_len // 4), text_len + 1, (batch,), generator=g)
        mask = torch.arange(text_len)[None] < lengths[:, None]
        return torch.randn(batch, text_len, dim, generator=g).half() * mask[..., None], mask

    def unit(dim: int) -> torch.Tensor:
        v = torch.randn(batch, dim, generator=g)
        return (v / v.norm(dim=-1, keepdim=True)).half()

    out: dict[str, Any] = {"keys": [f"{i:09d}" for i in range(batch)]}
    if flavor.image_size:
        s = flavor.image_size
        out["image"] = torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8)
    out["clip_image"], out["clip_text"] = unit(cond_dims["clip_dim"]), unit(cond_dims["clip_dim"])
    out["t5_tokens"], out["t5_mask"] = tokens(cond_dims["t5_dim"])
    out["clip_tokens"], out["clip_mask"] = tokens(cond_dims["clip_token_dim"])
    for tok, vocab in (("clip", 49408), ("t5", 32128)):  # token ids (GLIDE), as the loader pads them
        ids_len = torch.randint(max(1, text_len // 4), text_len + 1, (batch,), generator=g)
        mask = torch.arange(text_len)[None] < ids_len[:, None]
        out[f"{tok}_ids"] = torch.randint(0, vocab, (batch, text_len), generator=g) * mask
        out[f"{tok}_id_mask"] = mask
    if pin:  # what the training loader does on a GPU host (non_blocking copies need pinned memory)
        out = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed(step: Callable[[], dict], warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(mean seconds per step over ``steps`` after ``warmup`` untimed steps, last loss)."""
    out = None
    for _ in range(warmup):
        out = step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    _sync(device)  # kernels are queued asynchronously: the clock stops when the GPU is done
    dt = (time.perf_counter() - t0) / steps
    return dt, float(out["loss"])


def _one_run(mode: str, zero: int | None, *, spec, cfg, flavor, cond_dims, cpu_batch, device, opts: BenchOptions,
             warmup: int, steps: int, count: bool) -> dict[str, Any]:
    """Build a fresh network (same seed every run) and engine, time it, count its FLOPs, free it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    # channels_last is a UNetConfig switch: not for a GlideModel (glide, the decoder's glide variant)
    is_unet = type(flavor.config(cond_dims, spec.variant(cfg))).__name__ == "UNetConfig"
    extra = {"channels_last": True} if opts.channels_last and is_unet else {}
    with torch.device(device):  # built where it runs: a 2B network initialises in seconds on a GPU
        model = build_network(spec.net_role, cfg.flavor, cond_dims, spec.variant(cfg),
                              gradient_checkpointing=opts.activation_checkpointing,
                              **extra)
    n_params = sum(p.numel() for p in model.parameters())
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    engine = optimizer = scheduler = None
    if mode == "plain":
        precision = resolve_precision(cfg, device)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model, optimizer, scheduler = build_plain(cfg, model, device=device)
        net = torch.compile(model) if opts.compile else model

        def step(module=net) -> dict:
            micro = [spec.build_batch(cpu_batch, cfg, flavor, device, dtype)]
            return plain_train_step(module, optimizer, scheduler, diffusion, micro, grad_clip=cfg.grad_clip,
                                    dtype=dtype, loss_fn=spec.loss)

        count_step = functools.partial(step, model)  # same FLOPs; a compiled graph may not run under the counter
    else:
        run_cfg = cfg.model_copy(update={"zero_stage": zero})
        engine, precision = build_engine(run_cfg, model, device=device, world_size=_world_size())
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if opts.compile and hasattr(engine, "compile"):
            engine.compile()

        def step() -> dict:
            micro = [spec.build_batch(cpu_batch, cfg, flavor, device, dtype)]
            return train_step(engine, diffusion, micro, loss_fn=spec.loss)

        count_step = step

    step_s, loss = _timed(step, warmup, steps, device)
    flops = None
    if count:  # one more, untimed step under the counter
        try:
            flops = count_flops(count_step)
        except Exception as e:  # noqa: BLE001 (e.g. DeepSpeed's compiled module under a dispatch mode)
            print(f"bench: FLOP count failed for {mode} zero={zero}: {e!r}", file=sys.stderr)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    res = {"mode": mode, "zero": zero, "precision": precision, "params": n_params, "step_s": step_s,
           "samples_per_s": cpu_batch_size(cpu_batch) / step_s, "peak_mem_gib": peak_mem, "loss": loss,
           "flops_per_step": flops}
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    del engine, model, optimizer, scheduler, step, count_step
    _release(device)
    return res


def cpu_batch_size(batch: dict) -> int:
    return len(batch["keys"])


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def bench_train(stage: str, flavor: str = "debug", *, zero_stages: tuple[int, ...] = (2,), batch: int = 4,
                steps: int = 5, warmup: int = 2, device: str | None = None, plain: bool = True,
                text_len: int = 77, cond_dims: dict[str, int] | None = None, options: BenchOptions | None = None,
                count_flops_: bool = True, threads: int | None = None,
                on_run: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Benchmark one stage; returns a dict with one entry per run under ``runs`` (see module doc).

    ``on_run`` is called with each run's result as soon as it is measured (a caller with a deadline
    keeps what finished). A run that fails (CUDA OOM at that batch) carries ``error`` instead of
    figures and the remaining runs still happen. ``threads``: torch intra-op threads (CPU); on a
    shared, loaded CPU box one thread is far steadier than OpenMP teams fighting for the cores.
    """
    opts = options or BenchOptions()
    spec, cfg_cls = stage_parts(stage)
    fl = get_flavor(spec.net_role, flavor)
    for z in zero_stages:
        if z not in (0, 1, 2, 3):
            raise ValueError(f"zero stages must be among 0, 1, 2, 3 (got {z})")
    if batch < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"batch and steps must be >= 1 and warmup >= 0 (got {batch}, {steps}, {warmup})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        configure_cuda_fast_path()
    if threads:
        torch.set_num_threads(threads)
    dims = dict(cond_dims or default_cond_dims(flavor))
    # No LR warmup or decay: a constant LR over the few bench steps.
    cfg = cfg_cls(flavor=flavor, batch_size=batch, steps=max(1, warmup + steps + 1), warmup_steps=0,
                  min_lr_ratio=1.0, activation_checkpointing=opts.activation_checkpointing,
                  precision=opts.precision, loader_workers=0)
    cpu_batch = synthetic_batch(fl, dims, batch, text_len, seed=cfg.seed, pin=dev.type == "cuda")
    if zero_stages:
        setup_distributed(DistEnv.from_env(), dev)  # DeepSpeed needs a (1-process) group

    common = dict(spec=spec, cfg=cfg, flavor=fl, cond_dims=dims, cpu_batch=cpu_batch, device=dev, opts=opts,
                  warmup=warmup, steps=steps, count=count_flops_)
    runs: list[dict[str, Any]] = []
    todo = ([("plain", None)] if plain else []) + [("deepspeed", z) for z in zero_stages]
    for mode, z in todo:
        try:
            r = _one_run(mode, z, **common)
        except (RuntimeError, MemoryError) as e:  # e.g. CUDA OOM at this batch: report it, run the rest
            r = {"mode": mode, "zero": z, "error": f"{type(e).__name__}: {e}"[:400]}
        if "error" in r:
            _release(dev)  # here, not in the except block: the traceback there still holds the network
        _derive(r, runs[0] if plain and runs and mode != "plain" else None, stage, dev)
        runs.append(r)
        if on_run is not None:
            on_run(r)
    return {"stage": stage, "flavor": flavor, "batch": batch, "steps": steps, "warmup": warmup,
            "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "text_len": text_len, "cond_dims": dims,
            "peak_tflops": (peak_flops(dev, resolve_precision(cfg, dev)) or 0) / 1e12 or None,
            "options": opts.__dict__, "runs": runs,
            # with activation checkpointing the counter also sees the recomputed forward (HFU, not MFU)
            "flops_include_recompute": opts.activation_checkpointing}


def _derive(r: dict[str, Any], base: dict[str, Any] | None, stage: str, dev: torch.device) -> None:
    """Achieved TFLOP/s, MFU and the ratio to the plain run, in place."""
    if "error" in r:
        return
    peak = peak_flops(dev, r["precision"])
    f = r["flops_per_step"]
    r["achieved_tflops"] = f / r["step_s"] / 1e12 if f else None
    r["mfu"] = mfu(f, r["step_s"], peak) if f else None
    if base is not None and "error" not in base:
        r["ratio_vs_plain"] = r["step_s"] / base["step_s"]
        r["ratio_target"] = ZERO_RATIO_TARGETS[r["zero"]]
    if r["mfu"] is not None:
        r["mfu_target"] = STAGES[stage].mfu_target


def format_table(res: dict[str, Any]) -> list[list[str]]:
    """Rows (header first) for printing: one per run."""
    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    rows = [["run", "prec", "step ms", "samples/s", "peak GiB", "GFLOP/step", "TFLOP/s", "MFU", "DS/plain"]]
    for r in res["runs"]:
        name = "plain" if r["mode"] == "plain" else f"zero-{r['zero']}"
        if "error" in r:
            rows.append([name, "-", "failed: " + r["error"][:60]] + ["-"] * 6)
            continue
        rows.append([name, r["precision"], f(r["step_s"] * 1e3, ".1f"), f(r["samples_per_s"], ".1f"),
                     f(r["peak_mem_gib"], ".1f"), f((r["flops_per_step"] or 0) / 1e9 or None, ".2f"),
                     f(r["achieved_tflops"], ".3f"), f(r["mfu"], ".1%"), f(r.get("ratio_vs_plain"), ".2f")])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=list(STAGES), default="base")
    p.add_argument("--flavor", default="debug")
    p.add_argument("--zero", default="2", help="comma-separated ZeRO stages, e.g. 0,2,3 ('' = plain only)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    zeros = tuple(int(z) for z in a.zero.split(",") if z.strip())
    # One JSON line per finished run (a caller that times us out keeps those), then the whole result.
    res = bench_train(a.stage, a.flavor, zero_stages=zeros, batch=a.batch, steps=a.steps, warmup=a.warmup,
                      on_run=lambda r: print(json.dumps({"partial_run": r}), flush=True),
                      device=a.device, options=BenchOptions(a.compile, a.channels_last, a.activation_checkpointing,
                                                            a.precision), threads=a.threads)
    print(json.dumps(res))
    for row in format_table(res):
        print("  ".join(f"{c:>10}" for c in row))


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- the plain baseline
def build_plain(cfg, model: torch.nn.Module, *, device: torch.device):
    """The same optimizer and schedule without DeepSpeed (the bench's plain-PyTorch baseline)."""
    model.to(device)
    optimizer = build_optimizer(cfg, model.named_parameters(), device)
    return model, optimizer, build_scheduler(cfg, optimizer)


def plain_train_step(model, optimizer, scheduler, diffusion, micro_batches, *, grad_clip: float,
                     dtype: torch.dtype = torch.float32, loss_fn=None) -> dict[str, Any]:
    """:func:`train_step` in plain PyTorch (bf16 via autocast, fp32 weights) for comparison."""
    total = None
    for x0, cond in micro_batches:
        with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = (diffusion.training_loss(model, x0, cond) if loss_fn is None
                       else loss_fn(diffusion, model, x0, cond))
        (loss / len(micro_batches)).backward()
        total = loss.detach() if total is None else total + loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"), foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"loss": total / len(micro_batches), "grad_norm": norm}

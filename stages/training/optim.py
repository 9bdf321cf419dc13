"""Optimizer, LR schedule and the DeepSpeed config they plug into.

We hand DeepSpeed a *client* optimizer and scheduler instead of naming them in the DeepSpeed
config: DeepSpeed's own Adam variants are C++/CUDA ops that it JIT-compiles on first use (a
compiler on every worker, minutes at start-up, and no CPU build without a toolchain). torch's
AdamW is fused on GPU and plain on CPU, and needs nothing built.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from stages.training.config import TrainConfig


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """'bf16' or 'fp32'. bf16 needs a GPU here: CPU bf16 matmuls are slow and we test in fp32."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def configure_determinism() -> None:
    """``train.deterministic``: bitwise-repeatable GPU training (PyTorch's reproducibility notes):
    deterministic kernels (an op without one raises, naming it), no cuDNN autotuning (it may pick
    another algorithm next time), a fixed cuBLAS workspace (required by deterministic cuBLAS)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def configure_cuda_fast_path() -> None:
    """Process-wide CUDA settings for training speed; call once before building the network.

    cudnn.benchmark: a UNet step has fixed shapes, so trying cuDNN's conv algorithms once and
    keeping the fastest pays off from the second step. TF32: what little runs in fp32 on the
    GPU (fp32 runs, the diffusion loss) uses tensor cores; bf16 training is unaffected.
    """
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(cfg: TrainConfig, named_params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D tensors (norm gains, biases) — the usual split — and
    ``cfg.lr_scales`` (name prefix -> lr multiplier) as further groups. ``named_params``: the
    model's ``named_parameters()``."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    scales = dict(cfg.lr_scales)
    unused = sorted(k for k in scales if not any(n.startswith(k) for n, _ in named))
    if unused:
        roots = sorted({n.split(".")[0] + "." for n, _ in named})
        raise ValueError(f"lr_scales: no parameter is named {', '.join(map(repr, unused))}...; this network's "
                         f"parameter names start with {', '.join(roots)}")

    def scale_of(name: str) -> float:
        hits = [k for k in scales if name.startswith(k)]
        return scales[max(hits, key=len)] if hits else 1.0

    groups: dict[tuple[bool, float], list] = {}
    for n, p in named:
        # Under deepspeed.zero.Init a parameter is already an empty partition: its shape is ds_shape.
        decays = len(getattr(p, "ds_shape", p.shape)) >= 2
        groups.setdefault((decays, scale_of(n)), []).append(p)
    # Without lr_scales: [decay, no_decay], the groups (and so the checkpointed optimizer state) of
    # every earlier release.
    order = sorted(groups, key=lambda k: (k[1] != 1.0, k[1], not k[0]))
    param_groups = [{"params": groups[k], "weight_decay": cfg.weight_decay if k[0] else 0.0, "lr": cfg.lr * k[1]}
                    for k in order]
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine to ``min_lr_ratio`` at ``steps``.

    A class rather than a closure so that LambdaLR's state_dict (saved in every checkpoint) holds
    its parameters and a resumed run provably uses the same schedule.
    """

    def __init__(self, steps: int, warmup_steps: int, min_lr_ratio: float):
        self.steps, self.warmup_steps, self.min_lr_ratio = steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))


# ZeRO communication buckets, in elements. Large buckets mean few, big collectives (NCCL reaches
# bus bandwidth from ~100 MB messages); the cost is one bucket of gradient memory each (x2 with
# overlap_comm). DeepSpeed's own default for both is 5e8, tuned for the same multi-billion sizes.
REDUCE_BUCKET_SIZE = 200_000_000
ALLGATHER_BUCKET_SIZE = 200_000_000
# ZeRO-3: parameters smaller than this stay whole on every rank (no gather per forward), and how
# many elements to prefetch ahead of the layer that needs them.
STAGE3_PERSISTENCE_THRESHOLD = 10_000  # small: the debug nets of the tests still get partitioned
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict. Only what we mean; DeepSpeed's defaults for the rest."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    # overlap_comm runs the gradient reduce-scatter (ZeRO-2) and the parameter prefetch (ZeRO-3) on
    # a side CUDA stream while backward/forward continue: the known GPU win, and what keeps ZeRO-3
    # near plain speed. The CPU accelerator has no streams to overlap on (gloo is synchronous),
    # so CPU runs keep the simple path.
    overlap = torch.cuda.is_available()
    if cfg.zero_stage >= 1:
        zero.update(reduce_bucket_size=REDUCE_BUCKET_SIZE, allgather_bucket_size=ALLGATHER_BUCKET_SIZE)
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=overlap, contiguous_gradients=True, reduce_scatter=True)
    if cfg.zero_stage == 3:
        # Gather whole small params once instead of partitioning them (latency over memory).
        zero.update(stage3_param_persistence_threshold=STAGE3_PERSISTENCE_THRESHOLD,
                    stage3_prefetch_bucket_size=STAGE3_PREFETCH_BUCKET_SIZE)
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        # bf16 keeps fp32 master weights (and grads accumulate in fp32) inside DeepSpeed's optimizer.
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # Our client optimizer is torch AdamW; DeepSpeed only vouches for its own ones under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }

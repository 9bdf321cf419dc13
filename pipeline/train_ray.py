"""Launch a training stage's loop on Ray Train (the only place the training stages meet Ray).

``stages/train.py`` knows nothing of Ray: its loop takes a ``DistEnv``. Here each Ray Train
worker fills one from ``ray.train.get_context()`` (Ray Train has already set up the torch
process group: gloo on CPU, NCCL on GPU) and runs the same loop a single host runs without Ray.

Ray's own checkpointing is not used: the loop writes checkpoints to the artifact store itself
(with a COMPLETE marker, and resumes from them), so ``RunConfig.storage_path`` is a local
scratch dir for Ray's bookkeeping only. After a worker failure Ray Train restarts the whole
worker group (``max_failures`` times) and the loop resumes from the latest complete checkpoint.
"""
from __future__ import annotations

import tempfile
from typing import Any, Callable

from pipeline.context import StageContext


def scaling_kwargs(cfg) -> dict[str, Any]:
    """ScalingConfig arguments from a TrainConfig (separate so specs can be checked without Ray)."""
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **cfg.resources}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    kw: dict[str, Any] = {"num_workers": cfg.num_workers, "use_gpu": use_gpu, "resources_per_worker": resources}
    if cfg.accelerator_type:
        kw["accelerator_type"] = cfg.accelerator_type
    return kw


def launch(loop_fn: Callable[[Any], dict], cfg, ctx: StageContext, *, name: str | None = None) -> dict:
    """Run ``loop_fn(DistEnv)`` on ``cfg.num_workers`` Ray Train workers; returns rank 0's result."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from stages.train import DistEnv

    def worker(_config: dict) -> None:
        c = ray.train.get_context()
        env = DistEnv(rank=c.get_world_rank(), world_size=c.get_world_size(), local_rank=c.get_local_rank(),
                      initialized=True)
        result = loop_fn(env)
        # Every worker must report (it is a barrier); Ray keeps rank 0's.
        ray.train.report({k: v for k, v in result.items() if isinstance(v, (int, float, str))})

    scaling = ScalingConfig(**scaling_kwargs(cfg))
    stage = name or ctx.out_uri.rstrip("/").rsplit("/", 1)[-1]
    run_config = RunConfig(name=stage, storage_path=tempfile.mkdtemp(prefix="t2i-ray-train-"),
                           failure_config=FailureConfig(max_failures=cfg.max_failures))
    trainer = TorchTrainer(worker, train_loop_config={}, scaling_config=scaling, run_config=run_config,
                           torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"))
    ctx.progress(f"{stage}: Ray Train with {cfg.num_workers} workers ({scaling.resources_per_worker})")
    result = trainer.fit()
    return dict(result.metrics or {})

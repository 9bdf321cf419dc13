"""The executor verbs on Ray (see pipeline/executors.py): the only place stages' work meets Ray.

* ``run_workers``: a training loop on Ray Train workers (TorchTrainer: gloo on CPU, NCCL on
  GPU), each filling a DistEnv from ``ray.train.get_context()``; Ray's own checkpointing is not
  used (the loop checkpoints to the store and resumes from it), so after a worker failure Ray
  Train restarts the group (``max_failures``) and the loop resumes. A one-rank CPU stage runs
  its loop right in the stage's own Ray task instead (the scheduler reserved the task's CPUs):
  no worker group to start, no idle controller actor, and a retried task resumes the same way.
* ``map_shards``: Ray Data — decode tasks (CPU) stream chunk rows to encoder actors (each loads
  its model once, writes each chunk's part to the store and returns only counts); the driver
  counts finished chunks per shard and a small task finishes each shard once all are back.
  Neither pixels nor embeddings pass through the driver.
* ``ray_address``: the address img2dataset's own Ray distributor connects to.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline.executors import DistEnv, ShardPlacement, WorkerPlacement


def scaling_kwargs(p: WorkerPlacement) -> dict[str, Any]:
    """ScalingConfig arguments (separate so specs can be checked without Ray)."""
    use_gpu = p.gpus_per_worker > 0
    resources = {"CPU": p.cpus_per_worker, **p.resources}
    if use_gpu:
        resources["GPU"] = p.gpus_per_worker
    kw: dict[str, Any] = {"num_workers": p.num_workers, "use_gpu": use_gpu, "resources_per_worker": resources}
    if p.accelerator_type:
        kw["accelerator_type"] = p.accelerator_type
    return kw


def trains_in_task(p: WorkerPlacement) -> bool:
    """One CPU rank: the stage's Ray task runs the loop itself (see the module docstring)."""
    return p.num_workers == 1 and p.gpus_per_worker == 0 and not p.accelerator_type


@dataclass
class RayExecutor:
    """Picklable: the scheduler creates it and hands it to each stage task."""

    address: str | None = None
    kind: str = "ray"
    # The scheduler reserved this stage task's CPUs for a one-rank CPU training (pipeline/run/ray_scheduler.py):
    # the loop then runs right here. Elsewhere (a caller's own process) training goes to Ray Train.
    train_in_task: bool = False

    def ray_address(self) -> str | None:
        import ray  # ray: loaded only when a run uses it (t2i status, --no-ray runs never do)

        return self.address or (ray.get_runtime_context().gcs_address if ray.is_initialized() else None)

    # -- training -------------------------------------------------------------------------------
    def run_workers(self, loop_fn: Callable[[DistEnv], dict], placement: WorkerPlacement, *, name: str,
                    progress: Callable[[str], None]) -> dict:
        if self.train_in_task and trains_in_task(placement):
            torch = sys.modules.get("torch")
            if torch is not None:  # as many threads as the CPUs the scheduler reserved for this task
                torch.set_num_threads(max(1, int(placement.cpus_per_worker)))
            return loop_fn(DistEnv.from_env())
        return self._ray_train(loop_fn, placement, name=name, progress=progress)

    def _ray_train(self, loop_fn, placement: WorkerPlacement, *, name: str, progress) -> dict:
        import ray.train  # ray: loaded only when a stage trains on it
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        def worker(_config: dict) -> None:
            c = ray.train.get_context()
            env = DistEnv(rank=c.get_world_rank(), world_size=c.get_world_size(), local_rank=c.get_local_rank(),
                          initialized=True)
            result = loop_fn(env)
            # Every worker must report (it is a barrier); Ray keeps rank 0's.
            ray.train.report({k: v for k, v in result.items() if isinstance(v, (int, float, str))})

        scaling = ScalingConfig(**scaling_kwargs(placement))
        run_config = RunConfig(name=name, storage_path=tempfile.mkdtemp(prefix="t2i-ray-train-"),
                               failure_config=FailureConfig(max_failures=placement.max_failures))
        trainer = TorchTrainer(worker, train_loop_config={}, scaling_config=scaling, run_config=run_config,
                               torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"))
        progress(f"{name}: Ray Train with {placement.num_workers} workers ({scaling.resources_per_worker})")
        result = trainer.fit()
        return dict(result.metrics or {})

    # -- shard maps ------------------------------------------------------------------------------
    def map_shards(self, processor, sources: list[dict], placement: ShardPlacement, *, progress,
                   on_done=None) -> list[dict]:
        import ray  # ray: loaded only when a run uses it (t2i status, --no-ray runs never do)

        for src in sources:
            processor.prepare(src)
        n_actors, gpus = _actors_and_gpus(placement, len(sources), progress)
        progress(f"Ray Data over {len(sources)} shards, {n_actors} encoder actor(s), {gpus} GPU(s) each")
        threads = max(1, int(placement.cpus_per_decode_task))
        ds = ray.data.from_items(sources, override_num_blocks=max(1, len(sources)))
        ds = ds.map_batches(_decode_rows, batch_size=1, batch_format="numpy", num_cpus=placement.cpus_per_decode_task,
                            fn_kwargs={"processor": processor, "threads": threads})
        ds = ds.map_batches(_EncodeActor, batch_size=1, batch_format="numpy", concurrency=n_actors,
                            num_gpus=gpus if gpus > 0 else None, num_cpus=1 if gpus == 0 else None,
                            fn_constructor_kwargs={"processor": processor, "device": "cuda" if gpus > 0 else "cpu"})
        return _finish_as_chunks_arrive(ds, processor, sources, on_done)


def _decode_rows(batch: dict[str, np.ndarray], processor, threads: int):
    """One source row in, one row per decoded chunk out (a generator, so a shard streams)."""
    for i in range(len(batch["shard"])):
        src = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        for chunk in processor.decode(src, threads):
            yield processor.to_row(chunk)


class _EncodeActor:
    """Holds the processor's encoder (its model on its device); returns per-chunk metadata only."""

    def __init__(self, processor, device: str):
        self.processor = processor
        self.encode = processor.open_encoder(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"shard": [], "chunk": [], "last": [], "result": []}
        for i in range(len(batch["shard"])):
            chunk = self.processor.from_row({k: v[i] for k, v in batch.items()})
            out["result"].append(json.dumps(self.encode(chunk)))
            out["shard"].append(chunk.shard)
            out["chunk"].append(chunk.chunk)
            out["last"].append(chunk.last)
        return {k: np.array(v) for k, v in out.items()}


def _finish_as_chunks_arrive(ds, processor, sources: list[dict], on_done) -> list[dict]:
    import ray  # ray: loaded only when a run uses it (t2i status, --no-ray runs never do)

    by_name = {s["shard"]: s for s in sources}
    results: dict[str, dict[int, dict]] = {}
    n_chunks: dict[str, int] = {}
    finish = ray.remote(num_cpus=0.1)(_finish)
    pending: list[Any] = []
    finished: set[str] = set()
    markers: list[dict] = []

    def collect(timeout: float | None) -> None:
        nonlocal pending
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout)
        try:
            done = ray.get(ready)
        except ray.exceptions.RayTaskError as e:  # e.g. StageFailed over max_bad_fraction: keep its type
            raise e.as_instanceof_cause() from None
        for marker in done:
            markers.append(marker)
            if on_done is not None:
                on_done(marker)

    for row in ds.iter_rows():
        name = str(row["shard"])
        results.setdefault(name, {})[int(row["chunk"])] = json.loads(str(row["result"]))
        if bool(row["last"]):
            n_chunks[name] = int(row["chunk"]) + 1
        # Ray Data may re-run a failed decode task, re-emitting chunks already seen: keying by chunk
        # index absorbs the duplicates, and each shard is finished exactly once.
        if name in n_chunks and len(results[name]) == n_chunks[name] and name not in finished:
            finished.add(name)
            ordered = [results[name][i] for i in range(n_chunks[name])]
            pending.append(finish.remote(processor, by_name[name], ordered))
        if pending:
            collect(timeout=0)
    while pending:
        collect(timeout=None)
    missing = sorted(set(by_name) - {m["shard"] for m in markers})
    if missing:
        raise RuntimeError(f"shard map (Ray): shards {missing} produced no output")
    return markers


def _finish(processor, source: dict, results: list[dict]) -> dict:
    return processor.finish(source, results)


def _actors_and_gpus(p: ShardPlacement, n_shards: int, progress) -> tuple[int, float]:
    import ray  # ray: loaded only when a run uses it (t2i status, --no-ray runs never do)

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    g = p.gpus_per_worker
    if g > 0 and gpus == 0:
        progress(f"gpus_per_actor={g} but the Ray cluster has no GPUs; encoding on CPU")
        g = 0.0
    if p.num_workers != "auto":
        return int(p.num_workers), g
    n = int(gpus // g) if g > 0 else int(cpus // 4)
    return max(1, min(n, 4 * n_shards)), g


def ray_session(address: str | None):
    """Connect to Ray for the length of a block unless already connected (then leave it be)."""
    import ray  # ray: loaded only when a run uses it (t2i status, --no-ray runs never do)

    @contextlib.contextmanager
    def session():
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        try:
            yield RayExecutor(address)
        finally:
            if started:
                ray.shutdown()
    return session()

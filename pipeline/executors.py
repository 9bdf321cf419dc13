"""How a stage's work is spread out, without the stage knowing where it runs (docs/design.md).

The runner hands every stage an *executor* in its context. A stage says what to do with a few
verbs; the executor decides where:

* ``run_workers(loop_fn, placement, name)``: run a training loop ``loop_fn(DistEnv) -> dict`` on
  ``placement.num_workers`` ranks, returning rank 0's result;
* ``map_shards(processor, sources, placement)``: run a :class:`ShardProcessor` over shards —
  decode each shard into chunks, encode the chunks on stateful workers (each loads its model
  once), finish each shard from its chunks' results — returning the per-shard results;
* ``ray_address()``: the Ray cluster to hand a tool that distributes itself (img2dataset), or
  None to run it locally.

:class:`LocalExecutor` (this file) runs everything in this process; the Ray executor
(pipeline/run/ray_executor.py, the only other implementation) runs the same verbs on a cluster. This
module imports nothing of the project, so every floor may use it.
"""
from __future__ import annotations

import contextlib
import os
import queue
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol


OWN_GROUP_PID = "T2I_OWN_PROCESS_GROUP_PID"  # set by the process that created its group itself


@dataclass
class DistEnv:
    """This process's place in a training job. ``initialized``: someone (Ray Train) already made the group."""

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
        # A process that made its own single-rank group (stages/training/distributed.py) exports RANK etc.
        # for torch's env:// init; a child it starts (a t2i subprocess) inherits them but is no
        # torchrun worker: it gets a group of its own on a free port.
        inherited = e.get(OWN_GROUP_PID) not in (None, str(os.getpid()))
        if "RANK" in e and "WORLD_SIZE" in e and not inherited:
            return cls(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)))
        return cls(0, 1, 0, "127.0.0.1", free_port())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the one helper for this)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class WorkerPlacement:
    """Where a training stage's ranks run (filled from a TrainConfig by the stage)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    max_failures: int = 0


@dataclass(frozen=True)
class ShardPlacement:
    """How a shard map is spread: encoder workers, their GPUs, CPUs per decode task."""

    num_workers: int | str = "auto"  # encoder workers; "auto" = what the cluster's GPUs (or CPUs / 4) allow
    gpus_per_worker: float = 0.0
    cpus_per_decode_task: float = 1.0


class ShardProcessor(Protocol):
    """Per-shard work in three phases, so decoding (CPU) and encoding (a model, maybe on a GPU)
    can run in different processes. Chunks carry ``shard``, ``chunk`` (index) and ``last``."""

    def prepare(self, source: dict) -> None:
        """Clear what an interrupted earlier attempt left for this shard."""

    def decode(self, source: dict, threads: int) -> Iterator[Any]:
        """The shard's chunks, in order (at least one, so every shard gets a result)."""

    def to_row(self, chunk: Any) -> dict:
        """A chunk as numpy columns (to travel between processes)."""

    def from_row(self, row: dict) -> Any:
        """Inverse of :meth:`to_row`."""

    def open_encoder(self, device: str) -> Callable[[Any], dict]:
        """A worker's encode function (loads its model once): chunk -> small JSON-able result.
        It writes the chunk's output to the store itself."""

    def finish(self, source: dict, results: list[dict]) -> dict:
        """Join a shard's chunk results (in chunk order) into its final output; returns its marker."""


class Executor(Protocol):
    kind: str

    def run_workers(self, loop_fn: Callable[[DistEnv], dict], placement: WorkerPlacement, *, name: str,
                    progress: Callable[[str], None]) -> dict: ...

    def map_shards(self, processor: ShardProcessor, sources: list[dict], placement: ShardPlacement, *,
                   progress: Callable[[str], None], on_done: Callable[[dict], None] | None = None) -> list[dict]: ...

    def ray_address(self) -> str | None: ...


class LocalExecutor:
    """Everything in this process: one training rank (or torchrun's), shards one after another."""

    kind = "local"

    def __init__(self, device: str | None = None):
        self.device = device

    def run_workers(self, loop_fn, placement: WorkerPlacement, *, name: str, progress) -> dict:
        if placement.num_workers > 1 and "WORLD_SIZE" not in os.environ:
            progress(f"{name}: num_workers={placement.num_workers} needs Ray or torchrun; training one rank here")
        on_gpu = placement.gpus_per_worker > 0 and _cuda()
        # A CPU rank computes with the CPUs its placement names, as under Ray: the thread count
        # decides the last bits of every sum, and a spec must give the same weights either way.
        with cpu_threads(None if on_gpu else placement.cpus_per_worker):
            return loop_fn(DistEnv.from_env())

    def map_shards(self, processor, sources, placement: ShardPlacement, *, progress, on_done=None) -> list[dict]:
        device = self.device or ("cuda" if placement.gpus_per_worker > 0 and _cuda() else "cpu")
        encode = processor.open_encoder(device) if sources else None
        threads = min(8, os.cpu_count() or 1)
        markers = []
        for src in sources:
            processor.prepare(src)
            # Encoding on CPU uses one thread, as the Ray executor's encoder actor (num_cpus=1) does:
            # the same embeddings to the bit with Ray and without (decoding keeps its threads).
            with cpu_threads(1 if device == "cpu" else None):
                results = [encode(chunk) for chunk in prefetch(processor.decode(src, threads))]
            marker = processor.finish(src, results)
            markers.append(marker)
            if on_done is not None:
                on_done(marker)
        return markers

    def ray_address(self) -> str | None:
        return None


@contextlib.contextmanager
def cpu_threads(cpus: float | None) -> Iterator[None]:
    """torch's intra-op threads set to ``cpus`` (at least 1) for the block, then restored; None
    leaves them alone. A no-op until torch is loaded (this module must not load it)."""
    torch = sys.modules.get("torch")
    if cpus is None or torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cuda() -> bool:
    try:
        import torch  # torch: t2i status must not load it (the CLI imports this module)

        return torch.cuda.is_available()
    except ImportError:
        return False


def prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run a generator ``depth`` items ahead on a thread: decode the next chunk while the
    encoder works on this one (the single-host path's only overlap of CPU and GPU work).
    Exceptions surface in the consumer; abandoning the iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in it:
                if not put((x, None)):
                    return
            put((end, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put((end, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # runs the generator's cleanup (decode thread pool) on this thread

    t = threading.Thread(target=work, daemon=True, name="prefetch")
    t.start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()
        t.join()

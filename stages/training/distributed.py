"""Process-group set-up for the training loop, and DeepSpeed's import done right.

Ray never appears here: a rank learns its place from a :class:`pipeline.executors.DistEnv`
(filled by torchrun's environment, a single process, or the Ray executor).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.executors import OWN_GROUP_PID, DistEnv


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
                          MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
                          **{OWN_GROUP_PID: str(os.getpid())})
    deepspeed = import_deepspeed(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False,
                               verbose=False)
    return created

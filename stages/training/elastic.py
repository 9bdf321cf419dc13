"""Resuming a checkpoint on another number of ranks ("elastic" resume): what a rank reads, and
DeepSpeed's Universal Checkpoint conversion that re-partitions the ZeRO state.

Why Universal Checkpointing: DeepSpeed's own ZeRO files are partitions of flattened parameter
groups whose boundaries depend on the world size; ``deepspeed.checkpoint.ds_to_universal``
turns them into one file per parameter and state (fp32 master weights, Adam's two moments,
step), and an engine built with ``checkpoint.load_universal`` slices those into its own
partitions, for ZeRO 1, 2 and 3 alike, with the LR scheduler and step from the model-state file.
It is DeepSpeed's maintained answer to exactly this change, so nothing here re-partitions
optimizer state by hand. (torch.distributed.checkpoint would need the state as DTensors, which
DeepSpeed's ZeRO optimizers do not expose.) ZeRO-0 in fp32 keeps the whole optimizer state in
the model-state file every rank reads: it loads unchanged on any number of ranks, no conversion.

What a rank reads: every rank converts the whole checkpoint itself (each needs a slice of every
parameter under the new partitioning, so each would fetch all of it anyway); the store is read
``M x checkpoint size`` in all, against ``checkpoint size + (M - 1) x the shared files`` when the
world size is unchanged (docs/scale.md). No rank ever writes a converted copy into the run: a
user's checkpoint is read, never changed.

The EMA (ours, not DeepSpeed's) is re-sliced by :meth:`stages.training.ema.EMA.load_resharded`
under ZeRO-3 and is one whole file otherwise; the data position by stages/training/data_resize.py.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import re

import torch

from pipeline import layout

UNIVERSAL = "universal"  # the local folder (beside the fetched files) the conversion writes to
_STATE = re.compile(r"state_rank(\d+)\.json$")


def elastic_reads(rel: str, ema_sharded: bool) -> bool:
    """Whether a rank resuming on another world size reads checkpoint file ``rel``: all of
    DeepSpeed's files, every old rank's JSON state (for the data position) and the whole EMA;
    no old rank's RNG state (a changed world reseeds, see :func:`reseed_after_resize`)."""
    if rel.startswith(layout.CHECKPOINT_DEEPSPEED + "/"):
        return True
    if _STATE.search(rel):
        return True
    name = rel.rsplit("/", 1)[-1]
    return name.startswith("ema") and name.endswith(".safetensors") and (("_rank" in name) == ema_sharded)


def needs_conversion(local: str) -> bool:
    """ZeRO 1-3 (and bf16) write per-rank optimizer partitions (``*_optim_states.pt``); ZeRO-0 in
    fp32 does not, and its optimizer state loads on any world size as it is."""
    ds = os.path.join(local, layout.CHECKPOINT_DEEPSPEED)
    return any(n.endswith("_optim_states.pt") for n in os.listdir(ds))


def to_universal(local: str) -> str:
    """Convert the DeepSpeed files fetched into ``local`` to a Universal Checkpoint in
    ``local/universal/`` (same tag); returns the folder to pass to ``engine.load_checkpoint``.

    DeepSpeed's converter prints its progress: it goes to a buffer, shown only if it fails."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # deepspeed is imported lazily (CPU/GPU choice)

    out = os.path.join(local, UNIVERSAL)
    args = argparse.Namespace(input_folder=os.path.join(local, layout.CHECKPOINT_DEEPSPEED),
                              output_folder=os.path.join(out, layout.CHECKPOINT_DEEPSPEED),
                              num_extract_workers=1, num_merge_workers=1,  # 1: in-process, no fork per rank
                              keep_temp_folder=False, strict=True,
                              # our engines save no Megatron-style universal info (no tensor parallelism)
                              inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal(args)
    except Exception as e:
        raise RuntimeError(f"DeepSpeed's universal checkpoint conversion failed: {e}\n{log.getvalue()[-2000:]}") from e
    return out


def reseed_after_resize(step: int) -> None:
    """A rank of a resized run has no RNG state of its own to restore: derive it from the seed
    the loop set (which differs per rank) and the step, so no rank repeats an earlier draw and
    the same resize replays the same noise."""
    seed = (torch.initial_seed() * 1_000_003 + step) % (2 ** 63)
    torch.manual_seed(seed)
    random.seed(seed)

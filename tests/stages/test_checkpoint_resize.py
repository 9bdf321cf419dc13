"""A checkpoint written by N ranks restores on M ranks to the bit (issue 24): CheckpointManager's
resize path (DeepSpeed Universal Checkpoint conversion for ZeRO 1-3, the plain file for ZeRO-0)
on real DeepSpeed over gloo. The restored state, saved again by the M ranks, converts to the same
universal checkpoint as the original: fp32 master weights, both Adam moments and the step of
every parameter, and the same LR schedule; the EMA (re-sliced under ZeRO-3) consolidates to the
same tensors."""
from __future__ import annotations

import argparse
import glob
import os

import pytest
import torch
import torch.multiprocessing as mp

from stages.training.distributed import import_deepspeed
from pipeline.executors import free_port

pytestmark = pytest.mark.slow
ZEROS = (0, 1, 2, 3)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # sizes no world size divides: partitions end mid-parameter, with padding
    return torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.LayerNorm(53), torch.nn.GELU(), torch.nn.Linear(53, 11))


def _rank(rank: int, world: int, port: int, phase: str, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from stages.models import imagen_base as base
    from stages.training.checkpoint import CheckpointManager
    from stages.training.ema import EMA
    from stages.training.engine import build_engine
    from tests.support.train import tiny_train_kwargs

    ds = import_deepspeed(torch.device("cpu"))
    ds.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    for zero in ZEROS:
        cfg = base.BaseTrainConfig(**tiny_train_kwargs(zero_stage=zero, num_workers=world, steps=10))
        manager = lambda sub: CheckpointManager(os.path.join(root, f"z{zero}", sub), keep_last=2, every_steps=1,
                                                every_minutes=0, rank=rank, world_size=world,
                                                device=torch.device("cpu"))
        sharded = zero == 3  # the EMA: each rank's partition under ZeRO-3, one whole file otherwise
        if phase == "save":
            engine, _ = build_engine(cfg, _model(), device=torch.device("cpu"), world_size=world)
            ema = EMA(engine.module, 0.5)
            g = torch.Generator().manual_seed(rank)
            for step in range(1, 4):
                engine.backward(engine(torch.randn(2, 37, generator=g)).pow(2).mean())
                engine.step()
                ema.update(step)
            manager("written").save(engine, 3, {}, ema.state_tensors(), ema_sharded=sharded)
        else:
            point = manager("written").restore_point(ema_sharded=sharded)
            assert point.step == 3 and point.written_by != world and point.universal == (zero > 0)
            engine, _ = build_engine(cfg, _model(), device=torch.device("cpu"), world_size=world,
                                     load_universal=point.universal)
            ema = EMA(engine.module, 0.5)
            restored = manager("written").load(engine, point, ema_sharded=sharded)
            ema.load_resharded(restored) if sharded else ema.load_state_tensors(restored)
            manager("again").save(engine, 3, {}, ema.state_tensors(), ema_sharded=sharded)
        whole = ema.consolidated_state_dict(engine.module)  # a collective under ZeRO-3
        if rank == 0:
            torch.save(whole, os.path.join(root, f"z{zero}", f"ema-{phase}.pt"))


def _universal(ckpt: str, out: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's universal form (ZeRO-0: the whole model-state file)."""
    ds = os.path.join(ckpt, "ds")
    if not glob.glob(os.path.join(ds, "*optim_states.pt")):
        state = torch.load(os.path.join(ds, "mp_rank_00_model_states.pt"), weights_only=False)
        return {**{f"module.{k}": v for k, v in state["module"].items()},
                **{f"opt.{i}.{k}": v for i, st in state["optimizer"]["state"].items() for k, v in st.items()},
                "lr": torch.tensor(state["lr_scheduler"]["last_epoch"])}
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(argparse.Namespace(input_folder=ds, output_folder=out, num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True))
    out_tensors = {}
    for f in sorted(glob.glob(os.path.join(out, "zero", "*", "*.pt"))):
        t = torch.load(f, weights_only=False)
        out_tensors[os.path.relpath(f, out)] = t["param"] if isinstance(t, dict) else t
    state = torch.load(glob.glob(os.path.join(out, "*model_states.pt"))[0], weights_only=False)
    out_tensors["lr"] = torch.tensor(state["lr_scheduler"]["last_epoch"])
    return out_tensors


@pytest.mark.parametrize("before,after", [(2, 3), (3, 2)])
def test_zero_0_to_3_restore_on_another_world_size_to_the_bit(tmp_path, before, after):
    root = str(tmp_path)
    mp.spawn(_rank, args=(before, free_port(), "save", root), nprocs=before)
    mp.spawn(_rank, args=(after, free_port(), "load", root), nprocs=after)
    for zero in ZEROS:
        step = os.path.join("checkpoints", "step_00000003")
        written = _universal(os.path.join(root, f"z{zero}", "written", step), str(tmp_path / f"u{zero}a"))
        again = _universal(os.path.join(root, f"z{zero}", "again", step), str(tmp_path / f"u{zero}b"))
        assert set(written) == set(again) and len(written) > 6, zero
        for k in written:
            torch.testing.assert_close(again[k], written[k], rtol=0, atol=0, msg=f"ZeRO-{zero} {k}")
        # the EMA, consolidated from the M ranks' (re-sliced) state, equals the N ranks' to the bit
        ema_n, ema_m = (torch.load(os.path.join(root, f"z{zero}", f"ema-{p}.pt")) for p in ("save", "load"))
        assert set(ema_n) == set(ema_m)
        for k in ema_n:
            torch.testing.assert_close(ema_m[k], ema_n[k], rtol=0, atol=0, msg=f"ZeRO-{zero} EMA {k}")

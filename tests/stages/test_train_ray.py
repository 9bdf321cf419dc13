"""ZeRO-2 and ZeRO-3 on 2 Ray Train workers (CPU, gloo) on a fresh local Ray."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load as st_load

from pipeline import store
from pipeline.run.ray_executor import scaling_kwargs
from stages.models import imagen_base as base
from stages.training.hooks import InjectFaultAfterStep
from stages.nets.flavors import build_network
from stages.training.trainer import train_stage
from tests.support.data import DIMS, make_dataset
from tests.support.train import stage_ctx, tiny_train_kwargs

pytestmark = pytest.mark.slow


def test_scaling_config_from_train_config():
    cfg = base.BaseTrainConfig(num_workers=4, cpus_per_worker=8, gpus_per_worker=1, resources={"h200": 1.0},
                               accelerator_type="H200")
    assert scaling_kwargs(cfg.placement()) == {"num_workers": 4, "use_gpu": True, "accelerator_type": "H200",
                                   "resources_per_worker": {"CPU": 8, "GPU": 1, "h200": 1.0}}
    assert scaling_kwargs(base.BaseTrainConfig().placement())["use_gpu"] is False


def test_zero2_and_zero3_on_two_ray_workers_agree(local_ray, tmp_path):
    root = str(tmp_path)
    download, embed = make_dataset(root, n_shards=3, per_shard=4)
    finals = {}
    for zero in (2, 3):
        cfg = base.BaseTrainConfig(**tiny_train_kwargs(zero_stage=zero, num_workers=2, cpus_per_worker=1,
                                                       steps=3, checkpoint_every_steps=1, ema_decay=0.5,
                                                       max_failures=1 if zero == 3 else 0))
        ctx = stage_ctx(root, f"train_base_z{zero}", download, embed, ray_enabled=True)
        # ZeRO-3 also loses its workers after step 2: Ray Train restarts the group (FailureConfig),
        # and the loop resumes both ranks' partitions from the store.
        result = train_stage(base.SPEC, cfg, ctx, after_step=InjectFaultAfterStep(2) if zero == 3 else None)
        assert result.counts["steps"] == 3
        ckpt = store.join(ctx.out_uri, "checkpoints", "step_00000003")
        assert store.exists(store.join(ckpt, "COMPLETE"))
        for r in (0, 1):  # both ranks wrote their state (and, under ZeRO-3, their EMA partition)
            state = store.read_json(store.join(ckpt, f"state_rank{r}.json"))
            assert state["world_size"] == 2 and state["step"] == 3
        ema_files = sorted(u.rsplit("/", 1)[-1] for u in store.glob(store.join(ckpt, "ema*.safetensors")))
        assert ema_files == (["ema_rank0.safetensors", "ema_rank1.safetensors"] if zero == 3 else ["ema.safetensors"])
        lines = [json.loads(x) for x in store.read_bytes(result.outputs["metrics"]).decode().splitlines()]
        assert [r["step"] for r in lines] == [1, 2, 3]
        if zero == 3:  # the restart restored step 2: each rank read its own partition, not the other's
            listing = store.read_json(store.join(ctx.out_uri, "checkpoints", "step_00000002", "COMPLETE"))["files"]
            own = [sum(d["bytes"] for rel, d in listing.items() if re.search(rf"zero_pp_rank_{r}_|_rank{r}\.", rel))
                   for r in (0, 1)]
            # DeepSpeed's unpartitioned files every rank loads (its zero_to_fp32.py script is read by none)
            shared = sum(d["bytes"] for rel, d in listing.items()
                         if rel.startswith("ds/") and not re.search(r"zero_pp_rank_\d+_|_rank\d+\.", rel))
            assert min(own) > 0 and result.counts["resumed_from_step"] == 2
            assert result.counts["restore_bytes_read_total"] == sum(own) + 2 * shared
            assert result.counts["restore_bytes_read_max"] == max(own) + shared
        finals[zero] = st_load(store.read_bytes(result.outputs["weights"]))

    # Same data, seeds and fp32 math: ZeRO-3's consolidated (all-gathered partition) EMA, after a
    # restart, must equal ZeRO-2's replicated one, and have the network's exact keys and shapes.
    ref = build_network("base", "debug", DIMS).state_dict()
    assert set(finals[3]) == set(ref)
    for k, v in ref.items():
        assert finals[3][k].shape == v.shape, k
        torch.testing.assert_close(finals[3][k], finals[2][k], rtol=1e-3, atol=2e-4, msg=k)

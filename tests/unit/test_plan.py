"""``t2i plan``: the cost model against a hand calculation, and its byte estimates against a real run."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch

from stages.bench import plan as bench_plan
from stages.models.imagen_base import BaseTrainConfig, SPEC as BASE_SPEC
from stages.bench.train_step import synthetic_batch
from stages.diffusion import Diffusion
from stages.training.flops import count_flops
from stages.nets.flavors import build_network, get_flavor
from tests.support.cli import t2i
from tests.support.specs import SMOKE_SPEC

DIMS = {"t5_dim": 32, "clip_dim": 32, "clip_token_dim": 64}


def _hand_flops_per_sample(text_len: int, batch: int = 2) -> float:
    """One real CPU step of the debug base model (not the meta device), divided by the batch."""
    fl = get_flavor("base", "debug")
    cfg = BaseTrainConfig(flavor="debug", batch_size=batch, steps=1)
    torch.manual_seed(0)
    net = build_network("base", "debug", DIMS)
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    b = synthetic_batch(fl, DIMS, batch, text_len)

    def step():
        x0, cond = BASE_SPEC.build_batch(b, cfg, fl, torch.device("cpu"), torch.float32)
        diffusion.training_loss(net, x0, cond)[0].backward()
    return count_flops(step) / batch, sum(p.numel() for p in net.parameters())


def test_plan_matches_a_hand_calculation_for_a_debug_flavor(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    cfg = BaseTrainConfig(flavor="debug", steps=10, batch_size=4, num_workers=2, gpus_per_worker=1, zero_stage=2,
                          precision="bf16", checkpoint_every_steps=5, keep_last=3)
    corpus = bench_plan.CorpusFigures(t5_tokens=6.0, dims=dict(DIMS))
    res = bench_plan.plan({"train_base": cfg}, bench_plan.PlanOptions(gpu="h100", mfu=0.5, price=2.0), corpus)
    s = res["stages"]["train_base"]
    text_len = 18                                   # 3 x 6 mean tokens, under T5's 128
    fps, params = _hand_flops_per_sample(text_len)
    samples = 10 * 4 * 2                            # steps x micro-batch x workers
    gpu_hours = samples * fps / (0.5 * 989e12) / 3600
    assert s["samples"] == samples and s["text_len"] == text_len and s["params"] == params
    assert s["flops_per_sample"] == pytest.approx(fps, rel=1e-9)
    assert s["gpu_hours"] == pytest.approx(gpu_hours, rel=1e-9)
    assert s["days"] == pytest.approx(gpu_hours / 2 / 24, rel=1e-9)
    assert s["cost"] == pytest.approx(gpu_hours * 2.0, rel=1e-9)
    # ZeRO-2 bf16: bf16 module (2 B) + fp32 master, m, v (12 B) + fp32 EMA (4 B) per parameter
    parts = s["checkpoint_parts"]
    assert (parts["module"], parts["optimizer"], parts["ema"]) == (2 * params, 12 * params, 4 * params)
    assert s["checkpoints_saved"] == 2
    # restoring under ZeRO-2 (the rule the checkpoint tests measure): the module file and the EMA
    # on each of the 2 ranks, the optimizer partitions once; after a resize, everything on each rank
    assert s["checkpoint_restore_traffic"] == pytest.approx(
        2 * (parts["module"] + parts["ema"]) + parts["optimizer"] + parts["overhead"], rel=1e-9)
    assert s["checkpoint_restore_traffic_resized"] == pytest.approx(2 * s["checkpoint_bytes"], rel=1e-9)
    assert res["total"]["bounds_wall_time"] == "train_base"
    assert set(res["total"]) >= {"gpu_hours", "days", "bytes", "cost"}


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="--gpu must be one of"):
        bench_plan.peak_bf16("v100")


def test_byte_estimates_within_ten_percent_of_the_smoke_run(smoke_run, tmp_path):
    cwd, run_uri = smoke_run
    p = t2i("plan", SMOKE_SPEC, "--gpu", "h100", "--json", cwd=cwd, env={"T2I_CACHE": str(tmp_path)}, timeout=300)
    assert p.code == 0, p.output
    res = json.loads(p.stdout)
    assert res["assumptions"]["corpus"]["source"] == "measured in the run"
    actual = {}
    for path in glob.glob(os.path.join(run_uri.removeprefix("file://"), "*", "*", "_MANIFEST.json")):
        m = json.loads(Path(path).read_text())
        actual[m["stage"]] = m["total_bytes"]
    checked = [st for st in res["stages"] if st in actual]
    assert {"download", "embed", "train_base", "train_sr1024", "train_prior"} <= set(checked)
    for st in checked:
        assert res["stages"][st]["bytes"] == pytest.approx(actual[st], rel=0.10), st


def test_rows_counted_from_a_local_list_else_stated(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": ["http://a/1.jpg"] * 7, "caption": ["x"] * 7}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"url": "u"}\n{"url": "v"}\n\n')
    assert bench_plan._count_local_rows(str(tmp_path)) == 9
    assert bench_plan._count_local_rows("s3://bucket/list.parquet") is None

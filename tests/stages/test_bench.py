"""t2i bench: train step (plain vs DeepSpeed, FLOPs, MFU), loader vs step, Ray-free, CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from stages.bench.train_step import bench_train
from stages.training.flops import count_flops, mfu, peak_flops, peak_flops_by_name
from tests.support.specs import REPO

ROOT = str(REPO)


@pytest.fixture(autouse=True)
def _one_thread():
    # The shared 2-core box: one intra-op thread is steadier (and faster) than two fighting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("stage", ["base", "prior"])
def test_bench_train_plain_vs_deepspeed(stage):
    res = bench_train(stage, "debug", zero_stages=(2,), batch=2, steps=2, warmup=1, device="cpu")
    plain, ds = res["runs"]
    assert (plain["mode"], ds["mode"], ds["zero"]) == ("plain", "deepspeed", 2)
    for r in (plain, ds):
        assert r["step_s"] > 0 and r["samples_per_s"] == pytest.approx(2 / r["step_s"])
        assert math.isfinite(r["loss"])
        assert r["flops_per_step"] > 0 and r["achieved_tflops"] > 0
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no peak rate, no CUDA memory
        assert r["params"] == plain["params"] > 0
    # Same network, same batch: the counted FLOPs cannot depend on who runs the step.
    assert ds["flops_per_step"] == plain["flops_per_step"]
    assert math.isfinite(ds["ratio_vs_plain"]) and ds["ratio_vs_plain"] > 0
    assert ds["ratio_vs_plain"] == pytest.approx(ds["step_s"] / plain["step_s"])
    assert res["peak_tflops"] is None


def test_bench_train_rejects_bad_input():
    with pytest.raises(ValueError, match="stage must be one of"):
        bench_train("sr512", "debug")
    with pytest.raises(ValueError, match="unknown flavor"):
        bench_train("base", "base-9b")
    with pytest.raises(ValueError, match="zero stages"):
        bench_train("base", "debug", zero_stages=(4,))


def test_flop_counter_matches_analytic_counts():
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)
    assert count_flops(lambda: lin(x)) == 2 * 8 * 32 * 16
    # forward + backward (grad wrt input and weight): three matmuls of the same size
    xg = torch.randn(8, 32, requires_grad=True)
    assert count_flops(lambda: lin(xg).sum().backward()) == 3 * 2 * 8 * 32 * 16
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    img = torch.randn(2, 3, 10, 10)
    assert count_flops(lambda: conv(img)) == 2 * 2 * 8 * 10 * 10 * 3 * 3 * 3


def test_peak_table_and_mfu():
    assert peak_flops_by_name("NVIDIA H200", "bf16") == 989e12
    assert peak_flops_by_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops_by_name("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops_by_name("Some Future GPU", "bf16") is None
    assert peak_flops("cpu", "bf16") is None
    assert mfu(989e12 * 0.5, 1.0, 989e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, None) is None


def test_bench_loader_against_step():
    from stages.bench.loader import bench_loader

    res = bench_loader("base", "debug", batch=4, workers=1, batches=5, step_steps=1, step_warmup=1, device="cpu",
                       per_shard=16)
    assert res["loader_samples_per_s"] > 0 and res["step_samples_per_s"] > 0
    assert res["loader_over_step"] == pytest.approx(res["loader_samples_per_s"] / res["step_samples_per_s"])
    assert res["image_size"] == 16 and res["step_mode"] == "plain"


def test_bench_loader_reads_an_existing_run(tmp_path):
    """--run: the prior reads only the run's embedding shards (its tars are never opened)."""
    from stages.bench.loader import bench_loader, write_synthetic_shards
    from stages.bench.train_step import SMALL_COND_DIMS

    write_synthetic_shards(str(tmp_path), image_size=None, cond_dims=SMALL_COND_DIMS, n_shards=1, per_shard=8)
    step = {"runs": [{"samples_per_s": 10.0, "mode": "plain"}]}  # the step is measured in the test above
    res = bench_loader("prior", "debug", batch=2, workers=0, batches=3, run_uri=str(tmp_path), device="cpu",
                       step_result=step)
    assert res["data"] == str(tmp_path) and res["image_size"] is None
    assert res["loader_over_step"] == pytest.approx(res["loader_samples_per_s"] / 10.0)


_NO_RAY = textwrap.dedent("""
    import importlib.abc, sys
    class NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError("ray is not installed on this host (blocked by the test)")
    sys.meta_path.insert(0, NoRay())
    import torch; torch.set_num_threads(1)
    import pipeline.cli.bench, stages.bench.loader, data_prep.bench.embed
    from stages.bench.train_step import bench_train
    res = bench_train("sr256", "debug", zero_stages=(0,), batch=1, steps=1, warmup=0, device="cpu")
    bad = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    assert not bad, bad
    print("RATIO", res["runs"][1]["ratio_vs_plain"])
""")


def test_bench_path_imports_no_ray():
    # Not the in-process tests' torch.distributed variables: the child makes its own 1-process group.
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars}, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-c", _NO_RAY], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RATIO" in p.stdout


def test_cli_bench_commands():
    from pipeline.cli import app

    runner = CliRunner()
    for cmd in ("train", "loader", "embed", "checkpoint"):
        r = runner.invoke(app, ["bench", cmd, "--help"])
        assert r.exit_code == 0, r.output
        assert "--json" in r.output
    r = runner.invoke(app, ["bench", "train", "--zero", "5"])
    assert r.exit_code == 2 and "--zero" in r.output
    r = runner.invoke(app, ["bench", "embed", "--model-size", "vit-h"])
    assert r.exit_code == 2 and "tiny" in r.output
    r = runner.invoke(app, ["bench", "train", "--stage", "prior", "--zero", "", "--batch-size", "2", "--steps", "1",
                            "--warmup", "0", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert [x["mode"] for x in res["runs"]] == ["plain"] and res["runs"][0]["flops_per_step"] > 0


def test_gpu_driver_keeps_finished_runs_of_a_timed_out_item():
    """tests/gpu/test_gpu.py: a train item killed mid-way still reports the runs it finished."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_driver", os.path.join(ROOT, "tests", "gpu", "test_gpu.py"))
    drv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drv)
    plain = {"mode": "plain", "zero": None, "precision": "bf16", "step_s": 0.5, "samples_per_s": 64.0,
             "peak_mem_gib": 40.0, "mfu": 0.42, "mfu_target": 0.40}
    z3 = {"mode": "deepspeed", "zero": 3, "error": "OutOfMemoryError: CUDA out of memory"}
    out = "noise\n" + json.dumps({"partial_run": plain}) + "\n" + json.dumps({"partial_run": z3}) + "\nTraceback"
    res = drv._result(out)
    assert res["partial"] and [r["mode"] for r in res["runs"]] == ["plain", "deepspeed"]
    items = [{"name": "base64-2b", "kind": "train"}, {"name": "embed", "kind": "embed"}]
    rows = drv._rows(items, {"base64-2b": {"json": res, "rc": "timeout"}})
    assert rows[1][-1] == "yes" and rows[2][-1].startswith("FAILED OutOfMemoryError") and rows[3][-1] == "not run"


def test_unet_channels_last_option_is_numerically_the_same():
    """UNetConfig.channels_last (bench --channels-last) only changes the activation layout."""
    from stages.bench.train_step import SMALL_COND_DIMS
    from stages.nets.flavors import build_network

    torch.manual_seed(0)
    ref = build_network("sr256", "debug", SMALL_COND_DIMS)
    nhwc = build_network("sr256", "debug", SMALL_COND_DIMS, channels_last=True)
    for p in ref.parameters():  # zero-initialised output convs would hide any difference
        torch.nn.init.normal_(p, std=0.05)
    nhwc.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    cond = {"text_tokens": torch.randn(2, 5, 64), "text_mask": torch.ones(2, 5, dtype=torch.bool),
            "low_res": torch.randn(2, 3, 16, 16)}
    torch.testing.assert_close(nhwc(x, t, **cond), ref(x, t, **cond), rtol=1e-4, atol=1e-4)


def test_cli_bench_repeats_print_the_spread():
    from pipeline.cli import app

    r = CliRunner().invoke(app, ["bench", "train", "--stage", "prior", "--zero", "", "--batch-size", "2", "--steps",
                                 "1", "--warmup", "0", "--threads", "1", "--repeats", "2", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    s = res["step_ms_spread"]["plain"]
    assert res["repeats"] == 2 and 0 < s["min"] <= s["median"] <= s["max"]


def test_bench_checkpoint_background_against_synchronous_on_a_slow_s3():
    """`t2i bench checkpoint` end to end: moto's S3 server behind the throttling proxy (both child
    processes on 127.0.0.1), the real step and CheckpointManager. At 4 MB/s a synchronous save of
    the debug net's ~3 MB checkpoint stalls the loop for most of a second; a background one only
    for its snapshot."""
    from pipeline.cli import app

    r = CliRunner().invoke(app, ["bench", "checkpoint", "--steps", "16", "--every", "8", "--mbps", "4",
                                 "--latency-ms", "10", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    runs = res["runs"]
    assert runs["sync"]["saves"] == runs["background"]["saves"] == 2 and runs["none"]["saves"] == 0
    assert runs["sync"]["overhead_per_save_s"] > 0.3
    assert res["sync_over_background"] > 1.5
    assert runs["background"]["snapshot_bytes"] > 1 << 20 and res["link"] == {"mbps": 4.0, "latency_ms": 10.0}
    assert res["store"].startswith("s3://")

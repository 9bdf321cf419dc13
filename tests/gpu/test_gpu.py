"""GPU checks (issue 8): the fast path on one CUDA device. Never run by ``make test``.

Two ways in:
  * ``pytest -m gpu tests/gpu`` — quick correctness checks of the fast path on CUDA (flash /
    memory-efficient SDPA accept our attention layout in bf16, the bf16 bench reports MFU);
    skipped without CUDA.
  * ``python tests/gpu/test_gpu.py`` (what tests/gpu/check.sh runs) — the benchmark driver:
    paper-scale train benchmarks (plain vs ZeRO 0/2/3), the loader against the step, the
    ViT-L/14 + T5-XXL embed benchmark. Each item runs in its own subprocess with its own
    timeout; a failed or timed-out item is reported and the rest still run; the summary table
    is always printed last. ``--quick`` runs small flavors only (a smoke test of the driver).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

try:
    import pytest
except ImportError:  # the GPU host may lack pytest: the driver below needs only the stdlib
    pytest = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- pytest -m gpu
_gpu = pytest.mark.gpu if pytest is not None else (lambda f: f)


def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch


@_gpu
def test_unet_attention_layout_takes_fused_kernels():
    """Self-attention without a mask runs under the flash backend alone; masked cross-attention
    under the memory-efficient one (neither falls back to the math kernel)."""
    torch = _cuda()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stages.nets.layers import AttentionBlock

    dev = torch.device("cuda")
    x = torch.randn(4, 256, 16, 16, device=dev, dtype=torch.bfloat16)
    blk = AttentionBlock(256, 64).to(dev, torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        blk(x).float().sum().backward()
    cross = AttentionBlock(256, 64, ctx_dim=512).to(dev, torch.bfloat16)
    ctx = torch.randn(4, 77, 512, device=dev, dtype=torch.bfloat16)
    mask = torch.arange(77, device=dev)[None] < torch.tensor([5, 20, 77, 1], device=dev)[:, None]
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        cross(x, ctx=ctx, ctx_mask=mask).float().sum().backward()


@_gpu
def test_bf16_norms_keep_fp32_statistics():
    """The native bf16 GroupNorm/LayerNorm path (no fp32 copy) matches the upcast reference."""
    torch = _cuda()
    import torch.nn.functional as F

    from stages.nets.layers import GroupNorm32, LayerNorm32

    dev = torch.device("cuda")
    x = (torch.randn(2, 128, 64, 64, device=dev) * 30 + 100).bfloat16()  # large mean: bf16 sums would fail
    gn = GroupNorm32(32, 128).to(dev, torch.bfloat16)
    ref = F.group_norm(x.float(), 32, gn.weight.float(), gn.bias.float(), gn.eps)
    assert (gn(x).float() - ref).abs().max() < 0.05
    y = (torch.randn(4, 81, 2048, device=dev) * 10 + 50).bfloat16()
    ln = LayerNorm32(2048).to(dev, torch.bfloat16)
    ref = F.layer_norm(y.float(), (2048,), ln.weight.float(), ln.bias.float(), ln.eps)
    assert (ln(y).float() - ref).abs().max() < 0.05


@_gpu
def test_bench_train_bf16_reports_mfu():
    torch = _cuda()
    from stages.bench.train_step import bench_train

    res = bench_train("base", "demo", zero_stages=(2,), batch=8, steps=3, warmup=2)
    plain, ds = res["runs"]
    assert plain["precision"] == ds["precision"] == "bf16"
    assert plain["flops_per_step"] == ds["flops_per_step"] > 0
    assert plain["peak_mem_gib"] > 0
    if res["peak_tflops"]:
        assert 0 < plain["mfu"] < 1 and 0 < ds["mfu"] < 1
    assert torch.isfinite(torch.tensor(ds["loss"]))


# ----------------------------------------------------------------------------- the driver
def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _items(quick: bool) -> list[dict]:
    """(name, kind, argv, timeout) — sized to fit ~6 minutes on one H200 in total."""
    T = "stages.bench.train_step"
    if quick:
        return [
            dict(name="base/demo", kind="train", timeout=120,
                 argv=_py("-m", T, "--stage", "base", "--flavor", "demo", "--zero", "0,2,3", "--batch", "8")),
            dict(name="prior/demo", kind="train", timeout=120,
                 argv=_py("-m", T, "--stage", "prior", "--flavor", "demo", "--zero", "2", "--batch", "16")),
            dict(name="loader base/demo", kind="loader", timeout=120, step_from="base/demo",
                 argv=_py("-m", "stages.bench.loader", "--stage", "base", "--flavor", "demo", "--batch", "8",
                          "--workers", "2", "--batches", "10")),
            dict(name="embed tiny", kind="embed", timeout=120,
                 argv=_py("-c", "import json; from data_prep.bench.embed import bench_embed; "
                                "print(json.dumps(bench_embed('tiny', 8, 2)))")),
        ]
    return [
        # Imagen base 64px, 2B: plain vs ZeRO 0 / 2 / 3 at the same batch.
        dict(name="base64-2b", kind="train", timeout=170,
             argv=_py("-m", T, "--stage", "base", "--flavor", "base64-2b", "--zero", "0,2,3", "--batch", "32",
                      "--steps", "6", "--warmup", "3")),
        dict(name="prior-1b", kind="train", timeout=100,
             argv=_py("-m", T, "--stage", "prior", "--flavor", "prior-1b", "--zero", "0,2,3", "--batch", "256",
                      "--steps", "6", "--warmup", "3")),
        dict(name="sr256-600m", kind="train", timeout=90,
             argv=_py("-m", T, "--stage", "sr256", "--flavor", "sr256-600m", "--zero", "2", "--batch", "16",
                      "--steps", "5", "--warmup", "2")),
        # Loader at base64's batch against base64-2b's measured plain step rate (no second step bench),
        # from 1024 px JPEGs as the shipped LAION spec downloads them for every stage.
        dict(name="loader base64", kind="loader", timeout=60, step_from="base64-2b",
             argv=_py("-m", "stages.bench.loader", "--stage", "base", "--flavor", "base64-2b", "--batch", "32",
                      "--workers", "8", "--batches", "30", "--source-size", "1024")),
        dict(name="embed L14+XXL", kind="embed", timeout=150,
             argv=_py("-c", "import json; from data_prep.bench.embed import bench_embed; "
                            "print(json.dumps(bench_embed('vit-l-14+t5-xxl', 64, 16, 'cuda')))")),
    ]


def _json_lines(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _result(stdout: str) -> dict | None:
    """The final result line, else the runs a train bench finished before it failed or timed out."""
    lines = _json_lines(stdout)
    full = [x for x in lines if "partial_run" not in x]
    if full:
        return full[-1]
    partial = [x["partial_run"] for x in lines if "partial_run" in x]
    return {"runs": partial, "partial": True} if partial else None


def _run_item(item: dict, budget_s: float, results: dict) -> dict:
    argv = list(item["argv"])
    src = results.get(item.get("step_from", ""), {}).get("json") or {}
    sps = ((src.get("runs") or [{}])[0]).get("samples_per_s")
    if sps:  # reuse the step rate measured by an earlier train item (its plain run)
        argv += ["--step-samples-per-s", str(sps)]
    timeout = max(10.0, min(item["timeout"], budget_s))
    t0 = time.perf_counter()
    print(f"\n=== {item['name']}: {' '.join(argv[1:])} (timeout {timeout:.0f}s)", flush=True)
    try:
        paths = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([ROOT] if ROOT not in paths else []))}
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout, p.returncode
        tail = (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        tail = out[-1500:]
    dt = time.perf_counter() - t0
    res = {"json": _result(out), "rc": rc, "seconds": dt}
    print(f"--- {item['name']}: rc={rc} in {dt:.0f}s", flush=True)
    if rc != 0 or res["json"] is None:
        print(tail, flush=True)
    return res


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _rows(items: list[dict], results: dict) -> list[list[str]]:
    rows = [["item", "run", "step ms", "samples/s", "peak GiB", "MFU", "ratio", "target", "ok"]]
    for it in items:
        r = results.get(it["name"])
        if r is None:
            rows.append([it["name"], "-", "-", "-", "-", "-", "-", "-", "not run"])
            continue
        j = r["json"]
        if j is None:
            rows.append([it["name"], "-", "-", "-", "-", "-", "-", "-", f"FAILED rc={r['rc']}"])
            continue
        if it["kind"] == "train":
            for run in j["runs"]:
                name = "plain" if run["mode"] == "plain" else f"zero-{run['zero']}"
                if "error" in run:
                    rows.append([it["name"], name, "-", "-", "-", "-", "-", "-", "FAILED " + run["error"][:40]])
                    continue
                checks = []
                if run.get("mfu") is not None:
                    checks.append(run["mfu"] >= run["mfu_target"])
                if run.get("ratio_vs_plain") is not None:
                    checks.append(run["ratio_vs_plain"] <= run["ratio_target"])
                target = " ".join(x for x in (
                    f"MFU>={run['mfu_target']:.0%}" if run.get("mfu_target") else "",
                    f"<={run['ratio_target']:.2f}x" if run.get("ratio_target") else "") if x)
                rows.append([it["name"], name, _fmt(run["step_s"] * 1e3, ".0f"), _fmt(run["samples_per_s"], ".1f"),
                             _fmt(run["peak_mem_gib"], ".1f"), _fmt(run["mfu"], ".1%"),
                             _fmt(run.get("ratio_vs_plain"), ".2f"), target,
                             "yes" if checks and all(checks) else ("NO" if checks else "-")])
        elif it["kind"] == "loader":
            ok = j["loader_over_step"] >= j["target"]
            rows.append([it["name"], f"{j['workers']} workers", "-", _fmt(j["loader_samples_per_s"], ".0f"), "-", "-",
                         _fmt(j["loader_over_step"], ".2f"), ">=3x step", "yes" if ok else "NO"])
        else:
            ok = j["e2e_over_raw"] >= 0.8
            rows.append([it["name"], f"batch {j['batch_size']}", "-", _fmt(j["e2e_images_per_s"], ".1f"), "-", "-",
                         _fmt(j["e2e_over_raw"], ".2f"), ">=0.8x raw", "yes" if ok else "NO"])
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    quick = "--quick" in args
    total = float(os.environ.get("GPU_CHECK_BUDGET_S", "420"))
    items = _items(quick)
    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    env_line = _env_line()
    print(env_line, flush=True)
    for it in items:
        left = total - (time.perf_counter() - t_start)
        if left < 15:
            print(f"=== {it['name']}: skipped, {left:.0f}s of the {total:.0f}s budget left", flush=True)
            continue
        try:
            results[it["name"]] = _run_item(it, left, results)
        except Exception as e:  # never lose the table to one broken item
            print(f"--- {it['name']}: driver error {e!r}", flush=True)
            results[it["name"]] = {"json": None, "rc": repr(e), "seconds": 0.0}
    rows = _rows(items, results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{env_line}; total {time.perf_counter() - t_start:.0f}s")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    ok = all(r["rc"] == 0 and r["json"] is not None for r in results.values()) and len(results) == len(items)
    return 0 if ok else 1


def _env_line() -> str:
    try:
        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        return f"torch {torch.__version__}, {dev}, python {sys.version.split()[0]}"
    except Exception as e:  # noqa: BLE001
        return f"torch unavailable ({e!r})"


if __name__ == "__main__":
    sys.exit(main())

"""The house rules of imports (docs/design.md, "Floors"), checked on the source with ast:

* no import circle between the project's own modules (top-level and function-level imports);
* no module imports one on a higher floor;
* ``ray`` is imported only by the orchestration modules that schedule and execute on Ray;
* model and diffusion code (the pure core) never imports ray, deepspeed, torch.distributed,
  fsspec or boto.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "data_prep", "cluster")

# Lowest first. A module may import modules of its own floor or below, never above.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("basement", ("pipeline", "pipeline.store", "pipeline.configbase", "pipeline.context", "pipeline.layout",
                  "pipeline.manifest", "pipeline.executors", "pipeline.progress", "cluster")),
    ("pure core", ("stages", "stages.nets", "stages.diffusion", "stages.condaug", "stages.process_args")),
    ("data formats", ("data_prep", "data_prep.embed_format", "data_prep.shards", "data_prep.encoders",
                      "data_prep.tiny_encoders", "data_prep.http_server", "data_prep.demo_corpus",
                      "data_prep.embed_decode", "data_prep.embed_encode", "data_prep.embed_ledger",
                      "data_prep.image_decode", "data_prep.url_list", "data_prep.download_config", "data_prep.holdout",
                      "data_prep.embed_config", "data_prep.encoder_config",
                      "data_prep.download_verify", "data_prep.download_retry", "data_prep.download_child")),
    ("training machinery", ("stages.train", "stages.train_config", "stages.stage_spec", "stages.validation", "stages.train_metrics", "stages.train_hooks",
                            "stages.engine", "stages.distributed", "stages.checkpoint", "stages.ema", "stages.optim",
                            "stages.loader", "stages.batches", "stages.final_weights", "stages.flops")),
    ("stage modules", ("stages.prior", "stages.decoder", "stages.base", "stages.superres", "stages.glide", "stages.models",
                       "stages.noised_clip", "stages.clip_guidance",
                       "stages.export", "stages.evaluate", "stages.sample_config", "stages.sample_loading",
                       "stages.sample_outputs", "stages.rerank",
                       "stages.sample", "stages.report", "stages.report_run", "stages.report_svg", "stages.report_eval",
                       "stages.demo_check", "data_prep.download",
                       "data_prep.embed")),
    ("benchmarks", ("stages.bench_", "data_prep.bench_")),
    ("orchestration", ("pipeline.graph", "pipeline.spec", "pipeline.planning", "pipeline.stage_exec",
                       "pipeline.runner", "pipeline.ray_exec", "pipeline.ray_executor", "pipeline.gc",
                       "pipeline.reaper", "pipeline.submit", "pipeline.console")),
    ("CLI", ("pipeline.cli",)),
]
RAY_ALLOWED = ("pipeline.ray_exec", "pipeline.ray_executor", "pipeline.submit")
PURE = ("stages.nets", "stages.diffusion", "stages.condaug", "stages.process_args")
NOT_IN_PURE = ("ray", "deepspeed", "torch.distributed", "fsspec", "boto3", "botocore", "s3fs")


def modules() -> dict[str, Path]:
    found = {}
    for top in PACKAGES:
        for root, _, files in os.walk(REPO / top):
            for f in files:
                if f.endswith(".py"):
                    path = Path(root) / f
                    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
                    found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports(mod: str, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def floor_of(mod: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            exact_only = p in ("pipeline", "stages", "data_prep")  # a package's __init__, not its modules
            hit = mod == p or (not exact_only and (mod.startswith(p + ".") or (p.endswith("_") and mod.startswith(p))))
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{mod} has no floor: add it to FLOORS (tests/test_import_rules.py) and docs/design.md"
    return best


def project_edges() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: set() for m in mods}
    for mod, path in mods.items():
        for n in imports(mod, path):
            t = resolve(n)
            if t and t != mod and not (mod.startswith(t + ".") and mods[t].name == "__init__.py"):
                edges[mod].add(t)
    return edges


def test_every_module_has_a_floor_and_imports_only_downward():
    bad = []
    for mod, targets in project_edges().items():
        for t in targets:
            if floor_of(t) > floor_of(mod):
                bad.append(f"{mod} ({FLOORS[floor_of(mod)][0]}) imports {t} ({FLOORS[floor_of(t)][0]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles():
    edges = project_edges()
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not out, out


def test_ray_only_in_the_scheduler_and_executors():
    users = sorted(m for m, p in modules().items()
                   if any(n == "ray" or n.startswith("ray.") for n in imports(m, p)) and not m.startswith(RAY_ALLOWED))
    assert not users, f"ray imported outside {RAY_ALLOWED}: {users}"


def test_pure_core_imports_no_infrastructure():
    bad = [(m, n) for m, p in modules().items() if m.startswith(PURE)
           for n in imports(m, p) if n.split(".")[0] in {x.split(".")[0] for x in NOT_IN_PURE}
           and any(n == x or n.startswith(x + ".") for x in NOT_IN_PURE)]
    assert not bad, bad


def test_no_file_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long

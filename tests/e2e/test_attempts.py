"""Never lose trained work (the shipped smoke spec, real store): attempts, extension, rerun, gc.

One finished smoke run (a copy of the session's, tests/support/runs.py) is driven through what
users do to finished runs: train longer (only the extra steps run; every file the first run wrote
stays byte-identical), change the learning rate (a new attempt beside the old one, both readable),
resume a finished stage (a no-op), upgrade the package (nothing re-runs), list and delete superseded
attempts with ``t2i gc`` (dry run first), then resume. The same life on S3 (moto's server) checks a
changed download field.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline import layout, store
from pipeline import manifest as mf
from pipeline.run.planning import stage_uri
from tests.support.cli import t2i
from tests.support.runs import copy_run
from tests.support.specs import SMOKE_SPEC as SMOKE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _weights(run_dir: Path) -> dict[str, str]:
    """sha256 of every model/EMA weights file under a run (what a user must never lose)."""
    out = {}
    for p in sorted(run_dir.rglob("*.safetensors")):
        if p.name in ("model.safetensors", "ema.safetensors"):
            out[str(p.relative_to(run_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _finished_at(run: str, stage: str) -> float:
    return store.read_json(store.join(stage_uri(run, stage), mf.MANIFEST))["finished_at"]


@pytest.fixture
def smoke(smoke_run, tmp_path):
    """A private copy of the session's finished smoke run (no Ray), in its own working directory:
    these tests change the run, which the other tests only read."""
    cwd = copy_run(smoke_run[0], tmp_path / "w")
    return cwd, f"file://{cwd}/runs/smoke"


def out_of(r) -> tuple[int, str]:
    """A t2i run's exit code and its stdout and stderr together."""
    return r.code, r.output


def test_extend_lr_resume_upgrade_gc(smoke, smoke_run):
    assert smoke_run.seconds < 120, \
        f"the smoke spec must finish in under 2 minutes on 2 cores (took {smoke_run.seconds:.0f}s)"
    cwd, run = smoke
    run_dir = cwd / "runs" / "smoke"
    first = _weights(run_dir)
    assert sum("final/step_00000004/model.safetensors" in k for k in first) == 7, first
    others = {s: _finished_at(run, s) for s in ("download", "embed", "train_prior", "train_decoder")}
    base_attempt = stage_uri(run, "train_base")

    # 1. Train longer: the same attempt continues from step 4, trains exactly 4 more steps.
    code, out = out_of(t2i("run", str(SMOKE), "--no-ray", "--set", "train_base.steps=8", cwd=cwd))
    assert code == 0, out
    assert stage_uri(run, "train_base") == base_attempt, "longer training is the same attempt"
    m = store.read_json(store.join(base_attempt, mf.MANIFEST))
    assert m["counts"]["resumed_from_step"] == 4 and m["counts"]["steps"] == 8, m["counts"]
    assert m["outputs"]["final"].endswith("final/step_00000008")
    rows = [r for r in store.read_bytes(store.join(base_attempt, layout.METRICS)).decode().splitlines() if r]
    assert len(rows) == 8, "log_every 1: one row per step, none trained twice"
    after = _weights(run_dir)
    assert all(after.get(k) == v for k, v in first.items()), "every file the first run wrote is byte-identical"
    assert {s: _finished_at(run, s) for s in others} == others, "only train_base (and sample) ran"

    # 2. Another learning rate: a new attempt from zero beside the old one; both stay readable.
    code, out = out_of(t2i("run", str(SMOKE), "--no-ray", "--set", "train_base.steps=8", "--set",
                       "train_base.lr=3e-4", cwd=cwd))
    assert code == 0, out
    new_attempt = stage_uri(run, "train_base")
    assert new_attempt != base_attempt and "new attempt" in out, out
    m2 = store.read_json(store.join(new_attempt, mf.MANIFEST))
    assert "resumed_from_step" not in m2["counts"] and m2["counts"]["steps"] == 8
    from stages.training.final_weights import load_final, resolve_final

    old_net, old_cfg = load_final(resolve_final(base_attempt))
    assert old_cfg.step == 8 and sum(p.numel() for p in old_net.parameters()) > 0
    assert all(_weights(run_dir).get(k) == v for k, v in after.items())

    # 3. Resume of a finished stage is a no-op; so is a run after a package upgrade.
    code, out = out_of(t2i("resume", run, "--stage", "train_base", "--no-ray", cwd=cwd))
    assert code == 0 and "train_base: done already" in out, out
    stamp = _finished_at(run, "train_base")
    import importlib.metadata as md

    from pipeline.run.runner import run_pipeline
    from pipeline.run.planning import load_run_spec

    real_version = md.version
    try:
        md.version = lambda name: "99.0.0" if name == "t2i-pipeline" else real_version(name)
        spec = load_run_spec(run)
        spec.cluster.use_ray = False
        summary = run_pipeline(spec, log=lambda m: None)
    finally:
        md.version = real_version
    assert {o.status for o in summary.outcomes.values()} == {"skipped"}, summary.outcomes
    assert _finished_at(run, "train_base") == stamp

    # 4. gc: a dry run lists the superseded attempt with its size; --yes removes it; resume still works.
    code, out = out_of(t2i("status", run, cwd=cwd))
    assert code == 0 and "superseded" in out and base_attempt.rsplit("/", 1)[-1] in out, out
    code, out = out_of(t2i("gc", run, "--json", cwd=cwd))
    assert code == 0, out
    import json

    listing = json.loads(out)
    kinds = {(g["stage"], g["uri"]) for g in listing["items"]}
    assert ("train_base", base_attempt) in kinds and listing["bytes"] > 0 and not listing["deleted"]
    assert store.exists(store.join(base_attempt, mf.MANIFEST)), "a dry run deletes nothing"
    code, out = out_of(t2i("gc", run, "--yes", cwd=cwd))
    assert code == 0 and not store.exists(base_attempt), out
    assert store.exists(store.join(new_attempt, mf.MANIFEST)), "gc keeps what the current spec uses"
    code, out = out_of(t2i("resume", run, "--no-ray", cwd=cwd))
    assert code == 0 and out.count("done already") == 11 and "▶" not in out, out  # every stage, evaluate included


def test_rerun_keeps_the_old_attempt(smoke):
    work, run = smoke  # a private copy: this test's new attempt changes no other test's run
    old = stage_uri(run, "train_prior")
    code, out = out_of(t2i("rerun", run, "--stage", "train_prior", "--no-ray", cwd=work))
    assert code == 0, out
    new = stage_uri(run, "train_prior")
    assert new == old + "-2" and store.exists(store.join(old, mf.MANIFEST))
    assert "resumed_from_step" not in store.read_json(store.join(new, mf.MANIFEST))["counts"]
    code, out = out_of(t2i("resume", run, "--no-ray", cwd=work))
    assert code == 0 and "train_prior: done already" in out, out


def test_changed_download_field_on_s3(s3_bucket, tmp_path):
    """On S3: a changed download field makes new download, embed and training attempts; the old
    ones stay intact and readable. Its own runs, not a copy: the point is running on S3 (the
    first run writes the attempts there that the second must keep)."""
    enc = tmp_path / "enc"
    common = ["--no-ray", "--set", f"store.uri={s3_bucket}", "--set", f"embed.clip.model=tiny:{enc}",
              "--set", f"embed.t5.model=tiny:{enc}", "--set", "sample=null", "--set", "evaluate=null"]
    only_base = [x for s in ("train_prior", "train_decoder", "train_sr256", "train_sr1024") for x in ("--set", f"{s}=null")]
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    code, out = out_of(t2i("run", str(SMOKE), *common, *only_base, cwd=tmp_path, env=env))
    assert code == 0, out
    run = f"{s3_bucket}/smoke"
    old = {s: stage_uri(run, s) for s in ("download", "embed", "train_base")}
    old_weights = store.read_bytes(store.join(store.read_json(store.join(old["train_base"], mf.MANIFEST))
                                              ["outputs"]["final"], "model.safetensors"))
    code, out = out_of(t2i("run", str(SMOKE), *common, *only_base, "--set", "download.min_image_size=8", cwd=tmp_path,
                       env=env))
    assert code == 0, out
    for s, uri in old.items():
        assert stage_uri(run, s) != uri, f"{s}: a changed download field makes a new attempt"
        assert store.exists(store.join(uri, mf.MANIFEST)), f"{s}: the old attempt stays"
    final = store.read_json(store.join(old["train_base"], mf.MANIFEST))["outputs"]["final"]
    assert store.read_bytes(store.join(final, "model.safetensors")) == old_weights

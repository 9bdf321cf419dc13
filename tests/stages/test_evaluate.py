"""Evaluation (issue 14): FID and CLIP score behave as figures must, the evaluate stage runs in the
smoke spec and ``t2i eval`` reproduces its figures offline; spec mistakes get one clear line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import store
from stages.evaluate import evaluation_rows
from data_prep.clip_score import clip_scores
from stages.evaluate import metrics as M


def _shapes(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: flat backgrounds with a coloured rectangle (demo-like images)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(0, 255, 3)
        x, y, w = rng.integers(0, size // 2, 3)
        out[i, y:y + w + 4, x:x + w + 4] = rng.integers(0, 255, 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(tmp_path):
    name = f"tiny:{tmp_path / 'fid'}"
    net = M.load_feature_network(name)  # built, saved, loaded back through the same path
    assert (tmp_path / "fid" / M.TINY_CONFIG).exists()
    again = M.load_feature_network(name)
    real = _shapes(48)
    assert torch.equal(net(real), again(real)), "a saved feature network reloads to the same features"
    self_fid = M.fid(real, real, net)
    assert self_fid < 1e-6
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=gen)
    scores = [M.fid(real, (real.float() + s * noise).clamp(0, 255).round().to(torch.uint8), net)
              for s in (4.0, 16.0, 48.0)]
    assert self_fid < scores[0] < scores[1] < scores[2], scores
    with pytest.raises(ValueError, match="at least 2"):
        M.fid(real[:1], real, net)


def test_clip_score_higher_for_matching_than_shuffled_prompts(tiny_encoders):
    """The run's CLIP kind: the tiny CLIP trained contrastively on the demo corpus (cached per user)."""
    from data_prep.demo_corpus import caption_of, render, training_attrs
    from data_prep.encoders import ClipConfig, clip_preprocess_cfg, load_clip

    cfg = ClipConfig(model=f"tiny:{tiny_encoders}", pretrained=None)
    clip = load_clip(cfg, device="cpu")
    attrs = training_attrs()[::7][:16]
    rng = np.random.default_rng(0)
    images = [render(a, 64, rng) for a in attrs]
    prompts = [caption_of(a) for a in attrs]
    pp = clip_preprocess_cfg(cfg)
    matching = clip_scores(clip, images, prompts, pp)
    shuffled = clip_scores(clip, images, prompts[5:] + prompts[:5], pp)
    assert matching.shape == (16,) and (matching.abs() <= 1 + 1e-5).all()
    assert float(matching.mean()) > float(shuffled.mean()) + 0.05, (matching.mean(), shuffled.mean())


def _figures(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


@pytest.mark.slow
def test_evaluate_stage_in_the_smoke_run_and_t2i_eval_reproduces_it(smoke_run):
    from typer.testing import CliRunner

    from pipeline import layout
    from pipeline.cli import app

    cwd, run = smoke_run
    m = json.loads(store.read_bytes(store.join(layout.finished_stage_dir(run, "evaluate"), "_MANIFEST.json")))
    metrics = m["metrics"]
    for k in ("imagen_fid", "unclip_fid", "imagen_clip_score", "unclip_clip_score", "prior_cosine_similarity",
              "prior_text_baseline", "heldout_clip_score", "imagen_clip_score_suite",
              *(f"{st}_val_loss" for st in ("train_prior", "train_decoder", "train_base", "train_sr256",
                                            "train_sr1024"))):
        assert k in metrics and np.isfinite(metrics[k]), k
    assert metrics["imagen_fid"] >= 0 and -1 <= metrics["unclip_clip_score"] <= 1
    assert m["outputs"]["fid_features"] == "tiny" and m["counts"]["fid_samples"] == 4
    # The demo corpus's held-out captions are demo captions: the demo check ran on them.
    assert metrics["imagen_demo_n"] == 4
    # Each training stage's own manifest holds the val_loss the evaluation reports.
    train = json.loads(store.read_bytes(store.join(layout.finished_stage_dir(run, "train_base"), "_MANIFEST.json")))
    assert train["metrics"]["val_loss"] == metrics["train_base_val_loss"]
    rows = evaluation_rows(m)
    assert any(r[0] == "imagen_fid" and "tiny" in r[2] for r in rows)

    import os

    old = os.getcwd()
    os.chdir(cwd)  # the spec's relative paths (tiny encoders, feature network) are the run's
    try:
        r = CliRunner().invoke(app, ["eval", run, "--json"])
    finally:
        os.chdir(old)
    assert r.exit_code == 0, r.output
    again = json.loads(next(x for x in reversed(r.stdout.splitlines()) if x.startswith("{")))
    assert _figures(again["metrics"]) == pytest.approx(_figures(metrics), rel=1e-5, abs=1e-6)


def test_spec_mistakes_in_the_evaluate_section_name_the_field():
    from pipeline.run.spec import SpecError, parse_spec
    from tests.support.specs import smoke_spec as spec

    cases = [
        (spec(evaluate={"sampling": {"steps": 0}}), "evaluate.sampling: sampling.steps"),
        (spec(evaluate={"sampling": {"steps": None, "prompts": ["x"]}}), "sampling.prompts is set by"),
        (spec(evaluate={"fid_features": "torchvision:resnet50"}), "inception_v3"),
        (spec(evaluate={"num_samples": 1}), "evaluate.num_samples"),
        (spec(train_prior=None, evaluate={"cascade": "both"}),
         "evaluate.cascade: 'both' samples through train_prior"),
        (spec(embed={"holdout_fraction": 0, "holdout_min": 0}), "holds out no samples"),
    ]
    # 'auto' (the default) evaluates the cascades the spec trains: no prior, no unclip figures.
    assert parse_spec(spec(train_prior=None, sample=None), "smoke.yaml").evaluate.cascade == "auto"
    for data, expect in cases:
        with pytest.raises(SpecError) as e:
            parse_spec(data, "smoke.yaml")
        assert expect in str(e.value), str(e.value)


@pytest.mark.slow
def test_checkpoint_rows_appear_in_eval_jsonl(smoke_run, tmp_path):
    """One row per complete checkpoint, appended once (a second pass adds nothing)."""
    from pipeline import layout
    from pipeline.manifest import read_manifest
    from pipeline.run.planning import load_run_spec
    from stages.evaluate.follow import EVAL_LOG, complete_steps, evaluate_checkpoints, read_rows

    cwd, run = smoke_run
    spec = load_run_spec(run)
    inputs = {st: read_manifest(layout.finished_stage_dir(run, st)) for st in
              ("download", "embed", "train_prior", "train_decoder", "train_base", "train_sr256", "train_sr1024")}
    train_cfgs = {st: getattr(spec, st) for st in ("train_prior", "train_base")}
    written = [store.join(inputs[st]["out_uri"], EVAL_LOG) for st in train_cfgs]
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        added = evaluate_checkpoints(spec.evaluate, run, inputs, train_cfgs, str(tmp_path / "work"))
        for st in train_cfgs:
            attempt = inputs[st]["out_uri"]
            assert [r["step"] for r in read_rows(attempt)] == complete_steps(attempt) == [2, 4]
            assert [r["step"] for r in added[st]] == [2, 4]
            last = read_rows(attempt)[-1]
            # The last step's training-time validation (live weights) is in the row, beside the EMA's.
            assert last["val_loss"] == inputs[st]["metrics"]["val_loss"] and np.isfinite(last["val_loss_ema"])
        assert all(np.isfinite(r["fid"]) and -1 <= r["clip_score"] <= 1 for r in read_rows(inputs["train_base"]["out_uri"]))
        assert all(-1 <= r["prior_cosine_similarity"] <= 1 for r in read_rows(inputs["train_prior"]["out_uri"]))
        again = evaluate_checkpoints(spec.evaluate, run, inputs, train_cfgs, str(tmp_path / "work"))
        assert again == {st: [] for st in train_cfgs}
    finally:
        os.chdir(old)
        for uri in written:  # the shared run stays as the smoke spec left it
            store.remove(uri)


@pytest.mark.slow
def test_an_embedding_without_a_split_scores_the_suite_only(smoke_run, tmp_path, monkeypatch):
    """Runs embedded before held-out splits existed keep working: no held-out figure is made up."""
    import data_prep.holdout as holdout
    from pipeline import layout
    from pipeline.manifest import read_manifest
    from pipeline.run.planning import load_run_spec
    from stages.evaluate import evaluate

    cwd, run = smoke_run
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(holdout, "read_rule", lambda uri: holdout.NO_HOLDOUT)
    spec = load_run_spec(run)
    inputs = {st: read_manifest(layout.finished_stage_dir(run, st)) for st in ("download", "embed", "train_base",
                                                                             "train_sr256", "train_sr1024")}
    assert spec.evaluate.cascade == "auto"  # with only the imagen models given, only imagen is evaluated
    said = []
    res = evaluate(spec.evaluate, run, inputs, str(tmp_path / "out"), progress=said.append)
    assert "imagen_clip_score_suite" in res.metrics and res.counts["n_holdout"] == 0
    assert not [k for k in res.metrics if k.startswith("unclip")]
    assert not {"imagen_fid", "imagen_clip_score", "prior_cosine_similarity"} & set(res.metrics)
    assert any("no held-out split" in m and "embed.holdout_min" in m for m in said)

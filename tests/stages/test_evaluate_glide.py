"""The evaluate stage evaluates the glide cascade (issue 17): 'auto' picks every cascade the run
trains, glide included; its FID / CLIP score / demo check figures are named like the others';
`sampling.guidance: compare` adds the CLIP-guided figures; the token ids GLIDE samples held-out
captions with are the ids the embed stage stored for them (what GLIDE trained on).

Real formats end to end, at debug size: demo-corpus images and captions in img2dataset-style tars,
the real embed stage (tiny encoders: held-out split, token ids), random debug-flavor weights
written by the training loop's ``write_final`` (the shared ``trained_run``), the tiny FID feature
network.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline import store
from pipeline.context import StageContext
from tests.support.data import sample_members, write_tar

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TRAINED = ("glide", "sr256", "sr1024", "noised_clip")  # what demo-glide.yaml trains


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_encoders, trained_run):
    from data_prep.demo_corpus import caption_of, render, training_attrs
    from data_prep.embed.stage import run as embed_run
    from data_prep.embed.config import EmbedConfig
    from data_prep.encoders import ClipConfig, T5Config
    from data_prep.encoders_doc import read_encoders_doc

    root = tmp_path_factory.mktemp("eval_glide")
    (root / "download" / "shards").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, a in enumerate(training_attrs()[::9][:24]):
        buf = io.BytesIO()
        render(a, 64, rng).save(buf, format="JPEG", quality=95)
        key = f"00000{i:04d}"
        cap = caption_of(a)
        rows += sample_members(key, buf.getvalue(), cap, {"key": key, "caption": cap, "status": "success"})
    write_tar(root / "download" / "shards" / "00000.tar", rows)
    run = store.normalize(str(root / "run"))
    download = {"out_uri": str(root / "download"), "outputs": {"shards": str(root / "download" / "shards")}}
    ecfg = EmbedConfig(clip=ClipConfig(model=f"tiny:{tiny_encoders}"), t5=T5Config(model=f"tiny:{tiny_encoders}"),
                       batch_size=8, gpus_per_actor=0, holdout_fraction=0.25, holdout_min=0)
    embed_uri = store.join(run, "embed")
    res = embed_run(ecfg, StageContext(run_uri=run, out_uri=embed_uri, inputs={"download": download}))
    inputs = {"download": download, "embed": {"out_uri": embed_uri, "outputs": res.outputs}}
    dims = {k: int(res.metrics[k]) for k in ("clip_dim", "clip_token_dim", "t5_dim")}
    trained = read_encoders_doc(store.join(trained_run, "embed"))
    assert {k: getattr(trained, k) for k in dims} == dims, "the trained models were built on the same encoders"
    for i, role in enumerate(TRAINED):  # the models are read where the trained run holds them
        inputs[f"train_{role}"] = {"out_uri": store.join(trained_run, f"train_{role}"), "outputs": {},
                                   "metrics": {"val_loss": 0.5 + i}}
    return {"root": root, "run": run, "inputs": inputs, "rule_count": res.counts["n_holdout"]}


def _cfg(env, **kw):
    from stages.evaluate import EvaluateConfig

    return EvaluateConfig(num_samples=4, fid_features=f"tiny:{env['root'] / 'fid'}", prompt_suite="default",
                          suite_per_category=1, sampling={"steps": 2, "sampler": "ddim", **kw})


def test_auto_evaluates_the_glide_cascade(env, tmp_path):
    from stages.evaluate import evaluate

    said: list[str] = []
    res = evaluate(_cfg(env), env["run"], env["inputs"], str(tmp_path / "out"), progress=said.append)
    m = res.metrics
    assert res.counts["fid_samples"] == 4 <= env["rule_count"]
    for k in ("glide_fid", "glide_clip_score", "glide_clip_score_suite", "heldout_clip_score"):
        assert np.isfinite(m[k]), k
    assert m["glide_fid"] >= 0 and -1 <= m["glide_clip_score"] <= 1
    assert m["glide_demo_n"] == 4 and 0 <= m["glide_demo_colour_accuracy"] <= 1  # held-out demo captions
    assert m["train_glide_val_loss"] == 0.5
    assert not [k for k in m if k.startswith(("imagen", "unclip", "prior", "glide_clip_guided"))]
    assert any(s.startswith("evaluate: glide: FID") for s in said)
    doc = json.loads(store.read_bytes(res.outputs["evaluation"]))
    assert {r["cascade"] for r in doc["samples"]} == {"glide"}


def test_compare_adds_the_clip_guided_figures_on_the_same_captions(env, tmp_path):
    from stages.evaluate import evaluate

    plain = evaluate(_cfg(env), env["run"], env["inputs"], str(tmp_path / "a")).metrics
    both = evaluate(_cfg(env, guidance="compare", clip_guidance_scale=30.0), env["run"], env["inputs"],
                    str(tmp_path / "b")).metrics
    for k in ("glide_fid", "glide_clip_score", "glide_demo_colour_accuracy"):
        assert both[k] == pytest.approx(plain[k], rel=1e-6)  # the CFG half: the same samples as 'cfg'
        assert np.isfinite(both[k.replace("glide", "glide_clip_guided", 1)])
    assert both["glide_clip_guided_demo_n"] == 4


def test_glide_samples_held_out_captions_with_the_ids_it_trained_on(env):
    """Sampling re-tokenizes the captions with the run's encoders (as `t2i sample` does); those
    ids equal the ones the embed stage stored for the same held-out samples (sampling pads them to
    the encoder's full length, the stored batch to its longest caption)."""
    from data_prep.holdout import read_rule
    from stages.evaluate.data import read_holdout
    from stages.sampling.loading import PromptEncoders

    inputs = env["inputs"]
    embed = inputs["embed"]["out_uri"]
    held = read_holdout(inputs["download"]["outputs"]["shards"], inputs["embed"]["outputs"]["shards"],
                        read_rule(embed), 4)
    again = PromptEncoders.load(embed).encode(held.captions)
    for a, b in (("clip_ids", "clip_id_mask"), ("t5_ids", "t5_id_mask")):
        stored, fresh = getattr(held.features, a), getattr(again, a)
        assert stored is not None and stored.dtype == torch.long
        n = stored.shape[1]
        assert torch.equal(stored, fresh[:, :n]) and torch.equal(getattr(held.features, b), getattr(again, b)[:, :n]), a
        assert not getattr(again, b)[:, n:].any()  # beyond the longest caption: padding only


def test_cascade_names_and_spec_checks():
    from stages.evaluate import EvaluateConfig

    assert EvaluateConfig().cascades() == ["unclip", "imagen", "glide"]  # 'auto': the trained ones run
    assert EvaluateConfig(cascade="all").cascades() == ["unclip", "imagen", "glide"]
    assert EvaluateConfig(cascade="both").cascades() == ["unclip", "imagen"]
    assert EvaluateConfig(cascade="glide").required_stages() == ["train_sr256", "train_sr1024", "train_glide"]
    assert EvaluateConfig().required_stages() == []
    with pytest.raises(ValidationError, match="cascade"):
        EvaluateConfig(cascade="dalle")
    with pytest.raises(ValidationError, match=r"evaluate.sampling with cascade 'unclip': sample.guidance: 'compare'"):
        EvaluateConfig(cascade="unclip", sampling={"guidance": "compare"})

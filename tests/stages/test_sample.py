"""Cascade sampling from a run whose stages hold random debug-flavor weights.

The run (the ``trained_run`` fixture, tests/stages/conftest.py) is written in the real formats:
tiny encoders built offline and named in ``embed/encoders.json``, and every training stage's
``final/`` written by the training loop's own ``write_final`` (safetensors + config.json with the
stage config's diffusion/condaug settings). The weights are random but perturbed away from the
zero-initialised output layers, so the conditioning really reaches the output (guidance and
prompts change the images).
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import torch
import pytest
from PIL import Image
from pydantic import ValidationError

from data_prep.demo_corpus import demo_prompts
from data_prep.encoders_doc import read_encoders_doc
from pipeline import store
from pipeline.context import StageContext, StageFailed
from stages.nets.flavors import build_network, get_flavor
from stages.sampling.loading import PromptEncoders
from stages.sampling.config import SampleConfig, cascade_roles
from stages.sampling.cascade import run, sample_cascade, sample_cli, sample_images
from stages.training.final_weights import FinalConfig, write_final
from stages.training.config import TrainConfig
from tests.support.runs import CASCADE_ROLES as ROLES  # the default cascades' ('both'), with metrics

PROMPTS = demo_prompts()[:3]


@pytest.fixture(scope="module")
def run_uri(trained_run):
    """The shared trained run (every model at step 3; glide and noised_clip too, without metrics:
    the report's loss curves stay those of the default cascades)."""
    return trained_run


@pytest.fixture(scope="module")
def encoders(run_uri):
    """Loaded once for the tests that are about sampling, not loading (the stage/CLI tests load their own)."""
    return PromptEncoders.load(store.join(run_uri, "embed"))


def _arrays(samples):
    return [np.asarray(s.image) for s in samples]


def test_run_stage_both_cascades(run_uri, encoders, tmp_path):
    out = store.normalize(str(tmp_path / "sample"))
    lines = []
    ctx = StageContext(run_uri=run_uri, out_uri=out, progress=lines.append)
    res = run(SampleConfig(prompts=PROMPTS, cascade="both", steps=2), ctx)
    assert res.counts == {"images": 6, "prompts": 3}
    final = get_flavor("sr1024", "debug").image_size
    pngs = [u for u in store.listdir(out) if u.endswith(".png") and not u.endswith("grid.png")]
    assert len(pngs) == 6
    for u in pngs:
        assert Image.open(io.BytesIO(store.read_bytes(u))).size == (final, final)
    from stages.report.page import slug

    assert any(u.endswith(f"000_unclip_{slug(PROMPTS[0])}.png") for u in pngs)
    assert Image.open(io.BytesIO(store.read_bytes(res.outputs["grid"]))).width > 3 * 64
    doc = store.read_bytes(res.outputs["report"]).decode()
    assert all(p in doc for p in PROMPTS)
    assert doc.count("<svg") == 4 * len(ROLES)  # 4 charts per training stage with metrics (tests/stages/test_report.py)
    # demo prompts -> the demo check ran for both cascades and its lines reached progress
    for c in ("unclip", "imagen"):
        assert 0.0 <= res.metrics[f"{c}_demo_colour_accuracy"] <= 1.0 and res.metrics[f"{c}_demo_n"] == 3
    assert any("demo check" in s and "chance 0.12" in s for s in lines)
    assert any(s.startswith("sample: unclip/prior") for s in lines)
    # a cascade's images do not depend on whether the other cascade ran too
    alone = sample_images(SampleConfig(prompts=PROMPTS, cascade="imagen", steps=2), run_uri, encoders=encoders)
    written = sorted(u for u in pngs if "_imagen_" in u)
    assert len(written) == len(alone) == 3
    for u, a in zip(written, _arrays(alone)):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(store.read_bytes(u)))), a)


def test_fixed_seed_is_deterministic_and_knobs_change_images(run_uri, encoders):
    cfg = SampleConfig(prompts=PROMPTS[:2], cascade="imagen", steps=2, seed=7)
    a = _arrays(sample_images(cfg, run_uri, encoders=encoders))
    b = _arrays(sample_images(cfg, run_uri, encoders=encoders))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other_seed = _arrays(sample_images(cfg.model_copy(update={"seed": 8}), run_uri, encoders=encoders))
    assert not np.array_equal(a[0], other_seed[0])
    # guidance 1.0 (single conditional pass) works and differs from guided sampling
    g1 = sample_images(cfg.model_copy(update={"guidance_scale": 1.0}), run_uri, encoders=encoders)
    assert all(s.image.size == (get_flavor("sr1024", "debug").image_size,) * 2 for s in g1)
    assert not np.array_equal(_arrays(g1)[0], a[0])


def test_a_prompts_features_do_not_depend_on_the_prompts_beside_it(encoders):
    """Issue 26: T5's bidirectional pass over a padded batch changed a prompt's features in the last
    bit with the longest prompt beside it, so --from-sample (its batch of 16) and --prompt P (alone)
    did not redraw the sample stage's image (all prompts together) byte for byte."""
    short, long_ = "a red circle", "a small green square in the top left on a gray background with a frame"
    alone = encoders.encode([short])
    beside = encoders.encode([long_, short])
    n = int(alone.t5_mask[0].sum())
    assert n < int(beside.t5_mask[0].sum())  # the batch was padded beyond the short prompt
    assert torch.equal(alone.t5_tokens[0, :n], beside.t5_tokens[1, :n])
    assert torch.equal(alone.clip_tokens[0], beside.clip_tokens[1, : alone.clip_tokens.shape[1]])


def test_cpu_sampling_uses_one_thread_whatever_the_caller_set(run_uri, encoders, monkeypatch):
    """Issue 26: a Ray stage task that reserves no CPU computes with one thread (OMP_NUM_THREADS=1),
    and the last bit of an image depends on the thread count; so every CPU sampling path uses one
    (stages/sampling/cascade.py SAMPLING_CPU_THREADS) and gives the caller's count back after."""
    import torch

    from stages.sampling import cascade

    seen = []
    real = cascade.draw
    monkeypatch.setattr(cascade, "draw", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = SampleConfig(prompts=PROMPTS[:1], cascade="imagen", steps=1)
        sample_images(cfg, run_uri, encoders=encoders)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {cascade.SAMPLING_CPU_THREADS} == {1}


@pytest.mark.parametrize("cascade,sampler", [("imagen", "ddpm"), ("unclip", "dpmpp")])
def test_an_image_regenerated_alone_equals_it_in_its_batch(run_uri, encoders, cascade, sampler):
    """One generator per image (diffusers' convention), seeded sample.seed + index * images_per_prompt
    + k: image k=1 of prompt 2 of a batched grid is drawn again alone with that seed. Ancestral
    sampling (fresh noise every step) and the SR stages' condaug noise included."""
    grid = SampleConfig(prompts=PROMPTS[:3], cascade=cascade, steps=3, seed=5, images_per_prompt=2, batch_size=4,
                        sampler=sampler, demo_check=False)
    batched = {(s.index, s.k): np.asarray(s.image) for s in sample_images(grid, run_uri, encoders=encoders)}
    alone_cfg = grid.model_copy(update={"prompts": [PROMPTS[2]], "images_per_prompt": 1, "batch_size": 1,
                                        "seed": 5 + 2 * 2 + 1})
    alone = np.asarray(sample_images(alone_cfg, run_uri, encoders=encoders)[0].image)
    # Same noise; the networks' batched and single-image arithmetic may differ in the last bit.
    assert np.abs(alone.astype(int) - batched[(2, 1)].astype(int)).max() <= 1
    assert not np.array_equal(alone, batched[(2, 0)])  # its neighbour has noise of its own


def test_unclip_deterministic_with_images_per_prompt(run_uri, encoders):
    cfg = SampleConfig(prompts=PROMPTS[:1], cascade="unclip", steps=1, images_per_prompt=2, sampler="ddim",
                       guidance_scale={"prior": 1.0, "decoder": 2.0})
    a, b = sample_images(cfg, run_uri, encoders=encoders), sample_images(cfg, run_uri, encoders=encoders)
    assert [(s.k, s.cascade) for s in a] == [(0, "unclip"), (1, "unclip")]
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))
    assert not np.array_equal(_arrays(a)[0], _arrays(a)[1])  # two draws of one prompt differ


def test_missing_stage_is_a_clear_error_unless_the_cascade_stops_early(run_uri, encoders, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(store.local_path(run_uri), partial)
    shutil.rmtree(partial / "train_sr1024" / "final")
    next((partial / "train_prior" / "final").glob("step_*/config.json")).unlink()  # weights without config = incomplete
    p_uri = store.normalize(str(partial))

    def cfg(**kw):
        return SampleConfig(prompts=PROMPTS[:1], steps=1, **kw)

    with pytest.raises(StageFailed, match=r"train_sr1024 has no trained model.*max_stage"):
        sample_images(cfg(cascade="imagen"), p_uri, encoders=encoders)
    with pytest.raises(StageFailed, match="train_prior"):
        sample_images(cfg(cascade="unclip", max_stage="sr256"), p_uri, encoders=encoders)
    early = sample_images(cfg(cascade="imagen", max_stage="sr256"), p_uri, encoders=encoders)
    assert early[0].image.size == (get_flavor("sr256", "debug").image_size,) * 2
    base = sample_images(cfg(cascade="imagen", max_stage="base"), p_uri, encoders=encoders)
    assert base[0].image.size == (get_flavor("base", "debug").image_size,) * 2
    shutil.rmtree(partial / "embed")
    with pytest.raises(StageFailed, match="encoders.json"):
        sample_images(cfg(cascade="imagen", max_stage="base"), p_uri)


def test_model_trained_on_other_encoders_is_refused(run_uri, encoders, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(store.local_path(run_uri), other)
    o_uri = store.normalize(str(other))
    dims = {**encoders.dims, "t5_dim": encoders.dims["t5_dim"] + 8}
    fl = get_flavor("base", "debug")
    write_final(store.join(o_uri, "train_base"), build_network("base", "debug", dims).state_dict(), FinalConfig(
        role="base", flavor="debug", cond_dims=dims, image_size=fl.image_size, low_res_size=None,
        diffusion=TrainConfig().diffusion.model_dump(), condaug=None, step=5))  # newer than step 3
    with pytest.raises(StageFailed, match="train_base was trained on conditioning dims"):
        sample_images(SampleConfig(prompts=PROMPTS[:1], steps=1, cascade="imagen"), o_uri, encoders=encoders)


def test_cascade_roles():
    assert cascade_roles("unclip") == ("prior", "decoder", "sr256", "sr1024")
    assert cascade_roles("unclip", "decoder") == ("prior", "decoder")
    assert cascade_roles("imagen", "base") == ("base",)
    assert cascade_roles("imagen", "sr256") == ("base", "sr256")
    assert cascade_roles("glide") == ("glide", "sr256", "sr1024")
    assert cascade_roles("glide", "glide") == cascade_roles("glide", "base") == ("glide",)
    with pytest.raises(ValueError, match="allowed: unclip, imagen, glide"):
        cascade_roles("dalle3")
    assert SampleConfig(cascade="both").cascades() == ["unclip", "imagen"]  # as before GLIDE
    assert SampleConfig(cascade="all").cascades() == ["unclip", "imagen", "glide"]
    assert SampleConfig(cascade="glide").required_stages() == ["train_sr256", "train_sr1024", "train_glide"]
    assert SampleConfig(cascade="imagen", max_stage="sr256").required_stages() == ["train_base", "train_sr256"]
    assert SampleConfig().required_stages() == [f"train_{r}" for r in ROLES]


def test_config_validation_names_the_field():
    assert SampleConfig().prompts == demo_prompts()
    for kw, msg in [({"guidance_scale": {"sr512": 2.0}}, "unknown role 'sr512'"),
                    ({"guidance_scale": -1.0}, "guidance_scale"),
                    ({"steps": 0}, "steps"),
                    ({"sampler": "euler"}, "sampler"),
                    ({"prompts": []}, "at least one prompt"),
                    ({"prompts": ["ok", " "]}, r"prompts\[1\]"),
                    ({"sr_aug_level": 1.5}, "sr_aug_level"),
                    ({"dynamic_threshold_percentile": 0.2}, "dynamic_threshold_percentile"),
                    ({"device": "tpu"}, "device"),
                    ({"max_stage": "prior"}, "max_stage"),
                    ({"stepz": 3}, "stepz")]:
        with pytest.raises(ValidationError, match=msg):
            SampleConfig(**kw)


def test_sample_cascade_writes_to_s3(run_uri, s3_bucket):
    out = store.join(s3_bucket, "samples")
    uris = sample_cascade(run_uri, PROMPTS[:2], cascade="imagen", guidance=2.0, steps=1, sampler="ddpm", seed=1,
                          out_uri=out)
    assert len(uris) == 2 and all(u.startswith(out + "/00") for u in uris)
    assert Image.open(io.BytesIO(store.read_bytes(uris[1]))).size == (get_flavor("sr1024", "debug").image_size,) * 2
    assert store.exists(store.join(out, "grid.png")) and store.exists(store.join(out, "report.html"))


def test_sample_cli_prints_files_and_demo_check(run_uri, tmp_path, capsys):
    out = str(tmp_path / "cli")
    uris = sample_cli(run_uri, PROMPTS[:1] + ["a photo of a dog"], cascade="imagen", guidance=1.0, steps=1, out=out)
    printed = capsys.readouterr().out
    assert len(uris) == 2 and all(store.exists(u) for u in uris)
    assert f"report: {store.normalize(out)}/report.html" in printed and "sample: imagen/base" in printed
    assert "demo check" not in printed  # not every prompt is a demo caption


def test_clip_reranking_never_lowers_the_kept_score(run_uri, encoders, tmp_path):
    """images_per_prompt N with rerank_keep K keeps the K highest-scoring samples per prompt under
    the run's CLIP: their mean score is never below that of the first K drawn, and the manifest
    figures say so."""
    import dataclasses

    enc = dataclasses.replace(encoders, preprocess=json.loads(json.dumps(
        read_encoders_doc(store.join(run_uri, "embed")).clip_preprocess
        or {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "shortest"})))
    cfg = SampleConfig(prompts=PROMPTS[:2], steps=1, cascade="imagen", max_stage="base", images_per_prompt=3,
                       rerank_keep=1)
    samples = sample_images(cfg, run_uri, encoders=enc)
    assert len(samples) == 2 and all(s.clip_score is not None for s in samples)
    f = samples.figures
    assert f["imagen_rerank_clip_score_kept"] >= f["imagen_rerank_clip_score_first"]
    with pytest.raises(ValueError, match="rerank_keep"):
        SampleConfig(prompts=PROMPTS[:1], images_per_prompt=2, rerank_keep=3)


def test_glide_cascade_end_to_end(run_uri, encoders):
    """prompt -> token ids -> GLIDE (its own text transformer, CFG by the empty sequence) -> sr256 -> sr1024."""
    cfg = SampleConfig(prompts=PROMPTS[:2], cascade="glide", steps=2, seed=3)
    a = sample_images(cfg, run_uri, encoders=encoders)
    size = get_flavor("sr1024", "debug").image_size
    assert [s.cascade for s in a] == ["glide", "glide"] and all(s.image.size == (size, size) for s in a)
    assert not np.array_equal(*_arrays(a))  # the prompt reaches the image through the token ids
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(sample_images(cfg, run_uri, encoders=encoders))))
    unguided = sample_images(cfg.model_copy(update={"guidance_scale": {"glide": 1.0}}), run_uri, encoders=encoders)
    assert not np.array_equal(_arrays(unguided)[0], _arrays(a)[0])
    base = sample_images(cfg.model_copy(update={"max_stage": "glide"}), run_uri, encoders=encoders)
    assert base[0].image.size == (get_flavor("glide", "debug").image_size,) * 2
    # 'all' adds the glide cascade after the other two; theirs are unchanged by it
    every = sample_images(cfg.model_copy(update={"cascade": "all", "prompts": PROMPTS[:1]}), run_uri, encoders=encoders)
    assert [s.cascade for s in every] == ["unclip", "imagen", "glide"]
    imagen = sample_images(cfg.model_copy(update={"cascade": "imagen", "prompts": PROMPTS[:1]}), run_uri,
                           encoders=encoders)
    assert np.array_equal(_arrays(every)[1], _arrays(imagen)[0])


def test_image_n_is_regenerated_byte_for_byte_from_its_seed_record(run_uri, tmp_path):
    """samples.json records each image's prompt and seed; `t2i sample --from-sample N`
    (stages/sampling/cascade.regenerate) writes image N of each cascade byte for byte again
    (its batch is drawn again: same neighbours, same per-image noise), and changes it on top
    when a flag changes (more steps)."""
    from stages.sampling.cascade import regenerate, sample_with_config

    cfg = SampleConfig(prompts=PROMPTS, cascade="both", steps=2, seed=11, images_per_prompt=2, batch_size=4,
                       sampler="ddpm")
    stage_out = str(tmp_path / "stage")
    sample_with_config(cfg, run_uri, out=stage_out)
    index = store.read_json(store.join(store.normalize(stage_out), "samples.json"))["images"]
    n = 5  # prompt 2, image 1, in the second batch of 4
    entries = [e for e in index if e["n"] == n]
    assert {e["cascade"] for e in entries} == {"unclip", "imagen"}
    assert all(e["seed"] == 11 + n and e["prompt"] == PROMPTS[2] for e in entries)
    again = regenerate(cfg, run_uri, n, out=str(tmp_path / "again"))
    assert len(again) == 2
    for uri in again:
        name = uri.rsplit("/", 1)[-1]
        assert store.read_bytes(uri) == store.read_bytes(store.join(store.normalize(stage_out), name)), name
    longer = regenerate(cfg.model_copy(update={"steps": 3}), run_uri, n, out=str(tmp_path / "longer"))
    assert store.read_bytes(longer[0]) != store.read_bytes(again[0])
    with pytest.raises(StageFailed, match="images 0..5"):
        regenerate(cfg, run_uri, 6, out=str(tmp_path / "none"))

"""GLIDE's noised CLIP (§2.4): the image tower, its contrastive loss through the one training step
(StageSpec.loss), its place in the registry (no cascade, no sample_cond), and CLIP guidance at
sampling (guided samples score higher under the noised CLIP than unguided ones, same seeds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.nets import build_network
from tests.support.specs import smoke_spec

pytestmark = pytest.mark.usefixtures("single_thread_torch")

DIMS = {"t5_dim": 24, "clip_dim": 16, "clip_token_dim": 12}


def _red_blue(n: int = 16, seed: int = 0):
    """Half red, half blue 16px images and two fixed caption embeddings (as the embed stage stores them)."""
    text = F.normalize(torch.randn(2, DIMS["clip_dim"], generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(seed)  # the pixel noise differs per batch, the captions do not
    lab = torch.arange(n) % 2
    x = -torch.ones(n, 3, 16, 16)
    x[lab == 0, 0] = 1.0
    x[lab == 1, 2] = 1.0
    return x + 0.1 * torch.randn(x.shape, generator=g), {"clip_text": text[lab]}, text


def test_tower_shapes_and_similarity():
    net = build_network("noised_clip", "debug", DIMS).eval()
    x, cond, _ = _red_blue(4)
    t = torch.rand(4)
    logits = net(x, t, clip_text=cond["clip_text"])
    emb = net.image_embed(x, t)
    assert logits.shape == (4, 4) and emb.shape == (4, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    sim = net.similarity(x, t, cond["clip_text"])
    assert torch.allclose(logits.diagonal(), net.scale() * sim, atol=1e-5)
    # told t: the same image at another noise level embeds differently (after one random step)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(net.image_embed(x, torch.zeros(4)), net.image_embed(x, torch.ones(4)), atol=1e-4)
    with pytest.raises(ValueError, match="clip_text must be"):
        net(x, t, clip_text=torch.zeros(4, 5))


def test_contrastive_loss_treats_repeated_captions_as_positives():
    from stages.diffusion import Diffusion
    from stages.models.noised_clip import contrastive_loss

    net = build_network("noised_clip", "debug", DIMS)
    x, cond, _ = _red_blue(8)
    loss, stats = contrastive_loss(Diffusion(prediction="v"), net, x, cond)
    loss.backward()
    assert net.logit_scale.grad is not None and torch.isfinite(loss)  # the temperature learns
    # 4 identical captions each: the loss is bounded below by log(4), not 0
    assert float(loss.detach()) >= torch.log(torch.tensor(4.0)) - 1e-4 and 0 <= float(stats["top1"]) <= 1


def _train_clip(steps: int = 40):
    """The debug noised CLIP trained by the one training step (DeepSpeed engine, StageSpec.loss)."""
    from pipeline.executors import DistEnv
    from stages.models import noised_clip
    from stages.diffusion import Diffusion
    from stages.training.distributed import setup_distributed
    from stages.training.engine import build_engine, train_step

    cpu = torch.device("cpu")
    setup_distributed(DistEnv.from_env(), cpu)
    cfg = noised_clip.NoisedClipTrainConfig(flavor="debug", steps=steps, batch_size=16, lr=3e-3, warmup_steps=0)
    torch.manual_seed(0)
    engine, _ = build_engine(cfg, build_network("noised_clip", "debug", DIMS), device=cpu)
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    losses = []
    for i in range(steps):
        x, cond, text = _red_blue(16, seed=i)
        out = train_step(engine, diffusion, [(x, cond)], loss_fn=noised_clip.SPEC.loss)
        assert out["finite"]
        losses.append(float(out["loss"]))
    return engine.module.eval(), diffusion, text, losses


def test_train_step_runs_the_stage_loss_and_learns():
    net, _, _, losses = _train_clip()
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    # and it tells the captions apart on noisy held-out images
    from stages.models.noised_clip import SPEC
    from stages.diffusion import Diffusion

    x, cond, _ = _red_blue(16, seed=999)
    _, stats = SPEC.training_loss(Diffusion(prediction="v"), net, x, cond, t=torch.full((16,), 0.3),
                                  noise=torch.randn_like(x))
    assert float(stats["top1"]) == 1.0


def test_config_and_registry():
    from pipeline.run.graph import get_stage
    from stages import models
    from stages.models.noised_clip import NoisedClipTrainConfig
    from stages.sampling.config import ROLES as SAMPLE_ROLES, SampleConfig

    with pytest.raises(ValueError, match="no samples to draw"):
        NoisedClipTrainConfig(sample_every=10)
    m = models.model("noised_clip")
    assert m.stage == "train_noised_clip" and not m.stage_spec.samples and m.stage_spec.loss is not None
    assert "noised_clip" not in models.CASCADE_ROLES and "noised_clip" not in SAMPLE_ROLES
    assert get_stage("train_noised_clip").deps == ("download", "embed")  # trains on images
    with pytest.raises(ValueError, match="unknown role 'noised_clip'"):
        SampleConfig(guidance_scale={"noised_clip": 2.0})
    with pytest.raises(ValueError, match="CLIP guidance applies to base, glide"):
        SampleConfig(guidance="clip", clip_guidance_scale={"sr256": 2.0})


def test_spec_needs_train_noised_clip_for_clip_guidance():
    from pipeline.run.spec import SpecError, parse_spec

    sample = {"cascade": "imagen", "guidance": "clip", "steps": 2, "prompts": ["a red circle"]}
    debug = {"flavor": "debug", "steps": 4, "batch_size": 4, "loader_workers": 0}
    spec = parse_spec(smoke_spec(sample=sample, train_noised_clip=debug))
    assert spec.sample.required_stages() == ["train_base", "train_sr256", "train_sr1024", "train_noised_clip"]
    assert spec.sample.guidance_for("base") == 1.0 and spec.sample.guidance_for("sr256") == 1.0  # CLIP replaces CFG
    with pytest.raises(SpecError, match="samples through train_noised_clip"):
        parse_spec(smoke_spec(sample=sample, train_noised_clip=None))
    # the unclip cascade has no CLIP-guided model: nothing to need
    parse_spec(smoke_spec(sample={**sample, "cascade": "unclip"}, train_noised_clip=None))
    with pytest.raises(SpecError, match="train_noised_clip.sample_every"):
        parse_spec(smoke_spec(train_noised_clip={**debug, "sample_every": 2}))


def test_final_weights_rebuild_the_noised_clip(tmp_path):
    from stages.training.final_weights import FinalConfig, load_final, network_config, write_final

    net = build_network("noised_clip", "debug", DIMS).eval()
    folder = write_final(str(tmp_path), dict(net.state_dict()), FinalConfig(
        role="noised_clip", flavor="debug", cond_dims=DIMS, image_size=16, step=1, diffusion={},
        network=network_config(net)))
    x, cond, _ = _red_blue(2)
    loaded, _ = load_final(folder)
    t = torch.rand(2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, clip_text=cond["clip_text"]), net(x, t, clip_text=cond["clip_text"]))


def test_clip_guided_samples_score_higher_under_the_noised_clip():
    """cascade.sample_with_model with the noised CLIP as guide vs without, same generator seed: the guided
    base samples are closer to their captions under the noised CLIP (the gradient's sign)."""
    from stages.sampling.clip_guidance import check_compatible
    from stages.diffusion import Diffusion
    from stages.sampling.cascade import sample_with_model
    from stages.sampling.config import SampleConfig
    from stages.sampling.loading import LoadedModel, PromptFeatures
    from stages.training.final_weights import FinalConfig

    clip, _, text, _ = _train_clip(30)
    torch.manual_seed(1)
    base = build_network("base", "debug", DIMS).eval()
    diffusion = Diffusion(prediction="v", null_keys=("drop_text",))
    config = FinalConfig(role="base", flavor="debug", cond_dims=DIMS, image_size=16, step=1,
                         diffusion={"schedule": "cosine"})
    m = LoadedModel("base", base, diffusion, config)
    guide = LoadedModel("noised_clip", clip, diffusion, config.model_copy(update={"role": "noised_clip"}))
    assert check_compatible("base", config, guide.config) is None
    assert "32px" in check_compatible("base", config.model_copy(update={"image_size": 32}), guide.config)
    n = 6
    caps = text[torch.arange(n) % 2]
    f = PromptFeatures(caps, torch.zeros(n, 3, 12), torch.ones(n, 3, dtype=torch.bool),
                       torch.randn(n, 4, 24), torch.ones(n, 4, dtype=torch.bool))
    cpu = torch.device("cpu")

    def draw(cfg, guided):
        g = torch.Generator().manual_seed(7)
        return sample_with_model(m, f, None, cfg, g, cpu, guide=guide if guided else None)

    cfg = SampleConfig(guidance="clip", clip_guidance_scale=3.0, steps=8, sampler="ddim", prompts=["x"])
    plain, guided = draw(cfg, False), draw(cfg, True)
    with torch.no_grad():
        s_plain = clip.similarity(plain, torch.zeros(n), caps)
        s_guided = clip.similarity(guided, torch.zeros(n), caps)
    assert (s_guided > s_plain).all(), (s_plain, s_guided)
    # scale 0 is the unguided sampler exactly
    zero = SampleConfig(guidance="clip", clip_guidance_scale=0.0, steps=8, sampler="ddim", prompts=["x"])
    assert torch.equal(draw(zero, True), plain)


def _loop_passes_the_stage_loss() -> bool:
    """Whether stages/training/trainer.py hands StageSpec.loss to the step (the one-line hook; see docs/glide.md)."""
    import inspect

    from stages.training import trainer as train

    return "loss_fn=" in inspect.getsource(train)


@pytest.mark.skipif(not _loop_passes_the_stage_loss(),
                    reason="stages/training/trainer.py does not pass StageSpec.loss to train_step yet (docs/glide.md)")
def test_train_noised_clip_stage_in_the_one_loop(tmp_path):
    """run(cfg, ctx) of the stage: the one loop (DeepSpeed, checkpoints, EMA, final/) with its loss."""
    from tests.support.data import DIMS as FIX_DIMS, make_dataset
    from tests.support.train import stage_ctx, tiny_train_kwargs
    from pipeline import store
    from stages.models import noised_clip
    from stages.training.final_weights import load_final

    download, embed = make_dataset(str(tmp_path / "data"), n_shards=1, per_shard=6)
    cfg = noised_clip.NoisedClipTrainConfig(**tiny_train_kwargs(steps=3, batch_size=4))
    result = noised_clip.run(cfg, stage_ctx(str(tmp_path), "train_noised_clip", download, embed))
    assert result.counts["steps"] == 3 and torch.isfinite(torch.tensor(result.metrics["final_loss"]))
    net, config = load_final(store.join(result.outputs["final"]))
    assert type(net).__name__ == "NoisedClip" and config.role == "noised_clip"
    assert net.cfg.embed_dim == FIX_DIMS["clip_dim"] and config.image_size == 16


def test_sample_images_loads_the_noised_clip_for_clip_guidance(tmp_path, tiny_encoders):
    """The sample stage's own path: train_noised_clip's final/ is loaded beside train_base's and
    guides it; a missing or mismatched noised CLIP is refused before any sampling."""
    from data_prep.encoders_doc import read_encoders_doc
    from pipeline import store
    from pipeline.context import StageFailed
    from stages.sampling.cascade import sample_images
    from stages.sampling.config import SampleConfig
    from tests.support.runs import write_random_final, write_trained_run

    run = write_trained_run(tmp_path, tiny_encoders, ("base",), step=2, metrics=())  # no noised CLIP yet
    doc = read_encoders_doc(store.join(run, "embed"))
    dims = {k: getattr(doc, k) for k in ("clip_dim", "clip_token_dim", "t5_dim")}

    def final(role: str, stage: str, **over):
        write_random_final(run, role, dims, seed=len(role), step=2, stage=stage, **over)

    prompts = ["a red circle", "a blue square"]
    kw = dict(prompts=prompts, cascade="imagen", max_stage="base", steps=4, sampler="ddim")
    with pytest.raises(StageFailed, match="stage train_noised_clip has no trained model"):
        sample_images(SampleConfig(guidance="clip", **kw), run)
    final("noised_clip", "train_noised_clip")
    plain = sample_images(SampleConfig(**kw), run)
    guided = sample_images(SampleConfig(guidance="clip", clip_guidance_scale=50.0, **kw), run)
    import numpy as np

    a, b = (torch.from_numpy(np.stack([np.asarray(s.image) for s in x])) for x in (plain, guided))
    assert a.shape == b.shape and not torch.equal(a, b)  # same seeds: only the guidance differs
    # a noised CLIP trained at another resolution cannot guide the base model
    final("noised_clip", "train_noised_clip_32", image_size=32)
    with pytest.raises(StageFailed, match="sees 32px images but base"):
        sample_images(SampleConfig(guidance="clip", **kw), run,
                      stage_uris={"train_noised_clip": store.join(run, "train_noised_clip_32")})

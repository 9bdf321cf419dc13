"""The evaluate stage's two measurements: cascades (FID, CLIP score, demo check) and the prior
(cosine similarity of its sampled image embeddings with the true ones)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from data_prep import clip_score
from stages.evaluate import metrics as M
from stages.evaluate.data import HoldoutSet, load_prompt_suite, read_holdout
from stages.sampling import demo_check
from stages.sampling.cascade import sample_images, sample_with_model
from stages.sampling.config import cascade_roles, stage_of
from stages.sampling.loading import load_model
from stages.training.final_weights import read_final_config, resolve_final


@dataclass
class EvalContext:
    cfg: Any                     # stages.evaluate.EvaluateConfig
    run_uri: str
    stage_uris: dict[str, str]   # stage -> attempt folder whose final weights are evaluated
    embed_uri: str
    embed_shards: str
    download_shards: str | None
    rule: Any                    # data_prep.holdout.HoldoutRule
    encoders: Any                # stages.sampling.cascade.PromptEncoders (the run's CLIP + T5)
    preprocess: dict[str, Any]   # the embed stage's CLIP preprocessing
    device: torch.device
    progress: Callable[[str], None]


def runnable_cascades(ctx: EvalContext) -> list[str]:
    """The configured cascades whose every model has weights to evaluate."""
    max_stage = ctx.cfg.sample_config(["x"]).max_stage
    return [c for c in ctx.cfg.cascades()
            if all(stage_of(r) in ctx.stage_uris for r in cascade_roles(c, max_stage))]


def output_size(ctx: EvalContext, cascade: str) -> int:
    """The pixel size of a cascade's last model (its final/config.json)."""
    last = cascade_roles(cascade, ctx.cfg.sample_config(["x"]).max_stage)[-1]
    return read_final_config(resolve_final(ctx.stage_uris[stage_of(last)])).image_size


def cascade_figures(ctx: EvalContext) -> tuple[dict[str, float], dict[str, int], list[dict]]:
    """Sample the held-out captions and the suite through each cascade; FID, CLIP score, demo check."""
    cfg = ctx.cfg
    cascades = runnable_cascades(ctx)
    sizes = {c: output_size(ctx, c) for c in cascades}
    held = read_holdout(ctx.download_shards, ctx.embed_shards, ctx.rule, cfg.num_samples, max(sizes.values())) \
        if ctx.rule.enabled else None
    n = len(held) if held is not None else 0
    suite = load_prompt_suite(cfg.prompt_suite, cfg.suite_per_category)
    if not n and not suite:
        return {}, {}, []
    captions = held.captions if held is not None else []
    prompts = captions + [p for _, p in suite]
    scfg = cfg.sample_config(prompts)
    t0 = time.time()
    samples = []
    for c in cascades:  # one at a time: any subset of cascades; each one's noise is seeded by its name
        samples += sample_images(scfg.model_copy(update={"cascade": c}), ctx.run_uri, stage_uris=ctx.stage_uris,
                                 embed_uri=ctx.embed_uri, encoders=ctx.encoders, progress=ctx.progress)
    metrics: dict[str, float] = {"evaluate_sample_seconds": time.time() - t0}
    clip = ctx.encoders.clip
    text = clip_score.clip_text_embeddings(clip, prompts)
    if n:  # the ceiling: real held-out pairs under the same CLIP (stored embeddings, exactly as trained on)
        metrics["heldout_clip_score"] = float(clip_score.cosine(held.clip_image, held.features.clip_text).mean())
    net = M.load_feature_network(cfg.fid_features, ctx.device) if n else None
    rows: list[dict] = []
    cats = ["heldout"] * n + [c for c, _ in suite]
    # Under sampling.guidance 'compare' a cascade's CLIP-guided half is named <cascade>_clip_guided.
    names = [(c, name) for c in cascades for name, _ in scfg.variants(c)]
    for cascade, c in names:
        mine = sorted((s for s in samples if s.cascade == c), key=lambda s: s.index)
        images = [s.image for s in mine]
        scores = clip_score.cosine(clip_score.clip_image_embeddings(clip, images, ctx.preprocess), text)
        if n:
            metrics[f"{c}_clip_score"] = float(scores[:n].mean())
        if suite:
            metrics[f"{c}_clip_score_suite"] = float(scores[n:].mean())
            for cat in dict.fromkeys(cats[n:]):
                idx = [i for i, k in enumerate(cats) if k == cat]
                metrics[f"{c}_clip_score_{cat}"] = float(scores[idx].mean())
        rows += [{"cascade": c, "category": cat, "prompt": p, "key": held.keys[i] if i < n else None,
                  "clip_score": float(scores[i])} for i, (cat, p) in enumerate(zip(cats, prompts))]
        if not n:
            continue
        metrics[f"{c}_fid"] = _fid(held, images[:n], sizes[cascade], net)
        if demo_check.all_demo_prompts(held.captions):
            chk = demo_check.check_samples(list(zip(held.captions, images[:n])))
            metrics.update({f"{c}_{k}": v for k, v in chk.metrics().items()})
            ctx.progress(f"evaluate: {c}: {chk.line()}")
        ctx.progress(f"evaluate: {c}: FID {metrics[f'{c}_fid']:.2f} ({n} samples), "
                     f"CLIP score {metrics[f'{c}_clip_score']:.3f} (real images {metrics['heldout_clip_score']:.3f})")
    return metrics, {"fid_samples": n, "suite_prompts": len(suite)}, rows


def _fid(held: HoldoutSet, images: list, size: int, net: torch.nn.Module) -> float:
    """FID at the cascade's output size: the real images are resized to it first, so the feature
    network sees both sets through the same resampling."""
    return M.fid(M.pil_to_uint8(held.images, size), M.pil_to_uint8(images, size), net)


def prior_figures(ctx: EvalContext) -> tuple[dict[str, float], dict[str, int]]:
    """The prior's sampled CLIP image embeddings of held-out captions vs the true ones."""
    cfg = ctx.cfg
    held = read_holdout(None, ctx.embed_shards, ctx.rule, cfg.prior_samples)
    scfg = cfg.sample_config(["x"])
    m = load_model(ctx.stage_uris["train_prior"], "prior", device=ctx.device)
    outs = []
    for i in range(0, len(held), scfg.batch_size):
        g = torch.Generator(device=ctx.device).manual_seed(scfg.seed * 1_000_003 + i)
        outs.append(sample_with_model(m, held.features.select(slice(i, i + scfg.batch_size), ctx.device), None, scfg, g,
                                      ctx.device))
    sampled = torch.cat(outs)
    sim = float(clip_score.cosine(sampled, held.clip_image).mean())
    base = float(clip_score.cosine(held.features.clip_text, held.clip_image).mean())
    ctx.progress(f"evaluate: prior: cosine similarity {sim:.3f} (text-embedding baseline {base:.3f}, "
                 f"{len(held)} held-out samples)")
    return {"prior_cosine_similarity": sim, "prior_text_baseline": base}, {"prior_samples": len(held)}

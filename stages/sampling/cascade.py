"""Sampling, part 2: whole cascades from a run's trained stages — the pipeline's ``sample`` stage
and what ``t2i sample`` calls. Loading lives in stages/sampling/loading.py, the files a run leaves
in stages/sampling/outputs.py.

  unclip: prompt -> CLIP text -> prior -> CLIP image embedding -> decoder -> sr256 -> sr1024
  imagen: prompt -> T5 tokens -> base -> sr256 -> sr1024
  glide:  prompt -> token ids -> GLIDE (its own text transformer) -> sr256 -> sr1024

``guidance: clip`` guides the glide and base models with the noised CLIP of train_noised_clip
(stages/sampling/clip_guidance.py) instead of classifier-free guidance; ``guidance: compare`` samples each
cascade with such a model twice, CFG and CLIP-guided, from the same noise (the CLIP-guided half is
named ``<cascade>_clip_guided``: SampleConfig.variants).

Everything is read back through the store exactly as training wrote it (docs/contracts.md):
``<run>/train_X/final/{model.safetensors,config.json}`` (safetensors only: loading a run can never
execute code) and ``<run>/embed/encoders.json`` (which encoders embed the prompts). Networks are
built from their flavor name, so nothing here knows a model size.

Conditioning mirrors the training batch builders (stages/models/{prior,decoder,imagen_base,superres,glide}.py): the
same keyword arguments, with CLIP/T5 features rounded through fp16 as the embedding shards store
them. Classifier-free guidance is stages.diffusion's: the unconditional branch is the same call
with the role's ``drop_*`` flags all True (the network's learned null conditioning). Each SR
stage receives the previous stage's output downsampled to its ``low_res_size`` and noised at a
fixed conditioning-augmentation level (Imagen §2.5), which it is told through ``aug_level``.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from data_prep.buckets import bucket_shape, parse_ratio
from pipeline import layout, store
from pipeline.context import StageContext, StageFailed, StageResult
from pipeline.executors import cpu_threads
from stages.models import model
from stages.sampling.clip_guidance import ClipGuided, check_compatible
from stages.sampling.config import (CASCADES, CLI_OUT, NOISED_CLIP, ROLES, SAMPLER_NAMES, SampleConfig, cascade_roles,
                                    stage_of)
from stages.sampling.draw import draw, image_generators, image_seed
from stages.sampling.loading import LoadedModel, PromptEncoders, PromptFeatures, load_model
from stages.sampling.outputs import Sample, Samples, _to_pil, write_outputs
from stages.sampling.rerank import rerank


# ----------------------------------------------------------------------------- one stage
def _cond(m: LoadedModel, f: PromptFeatures, prev: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The network's keyword arguments: the model module's own ``sample_cond``, written beside its
    training batch builder (stages/models/__init__.py), told the model's final config."""
    return model(m.role).stage_spec.sample_cond(f, prev, m.config)


def kind_of(role: str) -> str:
    """What ``role`` draws in a cascade (stages/sampling/draw.py KINDS)."""
    spec = model(role)
    return "embedding" if spec.draws == "embedding" else "upsampler" if spec.upsampler else "image"


def sample_with_model(m: LoadedModel, f: PromptFeatures, prev: torch.Tensor | None, cfg: SampleConfig,
                      g: "torch.Generator | list[torch.Generator]", device: torch.device, guide: LoadedModel | None = None,
                      shape: tuple[tuple[int, int], tuple[int, int] | None] | None = None) -> torch.Tensor:
    """Sample one batch through one model of the cascade; returns its output on CPU.
    ``guide``: the noised CLIP, when this model samples with CLIP guidance (stages/sampling/clip_guidance.py).
    ``shape``: ``((h, w), low-res (h, w))`` of an image model at ``cfg.aspect`` (:func:`aspect_shapes`);
    None: square at its own size."""
    cond = _cond(m, f, prev.to(device) if prev is not None else None)
    net = m.net
    if guide is not None:
        net = ClipGuided(m.net, m.diffusion, guide.net, f.clip_text, cfg.clip_guidance_for(m.role))
    kw = draw_settings(m.role, m.config, cfg)
    if shape is not None and kw["kind"] != "embedding":
        kw.update(size=shape[0], low_res_size=shape[1])
    return draw(net, m.diffusion, cond, prev, generator=g, device=device, **kw)


def draw_settings(role: str, config, cfg: SampleConfig) -> dict:
    """:func:`draw`'s settings for ``role`` (its final config) sampled with ``cfg``: what it draws,
    at which size, how many steps with which sampler and guidance. The sample stage passes them on,
    a cascade export writes them down (stages/export/cascade_folder.py)."""
    kind = kind_of(role)
    return dict(kind=kind, size=int(config.cond_dims["clip_dim"]) if kind == "embedding" else int(config.image_size),
                low_res_size=config.low_res_size, condaug=config.condaug, sampler=SAMPLER_NAMES[cfg.sampler],
                steps=cfg.steps_for(role), guidance_scale=cfg.guidance_for(role), thresholding=cfg.thresholding,
                sr_start_t=cfg.sr_start_t, sr_aug_level=cfg.sr_aug_level)


def downsampling(config) -> int:
    """How many times an image model's network halves its input (its sides must be multiples)."""
    net = dict((config.network or {}).get("config") or {})
    unet = net.get("unet", net)  # GlideModel: its UNet's
    mults = unet.get("channel_mults")
    if mults is None:  # weights from before self-describing configs: the flavor table
        from stages.nets.flavors import get_flavor  # the flavor table: only for such old runs

        fl = get_flavor(config.role, config.flavor).config()
        mults = getattr(getattr(fl, "unet", fl), "channel_mults")
    return 2 ** (len(mults) - 1)


def aspect_shapes(models: dict[str, LoadedModel], roles: tuple[str, ...], aspect: str | None) -> dict[str, tuple]:
    """``{role: ((h, w), low-res (h, w) or None)}`` of a cascade's image models at ``aspect`` ({} for
    square): the first image model's shape on its own grid (bucket_shape at its side), every later
    model's that shape scaled by its side over the first's, so an upsampler's low-res input is
    exactly what the model before it drew."""
    if aspect is None:
        return {}
    images = [r for r in roles if kind_of(r) != "embedding"]
    if not images:
        return {}
    first = models[images[0]].config
    side0 = int(first.image_size)
    h0, w0 = bucket_shape(parse_ratio(aspect), side0, downsampling(first))
    out = {}
    for r in images:
        c = models[r].config
        sides = [int(c.image_size)] + ([int(c.low_res_size)] if c.low_res_size else [])
        if any(s % side0 for s in sides):
            raise StageFailed(f"sample.aspect: {stage_of(r)} works at {sides} px, not a multiple of the first "
                              f"model's {side0} px, so the aspect cannot carry through the cascade")
        scaled = [(h0 * s // side0, w0 * s // side0) for s in sides]
        m = downsampling(c)
        if any(v % m for v in scaled[0]):
            raise StageFailed(f"sample.aspect {aspect}: {stage_of(r)} would draw {scaled[0][0]}x{scaled[0][1]} px, "
                              f"not a multiple of its network's down-sampling factor {m}")
        out[r] = (scaled[0], scaled[1] if len(scaled) > 1 else None)
    return out


# ----------------------------------------------------------------------------- cascades
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _finished_attempt(run_uri: str, stage: str) -> str:
    """The attempt of ``stage`` the run last finished (for callers that pass no stage URIs)."""
    uri = layout.finished_stage_dir(run_uri, stage)
    if uri is not None:
        return uri
    if stage == "embed":
        raise StageFailed(f"{run_uri} has no finished embed stage ({layout.ENCODERS} not found): run it first "
                          "(sampling embeds prompts with the encoders it used)")
    raise StageFailed(f"stage {stage} has no trained model in {run_uri}: train it first (t2i resume {run_uri}), pick "
                      "a cascade that does not need it, or stop the cascade earlier with max_stage")


def _stage_uri(run_uri: str, stage_uris: dict[str, str], role: str) -> str:
    """The attempt the caller named for ``role``'s stage, else the one the run last finished."""
    return stage_uris.get(stage_of(role)) or _finished_attempt(run_uri, stage_of(role))


def _load_models(cfg: SampleConfig, run_uri: str, stage_uris: dict[str, str],
                 roles_by_cascade: dict[str, tuple[str, ...]], device: torch.device) -> dict[str, LoadedModel]:
    """Every model the cascades run, plus the noised CLIP under ``guidance: clip``/``compare``.
    All are loaded and checked before any sampling, so a missing stage or a noised CLIP that cannot
    guide a model fails in seconds rather than after the slow part."""
    needed = [r for r in ROLES if any(r in rs for rs in roles_by_cascade.values())]
    models = {}
    for role in needed:
        models[role] = load_model(_stage_uri(run_uri, stage_uris, role), role, device=device,
                                  percentile=cfg.dynamic_threshold_percentile)
    guided = cfg.clip_guided(needed)
    if guided:
        models[NOISED_CLIP] = load_model(_stage_uri(run_uri, stage_uris, NOISED_CLIP), NOISED_CLIP, device=device)
        for role in guided:
            why = check_compatible(role, models[role].config, models[NOISED_CLIP].config)
            if why:
                raise StageFailed(f"sample.guidance: {cfg.guidance}: {why}")
    return models


def _encode_prompts(encoders: PromptEncoders, models: dict[str, LoadedModel], prompts: list[str]) -> PromptFeatures:
    """The prompts' features, once checked that every model was trained on these encoders' dims:
    a model trained on other encoders' features cannot read them."""
    for role, m in models.items():
        if dict(m.config.cond_dims) != encoders.dims:
            raise StageFailed(f"{stage_of(role)} was trained on conditioning dims {m.config.cond_dims} but the "
                              f"embed stage's encoders give {encoders.dims}: re-train it on this embedding")
    return encoders.encode(prompts)


def _sample_variant(cfg: SampleConfig, cascade: str, name: str, vcfg: SampleConfig, roles: tuple[str, ...],
                    models: dict[str, LoadedModel], feats: PromptFeatures, seeds: list[int], device: torch.device,
                    progress) -> torch.Tensor:
    """The final outputs of one cascade variant (``name``, sampled with ``vcfg``) for every
    expanded prompt (``seeds``: each one's image seed), batch by batch through every stage of
    ``roles``."""
    n = len(seeds)
    ci = list(CASCADES).index(cascade)  # not the position in cfg: 'imagen' == imagen of 'both'
    guided = vcfg.clip_guided(roles)
    shapes = aspect_shapes(models, roles, vcfg.aspect)
    outs: list[torch.Tensor] = []
    for start in range(0, n, cfg.batch_size):
        f = feats.select(slice(start, start + cfg.batch_size), device)
        prev = None
        for si, role in enumerate(roles):
            g = image_generators(seeds[start:start + cfg.batch_size], ci, si, device)
            t0 = time.time()
            prev = sample_with_model(models[role], f, prev, vcfg, g, device,
                                     guide=models.get(NOISED_CLIP) if role in guided else None, shape=shapes.get(role))
            progress(f"sample: {name}/{role} batch {start // cfg.batch_size + 1}: "
                     f"{tuple(prev.shape)} in {time.time() - t0:.1f}s")
        outs.append(prev)
    return torch.cat(outs)


def _rerank(samples: list[Sample], cfg: SampleConfig, encoders: PromptEncoders, progress) -> Samples:
    """The ``rerank_keep`` samples per prompt that the run's CLIP scores highest (all of them when
    ``rerank_keep`` keeps every image)."""
    if cfg.rerank_keep is None or cfg.rerank_keep >= cfg.images_per_prompt:
        return Samples(samples)

    if encoders.preprocess is None:
        raise StageFailed(f"sample.rerank_keep needs the embed stage's CLIP preprocessing ({layout.ENCODERS} "
                          "clip_preprocess); re-run embed with this release")
    kept, figures = rerank(samples, cfg.rerank_keep, encoders.clip, encoders.preprocess)
    for k, v in figures.items():
        progress(f"sample: CLIP reranking {k} = {v:.4f}")
    return Samples(kept, figures)


# On the CPU an image's last bit depends on torch's thread count (how a reduction is split), and Ray
# gives a stage task that reserves no CPU one thread (OMP_NUM_THREADS=1). Every path that samples (the
# sample and evaluate stages with Ray or without, t2i sample, --from-sample) computes with this many,
# so an image drawn again anywhere is the same to the byte.
SAMPLING_CPU_THREADS = 1


def sampling_threads(device: torch.device):
    """The thread count every CPU sampling path uses (a context manager)."""
    return cpu_threads(SAMPLING_CPU_THREADS if device.type == "cpu" else None)


def sample_images(cfg: SampleConfig, run_uri: str, *, stage_uris: dict[str, str] | None = None,
                  embed_uri: str | None = None, encoders: PromptEncoders | None = None,
                  progress=lambda msg: None, images: slice | None = None) -> list[Sample]:
    """Sample cfg.prompts through cfg's cascades; every needed model is checked before any work.
    ``encoders``: already loaded prompt encoders (else loaded from ``<embed>/encoders.json``).
    ``images``: only these of the (prompt, image) list, with the seeds they have in the whole list."""
    device = resolve_device(cfg.device)
    with sampling_threads(device):
        return _sample_images(cfg, run_uri, device, stage_uris, embed_uri, encoders, progress, images)


def _sample_images(cfg: SampleConfig, run_uri: str, device: torch.device, stage_uris, embed_uri, encoders,
                   progress, images) -> list[Sample]:
    roles_by_cascade = {c: cascade_roles(c, cfg.max_stage) for c in cfg.cascades()}
    models = _load_models(cfg, run_uri, dict(stage_uris or {}), roles_by_cascade, device)
    expanded = [(i, k, p) for i, p in enumerate(cfg.prompts) for k in range(cfg.images_per_prompt)]
    expanded = expanded[images] if images is not None else expanded
    encoders = encoders or PromptEncoders.load(embed_uri or _finished_attempt(run_uri, "embed"), device=device)
    feats = _encode_prompts(encoders, models, [p for _, _, p in expanded])
    samples: list[Sample] = []
    for cascade in cfg.cascades():
        for name, vcfg in cfg.variants(cascade):
            seeds = [image_seed(cfg.seed, i, k, cfg.images_per_prompt) for i, k, _ in expanded]
            imgs = _sample_variant(cfg, cascade, name, vcfg, roles_by_cascade[cascade], models, feats,
                                   seeds, device, progress)
            samples += [Sample(p, i, k, name, _to_pil(x), seed=sd) for (i, k, p), x, sd in zip(expanded, imgs, seeds)]
    return _rerank(samples, cfg, encoders, progress)


# ----------------------------------------------------------------------------- entry points
def run(cfg: SampleConfig, ctx: StageContext) -> StageResult:
    """The pipeline's ``sample`` stage: sample, write PNGs + grid + report, run the demo check."""
    t0 = time.time()
    stage_uris = {name: m["out_uri"] for name, m in ctx.inputs.items() if "out_uri" in m}
    samples = sample_images(cfg, ctx.run_uri, stage_uris=stage_uris, embed_uri=stage_uris.get("embed"),
                            progress=ctx.progress)
    metrics_uris = {s: store.join(u, layout.METRICS) for s, u in stage_uris.items() if s.startswith("train_")}
    out = write_outputs(samples, cfg, ctx.run_uri, ctx.out_uri, metrics_uris)
    for line in out.lines:
        ctx.progress(line)
    metrics: dict[str, float] = {"sample_seconds": time.time() - t0}
    for cascade, chk in out.demo.items():
        metrics.update({f"{cascade}_{k}": v for k, v in chk.metrics().items()})
    metrics.update(getattr(samples, "figures", {}))  # CLIP reranking: kept vs first-drawn mean score
    return StageResult(
        counts={"images": len(samples), "prompts": len(cfg.prompts)},
        metrics=metrics,
        outputs={"dir": ctx.out_uri, "grid": out.grid_uri, "report": out.report_uri})


def _config_from_args(prompts, cascade, guidance, steps, **overrides: Any) -> SampleConfig:
    """A SampleConfig from call/CLI arguments; unset ones keep the config's per-model defaults."""
    kw: dict[str, Any] = {"cascade": cascade, **overrides}
    if prompts:
        kw["prompts"] = list(prompts)
    if guidance is not None:
        kw["guidance_scale"] = guidance
    if steps is not None:
        kw["steps"] = steps
    return SampleConfig(**kw)


def sample_cascade(run_uri: str, prompts: Sequence[str] | None = None, cascade: str = "imagen", *,
                   guidance: float | dict[str, float] | None = None, steps: int | dict[str, int] | None = None,
                   sampler: str = "dpmpp", seed: int = 0, out_uri: str | None = None,
                   **overrides: Any) -> list[str]:
    """Sample a run's cascade and write the PNGs (+ grid and report) to ``out_uri``
    (default ``<run>/samples_cli``). Returns the image URIs in prompt order."""
    cfg = _config_from_args(prompts, cascade, guidance, steps, sampler=sampler, seed=seed, **overrides)
    run_uri = store.normalize(run_uri)
    out_uri = store.normalize(out_uri) if out_uri else store.join(run_uri, CLI_OUT)
    samples = sample_images(cfg, run_uri)
    return [s.uri for s in write_outputs(samples, cfg, run_uri, out_uri).samples]


def sample_cli(run_uri: str, prompts: Sequence[str] | None = None, cascade: str = "imagen",
               guidance: float | None = None, steps: int | None = None, out: str | None = None,
               **overrides: Any) -> list[str]:
    """:func:`sample_with_config` from keyword arguments (unset ones keep the config defaults)."""
    return sample_with_config(_config_from_args(prompts, cascade, guidance, steps, **overrides), run_uri, out=out)


def regenerate(cfg: SampleConfig, run_uri: str, n: int, *, out: str | None = None) -> list[str]:
    """Image ``n`` (its place among ``cfg``'s prompts x images_per_prompt: the ``n`` of the sample
    stage's ``samples.json``) of each of ``cfg``'s cascades, byte for byte as a sampling run with
    ``cfg`` made it: its whole batch is sampled again (same neighbours, same per-image seeds), since
    a network's batched arithmetic may differ from a single image's in the last bit; only image
    ``n`` is written. Flags changed on top of ``cfg`` (steps, guidance) change it as they would
    have in that run."""
    total = len(cfg.prompts) * cfg.images_per_prompt
    if not 0 <= n < total:
        raise StageFailed(f"--from-sample {n}: the sample stage made images 0..{total - 1} per cascade")
    start = n // cfg.batch_size * cfg.batch_size
    cfg = cfg.model_copy(update={"rerank_keep": None})
    run_uri = store.normalize(run_uri)
    out_uri = store.normalize(out) if out else store.join(run_uri, CLI_OUT)
    batch = sample_images(cfg, run_uri, progress=print, images=slice(start, start + cfg.batch_size))
    mine = [s for s in batch if s.index * cfg.images_per_prompt + s.k == n]
    res = write_outputs(mine, cfg.model_copy(update={"demo_check": False}), run_uri, out_uri)
    return [s.uri for s in res.samples]


def sample_with_config(cfg: SampleConfig, run_uri: str, *, out: str | None = None) -> list[str]:
    """What ``t2i sample`` calls: sample ``cfg`` through the run's finished stages, write the PNGs,
    grid and report, print progress and the demo check; returns the image URIs."""
    run_uri = store.normalize(run_uri)
    out_uri = store.normalize(out) if out else store.join(run_uri, CLI_OUT)
    samples = sample_images(cfg, run_uri, progress=print)
    res = write_outputs(samples, cfg, run_uri, out_uri)
    print(f"grid: {res.grid_uri}\nreport: {res.report_uri}")
    for line in res.lines:
        print(line)
    return [s.uri for s in res.samples]

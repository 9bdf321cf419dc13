"""Evaluation follows training: one row per complete checkpoint in ``<attempt>/eval.jsonl``.

``t2i eval RUN --checkpoints`` (or :func:`evaluate_checkpoints`, e.g. from a task on spare
resources) evaluates every complete checkpoint of each training stage that has no row yet, so
running it again while the run trains adds the new ones; it only reads what training wrote
(checkpoints are picked up only once COMPLETE) and never blocks it. A row holds:

* ``step``; ``val_loss`` when the training logged one at that step (live weights, stages/training/validation.py);
* ``val_loss_ema``: the same fixed held-out batch, timesteps and noise on the checkpoint's EMA
  weights (what sampling uses);
* base / decoder / glide: ``fid`` and ``clip_score`` of the cascade cut after this model (imagen: base;
  unclip: the final prior + this decoder; glide: glide) on the held-out captions, at its output size;
* prior: ``prior_cosine_similarity``.

The SR models get the validation losses only (their FID needs the whole cascade: ``t2i eval``).
"""
from __future__ import annotations

import json
from typing import Any, Callable

from pipeline import layout, store
from pipeline.context import StageFailed
from stages.diffusion import Diffusion
from stages.evaluate import NO_SPLIT, context, figures
from stages.evaluate.offline import _materialise, checkpoint_val_loss
from stages.models import by_stage
from stages.nets.flavors import get_flavor
from stages.report.eval_figures import EVAL_LOG, read_rows  # one reader of eval.jsonl: the report reads it too
from stages.sampling.config import CASCADES, FIRST_IMAGE_ROLES
from stages.training.final_weights import FinalConfig, load_final, resolve_final
from stages.training.loader import pair_shards
from stages.training.trainer import read_cond_dims
from stages.training.validation import Validator


def complete_steps(attempt: str) -> list[int]:
    steps = []
    for u in store.listdir(store.join(attempt, layout.CHECKPOINTS)):
        step = layout.step_of(u)
        if step is not None and store.exists(store.join(u, layout.CHECKPOINT_COMPLETE)):
            steps.append(step)
    return sorted(steps)


def evaluate_checkpoints(cfg: Any, run_uri: str, inputs: dict[str, dict], train_cfgs: dict[str, Any],
                         work_uri: str, *, progress: Callable[[str], None] = lambda m: None) -> dict[str, list[dict]]:
    """Rows added per stage (module docstring). ``train_cfgs``: each stage's TrainConfig from the
    run's spec (the validation batch is built as training built it)."""
    ctx = context(cfg, run_uri, inputs, None, progress)
    if not ctx.rule.enabled:
        raise StageFailed("evaluate: " + NO_SPLIT.format(embed=ctx.embed_uri))
    added: dict[str, list[dict]] = {}
    for st, tcfg in train_cfgs.items():
        if st not in inputs:
            continue
        attempt = inputs[st]["out_uri"]
        rows = read_rows(attempt)
        done = {int(r["step"]) for r in rows}
        new = []
        for step in (s for s in complete_steps(attempt) if s not in done):
            view = store.join(work_uri, layout.EVAL_WEIGHTS, st, layout.step_name(step))
            _materialise(attempt, step, view, st, _final_config(by_stage(st), tcfg, ctx.embed_uri, step))
            row: dict[str, Any] = {"step": step}
            v = checkpoint_val_loss(attempt, step)
            if v is not None:
                row["val_loss"] = v
            row.update(_model_figures(ctx, by_stage(st), tcfg, view))
            new.append(row)
            progress(f"evaluate: {st} step {step}: " + ", ".join(f"{k} {x:.4g}" for k, x in row.items() if k != "step"))
        if new:
            rows = sorted(rows + new, key=lambda r: r["step"])
            store.write_bytes_atomic(store.join(attempt, EVAL_LOG),
                                     "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
        added[st] = new
    return added


def _model_figures(ctx, mdef, tcfg, view: str) -> dict[str, float]:
    import torch

    net, _ = load_final(resolve_final(view), ctx.device)
    shards = pair_shards(ctx.download_shards if mdef.needs_images else None, ctx.embed_shards)
    val = Validator.for_data(mdef.stage_spec, tcfg, get_flavor(mdef.network_role, tcfg.flavor), shards, ctx.rule,
                             ctx.device, torch.float32)
    out = {"val_loss_ema": val.loss(net, Diffusion(**tcfg.diffusion.model_dump()))}
    del net
    sub = _with(ctx, {**ctx.stage_uris, mdef.stage: view})
    if mdef.role == "prior":
        m, _ = figures.prior_figures(sub)
        out["prior_cosine_similarity"] = m["prior_cosine_similarity"]
    elif mdef.role in FIRST_IMAGE_ROLES:  # draws a cascade's first image: its FID/CLIP score there
        cascade = next(c for c, roles in CASCADES.items() if mdef.role in roles)
        cut = ctx.cfg.model_copy(update={"cascade": cascade, "prompt_suite": None,
                                         "sampling": {**ctx.cfg.sampling, "max_stage": mdef.role}})
        try:
            m, c, _ = figures.cascade_figures(_with(sub, sub.stage_uris, cut))
        except StageFailed as e:  # e.g. the decoder's prior has not finished yet: the losses still count
            ctx.progress(f"evaluate: {mdef.stage}: no FID/CLIP score yet ({e})")
            return out
        out.update(fid=m[f"{cascade}_fid"], clip_score=m[f"{cascade}_clip_score"], fid_samples=c["fid_samples"])
    return out


def _with(ctx, stage_uris: dict[str, str], cfg: Any = None):
    """``ctx`` with other weights (and optionally another config)."""
    import dataclasses

    return dataclasses.replace(ctx, stage_uris=stage_uris, cfg=cfg if cfg is not None else ctx.cfg)


def _final_config(mdef, tcfg, embed_uri: str, step: int) -> FinalConfig:
    """final/config.json as the training loop writes it (stages/training/trainer.py Trainer.finish), for a
    stage that has not finished yet."""
    flavor = get_flavor(mdef.network_role, tcfg.flavor)
    return FinalConfig(role=mdef.role, flavor=tcfg.flavor, cond_dims=read_cond_dims(embed_uri),
                       image_size=flavor.image_size, low_res_size=flavor.low_res_size,
                       diffusion=tcfg.diffusion.model_dump(), condaug=mdef.stage_spec.extra_config(tcfg), step=step)

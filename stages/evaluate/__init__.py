"""The ``evaluate`` stage (issue 14): is the run any good, on samples training never saw?

Figures, all on the embed stage's held-out split (data_prep/holdout.py) or the shipped prompt
suite, written to the stage manifest's metrics (docs/evaluation.md says how to read them):

* ``<cascade>_fid``: FID of the cascade's samples of N held-out captions vs those N held-out
  images, on the feature network ``fid_features`` names (recorded as ``outputs.fid_features``);
* ``<cascade>_clip_score``: mean cosine of each sample with its caption under the run's CLIP
  (the embed stage's encoders), beside ``heldout_clip_score`` (the same for the real images: the
  ceiling this CLIP gives); ``<cascade>_clip_score_suite`` / ``_<category>`` on the prompt suite;
* ``prior_cosine_similarity``: the prior's sampled CLIP image embedding vs the true one of
  held-out samples, beside ``prior_text_baseline`` (the caption's CLIP text embedding vs the
  image's: what the prior must beat to be worth having, as unCLIP reports);
* ``<stage>_val_loss``: each training stage's final validation loss (from its manifest);
* ``<cascade>_demo_*``: the demo check (stages/sampling/demo_check.py) when the captions are demo captions.

Cascades: unclip, imagen and glide ('auto' evaluates each one the run trains). With
``sampling.guidance: compare`` each cascade with a CLIP-guidable model is also evaluated CLIP-guided,
its figures named ``<cascade>_clip_guided_*`` (same captions, same seeds as the CFG figures).
Every cascade samples the held-out *captions* through the run's encoders, as ``t2i sample`` does
(GLIDE's token ids by the embed stage's tokenizer: the ids its shards store for those captions).

Sampling goes through stages/sampling/cascade.py (``sample_images``), so the figures are of exactly what
``t2i sample`` produces. ``t2i eval RUN`` (pipeline/cli/evaluate.py) runs :func:`evaluate` offline.
This module imports no torch until a stage runs (reading a spec stays light).
"""
from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from data_prep import holdout
from data_prep.encoders_doc import encoders_doc_uri, read_encoders_doc
from pipeline import layout, store
from pipeline.configbase import StrictModel
from pipeline.context import StageContext, StageFailed, StageResult
from stages.evaluate.names import check_feature_name, feature_kind
from stages.models import TRAIN_STAGES
from stages.sampling.config import CASCADE_CHOICES, CASCADES, SampleConfig

EVALUATION = layout.EVALUATION  # per-prompt figures beside the manifest
NO_SPLIT = ("the embedding {embed} has no held-out split (made before splits existed, or embed.holdout_fraction "
            "and holdout_min are 0): set embed.holdout_min (a new embed attempt, so training leaves samples out)")
_SAMPLE_OWN = ("prompts", "cascade", "images_per_prompt", "demo_check")  # set by the stage itself


class EvaluateConfig(StrictModel):
    """The ``evaluate`` section of a run spec."""

    fingerprint_exclude: ClassVar[tuple[str, ...]] = ()

    cascade: Literal[("auto", *CASCADE_CHOICES)] = Field("auto", description=(
        f"cascades to evaluate: 'auto' = each cascade whose models the run trains ({', '.join(CASCADES)}), or "
        f"{', '.join(repr(c) for c in CASCADES)}, 'both' (unclip and imagen) or 'all' (every cascade; the run "
        "must train them all)"))
    num_samples: int = Field(64, ge=2, description=(
        "held-out captions sampled per cascade for FID and CLIP score (capped by the held-out count; "
        "FID is biased upwards at small N, compare figures of equal N only)"))
    prior_samples: int = Field(256, ge=1, description="held-out embeddings for prior_cosine_similarity")
    fid_features: str = Field("torchvision:inception_v3", description=(
        "FID feature network: 'torchvision:inception_v3' (local torch cache), "
        "'torchvision:inception_v3:/path/weights.pth', 'tiny:DIR' (built and saved there once) or a saved DIR"))
    prompt_suite: str | None = Field("default", description=(
        "category-grouped prompt suite: 'default' (stages/evaluate/prompt_suite.py), a YAML path, or null"))
    suite_per_category: int = Field(2, ge=0, description="suite prompts sampled per category (0 = all)")
    sampling: dict[str, Any] = Field(default_factory=dict, description=(
        "sample-stage settings for the evaluation samples (steps, sampler, guidance_scale, sr_start_t, "
        "max_stage, batch_size, device, seed ...: the sample section's fields)"))

    @field_validator("fid_features")
    @classmethod
    def _features(cls, v: str) -> str:
        return check_feature_name(v)

    @field_validator("sampling")
    @classmethod
    def _sampling(cls, v: dict[str, Any]) -> dict[str, Any]:
        own = sorted(set(v) & set(_SAMPLE_OWN))
        if own:
            raise ValueError(f"sampling.{own[0]} is set by the evaluate stage itself; allowed: the sample "
                             f"section's other fields")
        try:
            SampleConfig(prompts=["x"], **v)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"sampling.{'.'.join(str(p) for p in err['loc'])}: "
                             f"{err['msg'].removeprefix('Value error, ')}") from None
        return v

    @model_validator(mode="after")
    def _sampling_for_cascade(self) -> "EvaluateConfig":
        """The sampling settings with this cascade (e.g. guidance 'compare' needs a CLIP-guidable one)."""
        try:
            self.sample_config(["x"])
        except ValidationError as e:
            raise ValueError(f"evaluate.sampling with cascade {self.cascade!r}: "
                             f"{e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return self

    def cascades(self) -> list[str]:
        """The cascades asked for ('auto': every cascade; those the run does not train are left out
        when the stage runs, stages/evaluate/figures.runnable_cascades)."""
        return list(CASCADES) if self.cascade == "auto" else self.sample_config(["x"]).cascades()

    def sample_config(self, prompts: list[str]) -> SampleConfig:
        cascade = "all" if self.cascade == "auto" else self.cascade
        return SampleConfig(prompts=prompts, cascade=cascade, images_per_prompt=1, demo_check=False,
                            **self.sampling)

    def required_stages(self) -> list[str]:
        """Training stages a named cascade needs ('auto' needs none: it evaluates what is trained)."""
        return [] if self.cascade == "auto" else self.sample_config(["x"]).required_stages()


def run(cfg: EvaluateConfig, ctx: StageContext) -> StageResult:
    return evaluate(cfg, ctx.run_uri, ctx.inputs, ctx.out_uri, progress=ctx.progress)


def evaluate(cfg: EvaluateConfig, run_uri: str, inputs: dict[str, dict], out_uri: str, *,
             progress: Callable[[str], None] = lambda m: None,
             stage_uris: dict[str, str] | None = None) -> StageResult:
    """Every figure of the stage from upstream manifests ``inputs`` (stage -> manifest);
    ``stage_uris`` overrides where a training stage's weights are read (``t2i eval --checkpoint``)."""
    from stages.evaluate import figures  # torch: reading a spec (this stage's config) must not load it
    from stages.sampling.cascade import sampling_threads  # torch: as above

    t0 = time.time()
    ctx = context(cfg, run_uri, inputs, stage_uris, progress)
    with sampling_threads(ctx.device):  # the same figures with Ray or without (see SAMPLING_CPU_THREADS)
        return _evaluate(cfg, ctx, inputs, out_uri, t0, progress, figures)


def _evaluate(cfg: EvaluateConfig, ctx, inputs: dict[str, dict], out_uri: str, t0: float, progress,
              figures) -> StageResult:
    if not ctx.rule.enabled:  # an embedding made before splits existed: only the suite can be scored
        progress(f"evaluate: {NO_SPLIT.format(embed=ctx.embed_uri)}; scoring the prompt suite only")
    metrics: dict[str, float] = {}
    for st in TRAIN_STAGES:  # each model's held-out diffusion loss, as its training stage measured it
        v = ((inputs.get(st) or {}).get("metrics") or {}).get("val_loss")
        if v is not None:
            metrics[f"{st}_val_loss"] = float(v)
    per_prompt: dict[str, Any] = {}
    counts: dict[str, int] = {"n_holdout": ctx.rule.count}
    if ctx.download_shards is not None and figures.runnable_cascades(ctx):
        m, c, rows = figures.cascade_figures(ctx)
        metrics.update(m)
        counts.update(c)
        per_prompt["samples"] = rows
    if "train_prior" in ctx.stage_uris and ctx.rule.enabled:
        m, c = figures.prior_figures(ctx)
        metrics.update(m)
        counts.update(c)
    metrics["evaluate_seconds"] = time.time() - t0
    doc_uri = store.join(out_uri, EVALUATION)
    store.write_json(doc_uri, {"metrics": metrics, "counts": counts, "fid_features": cfg.fid_features, **per_prompt})
    return StageResult(counts=counts, metrics=metrics,
                       outputs={"evaluation": doc_uri, "fid_features": feature_kind(cfg.fid_features),
                                "fid_features_spec": cfg.fid_features})


def context(cfg: EvaluateConfig, run_uri: str, inputs: dict[str, dict], stage_uris: dict[str, str] | None,
            progress: Callable[[str], None]):
    """What every measurement needs: the held-out rule, the run's encoders, where each model is."""
    from stages.evaluate.figures import EvalContext  # torch: reading a spec (this stage's config) must not load it
    from stages.sampling.cascade import resolve_device  # torch: as above
    from stages.sampling.loading import PromptEncoders  # torch: as above

    if "embed" not in inputs:
        raise StageFailed("evaluate: needs the embed stage (held-out split, encoders)")
    embed_uri = inputs["embed"]["out_uri"]
    doc = read_encoders_doc(embed_uri)
    if doc is None or doc.clip_preprocess is None:  # CLIP scores preprocess samples as the embed stage did
        raise StageFailed(f"evaluate: {encoders_doc_uri(embed_uri)} "
                          f"{'not found' if doc is None else 'has no clip_preprocess'}: re-run the embed stage")
    rule = holdout.read_rule(embed_uri)  # looked up when called: tests replace it
    uris = {n: m["out_uri"] for n, m in inputs.items() if "out_uri" in m}
    uris.update(stage_uris or {})
    device = resolve_device(cfg.sample_config(["x"]).device)
    return EvalContext(cfg, run_uri, uris, embed_uri, inputs["embed"]["outputs"]["shards"],
                       (inputs.get("download") or {}).get("outputs", {}).get("shards"), rule,
                       PromptEncoders.load(embed_uri, device=device), doc.clip_preprocess,
                       device, progress)


# What each figure means (for `t2i status`, report.html and `t2i eval`) lives with the report.
from stages.report.eval_figures import evaluation_rows  # noqa: E402,F401

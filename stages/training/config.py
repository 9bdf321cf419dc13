"""The one training config shared by the five training stages.

Each stage module subclasses :class:`TrainConfig` only to change defaults (flavor, CFG dropout
rates) or to add what that model alone needs (SR adds ``condaug``). Validation happens when the
run spec is parsed, before any worker starts, so a bad value fails with the field path and what
is allowed instead of a DeepSpeed assertion an hour into a run.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.configbase import StrictModel
from pipeline.executors import WorkerPlacement
from stages.process_args import check_condaug, check_diffusion


class DiffusionSettings(StrictModel):
    """Keyword arguments of ``stages.diffusion.Diffusion`` (also written to final/config.json).

    The allowed values are checked by the pure core's own checks (stages/process_args.py, also
    run by ``Diffusion``), so the spec and the core can never disagree on what is valid.
    """

    schedule: Literal["cosine", "linear", "logsnr_cosine"] = Field("cosine", description="noise schedule")
    # v (Salimans & Ho 2022): unlike eps, its target still carries the image at high noise, so
    # the network learns global content (colour, layout, text conditioning) early, and x0 has no
    # 1/alpha blow-up at t -> 1 when sampling. eps stays available for paper reproductions.
    prediction: Literal["eps", "x0", "v"] = Field("v", description="what the network predicts")
    min_snr_gamma: float | None = Field(5.0, description="Min-SNR loss weighting gamma (> 0); None = plain MSE")
    min_snr_floor: float = Field(0.0, description=(
        "lower bound of the Min-SNR x0-loss weight: max(min(snr, gamma), floor); 1 keeps the high-noise "
        "steps, where the layout is decided from the text alone, at full weight"))
    thresholding: Literal["none", "static", "dynamic"] = Field(
        "dynamic", description="x0 thresholding when sampling ('none' for the prior: embeddings are not in [-1, 1])")
    train_t_max: float = Field(1.0, description=(
        "train on t ~ U[0, train_t_max]; < 1 trains a low-noise refiner (SDXL refiner style) that must "
        "then be sampled from sample.sr_start_t <= this value"))

    @model_validator(mode="after")
    def _as_the_core_checks(self) -> "DiffusionSettings":
        check_diffusion(**self.model_dump())  # Diffusion's own checks; raises naming the field
        return self


class CondAugSettings(StrictModel):
    """Keyword arguments of ``stages.condaug.CondAugConfig`` (SR only; written to final/config.json).

    SR models train on real low-res images; corrupting them (noise at a random level, optional
    blur) closes the gap to the generated low-res images they see at sampling (Imagen §2.5).
    Validation runs CondAugConfig's own checks (stages/process_args.py: one home for them).
    """

    schedule: Literal["cosine", "linear", "logsnr_cosine"] = Field("cosine", description="aug level -> noise")
    max_train_level: float = Field(0.5, description="training aug levels ~ U[0, max_train_level], within [0, 1]")
    sample_level: float = Field(0.1, description="fixed aug level used when sampling, within [0, 1]")
    blur_prob: float = Field(0.0, description="probability of blurring a training low-res image (unCLIP: 0.5)")
    blur_sigma: tuple[float, float] = Field((0.4, 0.6), description="blur sigma range (lo, hi), 0 < lo <= hi")

    @model_validator(mode="after")
    def _as_the_core_checks(self) -> "CondAugSettings":
        check_condaug(**self.model_dump())  # CondAugConfig's own checks; raises naming the field
        return self


class TrainConfig(StrictModel):
    """Everything one training stage needs; defaults suit the CPU demo.

    Fields are of three kinds (pipeline/manifest.py). Everything not listed below defines the
    model and its data (flavor, batch, optimizer, diffusion, conditioning, seed, ZeRO stage and
    precision, whose checkpoints cannot be continued under another): a change starts a new
    attempt beside the old one. ``steps`` says how far to train: raising it continues the
    finished attempt from its latest checkpoint (the cosine LR schedule is stretched to the new
    length). The rest say how the work is scheduled, logged or placed: a change re-runs nothing.
    """

    extent_fields: ClassVar[tuple[str, ...]] = ("steps",)
    fingerprint_exclude: ClassVar[tuple[str, ...]] = (
        "checkpoint_every_steps", "checkpoint_every_minutes", "checkpoint_upload", "checkpoint_background_budget_gb",
        "keep_last", "log_every", "sample_every",
        "sample_steps", "wandb_project", "num_workers", "cpus_per_worker", "gpus_per_worker", "resources",
        "accelerator_type", "max_failures", "loader_workers", "max_nonfinite_steps", "activation_checkpointing", "deterministic",
        "eval_every", "val_samples")

    flavor: str = Field("debug", description="network size: debug, demo or the role's paper-scale name")
    steps: int = Field(100, description="optimizer steps to train (each = grad_accum micro-batches)")
    batch_size: int = Field(4, description="micro-batch size per worker")
    grad_accum: int = Field(1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(1e-4, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    warmup_steps: int = Field(0, description="linear warmup steps from 0 to lr")
    min_lr_ratio: float = Field(0.1, description="cosine decay floor as a fraction of lr")
    lr_scales: dict[str, float] = Field(default_factory=dict, description=(
        "learning-rate multipliers by parameter-name prefix, e.g. {'text.': 0.1}: a jointly trained text "
        "transformer (train_glide, train_decoder with text_encoder: glide) at a tenth of the UNet's lr; "
        "the longest matching prefix wins, every prefix must name some parameter"))
    grad_clip: float = Field(1.0, description="global gradient-norm clip; 0 disables")
    zero_stage: int = Field(0, description="DeepSpeed ZeRO stage 0..3")
    precision: Literal["bf16", "fp32", "auto"] = Field(
        "auto", description="bf16 (fp32 master weights) | fp32 | auto = bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = Field(False, description="recompute activations in backward (saves memory)")
    deterministic: bool = Field(False, description=(
        "GPU: PyTorch's deterministic algorithms (torch.use_deterministic_algorithms, cuDNN autotune off, "
        "a fixed cuBLAS workspace), so a rerun gives the same bits; slower. CPU training is bit-reproducible "
        "without it (same machine kind and thread count)"))
    ema_decay: float = Field(0.999, description="EMA decay of the weights; the final output is the EMA")
    cfg_drop_text: float = Field(0.1, description="probability of dropping the text conditioning (CFG)")
    cfg_drop_image: float = Field(0.0, description="probability of dropping the CLIP image embedding (decoder)")
    random_flip: bool = Field(True, description=(
        "mirror half the training images (augmentation); false when captions name left and right"))
    checkpoint_every_steps: int = Field(1000, description="save a checkpoint every N steps; 0 = only by time/end")
    checkpoint_every_minutes: float = Field(0.0, description="also save every M minutes; 0 disables")
    checkpoint_upload: Literal["sync", "background"] = Field("sync", description=(
        "'sync': the step loop waits for the upload and COMPLETE. 'background': a save waits only for "
        "the snapshot on local disk and uploads it while training goes on (one upload in flight; a "
        "failed upload fails the stage at the next save or the end); a worker that dies right after a "
        "save loses that checkpoint (the one before it is used)"))
    checkpoint_background_budget_gb: float = Field(0.0, ge=0, description=(
        "with checkpoint_upload 'background': the most local disk one rank's snapshot may hold while "
        "training goes on; a save over it is uploaded synchronously (logged, counted as "
        "checkpoint_sync_fallbacks). 0: no limit"))
    keep_last: int = Field(3, description="complete checkpoints kept in the store")
    log_every: int = Field(10, description="log metrics every N steps")
    sample_every: int = Field(0, description="write a sample grid every N steps; 0 disables")
    sample_steps: int = Field(10, description="sampler steps used for the sample grid")
    eval_every: int = Field(1000, description=(
        "compute the validation loss (held-out batch, fixed t and noise) every N steps and at the end; "
        "0 = only at the end"))
    val_samples: int = Field(16, description="held-out samples in the fixed validation batch")
    seed: int = Field(0, description="seed of initialization, noise, dropout masks and data order")
    num_workers: int = Field(1, description="training workers (ranks) under Ray Train")
    cpus_per_worker: float = Field(1.0, description="CPUs reserved per Ray Train worker")
    gpus_per_worker: float = Field(0.0, description="GPUs per Ray Train worker; > 0 means use_gpu")
    resources: dict[str, float] = Field(default_factory=dict, description="extra custom Ray resources per worker")
    accelerator_type: str | None = Field(None, description="Ray accelerator_type constraint, e.g. 'H100'")
    max_failures: int = Field(0, description="Ray Train restarts of the worker group after a failure")
    loader_workers: int = Field(1, description="DataLoader worker processes per rank; 0 = in the training process")
    max_nonfinite_steps: int = Field(
        20, description="stop the stage after this many NaN/inf-loss steps in a row (each one is skipped: no update)")
    wandb_project: str | None = Field(None, description="also log to this Weights & Biases project (rank 0)")
    diffusion: DiffusionSettings = Field(default_factory=DiffusionSettings, description="diffusion process")

    @field_validator("steps", "batch_size", "grad_accum", "num_workers", "keep_last", "log_every",
                     "max_nonfinite_steps", "val_samples")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v <= 0:
            raise ValueError(f"{info.field_name} must be > 0 (got {v})")
        return v

    @field_validator("lr_scales")
    @classmethod
    def _scales(cls, v: dict[str, float]) -> dict[str, float]:
        for prefix, scale in v.items():
            if not prefix:
                raise ValueError("lr_scales: a prefix must not be empty (the base lr is `lr`)")
            if not scale > 0:
                raise ValueError(f"lr_scales[{prefix!r}]={scale}: must be > 0 (freeze nothing by lr 0)")
        return v

    @field_validator("warmup_steps", "checkpoint_every_steps", "sample_every", "max_failures", "loader_workers",
                     "seed", "eval_every")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0 (got {v})")
        return v

    @field_validator("sample_steps")
    @classmethod
    def _sample_steps(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"sample_steps must be > 0 (got {v})")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"lr must be > 0 (got {v})")
        return v

    @field_validator("weight_decay", "grad_clip", "checkpoint_every_minutes", "cpus_per_worker", "gpus_per_worker")
    @classmethod
    def _non_negative_f(cls, v: float, info) -> float:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0 (got {v})")
        return v

    @field_validator("min_lr_ratio", "cfg_drop_text", "cfg_drop_image")
    @classmethod
    def _unit(cls, v: float, info) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{info.field_name} must be within [0, 1] (got {v})")
        return v

    @field_validator("ema_decay")
    @classmethod
    def _ema(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"ema_decay must be within [0, 1) (got {v})")
        return v

    @field_validator("zero_stage")
    @classmethod
    def _zero(cls, v: int) -> int:
        if v not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be one of 0, 1, 2, 3 (got {v})")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for k, amount in v.items():
            if k in ("CPU", "GPU"):
                raise ValueError(f"resources[{k!r}]: use cpus_per_worker / gpus_per_worker instead")
            if amount < 0:
                raise ValueError(f"resources[{k!r}] must be >= 0 (got {amount})")
        return v

    def placement(self) -> WorkerPlacement:
        """Where this stage's ranks run (what the executor needs)."""
        return WorkerPlacement(self.num_workers, self.cpus_per_worker, self.gpus_per_worker, dict(self.resources),
                               self.accelerator_type, self.max_failures)

    @model_validator(mode="after")
    def _cadence(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})")
        return self

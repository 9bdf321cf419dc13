"""The embed stage's config, torch-free (reading a run spec must not load the encoders)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from data_prep.encoder_config import ClipConfig, T5Config
from pipeline.configbase import TaskPlacement


class EmbedConfig(TaskPlacement):
    """Embedding precompute (runs once per dataset; training reads only its output)."""

    fingerprint_exclude: ClassVar[tuple[str, ...]] = ("num_actors", "gpus_per_actor", "cpus_per_decode_task", "resources")

    clip: ClipConfig = Field(default_factory=ClipConfig, description="CLIP encoder (image/text embeddings, text tokens).")
    t5: T5Config = Field(default_factory=T5Config, description="T5 encoder (per-token text conditioning).")
    batch_size: int = Field(64, ge=1, le=65536, description="Samples per encoder batch (and per decoded chunk).")
    t5_micro_batch: int | None = Field(None, ge=1, description=(
        "Captions per T5 forward after sorting a batch by length; null = the whole batch padded to its "
        "longest caption. Smaller values cut padding further on mixed-length captions."))
    num_actors: int | Literal["auto"] = Field("auto", description=(
        "Ray: encoder actors. 'auto' = cluster GPUs / gpus_per_actor (one per 4 CPUs, at least 1, on CPU)."))
    gpus_per_actor: float = Field(1.0, ge=0, description=(
        "Ray: GPUs per encoder actor (fractions share a GPU). 0 = run the encoders on CPU. On a cluster "
        "without GPUs the stage falls back to CPU and says so."))
    cpus_per_decode_task: float = Field(1.0, gt=0, description="Ray: CPUs reserved by each decode task.")
    image_size: int | None = Field(None, ge=8, description="CLIP input size override; null = the model's own.")
    skip_bad_images: bool = Field(True, description="Skip and count undecodable images (false: stop on the first).")
    max_bad_fraction: float = Field(0.5, ge=0, le=1, description=(
        "Stop the stage if a shard loses more than this fraction of its samples (bad image, missing caption, "
        "non-finite embedding)."))
    # The held-out split (data_prep/holdout.py): part of the identity, so a new fraction gives new
    # attempts downstream (training on other samples, evaluating on other samples).
    holdout_fraction: float = Field(0.01, ge=0, lt=1, description=(
        "Fraction of samples held out of training for evaluation, chosen by a hash of the sample key "
        "(0 = none)."))
    holdout_min: int = Field(256, ge=0, description=(
        "Hold out at least this many samples (raises the fraction on small sets), but never more than "
        "holdout_max_fraction of them."))
    holdout_max_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "Cap on the held-out fraction that holdout_min may raise it to (small corpora keep most data for training)."))

    @field_validator("num_actors")
    @classmethod
    def _check_actors(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 1:
            raise ValueError(f"num_actors must be 'auto' or an integer >= 1, got {v!r}")
        return v

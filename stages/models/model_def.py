"""What a model is, in one declaration its own module makes: ``MODEL = ModelDef(...)``.

A model module (stages/models/<model>.py) holds its config class, ``build_batch`` and
``sample_cond`` side by side in its ``StageSpec``, its ``run(cfg, ctx)``, and then this one line of
facts that the graph, the spec's checks, sampling, evaluation, the report and the benchmarks read
(through the registry, stages/models/__init__.py). Nothing else names a role's facts. Torch-free:
reading a run spec imports every model module for its config class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from stages.training.stage_spec import StageSpec


@dataclass(frozen=True)
class ModelDef:
    spec: StageSpec                   # training: stage name, network role, data needs, batch builder, sample_cond
    config: type                      # its TrainConfig subclass (the run spec's ``train_<model>`` section)
    run: Callable[[Any, Any], Any]    # the stage's entry: run(cfg, ctx) -> StageResult
    description: str
    null_keys: tuple[str, ...] = ()   # drop flags set for the unconditional branch of CFG
    default_guidance: float = 1.0     # CFG scale when the sample config names none (1.0 = off)
    upsampler: bool = False           # takes the previous model's output as ``low_res``
    # What sampling draws: "image" ([B, 3, S, S] in [-1, 1]) or "embedding" (a CLIP image
    # embedding, [B, clip_dim], unit length, never thresholded: the unCLIP prior's output).
    draws: str = "image"
    # Its place in each cascade it belongs to, e.g. {"imagen": 1}: the registry builds the
    # cascades from these (stages/models/__init__.py CASCADES). Empty: in no cascade (it only helps).
    cascades: dict[str, int] = field(default_factory=dict, hash=False)
    # CLIP guidance (GLIDE §2.4) with the noised CLIP: its default scale for a model that sees the
    # caption directly and draws the cascade's first image; None: not CLIP-guidable.
    clip_guidance: float | None = None
    # Model FLOPs utilisation the benchmarks hold one GPU's bf16 step to (docs/performance.md).
    mfu_target: float = 0.40

    def __post_init__(self) -> None:
        if self.draws not in ("image", "embedding"):
            raise ValueError(f"ModelDef({self.spec.role}).draws must be 'image' or 'embedding' (got {self.draws!r})")

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def stage(self) -> str:
        return self.spec.stage

    @property
    def needs_images(self) -> bool:
        """False: trains on embeddings only (its loader opens no tars)."""
        return self.spec.needs_images

    @property
    def network_role(self) -> str:
        """The flavor table's name for its network (stages/nets/flavors.py)."""
        return self.spec.net_role

    @property
    def stage_spec(self) -> StageSpec:
        return self.spec

    @property
    def module(self) -> str:
        """The module that declares it (where the stage's ``run`` lives)."""
        return self.run.__module__

    @property
    def config_class(self) -> str:
        return self.config.__name__

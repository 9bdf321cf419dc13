"""What a training stage contributes to the one loop: its role, data needs, batch builder and
its sampling twin. Torch-free at import time, so reading a run spec (which imports the model
modules for their config classes) stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Batch = dict[str, Any]


@dataclass(frozen=True)
class StageSpec:
    """Everything that differs between the training stages."""

    stage: str  # graph name, e.g. "train_base"
    role: str  # the model's name in the registry, sampling and final/config.json, e.g. "base"
    needs_images: bool
    # (loader batch, cfg, flavor, device, compute dtype) -> (x0, cond kwargs of the network)
    build_batch: Callable[[Batch, Any, Any, Any, Any], tuple[Any, dict]]
    # (prompt features, previous model's output or None, the model's final/config.json) -> the same
    # cond kwargs at sampling time (the config says which network a configurable model trained, e.g.
    # the decoder's text encoder); stages/sampling/cascade.py adds what only sampling knows (SR: the low-res
    # input and its aug level)
    sample_cond: Callable[[Any, Any, dict | None], dict] = lambda features, prev, config=None: {}
    # the "condaug" entry of final/config.json (SR only)
    extra_config: Callable[[Any], dict | None] = lambda cfg: None
    # the config the sample grid builds its fixed conditioning with: no CFG dropout (SR: no condaug)
    clean_config: Callable[[Any], Any] = \
        lambda cfg: cfg.model_copy(update={"cfg_drop_text": 0.0, "cfg_drop_image": 0.0})
    # The training objective, for a model that is not a denoiser (the noised CLIP's contrastive
    # loss): (diffusion, network, x0, cond, *, t=None, noise=None) -> (scalar loss, detached stats),
    # the signature of Diffusion.training_loss plus the diffusion itself (its noise schedule).
    # None: the diffusion loss. Everything that computes a stage's loss (the step, validation, the
    # benchmarks) goes through :meth:`training_loss`, so a stage's objective is named once.
    loss: Callable[..., tuple[Any, dict]] | None = None
    # The flavor variant the stage's network is (stages/nets/flavors.Flavor.variants), from its
    # config: the decoder's text_encoder. None: the flavor's default network.
    variant: Callable[[Any], str | None] = lambda cfg: None
    # False: not a denoiser, nothing to draw (no training sample grid, no place in a cascade)
    samples: bool = True
    # The network family in stages/nets/flavors.py, when the model trains an existing network
    # under a name of its own (a new model on the Imagen base UNet: network="base"). "": its role.
    network: str = ""

    @property
    def net_role(self) -> str:
        """The role the flavor table knows this model's network by."""
        return self.network or self.role

    def training_loss(self, diffusion, model, x0, cond, *, t=None, noise=None):
        """This stage's loss of ``model`` on one batch (``t``/``noise`` fixed: validation)."""
        if self.loss is None:
            return diffusion.training_loss(model, x0, cond, t=t, noise=noise)
        return self.loss(diffusion, model, x0, cond, t=t, noise=noise)



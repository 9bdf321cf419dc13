"""Validation loss: a component of the training loop (stages/training/trainer.py ``Trainer``), like the
checkpointer or the sample grid, deciding its own cadence.

Every ``eval_every`` steps and at the last step: the diffusion loss of the live weights on one
fixed batch of held-out samples (data_prep/holdout.py: training never reads them), at
``VAL_TIMESTEPS`` evenly spaced t with a fixed noise seed and no CFG dropout (and, for SR, no
conditioning augmentation). Everything it depends on is fixed at build time, so the figure is
deterministic and comparable across steps, restarts, world sizes and runs with the same data
(MLPerf's Flux benchmark validates the same way). The batch is the same on every rank and every
rank computes it: under ZeRO-3 a forward needs all ranks, and no reduction is needed.
"""
from __future__ import annotations

from typing import Any

import torch

from stages.training.loader import LoaderSpec, ShardStream

Trainer = Any  # stages.training.trainer.Trainer (not imported: it imports this module)

VAL_TIMESTEPS = 8


def val_timesteps(n: int = VAL_TIMESTEPS) -> list[float]:
    """n evenly spaced t in (0, 1): bin centres, so neither end (t=0: no noise, t=1: no signal) is used."""
    return [(i + 0.5) / n for i in range(n)]


class Validator:
    def __init__(self, every: int, last: int, x0: torch.Tensor, cond: dict, seed: int, spec=None):
        self.every, self.last, self.x0, self.cond, self.seed = every, last, x0, cond, seed
        self.spec = spec  # its StageSpec.training_loss: the stage's own objective (None: the diffusion loss)

    @classmethod
    def build(cls, t: Trainer) -> "Validator | None":
        """None when the embedding has no held-out split (made before splits existed, or fraction 0)."""
        return cls.for_data(t.spec, t.cfg, t.flavor, t.shards, t.job.holdout, t.device, t.dtype)

    @classmethod
    def for_data(cls, spec, cfg, flavor, shards, rule, device: torch.device, dtype: torch.dtype) -> "Validator | None":
        """The fixed batch of a stage (``spec``: its StageSpec) over ``shards`` (stages.training.loader.pair_shards);
        also what ``t2i eval --checkpoints`` validates a checkpoint's EMA weights on."""
        if not rule.enabled:
            return None
        n = min(cfg.val_samples, rule.count) if rule.count else cfg.val_samples
        lspec = LoaderSpec(flavor.image_size if spec.needs_images else None, n, cfg.seed, 0, 1, rule)
        batch = next(iter(ShardStream(shards, lspec, split="holdout")))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # SR's low-res path draws random numbers even without condaug
            x0, cond = spec.build_batch(batch, spec.clean_config(cfg), flavor, device, dtype)
        return cls(cfg.eval_every, cfg.steps, x0, cond, cfg.seed, spec)

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.last

    @torch.no_grad()
    def loss(self, model, diffusion) -> float:
        """Mean diffusion loss over the fixed timesteps (each with its own fixed noise)."""
        total = 0.0
        # A refiner trained on t <= train_t_max is validated on the same range (scaled bin centres).
        ts = [tv * getattr(diffusion, "train_t_max", 1.0) for tv in val_timesteps()]
        for i, tv in enumerate(ts):
            g = torch.Generator(device=self.x0.device).manual_seed(self.seed * 1_000_003 + 7919 * (i + 1))
            noise = torch.randn(self.x0.shape, generator=g, device=self.x0.device, dtype=self.x0.dtype)
            t = torch.full((self.x0.shape[0],), tv, device=self.x0.device)
            loss, _ = (diffusion.training_loss(model, self.x0, self.cond, t=t, noise=noise) if self.spec is None
                       else self.spec.training_loss(diffusion, model, self.x0, self.cond, t=t, noise=noise))
            total += float(loss)
        return total / len(ts)

    def run(self, t: Trainer) -> dict[str, float]:
        """Every rank computes it (ZeRO-3); the loop logs it on rank 0."""
        t.engine.eval()
        try:
            return {"val_loss": self.loss(t.engine, t.diffusion)}
        finally:
            t.engine.train()

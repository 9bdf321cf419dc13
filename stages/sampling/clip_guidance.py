"""CLIP guidance with a noised CLIP (GLIDE §2.4; Dhariwal & Nichol 2021's classifier guidance with
CLIP as the classifier): ``sample.guidance: clip``.

GLIDE shifts the reverse-step mean by ``s * Sigma * grad_x (f(x_t, t) . g(c))``, with f the noised
CLIP's image embedding and g the caption's CLIP text embedding. The pipeline's samplers (DDIM,
DPM-Solver++) work from the network's clean-image estimate, so the same guidance is applied to the
score, as Dhariwal & Nichol do for DDIM: with ``score = -eps / sigma``,

    eps' = eps - s * sigma * grad,       i.e.  x0' = x0 + s * sigma^2 / alpha * grad

(Tweedie: ``x0 = (x_t + sigma^2 * score) / alpha``), where ``grad = grad_{x_t} tau * cos(f(x_t, t), g(c))``:
GLIDE's dot product of the unit embeddings times the noised CLIP's learned logit scale tau, i.e.
the CLIP logit, log p(caption | x_t) up to the softmax's normalizer (classifier guidance ascends
log p). With tau the scale is in log-probability units, not tied to how sharp a given CLIP's
cosines are.
At each step the guided network's output is rewritten to the prediction (eps, x0 or v) that
carries ``eps'``, so ``stages/diffusion.py``'s samplers, thresholding and CFG stay untouched: a
guided model is just another network ``model(x_t, t, **cond)`` (:class:`ClipGuided`).

The noised CLIP is told the guided model's t: both must use the same noise schedule (checked when
sampling loads them, :func:`check_compatible`). With CFG on as well (guidance_scale != 1), the
sampler calls the network on [cond; uncond] rows of the same x_t; the same shift on both halves
is the shift of the guided combination (it is linear), so it is computed once.

Thresholding (sample.thresholding) acts on the guided x0 estimate: at high noise, where
``sigma^2 / alpha`` is large, dynamic thresholding rescales most of the shift away, so the guidance
acts mostly at mid and low noise.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from stages.diffusion import _bc

if TYPE_CHECKING:
    from stages.training.final_weights import FinalConfig


def clip_grad(clip: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """grad_{x_t} of the CLIP logit of each noisy image with its caption embedding ([B, 3, H, W], fp32)."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        sim = clip.scale().detach() * clip.similarity(x, t.float().expand(x.shape[0]), text.to(x.device))
        (grad,) = torch.autograd.grad(sim.sum(), x)
    return grad


class ClipGuided:
    """``net`` with CLIP guidance of ``scale`` toward ``text`` (clip_text [B, D] of the prompts)."""

    def __init__(self, net, diffusion, clip: torch.nn.Module, text: torch.Tensor, scale: float):
        if scale < 0:
            raise ValueError(f"clip_guidance_scale must be >= 0, got {scale}")
        self.net, self.diffusion, self.clip, self.text, self.scale = net, diffusion, clip, text, float(scale)

    def __call__(self, x_t, t, **cond):
        return self.forward(x_t, t, **cond)

    def forward(self, x_t, t, **cond):
        out = self.net(x_t, t, **cond)
        if self.scale == 0:
            return out
        n = self.text.shape[0]
        if x_t.shape[0] not in (n, 2 * n):
            raise ValueError(f"ClipGuided: {x_t.shape[0]} rows for {n} prompts")
        grad = clip_grad(self.clip, x_t[:n], t[:n], self.text)
        if x_t.shape[0] == 2 * n:  # CFG's [cond; uncond] rows: the same x_t, the same shift
            grad = torch.cat([grad, grad])
        alpha, sigma = self.diffusion.schedule.alpha_sigma(t)
        a, s = _bc(alpha, x_t).float(), _bc(sigma, x_t).float()
        k = self.scale * grad
        pred = self.diffusion.prediction
        # The network output that carries eps' = eps - k * sigma (x0 and v follow from eps and x_t).
        if pred == "eps":
            delta = -k * s
        elif pred == "x0":
            delta = k * s * s / a
        else:  # v = (eps - sigma * x_t) / alpha
            delta = -k * s / a
        return (out.float() + delta).to(out.dtype)


def check_compatible(guided_role: str, guided: FinalConfig, clip: FinalConfig) -> str | None:
    """Why ``clip`` (a noised CLIP's final/config.json) cannot guide ``guided`` (a model's), or None."""
    if clip.image_size != guided.image_size:
        return (f"train_noised_clip ({clip.flavor}) sees {clip.image_size}px images but "
                f"{guided_role} ({guided.flavor}) makes {guided.image_size}px; train the noised "
                "CLIP with a flavor of the guided model's size")
    keys = ("schedule", "logsnr_min", "logsnr_max")
    a = {k: guided.diffusion.get(k) for k in keys}
    b = {k: clip.diffusion.get(k) for k in keys}
    if a != b:
        return (f"train_noised_clip was trained on noise schedule {b} but {guided_role} samples with {a}: "
                "the noised CLIP's t would mean another noise level; give both the same diffusion.schedule")
    return None

"""The Gaussian diffusion process, shared by every model of the cascade (the network is an argument).

Everything is written in continuous time t in [0, 1] via the log signal-to-noise ratio
lambda(t) = log(alpha_t^2 / sigma_t^2) of a variance-preserving process
    x_t = alpha_t * x0 + sigma_t * eps,  alpha_t^2 = sigmoid(lambda),  sigma_t^2 = sigmoid(-lambda)
(Kingma et al. 2021, "Variational Diffusion Models"; Imagen uses this form). Discrete schedules are
their continuous limits, and the network always receives t itself (float [B] in [0, 1]).

Works for any tensor shape [B, ...]: images [B, 3, H, W] and CLIP-embedding vectors [B, D] for the
unCLIP prior (which predicts x0 and must run with thresholding="none": embeddings are not in
[-1, 1]).

Pure PyTorch by design (docs/design.md, invariant 1): no distributed or storage imports here.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from .process_args import PREDICTIONS, SCHEDULES, THRESHOLDING, check_diffusion, check_schedule  # noqa: F401
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


# ----------------------------------------------------------------------------- schedules
class Schedule:
    """lambda(t) for t in [0, 1], clamped to [logsnr_min, logsnr_max] so t=0 and t=1 are finite.

    linear         DDPM's linear betas (1e-4 .. 0.02 over T=1000), continuous limit:
                   log abar(t) = -(0.1 t + 9.95 t^2)
    cosine         Nichol & Dhariwal's cosine abar(t) = cos^2((t+s)/(1+s) * pi/2) / f(0), s=0.008
    logsnr_cosine  Imagen's continuous-time schedule: lambda(t) = -2 log tan(a t + b), spanning
                   exactly [logsnr_min, logsnr_max]
    """

    def __init__(self, name: str = "cosine", logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        check_schedule(name, logsnr_min, logsnr_max)
        self.name, self.logsnr_min, self.logsnr_max = name, logsnr_min, logsnr_max

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 1 and t.numel() > 1 and t.stride(0) == 0:
            # A sampler's `t.expand(B)` holds one value: evaluate it once and return shape [1],
            # which broadcasts like [B] everywhere here (per-element math on B copies of a
            # scalar is measurable per step on CPU).
            return self.logsnr(t[:1])
        t = t.double()          # [B] scalars only: fp64 costs nothing and keeps t~0 exact
        if self.name == "linear":
            out = -torch.log(torch.expm1(0.1 * t + 9.95 * t ** 2))
        elif self.name == "cosine":
            s = 0.008
            abar = (torch.cos((t + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)) ** 2
            out = torch.log(abar) - torch.log1p(-abar.clamp(max=1.0))
        else:
            b = math.atan(math.exp(-0.5 * self.logsnr_max))
            a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
            out = -2.0 * torch.log(torch.tan(a * t + b))
        return out.nan_to_num(posinf=self.logsnr_max, neginf=self.logsnr_min).clamp(
            self.logsnr_min, self.logsnr_max)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.logsnr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


# ----------------------------------------------------------------------------- conversions
Generators = "torch.Generator | list[torch.Generator] | None"


def randn(shape, generator: Generators = None, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise of ``shape`` = [B, ...]. ``generator`` may be a list with one generator per
    row (diffusers' convention): each row is then drawn from its own generator alone, so an image
    never depends on which others share its batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), device=device, dtype=dtype, generator=g)
                            for g in generator])
    return torch.randn(tuple(shape), device=device, dtype=dtype, generator=generator)


def _bc(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] coefficient -> broadcastable against [B, ...] in like's dtype."""
    return c.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def target_of(prediction: str, x0, eps, alpha, sigma):
    """What the network is trained to output. v = alpha * eps - sigma * x0 (Salimans & Ho 2022)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return _bc(alpha, x0) * eps - _bc(sigma, x0) * x0


def to_x0_eps(prediction: str, out, x_t, alpha, sigma):
    """Network output -> (x0, eps), exactly (alpha^2 + sigma^2 = 1)."""
    a, s = _bc(alpha, x_t), _bc(sigma, x_t)
    if prediction == "eps":
        return (x_t - s * out) / a, out
    if prediction == "x0":
        return out, (x_t - a * out) / s
    return a * x_t - s * out, s * x_t + a * out


def threshold(x0: torch.Tensor, mode: str, percentile: float = 0.995) -> torch.Tensor:
    """static: clip to [-1, 1]. dynamic (Imagen): s = p-th percentile of |x0| per sample,
    s = max(s, 1); clip to [-s, s] and divide by s, so saturated pixels are pushed inwards
    instead of piling up at +-1 under large guidance weights."""
    if mode == "none":
        return x0
    if mode == "static":
        return x0.clamp(-1.0, 1.0)
    flat = x0.detach().float().abs().reshape(x0.shape[0], -1)
    # kthvalue, not torch.quantile: quantile refuses inputs above 16M elements (1024px batches).
    k = max(1, min(flat.shape[1], math.ceil(percentile * flat.shape[1])))
    s = flat.kthvalue(k, dim=1).values.clamp(min=1.0)
    s = _bc(s, x0)
    return torch.maximum(torch.minimum(x0, s), -s) / s


# ----------------------------------------------------------------------------- the process
class Diffusion:
    """q_sample, training loss and samplers for a network called as `model(x, t, **cond)`.

    Args:
      schedule: 'linear' | 'cosine' | 'logsnr_cosine'.
      prediction: what the network outputs: 'eps' | 'x0' | 'v'.
      min_snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is their default);
        None: plain MSE on the prediction target.
      thresholding: default x0 treatment at sampling: 'dynamic' (Imagen), 'static' (clip to
        [-1, 1]) or 'none' (required for the prior: CLIP embeddings are not in [-1, 1]).
      dynamic_percentile: p of dynamic thresholding (Imagen: 0.995 at 64px).
      cond_drop_prob: classifier-free-guidance dropout in training, e.g.
        {"drop_text": 0.1, "drop_image": 0.1}: training_loss adds a bool [B] mask per key (unless
        the batch already carries one); the network swaps in its learned null embedding there.
      null_keys: the drop flags set to True for the unconditional branch when sampling with
        guidance; keys the network's forward does not take are skipped (the prior has no
        drop_image).
    """

    def __init__(self, schedule: str = "cosine", prediction: str = "eps", *,
                 min_snr_gamma: float | None = None, thresholding: str = "dynamic",
                 dynamic_percentile: float = 0.995, cond_drop_prob: dict | None = None,
                 null_keys: tuple[str, ...] = ("drop_text", "drop_image"),
                 logsnr_min: float = -20.0, logsnr_max: float = 20.0, train_t_max: float = 1.0,
                 min_snr_floor: float = 0.0):
        check_diffusion(schedule, prediction, min_snr_gamma=min_snr_gamma, thresholding=thresholding,
                        dynamic_percentile=dynamic_percentile, cond_drop_prob=cond_drop_prob,
                        logsnr_min=logsnr_min, logsnr_max=logsnr_max, train_t_max=train_t_max,
                        min_snr_floor=min_snr_floor)
        self.schedule = Schedule(schedule, logsnr_min, logsnr_max)
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        # Min-SNR weights the x0 error by min(snr, gamma), i.e. ~snr at high noise: the steps where
        # only the text can say where things go (x_t shows nothing yet) get almost no gradient, so
        # a briefly trained model learns colour and shape (decided at mid noise) but not layout.
        # A floor keeps those steps at weight >= floor (1 = the x0 loss itself).
        self.min_snr_floor = float(min_snr_floor)
        self.thresholding = thresholding
        self.dynamic_percentile = dynamic_percentile
        self.cond_drop_prob = dict(cond_drop_prob or {})
        self.null_keys = tuple(null_keys)
        # Training draws t ~ U[0, train_t_max]: < 1 makes a refiner that only ever starts from a
        # lightly noised input (SDXL's refiner: the lowest 20% of noise levels), and it then spends
        # its whole training budget on the levels it is sampled at (sample.sr_start_t <= this).
        self.train_t_max = float(train_t_max)

    # -- forward process ------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """Sample x_t ~ q(x_t | x0) = N(alpha_t x0, sigma_t^2 I)."""
        noise = torch.randn_like(x0) if noise is None else noise
        alpha, sigma = self.schedule.alpha_sigma(t)
        return _bc(alpha, x0) * x0 + _bc(sigma, x0) * noise

    # -- training -------------------------------------------------------------
    def training_loss(self, model: Callable, x0: torch.Tensor, cond: dict | None = None, *,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None):
        """MSE between the network output and its target at t ~ U[0, 1].

        Returns (loss: scalar tensor with grad, stats: dict of detached scalar tensors), so the
        training loop decides when to pay for `.item()`.
        """
        b, dev = x0.shape[0], x0.device
        cond = dict(cond or {})
        if t is None:
            t = torch.rand(b, device=dev, generator=generator) * self.train_t_max
        if noise is None:
            noise = torch.randn(x0.shape, device=dev, dtype=x0.dtype, generator=generator)
        for key, p in self.cond_drop_prob.items():
            if key not in cond and p > 0:
                cond[key] = torch.rand(b, device=dev, generator=generator) < p
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_t = _bc(alpha, x0) * x0 + _bc(sigma, x0) * noise
        out = model(x_t, t.float(), **cond)     # t stays fp32 even for bf16 data
        target = target_of(self.prediction, x0, noise, alpha, sigma)
        mse = (out.float() - target.float()).pow(2).reshape(b, -1).mean(dim=1)    # [B]
        weight = self.loss_weight(t)
        loss = (mse * weight).mean()
        with torch.no_grad():
            # Per-half-of-t MSE without a host sync (NaN when a half got no sample this batch).
            lo = (t < 0.5).float()
            stats = {"loss": loss.detach(), "mse": mse.mean(),
                     "mse_t_lo": _masked_mean(mse, lo), "mse_t_hi": _masked_mean(mse, 1 - lo)}
        return loss, stats

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight expressed for the chosen target (eps / x0 / v losses differ from
        the x0 loss by factors snr / 1 / snr+1). Ones when disabled."""
        if self.min_snr_gamma is None:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.schedule.logsnr(t).exp()
        w = snr.clamp(max=self.min_snr_gamma).clamp(min=self.min_snr_floor)
        if self.prediction == "eps":
            w = w / snr
        elif self.prediction == "v":
            w = w / (snr + 1)
        return w.float()

    # -- one denoising evaluation, with guidance and thresholding -------------
    def predict(self, model, x_t, t, cond, *, guidance_scale=1.0, uncond=None, thresholding=None):
        """-> (x0, eps) at time t (t float [B]). With guidance_scale w != 1 the output is
        uncond + w * (cond - uncond) (w = 1: plain conditional), both branches in one batch."""
        b = x_t.shape[0]
        if guidance_scale == 1.0:
            out = model(x_t, t, **cond)
        else:
            cond = dict(cond)
            null_keys = self._null_keys_for(model)
            if uncond is None:
                uncond = dict(cond)
                for k in null_keys:
                    uncond[k] = torch.ones(b, dtype=torch.bool, device=x_t.device)
            for k in null_keys:           # conditional branch: explicit "keep" flags
                cond.setdefault(k, torch.zeros(b, dtype=torch.bool, device=x_t.device))
            both = _cat_cond(cond, uncond, b)
            out_c, out_u = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        alpha, sigma = self.schedule.alpha_sigma(t)
        x0, eps = to_x0_eps(self.prediction, out.to(x_t.dtype), x_t, alpha, sigma)
        mode = self.thresholding if thresholding is None else thresholding
        if mode not in THRESHOLDING:
            raise ValueError(f"unknown thresholding {mode!r}; allowed: {', '.join(THRESHOLDING)}")
        if mode != "none":
            x0 = threshold(x0, mode, self.dynamic_percentile)
            eps = (x_t - _bc(alpha, x_t) * x0) / _bc(sigma, x_t)   # keep eps consistent with x0
        return x0, eps

    def _null_keys_for(self, model) -> tuple[str, ...]:
        """null_keys the network accepts (the prior has no drop_image); all of them when its
        signature takes **kwargs or cannot be read."""
        try:
            params = inspect.signature(getattr(model, "forward", model)).parameters.values()
        except (TypeError, ValueError):
            return self.null_keys
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return self.null_keys
        names = {p.name for p in params}
        return tuple(k for k in self.null_keys if k in names)

    # -- samplers -------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model, shape, cond: dict | None = None, *, sampler: str = "dpmpp_2m",
               steps: int = 50, guidance_scale: float = 1.0, thresholding: str | None = None,
               eta: float = 0.0, uncond: dict | None = None, noise: torch.Tensor | None = None,
               generator: Generators = None, device=None,
               dtype: torch.dtype = torch.float32, progress: Callable[[int, int], None] | None = None,
               t_start: float = 1.0, x_start: torch.Tensor | None = None):
        """Draw samples of `shape` = [B, ...] from t=t_start (1: pure noise) to t=0.

        With ``x_start`` the chain starts from ``q_sample(x_start, t_start)`` instead (SDEdit,
        Meng et al. 2022): a super-resolution model then refines the upsampled low-res image
        rather than inventing it from noise, which keeps colours and layout when the upsampler
        is small or briefly trained.

        sampler: 'ddpm' (ancestral), 'ddim' (eta=0 deterministic, eta=1 equals ddpm) or
        'dpmpp_2m' (DPM-Solver++(2M), Lu et al. 2022: ~20 steps match ~250 DDPM steps).
        Time steps are uniform in t. cond: keyword arguments of the network. ``generator``: one, or
        one per row of the batch (:func:`randn`).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        cond = dict(cond or {})
        if device is None:   # noise's, else the conditioning's, else the network's device
            params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
            tensors = [noise] + [v for v in cond.values() if isinstance(v, torch.Tensor)] + [next(params, None)]
            device = next((v.device for v in tensors if v is not None), torch.device("cpu"))
        if not 0.0 < t_start <= 1.0:
            raise ValueError(f"t_start must be in (0, 1], got {t_start}")
        x = (randn(shape, generator, device=device, dtype=dtype)
             if noise is None else noise.to(device=device, dtype=dtype))
        b = x.shape[0]
        if x_start is not None:
            x = self.q_sample(x_start.to(device=device, dtype=dtype),
                              torch.full((b,), t_start, device=device), noise=x)
        ts = torch.linspace(t_start, 0.0, steps + 1, device=device, dtype=torch.float64)
        kw = dict(guidance_scale=guidance_scale, uncond=uncond, thresholding=thresholding)
        x0_prev, h_prev = None, None
        for i in range(steps):
            t, s = ts[i].expand(b), ts[i + 1].expand(b)
            x0, eps = self.predict(model, x, ts[i].float().expand(b), cond, **kw)
            a_s, s_s = self.schedule.alpha_sigma(s)
            if i == steps - 1:
                # The last step lands on t=0 (sigma ~ 0): every sampler's update reduces to the
                # clean estimate there, so return it exactly (keeps thresholding's bounds).
                x = x0
            elif sampler == "ddpm" or sampler == "ddim":
                a_t, s_t = self.schedule.alpha_sigma(t)
                # std of q(x_s | x_t, x0), times eta (DDIM eq. 16); ddpm is eta = 1.
                var = (s_s ** 2 / s_t ** 2) * (1 - a_t ** 2 / a_s ** 2)
                std = (1.0 if sampler == "ddpm" else eta) * var.clamp(min=0).sqrt()
                dir_coef = (s_s ** 2 - std ** 2).clamp(min=0).sqrt()
                z = randn(x.shape, generator, device=device, dtype=dtype)
                x = _bc(a_s, x) * x0 + _bc(dir_coef, x) * eps + _bc(std, x) * z
            else:
                # DPM-Solver++(2M) in the half-log-SNR variable lambda/2 (data prediction).
                a_t, s_t = self.schedule.alpha_sigma(t)
                h = 0.5 * (self.schedule.logsnr(s) - self.schedule.logsnr(t))
                d = x0
                # Second order once a previous x0 exists. (The last step, handled above, is first
                # order: at t=0 lambda jumps to logsnr_max/2, so h is huge, r = h_prev/h tiny and
                # the 1/(2r) extrapolation would blow up; diffusers' lower_order_final.)
                if x0_prev is not None:
                    r = h_prev / h
                    d = _bc(1 + 1 / (2 * r), x) * x0 - _bc(1 / (2 * r), x) * x0_prev
                x = _bc(s_s / s_t, x) * x - _bc(a_s * torch.expm1(-h), x) * d
                x0_prev, h_prev = x0, h
            if progress is not None:
                progress(i + 1, steps)
        return x


def _masked_mean(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = w.sum()
    return torch.where(n > 0, (v * w).sum() / n.clamp(min=1), torch.full_like(n, float("nan")))


def _cat_cond(cond: dict, uncond: dict, b: int) -> dict:
    """Stack conditional and unconditional keyword arguments along the batch dimension."""
    out = {}
    for k in set(cond) | set(uncond):
        c, u = cond.get(k), uncond.get(k)
        if isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
            if c is None or u is None:
                raise ValueError(f"guidance: {k!r} is given for only one of cond/uncond")
            if c.shape[:1] != (b,) or u.shape[:1] != (b,):
                raise ValueError(f"guidance: cond[{k!r}] must have batch size {b}")
            if c.shape[1:] != u.shape[1:]:   # e.g. different token lengths: pad the shorter
                raise ValueError(f"guidance: cond[{k!r}] {tuple(c.shape)} and uncond "
                                 f"{tuple(u.shape)} differ in shape")
            out[k] = torch.cat([c, u.to(c.dtype)])
        elif c is u or c == u:
            out[k] = c
        else:
            raise ValueError(f"guidance: non-tensor argument {k!r} differs between cond and uncond")
    return out

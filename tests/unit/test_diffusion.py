"""The diffusion process: schedules, q_sample, parametrisations, loss, samplers, guidance.

Samplers are checked against networks whose answer is known in closed form:
  * the "true-noise oracle" knows the single clean x0 and returns the exact prediction, so every
    sampler must land on x0;
  * the Gaussian oracle is the exact posterior mean E[x0 | x_t] for data x0 ~ N(mu, s^2), so the
    samples must have mean mu and std s (this checks the noise/variance bookkeeping of each
    sampler, which the first oracle cannot see).
"""
import math

import pytest
import torch

from stages.diffusion import (Diffusion, Schedule, SCHEDULES, PREDICTIONS, target_of, threshold,
                              to_x0_eps)


pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _bc(c, like):
    return c.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class PointOracle:
    """Network that knows the one clean sample x0 and answers in the diffusion's parametrisation."""

    def __init__(self, diff, x0):
        self.diff, self.x0, self.calls = diff, x0, 0

    def __call__(self, x, t, **cond):
        self.calls += 1
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], *[1] * (x.ndim - 1))
        a, s = self.diff.schedule.alpha_sigma(t)
        eps = (x - _bc(a, x) * x0) / _bc(s, x)
        return target_of(self.diff.prediction, x0, eps, a, s)


class GaussianOracle:
    """Exact denoiser for x0 ~ N(mu, std^2 I): E[x0|x_t] = mu + a std^2 (x_t - a mu) / (a^2 std^2 + s^2)."""

    def __init__(self, diff, mu, std):
        self.diff, self.mu, self.std = diff, mu, std

    def __call__(self, x, t, **cond):
        a, s = (_bc(c, x) for c in self.diff.schedule.alpha_sigma(t))
        x0 = self.mu + a * self.std ** 2 * (x - a * self.mu) / (a ** 2 * self.std ** 2 + s ** 2)
        eps = (x - a * x0) / s
        return target_of(self.diff.prediction, x0, eps, *self.diff.schedule.alpha_sigma(t))


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_monotone_and_bounded(name):
    sch = Schedule(name)
    t = torch.linspace(0, 1, 1001)
    lam = sch.logsnr(t)
    assert torch.isfinite(lam).all()
    assert (lam[1:] <= lam[:-1]).all(), "log-SNR must decrease with t"
    assert lam.max() <= 20 and lam.min() >= -20
    a, s = sch.alpha_sigma(t)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a, dtype=a.dtype))
    assert a[0] > 0.999 and a[-1] < 0.01        # starts clean, ends (almost) pure noise


def test_linear_schedule_is_the_ddpm_limit():
    # DDPM: betas linspace(1e-4, 0.02, 1000), abar_i = prod(1 - beta_j); continuous t = i / T.
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    idx = torch.tensor([50, 200, 500, 800])
    a, _ = Schedule("linear").alpha_sigma((idx + 1).double() / 1000)
    torch.testing.assert_close(a ** 2, abar[idx], rtol=0.02, atol=1e-4)


def test_logsnr_cosine_spans_its_range():
    sch = Schedule("logsnr_cosine", -15.0, 12.0)
    lam = sch.logsnr(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(lam, torch.tensor([12.0, -15.0], dtype=torch.float64))


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_marginals_match_schedule(name):
    diff = Diffusion(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.8, -0.3, 0.0]).repeat(20000, 1)            # [N, 3]
    for tv in (0.1, 0.5, 0.9):
        t = torch.full((x0.shape[0],), tv)
        xt = diff.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        a, s = diff.schedule.alpha_sigma(torch.tensor([tv]))
        torch.testing.assert_close(xt.mean(0), (a.float() * x0[0]), atol=0.02, rtol=0)
        torch.testing.assert_close(xt.var(0), (s.float() ** 2).expand(3), atol=0.02, rtol=0.03)


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_conversions_round_trip(pred):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.01, 0.3, 0.5, 0.9, 1.0])
    a, s = Schedule("cosine").alpha_sigma(t)
    x_t = _bc(a, x0) * x0 + _bc(s, x0) * eps
    out = target_of(pred, x0, eps, a, s)
    rx0, reps = to_x0_eps(pred, out, x_t, a, s)
    # x0 from eps at t~1 (alpha ~ 4.5e-5) and eps from x0 at t~0 (sigma ~ 4.5e-5) are
    # ill-conditioned by nature; check them only where the parametrisation is well posed.
    ok = (a > 1e-3) if pred == "eps" else (s > 1e-3) if pred == "x0" else torch.ones_like(a, dtype=torch.bool)
    torch.testing.assert_close(rx0[ok], x0[ok], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reps[ok], eps[ok], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 40, 0.0), ("ddim", 8, 0.0),
                                               ("ddim", 8, 0.5), ("dpmpp_2m", 8, 0.0)])
def test_samplers_recover_x0_with_true_noise_oracle(pred, sampler, steps, eta):
    diff = Diffusion("cosine", pred, thresholding="none")
    g = torch.Generator().manual_seed(2)
    for shape in ((3, 3, 8, 8), (5, 16)):                  # images and prior vectors
        x0 = torch.rand(shape, generator=g) * 2 - 1
        oracle = PointOracle(diff, x0)
        out = diff.sample(oracle, shape, {}, sampler=sampler, steps=steps, eta=eta, generator=g)
        torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)
        assert oracle.calls == steps


@pytest.mark.parametrize("sampler,steps,schedule", [("ddpm", 250, "cosine"), ("ddim", 100, "cosine"),
                                                    ("dpmpp_2m", 25, "cosine"),
                                                    ("dpmpp_2m", 25, "logsnr_cosine")])
def test_samplers_match_gaussian_data_distribution(sampler, steps, schedule):
    diff = Diffusion(schedule, "v", thresholding="none")
    mu, std = torch.tensor([0.5, -0.2]), torch.tensor([0.5, 0.25])
    g = torch.Generator().manual_seed(3)
    out = diff.sample(GaussianOracle(diff, mu, std), (8000, 2), {}, sampler=sampler, steps=steps,
                      generator=g)
    torch.testing.assert_close(out.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(out.std(0), std, atol=0.0, rtol=0.05)


def test_dpm_solver_is_second_order_and_ddim_first_order():
    """Same initial noise, error against a 250-step solution of the probability-flow ODE:
    doubling the steps must cut DPM-Solver++(2M)'s error ~4x and DDIM's only ~2x."""
    diff = Diffusion("cosine", "eps", thresholding="none")
    oracle = GaussianOracle(diff, torch.tensor([0.5, -0.2]), torch.tensor([0.5, 0.25]))
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    ref = diff.sample(oracle, noise.shape, {}, sampler="dpmpp_2m", steps=250, noise=noise)
    err = {(s, n): (diff.sample(oracle, noise.shape, {}, sampler=s, steps=n, noise=noise) - ref).abs().mean().item()
           for s in ("ddim", "dpmpp_2m") for n in (20, 40)}
    assert err["dpmpp_2m", 20] < 0.3 * err["ddim", 20]
    assert err["dpmpp_2m", 40] < err["dpmpp_2m", 20] / 3
    assert err["ddim", 40] > err["ddim", 20] / 3


def test_sampling_draws_fresh_noise_per_call():
    diff = Diffusion("cosine", "v", thresholding="none")
    oracle = GaussianOracle(diff, torch.zeros(4), torch.ones(4) * 0.5)
    a = diff.sample(oracle, (2, 4), {}, sampler="ddpm", steps=10)
    b = diff.sample(oracle, (2, 4), {}, sampler="ddpm", steps=10)
    assert not torch.allclose(a, b)


class CondNet:
    """Output depends on the conditioning and on the null flag, so guidance is observable."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, *, y, drop_text=None, drop_image=None):
        self.calls.append(x.shape[0])
        drop = torch.zeros(x.shape[0], dtype=torch.bool) if drop_text is None else drop_text
        c = torch.where(drop[:, None, None, None], torch.full_like(y, -0.25), y)
        return 0.5 * x + c


def test_guidance_scale_one_is_the_conditional_prediction():
    diff = Diffusion("cosine", "eps", thresholding="none")
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.7])
    y = torch.randn(2, 3, 4, 4)
    net = CondNet()
    x0, eps = diff.predict(net, x, t, {"y": y}, guidance_scale=1.0)
    torch.testing.assert_close(eps, 0.5 * x + y)
    assert net.calls == [2]                               # no wasted unconditional pass
    x0g, epsg = diff.predict(net, x, t, {"y": y}, guidance_scale=3.0)
    cond, uncond = 0.5 * x + y, 0.5 * x - 0.25
    torch.testing.assert_close(epsg, uncond + 3.0 * (cond - uncond))
    assert net.calls == [2, 4]                            # both branches in one batch


def test_guidance_only_passes_null_flags_the_network_takes():
    seen = []

    def prior_like(x, t, *, y, drop_text=None):          # no drop_image, like PriorTransformer
        seen.append(drop_text)
        return torch.where(drop_text[:, None], torch.zeros_like(x), y)

    diff = Diffusion("cosine", "x0", thresholding="none")   # default null_keys include drop_image
    y = torch.ones(3, 4)
    x0, _ = diff.predict(prior_like, torch.randn(3, 4), torch.full((3,), 0.5), {"y": y},
                         guidance_scale=2.0)
    torch.testing.assert_close(x0, 2.0 * y)               # 0 + 2 * (y - 0)
    assert seen[0].tolist() == [False] * 3 + [True] * 3


def test_dynamic_thresholding_bounds():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 16, 16, generator=g) * 3
    x[0] = x[0].clamp(-0.9, 0.9)                          # already in range: untouched (s = 1)
    y = threshold(x, "dynamic", 0.995)
    assert y.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(y[0], x[0])
    flat = x[1:].abs().reshape(3, -1)
    s = flat.kthvalue(math.ceil(0.995 * flat.shape[1]), dim=1).values
    # inside [-s, s] the map is a pure rescale by 1/s
    inside = x[1].abs() < s[0]
    torch.testing.assert_close(y[1][inside], x[1][inside] / s[0])
    assert threshold(x, "static").abs().max() <= 1.0
    torch.testing.assert_close(threshold(x, "none"), x)


def test_thresholding_keeps_samples_in_range():
    diff = Diffusion("cosine", "x0", thresholding="dynamic")
    wild = lambda x, t, **c: 4 * torch.ones_like(x)       # predicts x0 far outside [-1, 1]
    out = diff.sample(wild, (2, 3, 8, 8), {}, sampler="ddim", steps=5)
    assert out.abs().max() <= 1.0 + 1e-5
    prior = Diffusion("cosine", "x0", thresholding="none")  # the prior's setting: untouched
    torch.testing.assert_close(prior.sample(wild, (2, 8), {}, sampler="ddim", steps=5),
                               torch.full((2, 8), 4.0))


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_training_loss_zero_for_oracle_and_min_snr_weights(pred):
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    t = torch.linspace(0.05, 0.95, 8)
    diff = Diffusion("cosine", pred)
    loss, stats = diff.training_loss(PointOracle(diff, x0), x0, {}, t=t, generator=g)
    assert loss.item() < 1e-8 and set(stats) >= {"loss", "mse"}
    zero = lambda x, t, **c: torch.zeros_like(x)
    noise = torch.randn(x0.shape, generator=g)
    plain, _ = diff.training_loss(zero, x0, {}, t=t, noise=noise)
    weighted = Diffusion("cosine", pred, min_snr_gamma=5.0)
    wl, _ = weighted.training_loss(zero, x0, {}, t=t, noise=noise)
    a, s = diff.schedule.alpha_sigma(t)
    per = target_of(pred, x0, noise, a, s).pow(2).reshape(8, -1).mean(1)
    snr = (a / s) ** 2
    w = {"eps": snr.clamp(max=5) / snr, "x0": snr.clamp(max=5), "v": snr.clamp(max=5) / (snr + 1)}[pred]
    torch.testing.assert_close(plain, per.mean().float())
    torch.testing.assert_close(wl, (per * w).mean().float())


def test_training_loss_applies_cfg_dropout():
    seen = {}

    def net(x, t, *, drop_text=None, drop_image=None):
        seen["text"], seen["image"] = drop_text, drop_image
        return x.sum() * 0 + torch.zeros_like(x)

    diff = Diffusion(cond_drop_prob={"drop_text": 0.5})
    diff.training_loss(net, torch.zeros(4000, 2), {}, generator=torch.Generator().manual_seed(6))
    assert seen["text"].dtype == torch.bool and abs(seen["text"].float().mean() - 0.5) < 0.05
    assert seen["image"] is None
    forced = torch.ones(3, dtype=torch.bool)
    diff.training_loss(net, torch.zeros(3, 2), {"drop_text": forced})
    assert seen["text"] is forced                         # the batch builder's mask wins


def test_bad_arguments_name_what_is_allowed():
    with pytest.raises(ValueError, match="linear, cosine, logsnr_cosine"):
        Diffusion("quadratic")
    with pytest.raises(ValueError, match="eps, x0, v"):
        Diffusion(prediction="score")
    with pytest.raises(ValueError, match="none, static, dynamic"):
        Diffusion(thresholding="soft")
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m"):
        Diffusion().sample(lambda x, t: x, (1, 2), {}, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        Diffusion().sample(lambda x, t: x, (1, 2), {}, steps=0)


def test_min_snr_floor_keeps_high_noise_steps_weighted():
    """Min-SNR alone weights the x0 error ~snr at high noise; the floor bounds it from below, so
    the steps where only the conditioning can say where things go still get a gradient."""
    t = torch.tensor([0.05, 0.5, 0.9, 0.99])
    for pred in ("x0", "v", "eps"):
        plain = Diffusion("cosine", pred, min_snr_gamma=5.0)
        floored = Diffusion("cosine", pred, min_snr_gamma=5.0, min_snr_floor=1.0)
        snr = plain.schedule.logsnr(t).exp()
        to_x0 = {"x0": torch.ones_like(snr), "v": snr + 1, "eps": snr}[pred]  # x0-weight = weight * factor
        x0_plain, x0_floored = plain.loss_weight(t) * to_x0, floored.loss_weight(t) * to_x0
        assert torch.allclose(x0_plain, snr.clamp(max=5.0), rtol=1e-5)
        assert torch.allclose(x0_floored, snr.clamp(max=5.0, min=1.0), rtol=1e-5)
        assert x0_floored[-1] == pytest.approx(1.0) and x0_plain[-1] < 0.01
    with pytest.raises(ValueError, match="min_snr_floor"):
        Diffusion("cosine", "v", min_snr_gamma=5.0, min_snr_floor=6.0)


def test_train_t_max_draws_only_low_noise_levels():
    seen = []

    def net(x, t, **_):
        seen.append(t.clone())
        return torch.zeros_like(x)

    d = Diffusion("cosine", "v", train_t_max=0.2)
    for _ in range(20):
        d.training_loss(net, torch.zeros(16, 3, 4, 4))
    t = torch.cat(seen)
    assert float(t.max()) <= 0.2 and float(t.min()) >= 0.0 and float(t.mean()) == pytest.approx(0.1, abs=0.02)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="train_t_max"):
            Diffusion("cosine", "v", train_t_max=bad)

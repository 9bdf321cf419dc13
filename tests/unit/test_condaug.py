"""Conditioning augmentation for the SR models and the low-res input helper."""
import pytest
import torch
import torch.nn.functional as F

from stages.condaug import CondAugConfig, ConditioningAugmentation, gaussian_blur, make_low_res
from stages.diffusion import Schedule


pytestmark = pytest.mark.usefixtures("single_thread_torch")


def test_level_zero_is_exactly_the_identity():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    aug = ConditioningAugmentation(CondAugConfig(sample_level=0.0))
    out, level = aug.sample(x)
    assert torch.equal(out, x)
    assert level.shape == (4,) and level.dtype == torch.float32 and (level == 0).all()
    mixed = aug.apply(x, torch.tensor([0.0, 0.3, 0.0, 0.6]))
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[2], x[2])
    assert not torch.allclose(mixed[1], x[1])


def test_noise_follows_the_forward_process_at_the_level():
    g = torch.Generator().manual_seed(0)
    x = torch.full((2000, 3, 4, 4), 0.5)
    aug = ConditioningAugmentation(CondAugConfig(schedule="cosine"))
    out, level = aug.sample(x, level=0.4, generator=g)
    a, s = Schedule("cosine").alpha_sigma(torch.tensor([0.4]))
    assert abs(out.mean().item() - 0.5 * a.item()) < 0.01
    assert abs(out.var().item() - s.item() ** 2) < 0.02 * s.item() ** 2 + 1e-3
    assert torch.allclose(level, torch.full((2000,), 0.4))


def test_training_levels_are_sampled_per_example_within_range():
    g = torch.Generator().manual_seed(1)
    aug = ConditioningAugmentation(CondAugConfig(max_train_level=0.3))
    x = torch.zeros(512, 3, 4, 4)
    out, level = aug.train(x, generator=g)
    assert level.shape == (512,) and level.min() >= 0 and level.max() <= 0.3
    assert level.std() > 0.05                                 # really sampled, not fixed
    # noisier examples have larger deviations from the (zero) clean input
    dev = out.reshape(512, -1).std(1)
    hi, lo = level > 0.2, level < 0.1
    assert dev[hi].mean() > dev[lo].mean() * 1.5


def test_blur_preserves_constants_and_smooths_noise():
    g = torch.Generator().manual_seed(2)
    const = torch.full((2, 3, 16, 16), 0.7)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.5, 1.0])), const)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    blurred = gaussian_blur(noise, torch.tensor([0.5, 2.0]))
    assert blurred[1].std() < blurred[0].std() < noise[0].std()
    # an impulse spreads into a normalised kernel
    imp = torch.zeros(1, 1, 9, 9)
    imp[0, 0, 4, 4] = 1.0
    k = gaussian_blur(imp, torch.tensor([1.0]))
    assert abs(k.sum().item() - 1.0) < 1e-5 and k[0, 0, 4, 4] == k.max()


def test_train_blur_applies_when_enabled():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(8, 3, 16, 16, generator=g) > 0.5).float() * 2 - 1     # high-frequency image
    aug = ConditioningAugmentation(CondAugConfig(max_train_level=0.0, blur_prob=1.0))
    out, level = aug.train(x, generator=g)
    assert (level == 0).all()                                   # no noise: only the blur acts
    assert out.abs().mean() < x.abs().mean() * 0.9


def test_make_low_res_shapes_and_antialiasing():
    x = torch.full((2, 3, 64, 64), -0.2)
    lr = make_low_res(x, 16)
    assert lr.shape == (2, 3, 16, 16)
    torch.testing.assert_close(lr, torch.full_like(lr, -0.2))
    assert make_low_res(x, 16, upsample=True).shape == x.shape
    # A 1-pixel checkerboard must average to grey with antialiasing (plain subsampling would alias
    # it into a solid colour).
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checker = (((yy + xx) % 2) * 2 - 1).float().expand(1, 3, 64, 64)
    assert make_low_res(checker, 16).abs().max() < 0.1
    assert F.interpolate(checker, size=(16, 16), mode="nearest").abs().min() == 1.0
    assert make_low_res(torch.rand(1, 3, 32, 32) * 4 - 2, 8).abs().max() <= 1.0


def test_bad_settings_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="max_train_level"):
        CondAugConfig(max_train_level=1.5)
    with pytest.raises(ValueError, match="blur_sigma"):
        CondAugConfig(blur_sigma=(0.6, 0.4))
    with pytest.raises(ValueError, match="noise schedule"):
        CondAugConfig(schedule="nope")
    with pytest.raises(ValueError, match="low_res_size"):
        make_low_res(torch.zeros(1, 3, 8, 8), 16)
    with pytest.raises(ValueError, match="aug level"):
        ConditioningAugmentation().sample(torch.zeros(1, 3, 4, 4), level=2.0)

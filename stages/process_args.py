"""What the diffusion process and conditioning augmentation accept, checked without torch.

The one home of these checks: ``stages.diffusion.Diffusion``/``Schedule`` and
``stages.condaug.CondAugConfig`` call them, and so does the run spec (stages/training/config.py)
when it validates a spec — which must stay fast (no torch import just to read a spec).
"""
from __future__ import annotations

SCHEDULES = ("linear", "cosine", "logsnr_cosine")
PREDICTIONS = ("eps", "x0", "v")
THRESHOLDING = ("none", "static", "dynamic")


def check_schedule(name: str, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min ({logsnr_min}) must be < logsnr_max ({logsnr_max})")


def check_diffusion(schedule: str = "cosine", prediction: str = "eps", *, min_snr_gamma: float | None = None,
                    thresholding: str = "dynamic", dynamic_percentile: float = 0.995,
                    cond_drop_prob: dict | None = None, logsnr_min: float = -20.0, logsnr_max: float = 20.0,
                    train_t_max: float = 1.0, min_snr_floor: float = 0.0, **_ignored) -> None:
    check_schedule(schedule, logsnr_min, logsnr_max)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
    if thresholding not in THRESHOLDING:
        raise ValueError(f"unknown thresholding {thresholding!r}; allowed: {', '.join(THRESHOLDING)}")
    if not 0.5 < dynamic_percentile <= 1.0:
        raise ValueError(f"dynamic_percentile must be in (0.5, 1], got {dynamic_percentile}")
    if not 0.0 < train_t_max <= 1.0:
        raise ValueError(f"train_t_max must be in (0, 1], got {train_t_max}")
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
    if not 0.0 <= min_snr_floor <= (min_snr_gamma if min_snr_gamma is not None else float("inf")):
        raise ValueError(f"min_snr_floor must be within [0, min_snr_gamma], got {min_snr_floor}")
    for k, p in (cond_drop_prob or {}).items():
        if not k.startswith("drop_") or not 0.0 <= p <= 1.0:
            raise ValueError(f"cond_drop_prob[{k!r}]={p}: keys are the network's drop_* "
                             f"arguments and probabilities must be in [0, 1]")


def check_condaug(schedule: str = "cosine", max_train_level: float = 0.5, sample_level: float = 0.1,
                  blur_prob: float = 0.0, blur_sigma: tuple[float, float] = (0.4, 0.6)) -> None:
    for name, v in (("max_train_level", max_train_level), ("sample_level", sample_level), ("blur_prob", blur_prob)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"CondAugConfig.{name} must be in [0, 1], got {v}")
    lo, hi = blur_sigma
    if not 0.0 < lo <= hi:
        raise ValueError(f"CondAugConfig.blur_sigma must be (lo, hi) with 0 < lo <= hi, got {blur_sigma}")
    check_schedule(schedule)

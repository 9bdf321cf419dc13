"""Aspect-ratio buckets, as data (issue 28): which aspects a cascade trains on, each stage's size
for an aspect, each sample's bucket, and which bucket each training step draws from.

Every function here is pure (numpy only, no torch, no store), because every rank, every stage and
every resumed run must compute the same answer from the same inputs:

* ``BucketsConfig`` is the spec's ``buckets`` section, shared by the whole cascade: a list of
  aspect ratios (width / height; ``16:9`` or ``1.78``), or ``auto``: ``count`` ratios spread
  evenly in log-aspect from 1 / ``max_ratio`` to ``max_ratio``.
* :func:`bucket_shape` turns an aspect into one stage's ``(height, width)`` at that stage's pixel
  area (its square side squared), both multiples of the network's down-sampling factor: the base's
  16:9 and the upsamplers' 16:9 are the same aspect at their own areas, so a base image is
  upsampled into the SR bucket of its own shape.
* :func:`bucket_of` puts a sample in the bucket nearest its *original* size (img2dataset's
  ``original_width`` / ``original_height``), in log-aspect: decided once per sample, from data
  that never changes, so every stage and every epoch agree.
* :func:`merge_small` folds a bucket with fewer samples than one global batch into its nearest
  neighbour in log-aspect (counted), so no step waits for a batch that cannot fill.
* :func:`epoch_schedule` orders an epoch's batches by bucket: each bucket's batches spread evenly
  over the epoch with a phase drawn from ``(seed, epoch)``, so the mix stays in proportion to the
  buckets' sizes at every point of the epoch and the bucket of step ``s`` is a pure function of
  ``(seed, epoch, s)``: all ranks agree without talking, and an exact resume finds its place.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.configbase import StrictModel

MAX_ASPECT = 8.0  # wider (or taller) than 8:1 is a banner, not a picture: refused in a spec


def parse_ratio(value: float | int | str) -> float:
    """``16:9`` / ``"1.78"`` / ``1.78`` -> width / height as a float."""
    if isinstance(value, str):
        if ":" in value:
            w, _, h = value.partition(":")
            try:
                w_f, h_f = float(w), float(h)
            except ValueError:
                raise ValueError(f"aspect ratio {value!r}: write W:H with numbers (16:9) or a number (1.78)") from None
            if w_f <= 0 or h_f <= 0:
                raise ValueError(f"aspect ratio {value!r}: both sides must be > 0")
            return w_f / h_f
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"aspect ratio {value!r}: write W:H (16:9) or a number (1.78)") from None
    r = float(value)
    if not 0 < r < math.inf:
        raise ValueError(f"aspect ratio {value!r} must be a positive number")
    return r


class BucketsConfig(StrictModel):
    """The spec's ``buckets`` section: the aspects every stage of the cascade trains on."""

    ratios: list[float | str] | Literal["auto"] = Field("auto", description=(
        "Aspect ratios (width / height) as W:H or numbers, e.g. ['1:1', '4:5', '16:9'], or 'auto': "
        "`count` ratios spread evenly in log-aspect between 1/max_ratio and max_ratio."))
    count: int = Field(5, ge=1, le=64, description="With ratios: auto, how many buckets (odd counts include 1:1).")
    max_ratio: float = Field(2.0, gt=1.0, le=MAX_ASPECT, description=(
        "With ratios: auto, the widest bucket's width / height (the tallest's is its inverse)."))

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v):
        if v == "auto":
            return v
        if not v:
            raise ValueError("give at least one aspect ratio, or 'auto'")
        parsed = [parse_ratio(x) for x in v]
        bad = [x for x, r in zip(v, parsed) if not 1 / MAX_ASPECT <= r <= MAX_ASPECT]
        if bad:
            raise ValueError(f"aspect ratios {bad} are beyond {MAX_ASPECT:g}:1 (either way)")
        return v

    @model_validator(mode="after")
    def _distinct(self):
        r = self.aspect_ratios()
        close = [(a, b) for a, b in zip(r, r[1:]) if math.log(b / a) < 0.01]
        if close:
            raise ValueError(f"aspect ratios {close[0][0]:.3f} and {close[0][1]:.3f} are within 1% of each other: "
                             "one bucket would never be chosen")
        return self

    def aspect_ratios(self) -> tuple[float, ...]:
        """The buckets' width / height, ascending (tallest first)."""
        if self.ratios == "auto":
            if self.count == 1:
                return (1.0,)
            logs = np.linspace(-math.log(self.max_ratio), math.log(self.max_ratio), self.count)
            return tuple(float(math.exp(x)) if abs(x) > 1e-12 else 1.0 for x in logs)
        return tuple(sorted(parse_ratio(x) for x in self.ratios))


def bucket_shape(ratio: float, side: int, multiple: int) -> tuple[int, int]:
    """``(height, width)`` of aspect ``ratio`` at about ``side``² pixels, each a multiple of
    ``multiple`` (the network's down-sampling factor) and at least that: 64 px, multiple 8 ->
    1:1 64x64, 4:5 (0.8) 72x56 ... as (h, w)."""
    if side < 1 or multiple < 1 or side % multiple:
        raise ValueError(f"side {side} must be a positive multiple of {multiple}")
    h = math.sqrt(side * side / ratio)
    w = ratio * h
    snap = lambda x: max(multiple, int(round(x / multiple)) * multiple)  # noqa: E731
    return snap(h), snap(w)


def bucket_of(width: np.ndarray | int, height: np.ndarray | int, ratios: tuple[float, ...]) -> np.ndarray:
    """Index of the bucket nearest each ``width x height`` in log-aspect; ties go to the squarer
    bucket (the one nearer 1:1), so a size between two buckets never flips with rounding."""
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    if np.any(w <= 0) or np.any(h <= 0):
        raise ValueError("image sizes must be > 0 (a sample without its original size cannot be bucketed)")
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    d = np.abs(np.log(w / h)[..., None] - logs)                     # [..., K]
    d = d + 1e-9 * np.abs(logs)  # the tie-break: a hair's preference for the squarer bucket
    return np.argmin(d, axis=-1)


def merge_small(counts: list[int], ratios: tuple[float, ...], min_count: int) -> tuple[list[int], dict[int, int]]:
    """``(target, merged)``: ``target[b]`` is the bucket bucket ``b``'s samples train in, and
    ``merged`` maps each folded bucket to its sample count. A bucket with fewer than ``min_count``
    samples (one global batch) is folded into the nearest bucket in log-aspect that keeps its own,
    smallest first; if none can fill a batch, all go to the most populous one."""
    if len(counts) != len(ratios):
        raise ValueError(f"{len(counts)} counts for {len(ratios)} buckets")
    target = list(range(len(counts)))
    n = list(counts)
    merged: dict[int, int] = {}
    logs = [math.log(r) for r in ratios]
    for b in sorted(range(len(n)), key=lambda i: (n[i], abs(logs[i]))):
        if n[b] >= min_count or n[b] == 0:
            continue
        keep = [k for k in range(len(n)) if k != b and target[k] == k and n[k] > 0]
        if not keep:
            break
        into = min(keep, key=lambda k: (abs(logs[k] - logs[b]), abs(logs[k])))
        merged[b] = counts[b]
        n[into] += n[b]
        n[b] = 0
        for i, t in enumerate(target):  # buckets folded into b earlier follow it
            if t == b:
                target[i] = into
    return target, merged


def epoch_schedule(batches: list[int], seed: int, epoch: int) -> np.ndarray:
    """The bucket of each batch of an epoch: bucket ``b`` takes ``batches[b]`` slots, spread at
    equal spacing over the epoch from a phase drawn from ``(seed, epoch)``. Every prefix of the
    epoch holds each bucket in proportion to its size (within two batches), and the order changes
    from epoch to epoch."""
    if any(x < 0 for x in batches):
        raise ValueError(f"batch counts must be >= 0 (got {batches})")
    phase = np.random.default_rng([seed, epoch, 0x42554B]).random(len(batches))  # "BUK": its own stream
    keys, owner = [], []
    for b, n in enumerate(batches):
        if n:
            keys.append((np.arange(n) + phase[b]) / n)
            owner.append(np.full(n, b))
    if not keys:
        return np.zeros(0, dtype=np.int64)
    k, o = np.concatenate(keys), np.concatenate(owner)
    return o[np.lexsort((o, k))].astype(np.int64)  # by position; equal positions by bucket id

"""Aspect-ratio buckets as data (data_prep/buckets.py, issue 28): the spec section, each stage's size
for an aspect, each sample's bucket, small buckets merged, and the bucket of every step."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from data_prep.buckets import BucketsConfig, bucket_of, bucket_shape, epoch_schedule, merge_small, parse_ratio


def test_ratios_from_a_list_or_auto():
    assert BucketsConfig(ratios=["16:9", "1:1", 0.75]).aspect_ratios() == (0.75, 1.0, 16 / 9)
    auto = BucketsConfig(ratios="auto", count=5, max_ratio=2.0).aspect_ratios()
    assert auto[2] == 1.0 and auto[0] == pytest.approx(0.5) and auto[-1] == pytest.approx(2.0)
    assert np.allclose(np.diff(np.log(auto)), math.log(2) / 2)  # evenly spread in log-aspect
    assert BucketsConfig(count=1).aspect_ratios() == (1.0,)
    assert parse_ratio("4:5") == 0.8 and parse_ratio("1.5") == 1.5


@pytest.mark.parametrize("bad, says", [
    ({"ratios": []}, "at least one"),
    ({"ratios": ["16/9"]}, "W:H"),
    ({"ratios": ["0:9"]}, "> 0"),
    ({"ratios": ["10:1"]}, "beyond 8:1"),
    ({"ratios": ["1:1", "1.001"]}, "within 1%"),
    ({"max_ratio": 1.0}, "max_ratio"),
    ({"ratio": "auto"}, "ratio"),
])
def test_a_bad_section_names_the_field(bad, says):
    with pytest.raises(ValidationError, match=says):
        BucketsConfig(**bad)


def test_each_stage_sizes_an_aspect_at_its_own_area():
    """The issue's base example (64 px area: 64x64, 56x72, 48x80 as w x h), then the same aspects at
    an upsampler's area: the same shape, every side a multiple of the down-sampling factor."""
    assert bucket_shape(1.0, 64, 8) == (64, 64)
    assert bucket_shape(0.8, 64, 8) == (72, 56)      # (h, w): 56 wide, 72 tall
    assert bucket_shape(0.6, 64, 8) == (80, 48)
    for r in BucketsConfig(count=7, max_ratio=3.0).aspect_ratios():
        for side, mult in ((16, 4), (64, 8), (256, 16), (1024, 64)):
            h, w = bucket_shape(r, side, mult)
            assert h % mult == 0 and w % mult == 0 and h >= mult and w >= mult
            assert abs(math.log(w / h) - math.log(r)) < 2 * mult / min(h, w) + 1e-9  # the aspect, up to the grid
            assert abs(h * w / side ** 2 - 1) < 0.35  # about the stage's area
    with pytest.raises(ValueError, match="multiple"):
        bucket_shape(1.0, 60, 8)


def test_a_sample_goes_to_the_nearest_bucket_in_log_aspect():
    ratios = BucketsConfig(ratios=["9:16", "3:4", "1:1", "4:3", "16:9"]).aspect_ratios()
    w = np.array([1920, 1080, 1000, 1300, 999, 4000])
    h = np.array([1080, 1920, 1000, 1000, 1000, 1000])
    assert bucket_of(w, h, ratios).tolist() == [4, 0, 2, 3, 2, 4]
    # exactly between 1:1 and 4:3 in log-aspect: the squarer one
    mid = math.sqrt(4 / 3)
    assert bucket_of(mid * 1e6, 1e6, ratios) == 2 and bucket_of(1e6, mid * 1e6, ratios) == 2
    with pytest.raises(ValueError, match="original size"):
        bucket_of(np.array([0]), np.array([10]), ratios)


def test_small_buckets_fold_into_their_nearest_neighbour_and_are_counted():
    ratios = (0.5, 0.75, 1.0, 1.333, 2.0)
    target, merged = merge_small([3, 40, 500, 10, 70], ratios, min_count=32)
    assert target == [1, 1, 2, 2, 4] and merged == {0: 3, 3: 10}
    # a chain: a folded bucket's own folded buckets follow it
    target, merged = merge_small([3, 20, 500, 0, 0], ratios, min_count=32)
    assert target == [2, 2, 2, 3, 4] and merged == {0: 3, 1: 20}
    # nothing fills a batch: all into the most populous (the last left standing)
    target, _ = merge_small([5, 6, 7, 0, 0], ratios, min_count=32)
    assert len({target[b] for b in range(3)}) == 1


def test_the_schedule_is_a_function_of_seed_and_epoch_and_keeps_proportions():
    batches = [5, 40, 160, 30, 12]
    a = epoch_schedule(batches, seed=3, epoch=7)
    assert np.array_equal(a, epoch_schedule(batches, seed=3, epoch=7))  # every rank computes the same
    assert not np.array_equal(a, epoch_schedule(batches, seed=3, epoch=8))
    assert not np.array_equal(a, epoch_schedule(batches, seed=4, epoch=7))
    assert np.bincount(a, minlength=5).tolist() == batches
    total = sum(batches)
    for prefix in range(1, total + 1):  # every prefix of the epoch: each bucket within two batches of its share
        seen = np.bincount(a[:prefix], minlength=5)
        assert np.all(np.abs(seen - np.array(batches) * prefix / total) < 2.0), prefix
    assert epoch_schedule([0, 0], 0, 0).size == 0

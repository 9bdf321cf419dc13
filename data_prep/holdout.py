"""The held-out split: which samples training never sees and evaluation reads (issue 14).

A sample is held out iff ``key_unit(key) < fraction``, where ``key_unit`` maps the sha1 of the
sample key to [0, 1). The rule depends on nothing but the key, so it is the same on every rank,
loader worker, machine and restart, and a sample keeps its side when shards are added.

The embed stage turns its config (``holdout_fraction``, ``holdout_min``, ``holdout_max_fraction``)
into one *effective* fraction over the keys it embedded: the threshold that holds out exactly
``k = max(ceil(fraction * N), min(holdout_min, floor(max_fraction * N)))`` samples (the midpoint
between the k-th and (k+1)-th smallest key units). At real scale that is ``fraction`` itself; on
a small corpus it is raised so evaluation has at least ``holdout_min`` samples, but never past
``max_fraction`` of the data. The effective fraction is written to ``encoders.json`` (``holdout``)
and the embed manifest; :func:`read_rule` is its one reader. An embedding made before held-out
splits existed has no ``holdout`` entry: :data:`NO_HOLDOUT` (everything is training data).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from data_prep.encoders_doc import EncodersDoc, read_encoders_doc
from pipeline import store

RULE_NAME = "sha1(key)[:8] / 2**64 < fraction"
SPLITS = ("train", "holdout", "all")


def key_unit(key: str) -> float:
    """The key's position in [0, 1): the first 8 bytes of sha1(key) over 2**64."""
    return int.from_bytes(hashlib.sha1(str(key).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def key_units(keys: Iterable[str]) -> np.ndarray:
    return np.fromiter((key_unit(k) for k in keys), dtype=np.float64)


@dataclass(frozen=True)
class HoldoutRule:
    """``fraction``: the effective threshold (0 = nothing held out)."""

    fraction: float = 0.0
    count: int = 0  # how many of the embedded samples it holds out (for messages and checks)

    @property
    def enabled(self) -> bool:
        return self.fraction > 0.0

    def is_held_out(self, key: str) -> bool:
        return self.fraction > 0.0 and key_unit(key) < self.fraction

    def mask(self, keys: Sequence[str]) -> np.ndarray:
        """bool [N]: True where the key is held out."""
        if self.fraction <= 0.0:
            return np.zeros(len(keys), dtype=bool)
        return key_units(keys) < self.fraction

    def keep(self, keys: Sequence[str], split: str) -> np.ndarray:
        """bool [N]: the rows of ``split`` ('train', 'holdout' or 'all')."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
        if split == "all":
            return np.ones(len(keys), dtype=bool)
        m = self.mask(keys)
        return m if split == "holdout" else ~m

    def to_doc(self, requested: float, minimum: int, max_fraction: float, total: int) -> dict[str, Any]:
        return {"rule": RULE_NAME, "fraction": self.fraction, "count": self.count, "requested_fraction": requested,
                "min": minimum, "max_fraction": max_fraction, "of": total}


NO_HOLDOUT = HoldoutRule(0.0, 0)


def target_count(n: int, fraction: float, minimum: int, max_fraction: float) -> int:
    """How many of ``n`` samples to hold out (see the module docstring)."""
    if n <= 0 or (fraction <= 0.0 and minimum <= 0):
        return 0
    want = math.ceil(fraction * n) if fraction > 0 else 0
    floor_ = min(minimum, math.floor(max_fraction * n))
    return int(min(max(want, floor_), n - 1 if n > 1 else 0))


class SmallestUnits:
    """The k+1 smallest key units seen so far, streamed shard by shard (memory O(k), not O(N))."""

    def __init__(self, k: int):
        self.k = k
        self.best = np.empty(0, np.float64)

    def add(self, keys: Sequence[str]) -> None:
        if self.k <= 0 or len(keys) == 0:
            return
        both = np.concatenate([self.best, key_units(keys)])
        keep = min(len(both), self.k + 1)
        self.best = np.sort(np.partition(both, keep - 1)[:keep])

    def rule(self) -> HoldoutRule:
        """The threshold between the k-th and (k+1)-th smallest units: exactly k keys below it."""
        if self.k <= 0 or len(self.best) <= self.k:
            return NO_HOLDOUT if self.k <= 0 or len(self.best) == 0 else HoldoutRule(1.0, len(self.best))
        lo, hi = float(self.best[self.k - 1]), float(self.best[self.k])
        return HoldoutRule((lo + hi) / 2.0, self.k)


def rule_from_doc(doc: EncodersDoc | None) -> HoldoutRule:
    """The rule an ``encoders.json`` records (NO_HOLDOUT when it records none)."""
    h = doc.holdout if doc is not None else None
    if not h:
        return NO_HOLDOUT
    return HoldoutRule(float(h["fraction"]), int(h.get("count", 0)))


def read_rule(embed_attempt_uri: str) -> HoldoutRule:
    """The held-out rule of an embed attempt (its ``encoders.json``)."""
    return rule_from_doc(read_encoders_doc(embed_attempt_uri))


def shard_keys(npz_uri: str) -> np.ndarray:
    """Only the ``keys`` array of an embedding shard (np.load reads one zip member: the features
    are not read, so the split of a large set costs a few KB per shard)."""
    with store.open_uri(npz_uri, "rb") as f, np.load(f, allow_pickle=False) as z:
        return np.asarray(z["keys"])


def split_rule(npz_uris: Sequence[str], n: int, fraction: float, minimum: int, max_fraction: float) -> HoldoutRule:
    """The effective rule over the keys of these shards (``n`` = how many they hold)."""
    acc = SmallestUnits(target_count(n, fraction, minimum, max_fraction))
    if acc.k > 0:
        for uri in npz_uris:
            acc.add([str(k) for k in shard_keys(uri)])
    return acc.rule()

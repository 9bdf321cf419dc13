"""Training data: download shards (webdataset tars) joined by key with their embedding shards.

One :class:`ShardStream` per rank; it splits shards across ranks and DataLoader workers, decodes
and random-crops/flips images, and yields whole micro-batches (each from one worker, so a batch
carries that worker's position exactly).

Position and resume. Every *logical* worker ``g = rank * K + w`` (K = loader workers per rank)
walks its own list of "units" per epoch and keeps ``{"epoch", "cursor", "index"}``: the next
sample to read is embedding row ``index`` of unit ``cursor`` of epoch ``epoch``. Each batch
carries its worker's position after its last sample; the training loop keeps the latest one per
worker and saves them in each checkpoint, so a resumed run reads exactly the samples the
interrupted one had not consumed yet (prefetched-but-unused batches are simply read again).
A DataLoader always polls its physical workers round-robin from worker 0, so after ``n``
consumed batches physical worker ``p`` plays logical worker ``(p + n) % K``; the batch order of
a resumed run is then identical to an uninterrupted one, not only the set of samples.

Randomness (shard order per epoch, crop offsets, flips) is a pure function of
``(seed, epoch, shard, row)``, so there is no loader RNG state to save.

Decoded-image cache. Each worker keeps the shards it has read whole, decoded and resized (before
the random crop and flip, which are drawn per epoch as without it) and their embedding shards,
up to ``LoaderSpec.cache_bytes``: a corpus that fits is decoded once, and later epochs never
reopen its tars (the demo's 993 images at 16px: 0.8 MB; decoding was ~40 ms of every batch of
64). A corpus larger than the budget streams from the store every epoch, as before; the cache
changes no sample (a test checks batches bit for bit).

Splitting: with at least as many shards as logical workers, each worker takes every G-th shard
of the epoch's permutation; with fewer (small demos, many GPUs), every worker reads every shard
and takes every G-th sample, so no rank idles.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from data_prep.embed_format import EmbeddingShard, pad_ids, pad_sequences, read_embedding_shard
from data_prep.holdout import NO_HOLDOUT, HoldoutRule
from data_prep.shards import ShardCorruptError, iter_shard
from data_prep.image_decode import decode_rgb
from pipeline import layout, store


class LoaderError(ValueError):
    """Training data that cannot be used as it is (missing or misaligned shards)."""


@dataclass(frozen=True)
class ShardPair:
    index: int  # position in the sorted list of shards: part of the random seeds
    tar_uri: str | None  # None when only embeddings are read (the prior)
    npz_uri: str


def pair_shards(download_shards: str | None, embed_shards: str) -> list[ShardPair]:
    """Each download shard ``NNNNN.tar`` with its embedding shard ``NNNNN.npz`` (the folders the
    upstream manifests name as their ``shards`` output); error if one is missing.

    Without ``download_shards`` (the prior) the embedding shards alone.
    """
    # One plain listing per folder, names only: a glob walks the folder and stats every entry
    # (2 x 20,000 stats for 20,000 shards), and the pairing needs names alone.
    npzs = {os.path.basename(u)[: -len(layout.EMBED_NPZ)]: u for u in _names(embed_shards, layout.EMBED_NPZ)}
    if download_shards is None:
        if not npzs:
            raise LoaderError(f"no embedding shards (*.npz) under {embed_shards}")
        return [ShardPair(i, None, npzs[k]) for i, k in enumerate(sorted(npzs))]
    tars = _names(download_shards, layout.SHARD_TAR)
    if not tars:
        raise LoaderError(f"no download shards (*.tar) under {download_shards}")
    pairs = []
    for i, t in enumerate(sorted(tars)):
        stem = os.path.basename(t)[: -len(layout.SHARD_TAR)]
        if stem not in npzs:
            raise LoaderError(f"download shard {t} has no embedding shard {stem}.npz under "
                              f"{embed_shards}; re-run the embed stage")
        pairs.append(ShardPair(i, t, npzs[stem]))
    return pairs


def _names(folder: str, suffix: str) -> list[str]:
    """URIs of the files directly under ``folder`` whose name ends with ``suffix``, sorted."""
    return [u for u in store.listdir(folder) if u.endswith(suffix)]


@dataclass
class LoaderSpec:
    """What a stage needs from the data (the prior needs no pixels: its tars are never opened)."""

    image_size: int | None  # None: no images
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    holdout: HoldoutRule = NO_HOLDOUT  # the embed stage's held-out rule (data_prep/holdout.py)
    random_flip: bool = True  # mirror half the images (off when captions name left and right)
    cache_bytes: int = 256 << 20  # per loader worker: decoded shards kept in memory (0: none)


def units_of_epoch(n_shards: int, epoch: int, g: int, G: int, seed: int) -> list[tuple[int, int, int]]:
    """(shard position, first row, row stride) for logical worker g of G in an epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    if n_shards >= G:
        return [(int(s), 0, 1) for s in order[g::G]]
    return [(int(s), g, G) for s in order]


def _load_image(data: bytes, size: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """Decode, resize the short side to ``size``, random square crop, random flip -> uint8 [3,H,W]."""
    return _crop_flip(_decode_resized(data, size), size, rng, flip)


def _decode_resized(data: bytes, size: int) -> np.ndarray:
    """Decode and resize the short side to ``size`` -> uint8 [H, W, 3] (what the cache keeps).

    Decoding is data_prep.image_decode's (pixel limit from the header before decoding, 16-bit
    scaled, EXIF orientation, alpha on white, first frame), the same as the download stage's, so a
    shard written by another tool is read as faithfully and as safely; it raises ImageRejected
    (a ValueError), which the caller skips and counts.
    """
    # JPEG can decode at 1/2, 1/4, 1/8 scale directly (never below the requested size): a 64px
    # stage reading 1024px shards decodes ~2.4x faster this way (docs/performance.md).
    img = decode_rgb(data, draft=(size, size))
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1.0:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _crop_flip(arr: np.ndarray, size: int, rng: np.random.Generator, flip: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    x = int(rng.integers(0, w - size + 1))
    y = int(rng.integers(0, h - size + 1))
    arr = arr[y:y + size, x:x + size]
    if rng.random() < 0.5 and flip:  # the draw happens either way: crops stay the same with flips off
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _wanted_rows(in_split: np.ndarray, start: int, first: int, stride: int) -> list[bool]:
    """Per embedding row: whether the unit reads it (every ``stride``-th row from ``first``, none
    before ``start``, where a resumed unit goes on) and it belongs to the split."""
    return [j >= start and (j - first) % stride == 0 and bool(keep) for j, keep in enumerate(in_split)]


def _sample(emb: EmbeddingShard, j: int, image: np.ndarray | None) -> dict | None:
    """One sample from embedding row j (+ its cropped image); None when the row is not finite."""
    d = {"key": str(emb.keys[j]), "clip_image": emb.clip_image[j], "clip_text": emb.clip_text[j],
         "t5": emb.t5_of(j), "clip_tokens": emb.clip_tokens_of(j)}
    for tok in ("clip", "t5"):  # optional: shards written before token ids were stored lack them
        if getattr(emb, f"{tok}_ids") is not None:
            d[f"{tok}_ids"] = emb.ids_of(tok, j)
    # A non-finite embedding row (a shard not written by our embed stage, bit rot) would
    # turn every step it lands in into a NaN loss: skipped and counted like a bad image.
    if not all(np.isfinite(d[k]).all() for k in ("clip_image", "clip_text", "t5", "clip_tokens")):
        return None
    if image is not None:
        d["image"] = image
    return d


def _decode_or_none(data: bytes | None, size: int) -> np.ndarray | None:
    """:func:`_decode_resized`, or None for a sample without an image or one that does not decode
    (the caller skips and counts it)."""
    if data is None:
        return None
    try:
        return _decode_resized(data, size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _tar_samples(uri: str) -> Iterator[Any]:
    """The shard's samples in tar order (data_prep.shards.iter_shard, the one tar reader). A
    truncated or corrupt tar stops training with an error naming it; the sample being read when
    it broke is never yielded."""
    try:
        yield from iter_shard(uri, on_corrupt="raise")
    except ShardCorruptError as e:
        raise LoaderError(f"download shard {e}; re-run the download stage for it") from e


def _pad(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features padded to the longest (at least 1, so an all-empty batch keeps its shape)."""
    out, mask = pad_sequences(seqs, max(1, max(len(s) for s in seqs)), seqs[0].shape[-1])
    return torch.from_numpy(out), torch.from_numpy(mask)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a micro-batch; token features padded to the batch's longest caption."""
    out: dict[str, Any] = {"keys": [s["key"] for s in samples], "epochs": [s.get("epoch", 0) for s in samples]}
    if "image" in samples[0]:
        out["image"] = torch.from_numpy(np.stack([s["image"] for s in samples]))  # uint8 [B,3,H,W]
    out["clip_image"] = torch.from_numpy(np.stack([s["clip_image"] for s in samples]))
    out["clip_text"] = torch.from_numpy(np.stack([s["clip_text"] for s in samples]))
    out["t5_tokens"], out["t5_mask"] = _pad([s["t5"] for s in samples])
    out["clip_tokens"], out["clip_mask"] = _pad([s["clip_tokens"] for s in samples])
    for tok in ("clip", "t5"):  # token ids (GLIDE): only when every sample's shard stored them
        if all(f"{tok}_ids" in s for s in samples):
            ids, mask = pad_ids([s[f"{tok}_ids"] for s in samples])
            out[f"{tok}_ids"], out[f"{tok}_id_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
    return out


def _read_embeddings(uri: str) -> EmbeddingShard:
    """read_embedding_shard, with a damaged zip (a truncated copy) named like any other bad shard."""
    import zipfile

    try:
        return read_embedding_shard(uri)
    except (zipfile.BadZipFile, EOFError, KeyError) as e:
        raise LoaderError(f"embedding shard {uri} is unreadable ({type(e).__name__}: {e}); "
                          f"re-run the embed stage") from e


class ShardStream(torch.utils.data.IterableDataset):
    """Endless stream of collated micro-batches for one rank (see module docstring)."""

    def __init__(self, shards: list[ShardPair], spec: LoaderSpec, positions: dict[int, dict] | None = None,
                 rotate: int = 0, split: str = "train", plans: dict[int, list[list[int]]] | None = None,
                 plan_next_epoch: int = 0):
        if not shards:
            raise LoaderError("no shards to train on")
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout' (got {split!r})")
        # 'train' never yields a held-out key; 'holdout' (validation) yields only those.
        self.shards, self.spec, self.split = shards, spec, split
        self.positions = positions or {}
        self.rotate = rotate
        # After a change of world size: each worker's explicit list of what the interrupted epochs
        # still owe, walked before epoch ``plan_next_epoch`` (stages/training/data_resize.py).
        self.plans, self.plan_next_epoch = plans or {}, plan_next_epoch
        # shard index -> (embeddings, {row: decoded image or None if undecodable}); filled per
        # worker process (each DataLoader worker has its own copy of this object)
        self._cache: dict[int, tuple[EmbeddingShard, dict[int, np.ndarray | None]]] = {}
        self._cached_bytes = 0
        self._cache_full = False  # a shard did not fit: stop decoding rows beyond each unit's own

    def _samples(self, g: int, G: int, start: dict, plan: list[list[int]] = ()) -> Iterator[tuple[dict, dict, int]]:
        """(sample, position after it, skipped-so-far) forever, from ``start``: the rest of
        ``plan`` first (``start`` has a "plan" cursor; a worker with a plan that has not started
        is at its beginning), then the epochs."""
        skipped = 0
        if plan and ("plan" in start or not start):
            cursor, index = int(start.get("plan", 0)), int(start.get("index", 0))
            for cursor in range(cursor, len(plan)):
                epoch, s, begin, first, stride = plan[cursor]
                pair = self.shards[s]
                emb = self._cache[s][0] if s in self._cache else _read_embeddings(pair.npz_uri)
                for row, sample in self._rows(pair, emb, max(index, begin, first), first, stride, epoch):
                    if sample is None:
                        skipped += 1
                        continue
                    sample["epoch"] = epoch
                    yield sample, {"plan": cursor, "index": row + 1}, skipped
                index = 0
            start = {"epoch": self.plan_next_epoch}
        epoch, cursor, index = start.get("epoch", 0), start.get("cursor", 0), start.get("index", 0)
        empty_epochs = 0
        while True:
            units = units_of_epoch(len(self.shards), epoch, g, G, self.spec.seed)
            produced = 0
            while cursor < len(units):
                s, first, stride = units[cursor]
                pair = self.shards[s]
                emb = self._cache[s][0] if s in self._cache else _read_embeddings(pair.npz_uri)
                for row, sample in self._rows(pair, emb, max(index, first), first, stride, epoch):
                    if sample is None:
                        skipped += 1
                        continue
                    produced += 1
                    sample["epoch"] = epoch
                    yield sample, {"epoch": epoch, "cursor": cursor, "index": row + 1}, skipped
                cursor, index = cursor + 1, 0
            # A resumed epoch may legitimately have nothing left; two empty epochs in a row mean none ever will.
            empty_epochs = empty_epochs + 1 if produced == 0 else 0
            if empty_epochs >= 2:
                raise LoaderError(f"data worker {g} of {G} gets no usable {self.split} samples from "
                                  f"{len(self.shards)} shards (fewer usable samples than ranks x loader_workers?)")
            epoch, cursor = epoch + 1, 0

    def _rows(self, pair: ShardPair, emb: EmbeddingShard, start: int, first: int, stride: int,
              epoch: int) -> Iterator[tuple[int, dict | None]]:
        """(row, sample or None when unusable) for one unit's rows of a shard, in row order."""
        in_split = self.spec.holdout.keep([str(k) for k in emb.keys], self.split)
        wanted = _wanted_rows(in_split, start, first, stride)
        if self.spec.image_size is None:
            yield from self._embedding_rows(emb, wanted)
        elif pair.index in self._cache:
            yield from self._cached_rows(pair, emb, self._cache[pair.index][1], wanted, epoch)
        else:
            yield from self._streamed_rows(pair, emb, wanted, epoch)

    @staticmethod
    def _embedding_rows(emb: EmbeddingShard, wanted: list[bool]) -> Iterator[tuple[int, dict | None]]:
        """Taken for a model that trains on embeddings only (``image_size`` None: the prior). Its
        tars are never opened, so a unit is its embedding rows alone."""
        for j in range(len(emb)):
            if wanted[j]:
                yield j, _sample(emb, j, None)

    def _cached_rows(self, pair: ShardPair, emb: EmbeddingShard, images: dict[int, np.ndarray | None],
                     wanted: list[bool], epoch: int) -> Iterator[tuple[int, dict | None]]:
        """Taken for a shard this worker has read whole before and kept decoded (the decoded-image
        cache): no tar to open. Only the crop and flip are drawn, exactly as streaming draws them,
        so a cached epoch yields the streamed epoch's batches."""
        for j in range(len(emb)):
            if wanted[j]:
                yield j, self._epoch_sample(emb, pair.index, j, epoch, images[j])

    def _streamed_rows(self, pair: ShardPair, emb: EmbeddingShard, wanted: list[bool],
                       epoch: int) -> Iterator[tuple[int, dict | None]]:
        """Taken for a shard not in the cache (its first read, or a corpus over the budget): its tar
        is read in order, each key checked against the embedding row expected next. While the cache
        has room every row is decoded on the way, not only this unit's, so the shard can be kept whole."""
        decoded: dict[int, np.ndarray | None] | None = \
            {} if self.spec.cache_bytes > 0 and not self._cache_full else None
        row = {str(k): j for j, k in enumerate(emb.keys)}
        j = 0  # next embedding row we expect to meet in the tar
        for smp in _tar_samples(pair.tar_uri):
            key = smp.key
            if key not in row:
                continue  # not embedded (bad image/caption at embed time): skipped there, counted there
            if row[key] != j:
                raise LoaderError(f"embedding shard {pair.npz_uri} is misaligned with {pair.tar_uri}: tar key "
                                  f"{key} is embedding row {row[key]} but row {j} ({emb.keys[j]}) was expected next")
            if wanted[j] or decoded is not None:
                img = _decode_or_none(smp.image_bytes, self.spec.image_size)
                if decoded is not None:
                    decoded[j] = img
                if wanted[j]:
                    yield j, self._epoch_sample(emb, pair.index, j, epoch, img)
            j += 1
        if j < len(emb):
            raise LoaderError(f"embedding shard {pair.npz_uri} is misaligned with {pair.tar_uri}: key "
                              f"{emb.keys[j]} (row {j}) is not in the tar")
        if decoded is not None:
            self._keep(pair.index, emb, decoded)

    def _epoch_sample(self, emb: EmbeddingShard, shard: int, j: int, epoch: int,
                      decoded: np.ndarray | None) -> dict | None:
        """Row j's sample with this epoch's crop and flip of its decoded image; None when the image
        did not decode. The draw's generator is seeded by (seed, epoch, shard, row) alone, so the
        cache, the split and a resume never shift it."""
        if decoded is None:
            return None
        rng = np.random.default_rng([self.spec.seed, epoch, shard, j])
        return _sample(emb, j, _crop_flip(decoded, self.spec.image_size, rng, self.spec.random_flip))

    def _keep(self, s: int, emb: EmbeddingShard, decoded: dict[int, np.ndarray | None]) -> None:
        """Cache a shard read whole, if it fits the budget (first come, first kept)."""
        nbytes = sum(a.nbytes for a in decoded.values() if a is not None)
        nbytes += sum(getattr(emb, f).nbytes for f in ("clip_image", "clip_text", "clip_tokens", "t5_tokens"))
        if self._cached_bytes + nbytes <= self.spec.cache_bytes:
            self._cache[s] = (emb, decoded)
            self._cached_bytes += nbytes
        else:
            self._cache_full = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        p, K = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (p + self.rotate) % K
        g, G = self.spec.rank * K + w, self.spec.world_size * K
        batch, last_pos, skipped = [], None, 0
        for sample, pos, skipped in self._samples(g, G, self.positions.get(w, {}), self.plans.get(w, [])):
            batch.append(sample)
            last_pos = pos
            if len(batch) == self.spec.batch_size:
                out = collate(batch)
                out["worker"], out["position"], out["skipped"] = w, last_pos, skipped
                yield out
                batch = []


def make_loader(shards: list[ShardPair], spec: LoaderSpec, state: dict | None, num_workers: int,
                pin_memory: bool = False, prefetch_factor: int = 4) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ShardStream` resuming from ``state`` (see :func:`loader_state`)."""
    K = max(1, num_workers)
    positions, rotate, plans, plan_next = {}, 0, {}, 0
    if state:
        if state.get("workers") != K or state.get("world_size") != spec.world_size:
            raise LoaderError(
                f"data position was saved for {state.get('workers')} loader workers x {state.get('world_size')} "
                f"ranks, this loader has {K} x {spec.world_size}: redistribute it first "
                "(stages/training/data_resize.redistribute)")
        positions = {int(k): v for k, v in state["positions"].items()}
        rotate = int(state["consumed"]) % K
        plans = {int(k): v for k, v in (state.get("plans") or {}).items()}
        plan_next = int(state.get("plan_next_epoch", 0))
    ds = ShardStream(shards, spec, positions, rotate, plans=plans, plan_next_epoch=plan_next)
    # Its own generator: creating an iterator otherwise draws a seed from the global torch RNG,
    # which would shift the training RNG stream of a resumed run (the stream is restored first).
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       # batches queued per worker: enough to ride out a shard of slow
                                       # JPEGs (or a new shard's open) without starving the step
                                       prefetch_factor=prefetch_factor if num_workers else None,
                                       generator=torch.Generator().manual_seed(spec.seed))


class PositionTracker:
    """What the loop keeps about the data it has consumed; saved in every checkpoint."""

    def __init__(self, num_workers: int, world_size: int, state: dict | None = None, batch_size: int = 0):
        self.K, self.world_size = max(1, num_workers), world_size
        self.positions: dict[int, dict] = {}
        self.consumed = 0   # batches this rank has taken since the last change of world size
        self.samples = 0    # samples this rank has taken (rank 0 also holds those before a change)
        self.skipped: dict[int, int] = {}
        self.plans: dict[str, list] = {}  # see data_resize: kept in every checkpoint after a change
        self.plan_next_epoch = 0
        self.resized_from: dict | None = None
        if state:
            self.positions = {int(k): v for k, v in state["positions"].items()}
            self.consumed = int(state["consumed"])
            # (states of releases before this field: every batch was full)
            self.samples = int(state.get("samples", self.consumed * batch_size))
            self.plans, self.plan_next_epoch = state.get("plans") or {}, int(state.get("plan_next_epoch", 0))
            self.resized_from = state.get("resized_from")

    def update(self, batch: dict) -> None:
        self.positions[int(batch["worker"])] = dict(batch["position"])
        self.skipped[int(batch["worker"])] = int(batch["skipped"])
        self.consumed += 1
        self.samples += len(batch["keys"])

    def state(self) -> dict:
        out = {"workers": self.K, "world_size": self.world_size, "consumed": self.consumed, "samples": self.samples,
               "positions": {str(k): v for k, v in sorted(self.positions.items())}}
        if self.plans:
            out.update(plans=self.plans, plan_next_epoch=self.plan_next_epoch)
        return out

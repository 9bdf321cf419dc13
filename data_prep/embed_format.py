"""On-disk format of precomputed embeddings: one ``NNNNN.npz`` per download shard ``NNNNN.tar``.

The layout is pinned in docs/contracts.md. Variable-length token features (CLIP per-token text
features, T5 hidden states) are stored trimmed to each caption's real length and concatenated,
with a lengths array: a 15-token caption costs 15 rows, not ``max_length`` rows, which is most of
the storage for T5-XXL (4096 wide). Everything is float16 and loadable with
``allow_pickle=False`` so a shard can never execute code on load.

Token ids (``clip_ids``, ``t5_ids``: int32, one row per token, trimmed and concatenated like the
features, so the same ``clip_lengths`` / ``t5_lengths`` delimit them) are what a model with its
own text encoder reads (GLIDE). They are optional: a shard written before they existed loads
with ``None`` there, and only a reader that needs them complains (:meth:`EmbeddingShard.ids_of`).
They are always written: 4 bytes per token beside the 1.5 KB of CLIP features per token.

Keys are the join between a download shard and its embeddings. The npz holds only the samples
that embedded cleanly, in tar order; :func:`align` is how a reader maps one onto the other and
turns any drift (a key the tar does not have, or keys out of order) into an error naming both.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline import store

ARRAYS = ("keys", "clip_image", "clip_text", "clip_tokens", "clip_lengths", "t5_tokens", "t5_lengths")
ID_ARRAYS = ("clip_ids", "t5_ids")  # optional (older shards lack them); aligned with *_lengths
COLUMN_PREFIX = "col__"


class EmbeddingFormatError(ValueError):
    """An embedding shard is malformed or does not line up with its download shard."""


@dataclass
class EmbeddingShard:
    keys: np.ndarray  # [N] <U
    clip_image: np.ndarray  # [N, Dc] f16
    clip_text: np.ndarray  # [N, Dc] f16
    clip_tokens: np.ndarray  # [sum Lc, Dct] f16
    clip_lengths: np.ndarray  # [N] i32
    t5_tokens: np.ndarray  # [sum Lt, Dt] f16
    t5_lengths: np.ndarray  # [N] i32
    # The download list's additional columns (download.save_additional_columns), one JSON-encoded
    # value per row as a string array: stored as ``col__<name>``, still loadable without pickles.
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    clip_ids: np.ndarray | None = None  # [sum Lc] i32: CLIP BPE ids up to and including EOT
    t5_ids: np.ndarray | None = None  # [sum Lt] i32: T5 SentencePiece ids up to and including EOS
    _clip_offsets: np.ndarray = field(init=False, repr=False)
    _t5_offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = np.asarray(self.keys, dtype=np.str_)
        self.clip_lengths = np.asarray(self.clip_lengths, dtype=np.int32)
        self.t5_lengths = np.asarray(self.t5_lengths, dtype=np.int32)
        n = len(self.keys)
        for name in ("clip_image", "clip_text", "clip_lengths", "t5_lengths"):
            if len(getattr(self, name)) != n:
                raise EmbeddingFormatError(f"{name} has {len(getattr(self, name))} rows, keys has {n}")
        self.columns = {k: np.asarray(v, dtype=np.str_) for k, v in (self.columns or {}).items()}
        for k, v in self.columns.items():
            if len(v) != n:
                raise EmbeddingFormatError(f"column {k} has {len(v)} rows, keys has {n}")
        if int(self.clip_lengths.sum()) != len(self.clip_tokens):
            raise EmbeddingFormatError(
                f"clip_tokens has {len(self.clip_tokens)} rows but clip_lengths sum to {int(self.clip_lengths.sum())}")
        if int(self.t5_lengths.sum()) != len(self.t5_tokens):
            raise EmbeddingFormatError(
                f"t5_tokens has {len(self.t5_tokens)} rows but t5_lengths sum to {int(self.t5_lengths.sum())}")
        for name, lengths in (("clip_ids", self.clip_lengths), ("t5_ids", self.t5_lengths)):
            ids = getattr(self, name)
            if ids is None:
                continue
            ids = np.asarray(ids, dtype=np.int32).reshape(-1)
            if len(ids) != int(lengths.sum()):
                raise EmbeddingFormatError(f"{name} has {len(ids)} rows but its lengths sum to {int(lengths.sum())}")
            setattr(self, name, ids)
        self._clip_offsets = np.concatenate([[0], np.cumsum(self.clip_lengths, dtype=np.int64)])
        self._t5_offsets = np.concatenate([[0], np.cumsum(self.t5_lengths, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dims(self) -> dict[str, int]:
        return {"clip_dim": int(self.clip_image.shape[-1]), "clip_token_dim": int(self.clip_tokens.shape[-1]),
                "t5_dim": int(self.t5_tokens.shape[-1])}

    def t5_of(self, i: int) -> np.ndarray:
        """T5 hidden states of sample ``i`` trimmed to its real length (a view)."""
        return self.t5_tokens[self._t5_offsets[i]:self._t5_offsets[i + 1]]

    def clip_tokens_of(self, i: int) -> np.ndarray:
        """CLIP per-token features of sample ``i`` up to and including EOT (a view)."""
        return self.clip_tokens[self._clip_offsets[i]:self._clip_offsets[i + 1]]

    def ids_of(self, tokenizer: str, i: int) -> np.ndarray:
        """Token ids of sample ``i`` (``tokenizer``: 'clip' or 't5'), trimmed like its features (a view)."""
        ids = {"clip": self.clip_ids, "t5": self.t5_ids}[tokenizer]
        if ids is None:
            raise EmbeddingFormatError(f"this embedding shard has no {tokenizer}_ids (written before the embed stage "
                                       "stored token ids): re-run the embed stage (t2i rerun RUN --from embed)")
        off = self._clip_offsets if tokenizer == "clip" else self._t5_offsets
        return ids[off[i]:off[i + 1]]

    def padded_t5(self, indices: Sequence[int], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([B, L, Dt] float16, [B, L] bool mask); L = max_len, or the longest selected when None."""
        return pad_sequences([self.t5_of(i) for i in indices], max_len, self.t5_tokens.shape[-1])

    def padded_clip_tokens(self, indices: Sequence[int], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return pad_sequences([self.clip_tokens_of(i) for i in indices], max_len, self.clip_tokens.shape[-1])

    @classmethod
    def concat(cls, parts: Sequence["EmbeddingShard"]) -> "EmbeddingShard":
        """Join embeddings of consecutive chunks of one shard (parts must be in shard order)."""
        if not parts:
            raise EmbeddingFormatError("cannot concatenate zero embedding parts")
        names = sorted({c for p in parts for c in p.columns})
        cols = {c: np.concatenate([p.columns.get(c, np.full(len(p), "null")) for p in parts]) for c in names}
        # ids only when every part has them: a shard never holds ids for some of its rows
        ids = {a: np.concatenate([getattr(p, a) for p in parts]) for a in ID_ARRAYS
               if all(getattr(p, a) is not None for p in parts)}
        return cls(**{a: np.concatenate([getattr(p, a) for p in parts]) for a in ARRAYS}, columns=cols, **ids)

    @classmethod
    def empty(cls, clip_dim: int, clip_token_dim: int, t5_dim: int) -> "EmbeddingShard":
        f = np.float16
        return cls(keys=np.zeros([0], np.str_), clip_image=np.zeros([0, clip_dim], f), clip_text=np.zeros([0, clip_dim], f),
                   clip_tokens=np.zeros([0, clip_token_dim], f), clip_lengths=np.zeros([0], np.int32),
                   t5_tokens=np.zeros([0, t5_dim], f), t5_lengths=np.zeros([0], np.int32),
                   clip_ids=np.zeros([0], np.int32), t5_ids=np.zeros([0], np.int32))


def pad_sequences(seqs: list[np.ndarray], max_len: int | None, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, L, dim] float16 + [N, L] bool mask: the one padding helper for trimmed token features."""
    # Sequences longer than max_len are cut (the caller chose the context size); mask marks real tokens.
    L = max_len if max_len is not None else max((len(s) for s in seqs), default=0)
    out = np.zeros([len(seqs), L, dim], dtype=np.float16)
    mask = np.zeros([len(seqs), L], dtype=bool)
    for b, s in enumerate(seqs):
        n = min(len(s), L)
        out[b, :n] = s[:n]
        mask[b, :n] = True
    return out, mask


def pad_ids(seqs: list[np.ndarray], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N, L] int64 token ids (0 past each end) + [N, L] bool mask; L >= 1 so an all-empty batch keeps
    its shape. The one padding helper for trimmed token ids (training batches and prompts alike)."""
    L = max_len if max_len is not None else max(1, max((len(s) for s in seqs), default=0))
    out = np.zeros([len(seqs), L], dtype=np.int64)
    mask = np.zeros([len(seqs), L], dtype=bool)
    for b, s in enumerate(seqs):
        n = min(len(s), L)
        out[b, :n] = s[:n]
        mask[b, :n] = True
    return out, mask


def to_npz_bytes(shard: EmbeddingShard) -> bytes:
    arrays = {a: getattr(shard, a) for a in ARRAYS}
    arrays.update({f"{COLUMN_PREFIX}{k}": v for k, v in shard.columns.items()})
    arrays.update({a: getattr(shard, a) for a in ID_ARRAYS if getattr(shard, a) is not None})
    for a in ("clip_image", "clip_text", "clip_tokens", "t5_tokens"):
        arrays[a] = np.ascontiguousarray(arrays[a], dtype=np.float16)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: fp16 features barely compress and load time matters
    return buf.getvalue()


def from_npz_bytes(data: bytes, where: str = "<bytes>") -> EmbeddingShard:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = [a for a in ARRAYS if a not in z.files]
            if missing:
                raise EmbeddingFormatError(f"embedding shard {where} lacks arrays {missing}; expected {list(ARRAYS)}")
            cols = {f[len(COLUMN_PREFIX):]: z[f] for f in z.files if f.startswith(COLUMN_PREFIX)}
            ids = {a: z[a] for a in ID_ARRAYS if a in z.files}
            return EmbeddingShard(**{a: z[a] for a in ARRAYS}, columns=cols, **ids)
    except EmbeddingFormatError as e:
        raise EmbeddingFormatError(f"{where}: {e}") if where not in str(e) else e
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # truncated or not a zip at all
        raise EmbeddingFormatError(f"embedding shard {where} is not a readable npz: {e}") from e


def write_embedding_shard(uri: str, shard: EmbeddingShard) -> int:
    """Write atomically; returns the number of bytes written."""
    data = to_npz_bytes(shard)
    store.write_bytes_atomic(uri, data)
    return len(data)


def read_embedding_shard(uri: str) -> EmbeddingShard:
    return from_npz_bytes(store.read_bytes(uri), where=uri)


def align(shard_keys: Sequence[str], embedding_keys: Sequence[str], shard_uri: str) -> np.ndarray:
    """Index into ``shard_keys`` of every embedding row.

    Samples in the tar but not in the npz were skipped at embed time (bad image, non-finite
    embedding) and are allowed. An npz key the tar lacks, or keys out of tar order, means the
    two files do not belong together: that is an error naming the shard and the key.
    """
    pos = {str(k): i for i, k in enumerate(shard_keys)}
    out = np.empty(len(embedding_keys), dtype=np.int64)
    prev = -1
    for j, k in enumerate(embedding_keys):
        k = str(k)
        i = pos.get(k)
        if i is None:
            raise EmbeddingFormatError(f"embedding key {k!r} (row {j}) is not in download shard {shard_uri}")
        if i <= prev:
            raise EmbeddingFormatError(
                f"embedding key {k!r} (row {j}) is out of order relative to download shard {shard_uri}")
        out[j] = prev = i
    return out

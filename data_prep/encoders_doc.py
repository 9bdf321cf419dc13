"""``encoders.json``: which encoders made a run's embeddings, their dims and their preprocess.

The embed stage writes it once (:func:`write_encoders_doc`); training, sampling, evaluation and
the held-out split read it back through :func:`read_encoders_doc`, its one reader, as an
:class:`EncodersDoc` checked on load.

What is required is what docs/contracts.md has always promised (``clip``, ``t5`` and the three
widths: every release's embed stage wrote them). The rest is optional: ``holdout`` came with
the held-out split, and a document written by hand or by a tool (benchmarks, tests of one
stage) may carry the widths and encoders alone. Unknown keys are kept (pipeline.configbase.StoredDoc).
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from data_prep.encoder_config import ClipConfig, T5Config
from pipeline import layout, store
from pipeline.configbase import StoredDoc


class EncodersDoc(StoredDoc):
    """The embed stage's account of its encoders. ``clip`` / ``t5`` hold the fields of
    :class:`ClipConfig` / :class:`T5Config` as plain dicts: reading the widths (training) must
    not validate encoder names (that may import open_clip); :meth:`clip_config` does, when needed."""

    remedy = ": re-run the embed stage with this release"

    clip: dict[str, Any]          # ClipConfig fields: {"model": absolute location, "pretrained"}
    t5: dict[str, Any]            # T5Config fields: {"model": absolute location, "max_length"}
    clip_dim: int = Field(gt=0)   # CLIP image/text embedding width
    clip_token_dim: int = Field(gt=0)  # CLIP per-token text feature width
    t5_dim: int = Field(gt=0)     # T5 hidden width
    identity: dict[str, Any] | None = None  # embed_identity(cfg): what every shard's done marker matches
    clip_preprocess: dict[str, Any] | None = None  # CLIP image preprocessing (CLIP scores of samples)
    shards: list[dict[str, Any]] | None = None  # [{"shard", "size"}] of the download shards embedded
    counts: dict[str, int] | None = None  # summed per-shard counts (n_total, n_embedded, ...)
    holdout: dict[str, Any] | None = None  # the held-out split (data_prep/holdout.py); absent: none

    @field_validator("clip", "t5")
    @classmethod
    def _names_a_model(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("model"), str) or not v["model"].strip():
            raise ValueError("must hold the encoder's 'model' (a name or a location)")
        return v

    @property
    def dims(self) -> dict[str, int]:
        """The conditioning widths (``cond_dims`` of every network trained on this embedding)."""
        return {"clip_dim": self.clip_dim, "clip_token_dim": self.clip_token_dim, "t5_dim": self.t5_dim}

    def clip_config(self) -> ClipConfig:
        return ClipConfig(**self.clip)

    def t5_config(self) -> T5Config:
        return T5Config(**self.t5)


def encoders_doc_uri(embed_uri: str) -> str:
    return store.join(embed_uri, layout.ENCODERS)


def write_encoders_doc(embed_uri: str, doc: EncodersDoc) -> str:
    uri = encoders_doc_uri(embed_uri)
    store.write_json(uri, doc.to_json())
    return uri


def read_encoders_doc(embed_uri: str) -> EncodersDoc | None:
    """The embed stage's ``encoders.json``, or None where there is none; pipeline.configbase.DocError
    (naming the file and the field) where there is one this release cannot use."""
    uri = encoders_doc_uri(embed_uri)
    return EncodersDoc.from_json(store.read_json(uri), uri) if store.exists(uri) else None

"""``encoders.json``: which encoders made a run's embeddings, their dims and their preprocess.

The embed stage writes it once; training, sampling, evaluation and the held-out split read it
back through :func:`read_encoders_doc`, its one reader.
"""
from __future__ import annotations

from typing import Any

from pipeline import layout, store


def encoders_doc_uri(embed_uri: str) -> str:
    return store.join(embed_uri, layout.ENCODERS)


def write_encoders_doc(embed_uri: str, doc: dict[str, Any]) -> str:
    uri = encoders_doc_uri(embed_uri)
    store.write_json(uri, doc)
    return uri


def read_encoders_doc(embed_uri: str) -> dict[str, Any] | None:
    """The embed stage's ``encoders.json`` (which encoders, their dims, preprocess), or None."""
    uri = encoders_doc_uri(embed_uri)
    return store.read_json(uri) if store.exists(uri) else None

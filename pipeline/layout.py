"""Where every artifact of a run lives in the store: one module, so no path is rebuilt by hand.

A run is a folder ``<store>/<run_id>/`` holding ``spec.yaml`` and one folder per stage. A stage
folder holds *attempts*, never outputs directly (docs/design.md, "Attempts")::

    <run>/<stage>/<attempt>/...            one attempt's outputs; <attempt> = fingerprint[:12]
    <run>/<stage>/<attempt>/_MANIFEST.json  written last: the attempt is complete iff it exists
    <run>/<stage>/<fp12>-2/...              an explicit ``t2i rerun`` of the same config
    <run>/<stage>/_CURRENT.json             which attempt the last finished run used

A stage whose definition changes (its fingerprint) starts a new attempt *beside* the old one,
so nothing trained is ever deleted implicitly; going back to an old config finds its attempt
again. ``t2i gc`` is the only thing that removes attempts.

Inside an attempt, the artifact names below are the only spelling of each path.
"""
from __future__ import annotations

import re

from pipeline import store

SPEC = "spec.yaml"
CURRENT = "_CURRENT.json"
ATTEMPT_PREFIX_LEN = 12
_ATTEMPT = re.compile(r"^([0-9a-f]{12})(?:-(\d+))?$")

# Artifact names inside an attempt.
SHARDS = "shards"                 # download: NNNNN.tar (+ stats, parquet); embed: NNNNN.npz
ENCODERS = "encoders.json"        # embed: which encoders made the embeddings
FINAL = "final"                   # training: final/step_NNNNNNNN/{model.safetensors, config.json}
FINAL_WEIGHTS = "model.safetensors"
FINAL_CONFIG = "config.json"
CHECKPOINTS = "checkpoints"       # training: checkpoints/step_NNNNNNNN/...
METRICS = "metrics.jsonl"         # training: one JSON row per logged step
TENSORBOARD = "tb"


def run_spec_uri(run_uri: str) -> str:
    return store.join(run_uri, SPEC)


def stage_root(run_uri: str, stage: str) -> str:
    return store.join(run_uri, stage)


def attempt_name(fingerprint: str, number: int = 1) -> str:
    """``fp[:12]`` for the first attempt of a config, ``fp[:12]-N`` for the N-th (``t2i rerun``)."""
    base = fingerprint[:ATTEMPT_PREFIX_LEN]
    return base if number <= 1 else f"{base}-{number}"


def parse_attempt(name: str) -> tuple[str, int] | None:
    """(fingerprint prefix, number) of an attempt folder name, or None for anything else."""
    m = _ATTEMPT.match(name.rstrip("/").rsplit("/", 1)[-1])
    if not m:
        return None
    return m.group(1), int(m.group(2) or 1)


def attempt_uri(run_uri: str, stage: str, name: str) -> str:
    return store.join(run_uri, stage, name)


def list_attempts(run_uri: str, stage: str) -> list[tuple[str, str]]:
    """[(attempt name, uri)] of every attempt folder of a stage, in name order."""
    out = []
    for uri in store.listdir(stage_root(run_uri, stage)):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if parse_attempt(name) is not None:
            out.append((name, store.join(run_uri, stage, name)))
    return sorted(out)


def attempts_of(run_uri: str, stage: str, fingerprint: str) -> list[tuple[int, str]]:
    """[(number, uri)] of the attempts made for this fingerprint, lowest number first."""
    prefix = fingerprint[:ATTEMPT_PREFIX_LEN]
    found = []
    for name, uri in list_attempts(run_uri, stage):
        parsed = parse_attempt(name)
        if parsed and parsed[0] == prefix:
            found.append((parsed[1], uri))
    return sorted(found)


def current_attempt_uri(run_uri: str, stage: str, fingerprint: str) -> str:
    """The attempt a run with this fingerprint uses: the newest one made for it, else the first."""
    found = attempts_of(run_uri, stage, fingerprint)
    if found:
        return found[-1][1]
    return attempt_uri(run_uri, stage, attempt_name(fingerprint))


def next_attempt_uri(run_uri: str, stage: str, fingerprint: str) -> str:
    """A fresh attempt for this fingerprint (``t2i rerun``): the old ones stay until ``t2i gc``."""
    found = attempts_of(run_uri, stage, fingerprint)
    number = found[-1][0] + 1 if found else 1
    return attempt_uri(run_uri, stage, attempt_name(fingerprint, number))


def write_current(run_uri: str, stage: str, attempt: str) -> None:
    """Point tools that have no spec at hand (``t2i sample``, ``t2i export``) at a finished attempt."""
    name = attempt.rstrip("/").rsplit("/", 1)[-1]
    store.write_json(store.join(stage_root(run_uri, stage), CURRENT), {"attempt": name})


def read_current(run_uri: str, stage: str) -> str | None:
    """URI of the attempt the last finished run of this stage used, or None."""
    uri = store.join(stage_root(run_uri, stage), CURRENT)
    if not store.exists(uri):
        return None
    try:
        name = store.read_json(uri).get("attempt")
    except (ValueError, store.StoreError, AttributeError):
        return None
    return attempt_uri(run_uri, stage, name) if name and parse_attempt(name) else None


def finished_stage_dir(run_uri: str, stage: str) -> str | None:
    """The folder holding a stage's finished outputs for tools without a spec: the attempt
    ``_CURRENT.json`` names, else ``<run>/<stage>`` itself when it holds outputs directly (a run
    laid out by hand or by an older release), else None."""
    uri = read_current(run_uri, stage)
    if uri is not None:
        return uri
    flat = stage_root(run_uri, stage)
    if any(store.exists(store.join(flat, name)) for name in (FINAL, ENCODERS, SHARDS)):
        return flat
    return None


def final_dir(attempt: str, step: int) -> str:
    """Final weights of a training attempt at ``step``: each extension writes a new folder, so
    the weights an earlier finished run wrote are never overwritten."""
    return store.join(attempt, FINAL, f"step_{step:08d}")

"""The registry of trained models, built from the model modules themselves.

Each model module (stages/models/<model>.py) declares ``MODEL = ModelDef(...)``
(stages/models/model_def.py): its ``StageSpec`` (training: what data it needs and how a batch
becomes network kwargs, beside ``sample_cond``, how prompt features and the previous model's
output become the same kwargs at sampling), its config class and ``run``, its CFG null keys and
default guidance, whether it is an upsampler, its place in each cascade, CLIP guidance and its MFU
target. The stage graph, the spec's cross-stage checks, sampling, evaluation, the report and the
benchmarks read this registry; nothing else names a model's facts.

Adding a model = its module + its name in ``MODELS`` below (docs/design.md, "Adding a model"), or,
for a model kept outside this repository, its module named in ``T2I_MODELS``.
Importing this package imports no torch (the model modules import it only when they train).
"""
from __future__ import annotations

import importlib
import os

from stages.models import decoder, glide, imagen_base, noised_clip, prior, superres
from stages.models.model_def import ModelDef

def _plugins() -> tuple[ModelDef, ...]:
    """Models declared outside this package, named in ``T2I_MODELS`` (comma-separated module names,
    each declaring ``MODEL`` or ``MODELS``): a team's own model, or a test's toy model, joins the
    registry through the same path as the shipped ones. Read once, at import, so every process
    of a run (the driver, Ray workers, the download child) sees the same registry."""
    found = []
    for name in filter(None, (n.strip() for n in os.environ.get("T2I_MODELS", "").split(","))):
        mod = importlib.import_module(name)
        declared = getattr(mod, "MODELS", None) or (getattr(mod, "MODEL", None),)
        if not all(isinstance(m, ModelDef) for m in declared):
            raise ImportError(f"T2I_MODELS: module {name} declares no MODEL = ModelDef(...) (or MODELS)")
        found += declared
    return tuple(found)


def _checked(models: tuple[ModelDef, ...]) -> tuple[ModelDef, ...]:
    for i, m in enumerate(models):
        for other in models[:i]:
            if other.role == m.role or other.stage == m.stage:
                raise ValueError(f"two models claim role {m.role!r} or stage {m.stage!r} ({other.module}, {m.module})")
    return models


def _cascades() -> dict[str, tuple[str, ...]]:
    """Which models a cascade runs, in order (an upsampler's input is the model before it), from
    each model's ``cascades`` places; cascades in the order their first model is registered."""
    places: dict[str, dict[int, str]] = {}
    for m in MODELS:
        for cascade, place in m.cascades.items():
            taken = places.setdefault(cascade, {})
            if place in taken:
                raise ValueError(f"cascade {cascade!r}: {m.role} and {taken[place]} both claim place {place}")
            taken[place] = m.role
    out = {}
    for cascade, taken in places.items():
        if sorted(taken) != list(range(len(taken))):
            raise ValueError(f"cascade {cascade!r} has gaps in its places: {dict(sorted(taken.items()))}")
        out[cascade] = tuple(taken[i] for i in range(len(taken)))
    return out


def _derived():
    cascades = _cascades()
    roles = tuple(m.role for m in MODELS)
    # The models a cascade can run (denoisers); the others (the noised CLIP) only help sampling.
    cascade_roles = tuple(r for r in roles if any(r in rs for rs in cascades.values()))
    return cascades, roles, cascade_roles, tuple(m.stage for m in MODELS)


MODELS: tuple[ModelDef, ...] = _checked((prior.MODEL, decoder.MODEL, imagen_base.MODEL, superres.SR256,
                                         superres.SR1024, glide.MODEL, noised_clip.MODEL, *_plugins()))
CASCADES, ROLES, CASCADE_ROLES, TRAIN_STAGES = _derived()


def model(role: str) -> ModelDef:
    for m in MODELS:
        if m.role == role:
            return m
    raise KeyError(f"unknown model role {role!r}; roles: {', '.join(ROLES)}")


def by_stage(stage: str) -> ModelDef:
    for m in MODELS:
        if m.stage == stage:
            return m
    raise KeyError(f"unknown training stage {stage!r}; stages: {', '.join(TRAIN_STAGES)}")


def stage_of(role: str) -> str:
    return model(role).stage


def chained_pairs() -> list[tuple[str, str]]:
    """(lower, upper) model pairs whose sizes must chain: each upsampler after the one before it."""
    pairs = []
    for roles in CASCADES.values():
        pairs += [(lo, hi) for lo, hi in zip(roles, roles[1:]) if model(hi).upsampler]
    return sorted(set(pairs), key=pairs.index)

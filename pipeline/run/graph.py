"""The stage graph: which stages exist, what each depends on, and where its code lives.

download -> embed -> {one training stage per model of stages/models/__init__.py} -> sample, evaluate

The training stages do not depend on each other (SR trains on real low-res images), so the
runner can run them side by side. A stage whose module is not part of this installation is
simply absent from the graph.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache

from stages.models import MODELS, TRAIN_STAGES  # the registry of trained models: pure data, no torch


@dataclass(frozen=True)
class StageDef:
    name: str
    module: str           # where ``run(cfg, ctx)`` and the config class live
    config_class: str     # attribute name of the config class in ``module``
    deps: tuple[str, ...]
    description: str
    required: bool = False
    code_version: str = "1"  # bump when a stage's outputs change meaning: it re-runs the stage
    # Where the config class lives when not in ``module``: a torch-free module, so reading a spec
    # (t2i status, validation) never imports the stage's heavy code.
    config_module: str | None = None

    def load(self):
        mod = importlib.import_module(self.module)
        return mod


def _training_stages() -> tuple[StageDef, ...]:
    return tuple(StageDef(m.stage, m.module, m.config_class, ("embed",) if not m.needs_images else ("download", "embed"),
                          m.description) for m in MODELS)


def _all() -> tuple[StageDef, ...]:
    """Every stage, in topological order."""
    return (
        StageDef("download", "data_prep.download.stage", "DownloadConfig", (),
                 "img2dataset download of a URL+caption list into webdataset shards.", required=True,
                 config_module="data_prep.download.config"),
        StageDef("embed", "data_prep.embed.stage", "EmbedConfig", ("download",),
                 "CLIP image/text and T5 text embeddings of every downloaded sample.",
                 config_module="data_prep.embed.config"),
        *_training_stages(),
        StageDef("sample", "stages.sampling.cascade", "SampleConfig", ("embed", *TRAIN_STAGES),
                 "Samples the prompts through the trained cascades and writes a report.",
                 config_module="stages.sampling.config"),
        StageDef("evaluate", "stages.evaluate", "EvaluateConfig", ("download", "embed", *TRAIN_STAGES),
                 "Evaluates the trained models on the held-out split and the prompt suite: FID, CLIP score, "
                 "prior similarity, validation losses."),
    )


def _available(stage: StageDef) -> bool:
    where = stage.config_module or stage.module
    if importlib.util.find_spec(where) is None:
        return False
    return hasattr(importlib.import_module(where), stage.config_class)


@lru_cache(maxsize=1)
def available_stages() -> tuple[StageDef, ...]:
    return tuple(s for s in _all() if _available(s))


class _Stages:
    """Lazy view of the available stages (importing them pulls in torch)."""

    def __iter__(self):
        return iter(available_stages())

    def __len__(self):
        return len(available_stages())


STAGES = _Stages()


def stage_config_classes() -> dict[str, type]:
    return {s.name: getattr(importlib.import_module(s.config_module or s.module), s.config_class)
            for s in available_stages()}


def get_stage(name: str) -> StageDef:
    for s in available_stages():
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in available_stages())}")


def enabled_stages(spec) -> list[StageDef]:
    """Stages the spec configures, in topological order (``_all()`` is already topological)."""
    return [s for s in available_stages() if getattr(spec, s.name, None) is not None]


def deps_in_spec(stage: StageDef, spec) -> list[str]:
    """Dependencies that the spec actually runs (sample needs only the models it has)."""
    enabled = {s.name for s in enabled_stages(spec)}
    return [d for d in stage.deps if d in enabled]


def downstream(name: str, spec) -> list[str]:
    """``name`` and every enabled stage that depends on it, transitively, in order."""
    out = [name]
    for s in enabled_stages(spec):
        if s.name not in out and any(d in out for d in deps_in_spec(s, spec)):
            out.append(s.name)
    return out

"""What the runner hands a stage, and what the stage hands back.

Stages are plain functions ``run(cfg, ctx) -> StageResult`` so they run with or without Ray
(docs/design.md, invariant 2): where the work goes is the executor's business
(pipeline/executors.py). The runner turns a StageResult into the stage's ``_MANIFEST.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.executors import Executor, LocalExecutor


@dataclass
class StageContext:
    run_uri: str
    out_uri: str
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    executor: Executor = field(default_factory=LocalExecutor)
    progress: Callable[[str], None] = lambda msg: None
    # This attempt's manifest from an earlier finish, when the stage is being extended (more
    # steps): what that run produced must be kept (e.g. its checkpoints are never pruned).
    previous: dict[str, Any] | None = None

    def report(self, **fields: Any) -> None:
        """Live figures for the driver's progress line (pipeline/progress.py); a plain callable
        ``progress`` (tests) ignores them."""
        update = getattr(self.progress, "update", None)
        if update is not None:
            update(**fields)

    @property
    def ray_enabled(self) -> bool:
        return self.executor.kind == "ray"

    def input_uri(self, stage: str) -> str:
        """Attempt folder of an upstream stage (from its manifest)."""
        return self._input(stage)["out_uri"]

    def input_output(self, stage: str, name: str) -> str:
        """One named output of an upstream stage, as its manifest's ``outputs`` record it."""
        outputs = self._input(stage).get("outputs") or {}
        if name not in outputs:
            raise KeyError(f"stage {stage}'s manifest has no output {name!r}; it has {sorted(outputs)}")
        return outputs[name]

    def _input(self, stage: str) -> dict[str, Any]:
        if stage not in self.inputs:
            raise KeyError(f"stage input {stage!r} missing; have {sorted(self.inputs)}")
        return self.inputs[stage]


@dataclass
class StageResult:
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


class StageFailed(RuntimeError):
    """A stage stopped on purpose with a message meant for the user (no traceback needed)."""

"""What the runner hands a stage, and what the stage hands back.

Stages are plain functions ``run(cfg, ctx) -> StageResult`` so they run with or without Ray
(DESIGN invariant 2). The runner turns a StageResult into the stage's ``_MANIFEST.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class StageContext:
    run_uri: str
    out_uri: str
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ray_enabled: bool = False
    progress: Callable[[str], None] = lambda msg: None
    # This attempt's manifest from an earlier finish, when the stage is being extended (more
    # steps): what that run produced must be kept (e.g. its checkpoints are never pruned).
    previous: dict[str, Any] | None = None

    def input_uri(self, stage: str) -> str:
        """Output URI of an upstream stage (from its manifest)."""
        if stage not in self.inputs:
            raise KeyError(f"stage input {stage!r} missing; have {sorted(self.inputs)}")
        return self.inputs[stage]["out_uri"]


@dataclass
class StageResult:
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


class StageFailed(RuntimeError):
    """A stage stopped on purpose with a message meant for the user (no traceback needed)."""

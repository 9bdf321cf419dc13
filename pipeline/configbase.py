"""Base class for every typed config in the run spec.

Configs are pydantic models so that a bad spec fails *before* any Ray worker starts, with an
error that names the field path (``train_base.batch_size``) and what is allowed.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TaskPlacement(StrictModel):
    """Mixin for stages that run as one Ray task (download, embed): where that task may run.

    ``resources`` pins the task to nodes that have them (``{"cpu_worker": 0.001}``: a tiny share, so many tasks fit one node, or
    ``{"accelerator_type:H100": 0.001}``); it changes where work runs, never what it produces, so it
    is left out of the stage fingerprint.
    """

    resources: dict[str, float] = Field(default_factory=dict, description=(
        "Custom Ray resources the stage's task requires; pins it to nodes that offer them."))

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for k, amount in v.items():
            if k in ("CPU", "GPU", "memory"):
                raise ValueError(f"resources[{k!r}]: CPU/GPU/memory are set by the stage's own fields, not here")
            if amount < 0:
                raise ValueError(f"resources[{k!r}] must be >= 0 (got {amount})")
        return v

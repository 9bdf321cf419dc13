"""Base class for every typed config in the run spec.

Configs are pydantic models so that a bad spec fails *before* any Ray worker starts, with an
error that names the field path (``train_base.batch_size``) and what is allowed.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

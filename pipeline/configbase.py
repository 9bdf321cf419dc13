"""Base class for every typed config in the run spec.

Configs are pydantic models so that a bad spec fails *before* any Ray worker starts, with an
error that names the field path (``train_base.batch_size``) and what is allowed. The documents
stages hand each other through the store (:class:`StoredDoc`) are checked the same way on load.
"""
from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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


class DocError(ValueError):
    """A stored document (``encoders.json``, a final ``config.json``) that its reader cannot use."""


class StoredDoc(BaseModel):
    """Base of a JSON document one stage writes and later stages read back (``encoders.json``,
    ``final/step_N/config.json``): one writer (:meth:`to_json`), one reader (:meth:`from_json`),
    checked on load like levanter's cache ledger checks its metadata.

    Unlike a spec config, unknown keys are *kept*, not refused: a file written by a newer release
    (one more key) must still load in this one, and a document read and written back (``t2i eval``
    copies a final config with another step) keeps them. Strict types: a JSON string where a number
    belongs is an error, not a guess. Optional fields are the ones older releases did not write.
    """

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, protected_namespaces=())
    remedy: ClassVar[str] = ""  # what to do about a bad file, appended to every error

    def to_json(self) -> dict[str, Any]:
        """The document as written: the fields given (a field an older file lacked stays absent,
        so reading and writing back changes nothing) plus the unknown keys it carried."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def from_json(cls, doc: Any, uri: str) -> Self:
        """The checked document; :class:`DocError` naming ``uri`` and every bad field otherwise."""
        if not isinstance(doc, dict):
            raise DocError(f"{uri}: expected a JSON object, got {type(doc).__name__}{cls.remedy}")
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                name = ".".join(str(p) for p in err["loc"])
                if err["type"] == "missing":
                    problems.append(f"required field {name!r} is missing")
                else:
                    got = repr(err.get("input"))
                    problems.append(f"field {name!r}: {err['msg']} (got {got[:80] + '...' if len(got) > 80 else got})")
            raise DocError(f"{uri}: {'; '.join(problems)}{cls.remedy}") from None

"""Extension points of the training loop (``Trainer(after_step=...)``), and the one shipped hook.

A hook is any picklable callable ``hook(step, start_step)`` called after each step (and after
that step's checkpoint, if one was due); it travels to Ray workers with the loop. A hook with a
``record_batch(rank, step, batch)`` method also sees every micro-batch the loop takes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class InjectFaultAfterStep:
    """Fault injection for resilience tests: raise right after ``step`` (its checkpoint written),
    like a killed worker — unless this attempt resumed at or after it, so a restarted attempt
    gets past the fault and finishes."""

    step: int

    def __call__(self, step: int, start_step: int) -> None:
        if step == self.step > start_step:
            raise RuntimeError(f"injected fault after step {step}")


@dataclass(frozen=True)
class RecordTrainedKeys:
    """An audit of the data: every sample key each rank trains on, with its epoch and step, one
    JSON line per micro-batch in ``<folder>/rank<r>.jsonl`` (a local folder every rank can
    write). With it a resumed or resized run can be checked to train each sample of an epoch
    exactly once."""

    folder: str

    def __call__(self, step: int, start_step: int) -> None:
        pass

    def record_batch(self, rank: int, step: int, batch: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "keys": list(batch["keys"]), "epochs": list(batch["epochs"])}) + "\n")

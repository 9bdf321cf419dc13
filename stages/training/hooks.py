"""Extension points of the training loop (``Trainer(after_step=...)``), and the one shipped hook.

A hook is any picklable callable ``hook(step, start_step)`` called after each step (and after
that step's checkpoint, if one was due); it travels to Ray workers with the loop.
"""
from __future__ import annotations

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

"""FLOPs of a training step and the model FLOPs utilisation (MFU) they imply.

FLOPs are *counted*, not estimated from a formula: ``torch.utils.flop_counter.FlopCounterMode``
sees every matmul, convolution and attention kernel the step dispatches (forward and backward),
so UNet convolutions, cross-attention over padded text and the prior's masked attention are all
counted as they actually run. Elementwise ops (norms, activations, the optimizer) are not
counted, which is the usual MFU convention (PaLM, nanoGPT): MFU = useful matmul FLOPs / time /
peak dense tensor-core rate.

Peak rates come from a table keyed by the CUDA device name (dense, no sparsity). Unknown GPUs
and the CPU give ``None``: the bench then reports achieved FLOP/s and no MFU.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense peak TFLOP/s per precision (vendor datasheets, SXM parts). fp32 means TF32 tensor cores
# only when torch allows TF32 matmuls; otherwise the plain fp32 rate applies (see peak_flops).
_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    # matched in order against the lower-cased device name: the more specific names first
    ("h200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("h100 pcie", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("h100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("gh200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("b200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    ("a100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("l40s", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("l4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("a10g", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("a10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("v100", {"bf16": 0.0, "tf32": 0.0, "fp32": 15.7}),  # no bf16 tensor cores
]


def peak_flops(device: torch.device | str, precision: str) -> float | None:
    """Dense peak FLOP/s of ``device`` for ``precision`` ('bf16' | 'fp32'); None if unknown or CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    return peak_flops_by_name(name, precision)


def peak_flops_by_name(name: str, precision: str) -> float | None:
    """The table lookup behind :func:`peak_flops` (separate so it is testable without a GPU)."""
    name = name.lower()
    key = precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    for pattern, rates in _PEAK_TFLOPS:
        if pattern in name:
            rate = rates.get(key)
            return rate * 1e12 if rate else None
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs dispatched while running ``fn()`` (forward and backward, if fn does both)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Achieved / peak FLOP/s, or None without a known peak."""
    if not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak

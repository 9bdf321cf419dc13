"""FLOPs of a training step and the model FLOPs utilisation (MFU) they imply.

FLOPs are *counted*, not estimated from a formula: ``torch.utils.flop_counter.FlopCounterMode``
sees every matmul, convolution and attention kernel the step dispatches (forward and backward),
so UNet convolutions, cross-attention over padded text and the prior's masked attention are all
counted as they actually run. Elementwise ops (norms, activations, the optimizer) are not
counted, which is the usual MFU convention (PaLM, nanoGPT): MFU = useful matmul FLOPs / time /
peak dense tensor-core rate.

Attention is counted the same whichever SDPA kernel runs (``ATTENTION_FLOP_FORMULAS``): torch
has no formula for the fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``, which
the nets use on CPU; it would count 0), and its CUDA backward formulas count the recomputed
scores of flash / memory-efficient / cuDNN backward (5 matmuls) where the math kernel's
autograd dispatches 4. We count model FLOPs for every kernel: forward = QK^T + PV, backward =
the 4 matmuls of their gradients (what the math kernel counts), no recomputation. Masks and
causality are not subtracted (the math kernel computes the masked entries too).

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


def attention_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of SDPA on [B, Hq, Lq, D] x [B, Hkv, S, D] x [B, Hkv, S, Dv] (GQA: Hq heads)."""
    b, h, lq, d = query_shape
    s, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * s * (d + dv)


def attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                             out_shape=None, **kwargs) -> int:
    """dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: twice the forward (no recompute)."""
    return 2 * attention_forward_flops(query_shape, key_shape, value_shape)


def _attention_formulas() -> dict:
    """{op packet: formula} for the fused SDPA kernels this torch build has (the CUDA ones
    are meta-dispatchable, so their counting is testable on a CPU-only host)."""
    kernels = ("_scaled_dot_product_flash_attention_for_cpu",   # CPU (flash-style, fused)
               "_scaled_dot_product_flash_attention",           # CUDA flash
               "_scaled_dot_product_efficient_attention",       # CUDA memory-efficient
               "_scaled_dot_product_cudnn_attention",           # CUDA cuDNN
               "_scaled_dot_product_fused_attention_overrideable")  # XPU / out-of-tree backends
    mapping = {}
    for name in kernels:
        # every backward op takes (grad_out, query, key, value, ...) first
        for op, formula in ((name, attention_forward_flops), (name + "_backward", attention_backward_flops)):
            if hasattr(torch.ops.aten, op):    # older/newer torch builds may lack one
                mapping[getattr(torch.ops.aten, op)] = formula
    return mapping


ATTENTION_FLOP_FORMULAS = _attention_formulas()


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts the fused attention kernels like the math kernel (see
    the module docstring). Passed as ``custom_mapping``: torch's global registry is left alone."""
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS)


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs dispatched while running ``fn()`` (forward and backward, if fn does both)."""
    counter = flop_counter()
    with counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Achieved / peak FLOP/s, or None without a known peak."""
    if not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak

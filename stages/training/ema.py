"""Exponential moving average of the weights, correct under every ZeRO stage.

Under ZeRO 0-2 every rank holds the whole (bf16 or fp32) parameters, so the EMA is a full fp32
copy, identical on all ranks. Under ZeRO-3 a rank holds only its partition of each parameter
(``p.ds_tensor``), so the EMA is kept over that partition only: memory per rank shrinks with the
world size exactly like the weights do. The update is two ``torch._foreach_*`` calls over
tensor lists built once, i.e. no per-parameter Python work in the training step.

At the end :meth:`EMA.consolidated_state_dict` rebuilds full fp32 tensors. Under ZeRO-3 it
all-gathers the fp32 EMA partitions itself (rank r holds elements ``[r*n, (r+1)*n)`` of the
flattened, end-padded parameter — DeepSpeed's partition layout) instead of swapping them into
the live partitions and using ``deepspeed.zero.GatheredParameters``: that swap would round the
EMA to the bf16 parameter dtype, and GatheredParameters does not re-gather "persistent" small
parameters, which would silently return live weights instead of the EMA for those.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in module.named_parameters()]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.zero3 = any(_is_zero3_param(p) for p in self.params)
        # The tensors the optimizer actually updates on this rank.
        self.sources = [p.ds_tensor if self.zero3 else p for p in self.params]
        with torch.no_grad():
            self.shadow = [s.detach().float().clone() for s in self.sources]
        self._same_dtype = all(s.dtype == torch.float32 for s in self.sources)

    def decay_at(self, step: int) -> float:
        """Warm the decay up so that short runs are not dominated by the initial weights."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.decay_at(step)
        # The source tensors are the same Python objects across steps even when ZeRO re-points
        # their storage (``p.data = flat_buffer_view``), so the lists built in __init__ stay valid.
        if self._same_dtype:
            torch._foreach_lerp_(self.shadow, self.sources, 1.0 - d)
        else:  # bf16 params into fp32 shadows: lerp wants equal dtypes, mul+add does not
            torch._foreach_mul_(self.shadow, d)
            torch._foreach_add_(self.shadow, self.sources, alpha=1.0 - d)

    # -- checkpoint state (this rank's part) -------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for n, s in zip(self.names, self.shadow):
            t = tensors[n]
            if t.shape != s.shape:
                raise ValueError(f"EMA state for {n!r} has shape {tuple(t.shape)}, expected {tuple(s.shape)} "
                                 "(was the checkpoint written with another world size or ZeRO stage?)")
            s.copy_(t)

    @torch.no_grad()
    def load_resharded(self, parts: list[dict[str, torch.Tensor]]) -> None:
        """ZeRO-3 after a change of world size: ``parts[r]`` is old rank r's partition of every
        parameter; this rank takes its own slice of each under the new layout (the same flattened,
        end-padded layout as :meth:`consolidated_state_dict`)."""
        if not self.zero3:
            raise ValueError("a partitioned EMA can only be re-sliced into a ZeRO-3 run")
        rank = dist.get_rank() if dist.is_initialized() else 0
        for n, p, s in zip(self.names, self.params, self.shadow):
            if any(n not in part for part in parts):
                raise ValueError(f"EMA state lacks parameter {n!r} in some rank's partition")
            full = torch.cat([part[n].reshape(-1) for part in parts])[: p.ds_numel]
            size = s.numel()  # this rank's partition, end padding included
            mine = full[rank * size:(rank + 1) * size]
            s.zero_()  # the padding past the parameter's end stays zero
            s.view(-1)[: mine.numel()].copy_(mine)

    # -- final export ------------------------------------------------------------------------
    @torch.no_grad()
    def consolidated_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights (+ the module's buffers) on CPU, keyed like ``module.state_dict()``.

        A collective under ZeRO-3: every rank must call it; every rank gets the result.
        """
        out: dict[str, torch.Tensor] = {}
        if self.zero3:
            world = dist.get_world_size()
            for n, p, s in zip(self.names, self.params, self.shadow):
                parts = [torch.empty_like(s) for _ in range(world)]
                dist.all_gather(parts, s)
                out[n] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        else:
            for n, s in zip(self.names, self.shadow):
                out[n] = s.detach().cpu().clone()
        keys = set(module.state_dict().keys())  # persistent buffers only, like state_dict()
        for n, b in module.named_buffers():
            if n in keys:
                out[n] = b.detach().float().cpu().clone() if b.is_floating_point() else b.detach().cpu().clone()
        return out

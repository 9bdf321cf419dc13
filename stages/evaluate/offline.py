"""``t2i eval RUN --checkpoint STEP``: the weights of one step of every training stage, laid out as
a training attempt's ``final/step_N/`` so sampling (stages/sampling/cascade.py) loads them unchanged.

A step that finished (``final/step_N/``) is copied as it is; a checkpoint's EMA
(``checkpoints/step_N/ema.safetensors``, ZeRO 0-2) is written into the network the stage's
final config describes (EMA tensors are the parameters; buffers come from the network's own
initialisation, as at the start of training). ZeRO-3 checkpoints keep the EMA partitioned per
rank: evaluate a finished step of those instead.
"""
from __future__ import annotations

import json
from typing import Any

from pipeline import layout, store
from pipeline.context import StageFailed
from stages.models import TRAIN_STAGES
from stages.nets.flavors import build_network
from stages.training.final_weights import FinalConfig, latest_final, load_final, write_final

WEIGHTS_DIR = layout.EVAL_WEIGHTS


def checkpoint_val_loss(attempt: str, step: int) -> float | None:
    """The validation loss a training attempt logged at ``step`` (metrics.jsonl), if it did."""
    uri = store.join(attempt, layout.METRICS)
    if not store.exists(uri):
        return None
    for line in store.read_bytes(uri).decode().splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("step") == step and "val_loss" in row:
                return float(row["val_loss"])
    return None


def checkpoint_inputs(inputs: dict[str, dict[str, Any]], step: int, out_uri: str) -> tuple[dict[str, str], dict]:
    """(stage -> a folder holding ``final/step_N/`` of that stage at ``step``, the inputs with each
    training manifest's ``val_loss`` replaced by the one logged at ``step``)."""
    uris, new_inputs = {}, dict(inputs)
    for st in TRAIN_STAGES:
        if st not in inputs:
            continue
        attempt = inputs[st]["out_uri"]
        view = store.join(out_uri, WEIGHTS_DIR, st)
        _materialise(attempt, step, view, st)
        uris[st] = view
        metrics = {k: v for k, v in (inputs[st].get("metrics") or {}).items() if k != "val_loss"}
        v = checkpoint_val_loss(attempt, step)
        if v is not None:
            metrics["val_loss"] = v
        new_inputs[st] = {**inputs[st], "metrics": metrics}
    return uris, new_inputs


def _materialise(attempt: str, step: int, view: str, stage: str, fallback: FinalConfig | None = None) -> None:
    """``fallback``: the final config to use while the stage has never finished (no final/ yet)."""
    from safetensors.torch import load as st_load

    target = layout.final_dir(view, step)
    if store.exists(store.join(target, layout.FINAL_CONFIG)):
        return
    final = layout.final_dir(attempt, step)
    if store.exists(store.join(final, layout.FINAL_CONFIG)):
        store.write_bytes_atomic(store.join(target, layout.FINAL_WEIGHTS),
                                 store.read_bytes(store.join(final, layout.FINAL_WEIGHTS)))
        store.write_bytes_atomic(store.join(target, layout.FINAL_CONFIG),
                                 store.read_bytes(store.join(final, layout.FINAL_CONFIG)))
        return
    ckpt = layout.checkpoint_dir(attempt, step)
    if not store.exists(store.join(ckpt, layout.CHECKPOINT_COMPLETE)):
        steps = sorted(s for s in map(layout.step_of, store.listdir(store.join(attempt, layout.CHECKPOINTS)))
                       if s is not None)
        raise StageFailed(f"{stage} has no complete checkpoint or final weights at step {step} under {attempt}; "
                          f"checkpoints: {steps or 'none'}")
    ema_uri = store.join(ckpt, layout.CHECKPOINT_EMA)
    if not store.exists(ema_uri):
        raise StageFailed(f"{stage} step {step}: the checkpoint holds no unpartitioned EMA (ZeRO-3 keeps one "
                          f"per rank); evaluate a finished step (final/step_N) of this stage instead")
    last = latest_final(attempt)
    if last is not None:  # the network this stage trains, as its last final config describes it
        net, config = load_final(last)
    elif fallback is not None:
        config = fallback
        net = build_network(config.role, config.flavor, config.cond_dims)
    else:
        raise StageFailed(f"{stage} has not finished yet under {attempt}: its network config is unknown")
    state = net.state_dict()
    state.update(st_load(store.read_bytes(ema_uri)))
    net.load_state_dict(state)
    write_final(view, {k: v.detach().cpu() for k, v in net.state_dict().items()}, config.model_copy(update={"step": step}))

"""A training stage's final output: ``final/model.safetensors`` + ``final/config.json``.

Written by the training loop, read by sampling and by anyone who wants the weights without
DeepSpeed. The config is written after the weights, so its presence means they are whole.
Weights are safetensors: nothing from the store is unpickled.
"""
from __future__ import annotations

import torch

from pipeline import store


def write_final(out_uri: str, weights: dict[str, torch.Tensor], config: dict) -> None:
    """final/model.safetensors, then final/config.json (its presence means the weights are whole)."""
    from safetensors.torch import save as st_save

    body = st_save({k: v.contiguous() for k, v in weights.items()})
    store.write_bytes_atomic(store.join(out_uri, "final", "model.safetensors"), body)
    store.write_json(store.join(out_uri, "final", "config.json"), config)


def load_final(uri: str, device: str | torch.device = "cpu", config: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """(network with the EMA weights, config.json) from a stage's ``final/`` dir — no DeepSpeed.

    Raises RuntimeError (from ``load_state_dict``) when the weights do not fit the network the
    config describes.
    """
    from safetensors.torch import load as st_load

    from stages.nets.flavors import build_network

    config = config if config is not None else store.read_json(store.join(uri, "config.json"))
    net = build_network(config["role"], config["flavor"], config["cond_dims"])
    net.load_state_dict(st_load(store.read_bytes(store.join(uri, "model.safetensors"))))
    return net.to(device).eval(), config

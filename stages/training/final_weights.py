"""A training stage's final output: ``final/step_N/model.safetensors`` + ``config.json``.

Each time a stage finishes (first run, or an extension to more steps) it writes a new
``final/step_N/`` folder, so the weights an earlier finished run wrote are never overwritten;
the stage manifest's ``outputs["final"]`` says which one is current.

Written by the training loop, read by sampling and by anyone who wants the weights without
DeepSpeed. The config is written after the weights, so its presence means they are whole.
Weights are safetensors: nothing from the store is unpickled.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PositiveInt

from pipeline import layout, store
from pipeline.configbase import StoredDoc
from stages.nets.clip_image_tower import NoisedClip, NoisedClipConfig
from stages.nets.flavors import build_network
from stages.nets.prior_transformer import PriorConfig, PriorTransformer
from stages.nets.text_transformer import GlideConfig, GlideModel
from stages.nets.unet import UNet, UNetConfig


class FinalConfig(StoredDoc):
    """``final/step_N/config.json``: what the weights beside it are. Written by the training loop
    (:func:`write_final`), read by sampling, evaluation, export and the report (:func:`read_final_config`).

    Required: what every release has written (the first one wrote all but ``network``).
    ``network`` came later: without it the network is rebuilt from the flavor table.
    ``image_size`` is null for the prior (it makes embeddings), ``low_res_size`` and ``condaug``
    for models that do not upsample.
    """

    remedy = ": extend or rerun its training stage with this release"

    role: str                     # the network role (stages/models/__init__.py), e.g. "base"
    flavor: str                   # its size (stages/nets/flavors.py), e.g. "debug"
    cond_dims: dict[str, int]     # the conditioning widths it was trained on (encoders.json)
    image_size: PositiveInt | None  # the pixel size it makes (SR: its output); null for the prior
    step: int = Field(ge=0)       # the training step of these weights
    diffusion: dict[str, Any]     # Diffusion constructor kwargs it trained with (sampling uses the same)
    low_res_size: PositiveInt | None = None  # SR models: the size of their low-res input
    condaug: dict[str, Any] | None = None  # SR models: CondAugConfig fields
    network: dict[str, Any] | None = None  # network_config(net): every constructor argument


def write_final(out_uri: str, weights: dict[str, torch.Tensor], config: FinalConfig) -> str:
    """final/step_N/model.safetensors, then its config.json (whose presence means the weights are
    whole). Returns the folder."""
    from safetensors.torch import save as st_save

    folder = layout.final_dir(out_uri, config.step)
    if store.exists(store.join(folder, layout.FINAL_CONFIG)):
        return folder  # written whole before (a resume that had nothing left to train): never overwrite
    body = st_save({k: v.contiguous() for k, v in weights.items()})
    store.write_bytes_atomic(store.join(folder, layout.FINAL_WEIGHTS), body)
    store.write_json(store.join(folder, layout.FINAL_CONFIG), config.to_json())
    return folder


def read_final_config(folder: str) -> FinalConfig:
    """The checked ``config.json`` of a ``final/step_N/`` folder (pipeline.configbase.DocError
    naming the file and the field when it is not usable; FileNotFoundError when it is absent)."""
    uri = store.join(folder, layout.FINAL_CONFIG)
    if not store.exists(uri):
        raise FileNotFoundError(f"{uri} not found: the stage has not finished writing these weights")
    return FinalConfig.from_json(store.read_json(uri), uri)


def latest_final(out_uri: str) -> str | None:
    """The newest complete ``final/step_N/`` folder of a training attempt, or None."""
    best = None
    for uri in store.listdir(store.join(out_uri, layout.FINAL)):
        step = layout.step_of(uri)
        if step is not None and store.exists(store.join(uri, layout.FINAL_CONFIG)):
            best = max(best or (0, ""), (step, store.join(out_uri, layout.FINAL, uri.rstrip("/").rsplit("/", 1)[-1])))
    return best[1] if best else None


def resolve_final(stage_uri: str) -> str:
    """The final-weights folder of a finished training attempt: what its manifest names, else the
    newest complete one (a manifest is written only after it)."""
    m_uri = store.join(stage_uri, layout.MANIFEST)
    if store.exists(m_uri):
        final = (store.read_json(m_uri).get("outputs") or {}).get("final")
        if final:
            return final
    return latest_final(stage_uri) or store.join(stage_uri, layout.FINAL)


def load_final(uri: str, device: str | torch.device = "cpu",
               config: FinalConfig | None = None) -> tuple[torch.nn.Module, FinalConfig]:
    """(network with the EMA weights, its config) from a ``final/step_N/`` folder — no DeepSpeed.

    Raises RuntimeError (from ``load_state_dict``) when the weights do not fit the network the
    config describes.
    """
    from safetensors.torch import load as st_load

    config = config if config is not None else read_final_config(uri)
    if config.network:  # self-describing: every constructor argument, no flavor table needed
        net = network_from_config(config.network)
    else:  # written before final/config.json held the network: rebuild it from the flavor name
        net = build_network(config.role, config.flavor, config.cond_dims)
    net.load_state_dict(st_load(store.read_bytes(store.join(uri, layout.FINAL_WEIGHTS))))
    return net.to(device).eval(), config


def network_config(net: torch.nn.Module) -> dict:
    """``{"class": "UNet" | "PriorTransformer" | "GlideModel" | "NoisedClip", "config": every constructor field}``: what
    :func:`network_from_config` rebuilds the network from, with nothing but this package's nets.
    Training-only switches (activation checkpointing) are left at their defaults."""
    import dataclasses

    cfg = dataclasses.asdict(net.cfg)
    cfg.pop("gradient_checkpointing", None)
    for sub in cfg.values():  # nested configs (GlideModel: text + unet) carry their own switch
        if isinstance(sub, dict):
            sub.pop("gradient_checkpointing", None)
    return {"class": type(net).__name__, "config": cfg}


def network_from_config(doc: dict) -> torch.nn.Module:
    import dataclasses

    classes = {"UNet": (UNet, UNetConfig), "PriorTransformer": (PriorTransformer, PriorConfig),
               "GlideModel": (GlideModel, GlideConfig), "NoisedClip": (NoisedClip, NoisedClipConfig)}
    if doc.get("class") not in classes:
        raise ValueError(f"final config network.class must be one of {sorted(classes)} (got {doc.get('class')!r})")
    net_cls, cfg_cls = classes[doc["class"]]
    kinds = {f.name: f for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(doc["config"]) - set(kinds))
    if unknown:
        raise ValueError(f"final config network.config has fields this {doc['class']} does not know: {unknown}")
    # JSON has no tuples: give tuple-typed fields their tuples back (nested config dicts, GLIDE's
    # text + unet, are rebuilt by GlideConfig itself).
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["config"].items()}
    return net_cls(cfg_cls(**args))

"""Sampling, part 1: what a cascade samples with, loaded from a run exactly as training wrote it:
each model's EMA network + diffusion from its ``final/step_N/`` (safetensors only: loading a run
never executes code), and the frozen CLIP + T5 the embed stage used (its ``encoders.json``),
with prompt features rounded through fp16 as the embedding shards store them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from data_prep.embed_format import pad_ids, pad_sequences
from data_prep.encoders import load_clip, load_t5
from data_prep.encoders_doc import encoders_doc_uri, read_encoders_doc
from pipeline import layout, store
from pipeline.context import StageFailed
from stages.diffusion import Diffusion
from stages.nets.text_transformer import GlideConfig, GlideModel
from stages.sampling.config import NULL_KEYS, stage_of
from stages.training.final_weights import FinalConfig, load_final, read_final_config, resolve_final


@dataclass
class LoadedModel:
    role: str
    net: torch.nn.Module
    diffusion: Any  # stages.diffusion.Diffusion
    config: FinalConfig  # final/config.json


def load_model(stage_uri: str, role: str, *, device: torch.device, percentile: float = 0.995) -> LoadedModel:
    """A trained stage's EMA network + its diffusion, from ``<stage_uri>/final/`` (safetensors)."""
    final = resolve_final(stage_uri)
    cfg_uri, w_uri = store.join(final, layout.FINAL_CONFIG), store.join(final, layout.FINAL_WEIGHTS)
    # config.json is written after the weights: its absence means "not (completely) trained".
    missing = [u for u in (cfg_uri, w_uri) if not store.exists(u)]
    if missing:
        raise StageFailed(
            f"stage {stage_of(role)} has no trained model: {missing[0]} not found. Train it first "
            f"(t2i run <spec> runs {stage_of(role)}), pick a cascade that does not need it, or stop the "
            f"cascade earlier with max_stage")
    config = read_final_config(final)
    if config.role != role:
        raise StageFailed(f"{cfg_uri}: role is {config.role!r}, expected {role!r}")
    try:
        net = _load_glide(final, device, config) if role == "glide" else load_final(final, device, config)[0]
    except RuntimeError as e:
        raise StageFailed(f"{w_uri} does not fit network {role}/{config.flavor}: {e}") from e
    return LoadedModel(role, net, Diffusion(**diffusion_kwargs(role, config, percentile)), config)


def diffusion_kwargs(role: str, config: FinalConfig, percentile: float) -> dict[str, Any]:
    """The Diffusion a trained model samples with: its training's settings, its role's CFG null
    keys, the sampling's dynamic-thresholding percentile (a cascade export writes the same down)."""
    return {**dict(config.diffusion), "null_keys": tuple(NULL_KEYS[role]), "dynamic_percentile": percentile}


def _load_glide(final: str, device: torch.device, config: FinalConfig) -> torch.nn.Module:
    """GLIDE's network from its self-describing config (final_weights.network_from_config knows only
    UNet and PriorTransformer); the flavor table when the config has none."""
    from safetensors.torch import load as st_load

    doc = config.network or {}
    if doc.get("class") != "GlideModel":
        return load_final(final, device, config.model_copy(update={"network": None}))[0]
    net = GlideModel(GlideConfig(**doc["config"]))
    net.load_state_dict(st_load(store.read_bytes(store.join(final, layout.FINAL_WEIGHTS))))
    return net.to(device).eval()


@dataclass
class PromptFeatures:
    """Everything any network of either cascade is conditioned on, for a batch of prompts."""

    clip_text: torch.Tensor  # [B, Dc]
    clip_tokens: torch.Tensor  # [B, Lc, Dct]
    clip_mask: torch.Tensor  # [B, Lc] bool
    t5_tokens: torch.Tensor  # [B, Lt, Dt]
    t5_mask: torch.Tensor  # [B, Lt] bool
    # Token ids, for models with their own text encoder (GLIDE): padded as training batches pad them.
    clip_ids: torch.Tensor | None = None  # [B, Lc] long
    clip_id_mask: torch.Tensor | None = None  # [B, Lc] bool
    t5_ids: torch.Tensor | None = None  # [B, Lt] long
    t5_id_mask: torch.Tensor | None = None  # [B, Lt] bool

    def select(self, idx: slice, device: torch.device) -> "PromptFeatures":
        return PromptFeatures(*(None if getattr(self, f) is None else getattr(self, f)[idx].to(device) for f in
                                ("clip_text", "clip_tokens", "clip_mask", "t5_tokens", "t5_mask",
                                 "clip_ids", "clip_id_mask", "t5_ids", "t5_id_mask")))


def _pad(seqs: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt token features padded to the encoder's full ``length`` (data_prep.embed_format.pad_sequences)."""
    out, mask = pad_sequences([x.float().numpy() for x in seqs], max(1, length), seqs[0].shape[-1])
    return torch.from_numpy(out).float(), torch.from_numpy(mask)


@dataclass
class PromptEncoders:
    """The frozen CLIP + T5 the embed stage used, reloaded from its ``encoders.json``."""

    clip: Any  # data_prep.encoders.ClipEncoder
    t5: Any  # data_prep.encoders.T5Encoder
    preprocess: dict | None = None  # the embed stage's CLIP image preprocessing (CLIP scores of samples)

    @classmethod
    def load(cls, embed_uri: str, device: torch.device | str = "cpu") -> "PromptEncoders":
        doc = read_encoders_doc(embed_uri)
        if doc is None:
            raise StageFailed(f"{encoders_doc_uri(embed_uri)} not found: run the embed stage first (sampling "
                              "embeds prompts with the encoders it used)")
        return cls(load_clip(doc.clip_config(), device=device), load_t5(doc.t5_config(), device=device),
                   doc.clip_preprocess)

    @property
    def dims(self) -> dict[str, int]:
        return {"clip_dim": self.clip.dim, "clip_token_dim": self.clip.token_dim, "t5_dim": self.t5.dim}

    def encode(self, prompts: Sequence[str]) -> PromptFeatures:
        # A prompt's image must not depend on the prompts sampled with it (--from-sample redraws a
        # batch of 16, --prompt P one prompt, the sample stage all of them). Two things made it:
        # - each prompt is encoded alone: in a batch its features took another last bit from the
        #   prompts beside it (T5's pass over a batch padded to the longest: up to 6e-5, an fp16
        #   ulp; for CLIP, the GEMMs' shapes);
        # - features and ids are padded to the encoder's full length (masked), not to the longest
        #   prompt of the list: the networks' attention over another padded length computes
        #   another last bit (1/255 in 1 of 16 Imagen images).
        clip = [self.clip.encode_text([p]) for p in prompts]
        pooled = torch.cat([c[0] for c in clip])
        clip_len, t5_len = self.clip.context_length, self.t5.max_length
        clip_tokens, clip_mask = _pad([c[1][0] for c in clip], clip_len)
        t5_tokens, t5_mask = _pad([self.t5.encode_padded([p])[0][0] for p in prompts], t5_len)
        # The same ids the embed stage writes (data_prep/embed/encode.py), padded as above.
        cids, clens = self.clip.tokenize(list(prompts))
        clip_ids, clip_id_mask = pad_ids([cids[i, : int(n)].numpy() for i, n in enumerate(clens)], clip_len)
        t5_ids, t5_id_mask = pad_ids([torch.tensor(x).numpy() for x in self.t5.token_ids(list(prompts))], t5_len)
        # The networks were trained on fp16-stored features: round the same way.
        r = lambda x: x.float().half().float()  # noqa: E731
        return PromptFeatures(r(pooled), r(clip_tokens), clip_mask, r(t5_tokens), t5_mask.bool(),
                              torch.from_numpy(clip_ids), torch.from_numpy(clip_id_mask),
                              torch.from_numpy(t5_ids), torch.from_numpy(t5_id_mask))

"""Frozen text/image encoders: CLIP (open_clip) and a T5 encoder (transformers).

Both load from a name *or a local path* through one code path, so the tiny test encoders
(data_prep/tiny_encoders.py) exercise exactly what ViT-L/14 + T5-XXL go through:

* CLIP: ``ClipConfig.model`` is an open_clip architecture name ('ViT-L-14', with ``pretrained``
  a tag or a checkpoint file) or a directory holding ``open_clip_config.json`` + weights
  (open_clip's ``local-dir:`` schema). Image preprocessing (size, mean/std, interpolation,
  resize mode) comes from the model's own preprocess config, never from constants here.
* T5: ``T5Config.model`` is a hub name or a directory saved with ``save_pretrained``; loaded as
  ``T5EncoderModel`` + ``AutoTokenizer``.
* ``tiny:DIR`` for either builds the tiny pair into DIR if missing, then loads it as a local path.

bf16 on GPU, fp32 on CPU. Outputs leave as fp32 CPU tensors; the writer converts to fp16.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch


from data_prep.encoder_config import TINY_PREFIX, ClipConfig, T5Config, _looks_like_path, caption_counts  # noqa: F401
from data_prep.tiny_encoders import ensure_tiny_encoders


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_clip_model(cfg: ClipConfig) -> tuple[str, str | None]:
    """(name open_clip understands, pretrained) — 'tiny:' builds if missing, dirs become local-dir:."""
    m = cfg.model
    if m.startswith(TINY_PREFIX):
        clip_dir, _ = ensure_tiny_encoders(m[len(TINY_PREFIX):])
        return "local-dir:" + clip_dir, None
    if _looks_like_path(m):
        d = Path(os.path.expanduser(m)).resolve()
        if not (d / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"clip.model directory {d} has no open_clip_config.json "
                                    "(expected open_clip_config.json with model_cfg/preprocess_cfg + a weights file)")
        return "local-dir:" + str(d), None
    pretrained = cfg.pretrained
    if pretrained and _looks_like_path(pretrained) and not os.path.isfile(os.path.expanduser(pretrained)):
        raise FileNotFoundError(f"clip.pretrained checkpoint file {pretrained!r} does not exist")
    return m, (os.path.expanduser(pretrained) if pretrained and _looks_like_path(pretrained) else pretrained)


def resolve_t5_model(cfg: T5Config) -> str:
    m = cfg.model
    if m.startswith(TINY_PREFIX):
        return ensure_tiny_encoders(m[len(TINY_PREFIX):])[1]
    if _looks_like_path(m):
        d = Path(os.path.expanduser(m)).resolve()
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"t5.model directory {d} has no config.json (save it with save_pretrained)")
        return str(d)
    return m


def clip_preprocess_cfg(cfg: ClipConfig, image_size: int | None = None) -> dict[str, Any]:
    """The image preprocessing a CLIP expects, without building the model.

    Mirrors open_clip.create_model: defaults, then the local dir's / pretrained tag's
    preprocess_cfg, then the vision tower's image_size (or the override). Decode tasks on CPU
    nodes need this but must not load a 1 GB checkpoint to get it; a test checks it agrees
    with the loaded model's own ``preprocess_cfg``.
    """
    from open_clip.factory import get_model_config  # open_clip: loaded only when a CLIP is built or read
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    name, pretrained = resolve_clip_model(cfg)
    pp = asdict(PreprocessCfg())
    if name.startswith("local-dir:"):
        doc = json.loads((Path(name[len("local-dir:"):]) / "open_clip_config.json").read_text())
        model_cfg = doc["model_cfg"]
        pp = merge_preprocess_dict(pp, doc.get("preprocess_cfg", {}))
    else:
        model_cfg = get_model_config(name.replace("/", "-"))
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {name!r}")
        if pretrained:
            tag_cfg = get_pretrained_cfg(name.replace("/", "-"), pretrained)
            if tag_cfg:
                pp = merge_preprocess_dict(pp, tag_cfg)
    size = image_size or model_cfg.get("vision_cfg", {}).get("image_size", pp["size"])
    pp["size"] = [size, size] if isinstance(size, int) else list(size)
    return _jsonable(pp)


def _jsonable(pp: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}


@dataclass
class ClipEncoder:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    preprocess_cfg: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[-1] if not isinstance(self.model.text_projection, torch.nn.Linear)
                   else self.model.text_projection.out_features)

    @property
    def token_dim(self) -> int:
        return int(self.model.ln_final.weight.shape[0])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, Dc] L2-normalised fp32 (CPU)."""
        x = pixels.to(self.device, self.dtype, non_blocking=True)
        return self.model.encode_image(x, normalize=True).float().cpu()

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, context_length], real lengths [B] up to and including EOT)."""
        ids = self.tokenizer(list(captions))
        return ids, _clip_lengths(ids, self.model, self.tokenizer)

    def count_truncated(self, captions: Sequence[str]) -> int:
        """Captions longer than the context (EOT included): ``tokenize`` cuts them silently.
        Tokenized again with 4x the context so the real length is seen."""
        if not captions:
            return 0
        ids = self.tokenizer(list(captions), context_length=4 * self.context_length)
        return int((_clip_lengths(ids, self.model, self.tokenizer) > self.context_length).sum())

    @torch.inference_mode()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(pooled [B, Dc] L2-normalised, per-token features trimmed [L_i, Dct] each, lengths [B]).

        Re-implements open_clip's CLIP.encode_text so the per-token features (after ln_final,
        before projection) come out of the same pass as the pooled embedding. With a causal mask
        a token never attends to later positions, so running only the first ``max(lengths)``
        positions gives bit-for-bit the features of the full context_length pass at a fraction of
        the cost; a bidirectional text tower must see the padding open_clip trained it with, so it
        keeps the full context.
        """
        m = self.model
        if not hasattr(m, "token_embedding"):
            raise NotImplementedError(f"CLIP text tower {type(m).__name__} (custom/HF text) is not supported; "
                                      "use a standard open_clip CLIP architecture")
        ids, lengths = self.tokenize(captions)
        causal = getattr(m, "attn_mask", None) is not None
        L = int(lengths.max()) if causal and len(lengths) else ids.shape[1]
        ids = ids[:, :L].to(self.device)
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[:L].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:L, :L] if causal else None)
        x = m.ln_final(x)
        from open_clip.transformer import text_global_pool  # open_clip: loaded only when a CLIP is built or read

        pooled = text_global_pool(x, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            pooled = m.text_projection(pooled) if isinstance(m.text_projection, torch.nn.Linear) else pooled @ m.text_projection
        pooled = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
        x = x.float().cpu()
        return pooled, [x[i, : int(lengths[i])] for i in range(len(lengths))], lengths


def _clip_lengths(ids: torch.Tensor, model: Any, tokenizer: Any) -> torch.Tensor:
    """Real token count per caption, EOT included (a truncated caption still ends in EOT)."""
    pool = getattr(model, "text_pool_type", "argmax")
    eot = getattr(tokenizer, "eot_token_id", None)
    if pool == "eos" and getattr(model, "text_eos_id", None) is not None:
        eot = model.text_eos_id
    if eot is not None:
        is_eot = ids == eot
        pos = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
        return (pos + 1).to(torch.int32)
    if pool == "argmax":  # open_clip's own rule: EOT is the largest id
        return (ids.argmax(1) + 1).to(torch.int32)
    return (ids != getattr(model, "pad_id", 0)).sum(1).to(torch.int32)


def load_clip(cfg: ClipConfig, device: torch.device | str | None = None, image_size: int | None = None) -> ClipEncoder:
    import open_clip  # open_clip: loaded only when a CLIP is built or read

    device = torch.device(device) if device is not None else default_device()
    name, pretrained = resolve_clip_model(cfg)
    model = open_clip.create_model(
        name, pretrained=pretrained, precision="bf16" if device.type == "cuda" else "fp32", device=device,
        force_image_size=image_size, require_pretrained=bool(pretrained) or name.startswith("local-dir:"))
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    pp = _jsonable(dict(getattr(model.visual, "preprocess_cfg", {})))
    return ClipEncoder(model=model, tokenizer=tokenizer, device=device, dtype=_dtype_for(device), preprocess_cfg=pp,
                       identity={"model": cfg.model, "pretrained": cfg.pretrained, "resolved": name})


@dataclass
class T5Encoder:
    model: Any
    tokenizer: Any
    device: torch.device
    max_length: int
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    def token_ids(self, captions: Sequence[str]) -> list[list[int]]:
        """Unpadded ids per caption (EOS included, truncated to max_length)."""
        enc = self.tokenizer(list(captions), truncation=True, max_length=self.max_length, padding=False)
        return [list(x) for x in enc["input_ids"]]

    def count_truncated(self, captions: Sequence[str]) -> int:
        """Captions whose token count (EOS included) exceeds max_length: ``token_ids`` cuts them."""
        if not captions:
            return 0
        enc = self.tokenizer(list(captions), truncation=False, padding=False, verbose=False)
        return sum(len(x) > self.max_length for x in enc["input_ids"])

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return out.last_hidden_state.float().cpu()

    def encode_padded(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, L, Dt] fp32, attention mask [B, L] bool), L = longest caption in the batch."""
        ids = self.token_ids(captions)
        t, m = _pad_ids(ids, self.tokenizer.pad_token_id or 0)
        return self.forward(t, m), m.bool()

    def encode(self, captions: Sequence[str], micro_batch: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-caption hidden states trimmed to real length, with length bucketing.

        Captions are sorted by token count and run in micro-batches padded to *their own*
        longest caption: a batch of 15-token captions costs 15 positions, not max_length (T5's
        attention is bidirectional but masked, so padding never changes the real positions).
        """
        ids = self.token_ids(captions)
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.int32)
        order = sorted(range(len(ids)), key=lambda i: lengths[i].item())
        mb = micro_batch or max(1, len(ids))
        out: list[torch.Tensor | None] = [None] * len(ids)
        for s in range(0, len(order), mb):
            idx = order[s:s + mb]
            t, m = _pad_ids([ids[i] for i in idx], self.tokenizer.pad_token_id or 0)
            h = self.forward(t, m)
            for j, i in enumerate(idx):
                out[i] = h[j, : int(lengths[i])]
        return out, lengths  # type: ignore[return-value]


def _pad_ids(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max((len(x) for x in ids), default=1)
    t = torch.full((len(ids), L), pad_id, dtype=torch.long)
    m = torch.zeros((len(ids), L), dtype=torch.long)
    for i, x in enumerate(ids):
        t[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        m[i, : len(x)] = 1
    return t, m


def load_t5(cfg: T5Config, device: torch.device | str | None = None) -> T5Encoder:
    from transformers import AutoTokenizer, T5EncoderModel  # transformers: loaded only when a T5 is built or read

    device = torch.device(device) if device is not None else default_device()
    path = resolve_t5_model(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = T5EncoderModel.from_pretrained(path, dtype=_dtype_for(device))
    except OSError as e:
        raise OSError(f"cannot load T5 encoder {cfg.model!r} (resolved {path!r}): {e}. Offline machines need a "
                      "local directory saved with save_pretrained, or 'tiny:DIR' for the test encoder") from e
    model.to(device).eval().requires_grad_(False)
    return T5Encoder(model=model, tokenizer=tokenizer, device=device, max_length=cfg.max_length,
                     identity={"model": cfg.model, "max_length": cfg.max_length, "resolved": path})


def encoder_identity(clip: ClipConfig, t5: T5Config) -> dict[str, Any]:
    """What makes two embedding sets comparable: the encoders as the spec names them."""
    return {"clip": {"model": clip.model, "pretrained": clip.pretrained},
            "t5": {"model": t5.model, "max_length": t5.max_length}}

"""The figures of the evaluate stage: FID (torchmetrics, on a named feature network), CLIP score
and embedding cosine similarity. Pure functions over tensors and loaded networks; the stage
(stages/evaluate/__init__.py) decides what to feed them.

Feature networks for FID are named in the spec (``evaluate.fid_features``), never downloaded at
run time unless the name says so and the machine has a network:

* ``torchvision:inception_v3`` — torchvision's ImageNet Inception-v3, 2048-d pool features
  (weights from the local torch hub cache), or ``torchvision:inception_v3:/path/weights.pth``
  for a local state dict. Its figures are comparable with each other, not with papers' FID on
  the TF-Inception port.
* ``tiny:DIR`` — a small random-feature CNN built with a fixed seed, saved to ``DIR`` (once) and
  loaded back from it through the same path as any saved network: what the tests and the demo
  use (offline, milliseconds). Its FID is only comparable with other ``tiny`` FIDs.
* ``DIR`` — a network saved in that format (``fid_features.json`` + ``.safetensors``).

The metric's kind (``inception_v3`` / ``tiny``) is recorded beside the figure (``fid_features``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stages.evaluate.names import check_feature_name

TINY_CONFIG = "fid_features.json"
TINY_WEIGHTS = "fid_features.safetensors"


class TinyFeatures(torch.nn.Module):
    """Random-feature CNN: uint8 [N, 3, H, W] -> [N, num_features] (channel means and stds of two
    depths: colour, texture and noise statistics are all visible to it)."""

    def __init__(self, width: int = 16, input_size: int = 64):
        super().__init__()
        self.input_size = input_size
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(3, width, 3, stride=2, padding=1),
                                          torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)])
        self.num_features = 2 * (width + 2 * width)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = _as_unit(imgs, self.input_size) * 2 - 1
        feats = []
        for conv in self.convs:
            x = F.gelu(conv(x))
            feats += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        return torch.cat(feats, dim=1).double()


class InceptionPool(torch.nn.Module):
    """torchvision Inception-v3 up to its 2048-d average pool (ImageNet normalisation, 299px)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        net.fc = torch.nn.Identity()
        self.net = net.eval()
        self.num_features = 2048
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = (_as_unit(imgs, 299) - self.mean) / self.std
        return self.net(x).double()


def _as_unit(imgs: torch.Tensor, size: int) -> torch.Tensor:
    x = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def build_tiny_features(out_dir: str | Path, seed: int = 0, width: int = 16, input_size: int = 64) -> Path:
    """Build the tiny feature network with a fixed seed and save it to ``out_dir`` (idempotent)."""
    from safetensors.torch import save_file

    d = Path(out_dir)
    if (d / TINY_CONFIG).exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = TinyFeatures(width, input_size)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / TINY_WEIGHTS))
    tmp = d / (TINY_CONFIG + ".tmp")  # the config is written last: its presence means the weights are whole
    tmp.write_text(json.dumps({"kind": "tiny", "width": width, "input_size": input_size, "seed": seed}))
    tmp.replace(d / TINY_CONFIG)
    return d


def load_saved_features(d: str | Path) -> TinyFeatures:
    from safetensors.torch import load_file

    d = Path(d)
    if not (d / TINY_CONFIG).exists():
        raise FileNotFoundError(f"evaluate.fid_features: {d} holds no {TINY_CONFIG} (a saved feature network); "
                                "use 'tiny:DIR' to build one there, or 'torchvision:inception_v3'")
    cfg = json.loads((d / TINY_CONFIG).read_text())
    net = TinyFeatures(int(cfg["width"]), int(cfg["input_size"]))
    net.load_state_dict(load_file(str(d / TINY_WEIGHTS)))
    return net.eval()


def load_feature_network(name: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The FID feature network ``name`` names (module docstring)."""
    check_feature_name(name)
    if name.startswith("torchvision:"):
        import torchvision  # heavy: only for the torchvision feature network

        parts = name.split(":", 2)
        if len(parts) == 3:  # a local state dict: nothing is downloaded
            # transform_input as torchvision sets it for its own weights (they expect [-1, 1] inputs)
            net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False,
                                                  transform_input=True)
            net.load_state_dict(torch.load(parts[2], map_location="cpu", weights_only=True))
        else:  # torchvision's weights, from the local torch hub cache (downloaded only if missing)
            net = torchvision.models.inception_v3(weights="IMAGENET1K_V1")
        return InceptionPool(net).to(device).eval()
    if name.startswith("tiny:"):
        return load_saved_features(build_tiny_features(name[len("tiny:"):])).to(device)
    return load_saved_features(name).to(device)


@torch.no_grad()
def fid(real: torch.Tensor, fake: torch.Tensor, net: torch.nn.Module, batch_size: int = 64) -> float:
    """Fréchet distance between the feature statistics of two uint8 [N, 3, H, W] image sets
    (torchmetrics' FrechetInceptionDistance with ``net`` as its feature extractor)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # heavy: only when an FID is computed

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set (got {len(real)} real, {len(fake)} generated)")
    metric = FrechetInceptionDistance(feature=net, reset_real_features=True)
    dev = next(net.parameters()).device
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i:i + batch_size].to(dev), real=is_real)
    return max(0.0, float(metric.compute()))  # tiny negative values are rounding of identical sets


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pil_to_uint8(images: Sequence[Any], size: int | None = None) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, S, S] (resized to ``size`` when given)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out)

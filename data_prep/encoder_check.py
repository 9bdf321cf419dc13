"""Every pretrained model a run spec names, checked before any stage starts.

Why: the embed stage loads its CLIP and T5 only once the download stage has finished (hours, on a
real corpus), and on a machine without network it then fails with open_clip's raw "Failed to
download weights ... check your connection". Here each named model is resolved without loading a
weight or downloading a byte: a local path that exists, weights already in the local cache (Hugging
Face hub cache, open_clip's URL cache, torch's hub cache), or a host that answers. Each problem is
one line naming the spec field, the model and what to do (docs/design.md, "Encoders are checked
before any work"); the runner refuses to start on any.

Network: HF_HUB_OFFLINE=1 marks the machine offline and nothing is tried; otherwise the probe
(injectable: tests pass their own) sends one HEAD per host, 3 s timeout, only for a model not
cached. Torch-free at import: open_clip is imported only for an open_clip name with a pretrained
tag, to read where that tag's weights come from.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit

from data_prep.encoder_config import TINY_PREFIX, _looks_like_path

Probe = Callable[[str], bool]  # a host's base URL -> whether it answered
HOW = 'docs/design.md, "Encoders are checked before any work"'
# torchvision's Inception_V3_Weights.IMAGENET1K_V1.url, here so checking it needs no torch (a test compares)
INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
CLIP_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's hf-hub names
T5_FILES = (("config.json",), ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                               "pytorch_model.bin.index.json"), ("spiece.model", "tokenizer.json"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now, else as huggingface_hub read it at import."""
    v = os.environ.get("HF_HUB_OFFLINE")
    if v is not None:
        return v.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hf_cache() -> str:
    """The Hugging Face hub cache folder, read from the environment now (tests point HF_HOME elsewhere)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"])
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def torch_checkpoints() -> str:
    """torch.hub.get_dir()/checkpoints, where torchvision keeps downloaded weights (without torch)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return os.path.join(os.path.expanduser(home), "hub", "checkpoints")


def head_ok(url: str, timeout: float = 3.0) -> bool:
    """The real probe: does ``url`` answer a HEAD request (any HTTP status counts)?"""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


class _Net:
    """Why a model cannot be had (None: it can), asking each host at most once."""

    def __init__(self, probe: Probe | None):
        self.probe, self.seen = probe or head_ok, {}

    def unless(self, cached: bool, url: str) -> str | None:
        """None when the model is ``cached`` or ``url``'s host answers, else why it cannot be fetched."""
        if cached:
            return None
        if hub_offline():
            return "HF_HUB_OFFLINE is set, so no network is tried"
        u = urlsplit(url)
        base = f"{u.scheme}://{u.netloc}"
        if base not in self.seen:
            self.seen[base] = self.probe(base)
        return None if self.seen[base] else f"{u.netloc} did not answer"


def _hub() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def _hf_cached(repo: str, groups: Sequence[Sequence[str]]) -> bool:
    """Whether the hub cache holds, for ``repo``, one file of every group."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return all(any(isinstance(try_to_load_from_cache(repo, n, cache_dir=hf_cache()), str) for n in g)
                   for g in groups)
    except ValueError:  # not a valid repo id: then not in the cache either
        return False


def _missing(field: str, what: str, cache: str, why: str, fetch: str, local: str) -> str:
    return (f"{field}: {what} is not in the local cache ({cache}) and cannot be downloaded ({why}); pre-fetch it "
            f"on a machine with network (`{fetch}`) and copy {cache} to the same place here, or {local} ({HOW})")


def _clip(clip, net: _Net) -> list[str]:
    m, p, field = clip.model, clip.pretrained, "embed.clip.model"
    if m.startswith(TINY_PREFIX):
        return []  # built on demand
    if _looks_like_path(m):
        d = os.path.abspath(os.path.expanduser(m))
        ok = os.path.isfile(os.path.join(d, "open_clip_config.json"))
        return [] if ok else [f"{field}: {m!r}: {d} holds no open_clip_config.json (a saved open_clip model: "
                              "open_clip_config.json + weights); point it at such a directory"]
    fetch = (f"python -c \"import open_clip; open_clip.create_model_and_transforms('{m}'"
             + (f", pretrained='{p}'" if p and not m.startswith("hf-hub:") else "") + ")\"")
    local = (f"set {field} to a local open_clip directory (open_clip_config.json + weights)"
             + ("" if m.startswith("hf-hub:") else " or embed.clip.pretrained to a local checkpoint file"))
    if m.startswith("hf-hub:"):
        what, groups, url = f"{m!r}", (("open_clip_config.json",), CLIP_HUB_WEIGHTS), _hub()
        repo = m[len("hf-hub:"):]
    elif not p:
        return []  # random weights: nothing to fetch
    elif _looks_like_path(p):
        ok = os.path.isfile(os.path.expanduser(p))
        return [] if ok else [f"embed.clip.pretrained: checkpoint file {p!r} does not exist; point it at one, "
                              "or give an open_clip tag (e.g. 'openai') or null"]
    else:
        from open_clip.pretrained import get_pretrained_cfg  # torch: only for a named open_clip tag

        cfg = get_pretrained_cfg(m.replace("/", "-"), p) or {}
        what = f"{m!r} (pretrained {p!r})"
        if cfg.get("file"):
            ok = os.path.isfile(cfg["file"])
            return [] if ok else [f"{field}: {what}: its weights file {cfg['file']} is missing"]
        if cfg.get("hf_hub"):  # open_clip prefers the hub: 'org/repo/' (default file name) or 'org/repo/file'
            repo, name = os.path.split(cfg["hf_hub"])
            names = CLIP_HUB_WEIGHTS if not name else (
                (name[:-4] + ".safetensors", name) if name.endswith((".bin", ".pth")) else (name,))
            groups, url = (names,), _hub()
        elif cfg.get("url"):  # fetched by URL into open_clip's own cache
            cache = os.path.expanduser("~/.cache/clip")
            why = net.unless(os.path.isfile(os.path.join(cache, os.path.basename(cfg["url"]))), cfg["url"])
            return [_missing(field, what, cache, why, fetch, local)] if why else []
        else:
            return []
    why = net.unless(_hf_cached(repo, groups), url)
    return [_missing(field, what, hf_cache(), why, fetch, local)] if why else []


def _t5(t5, net: _Net) -> list[str]:
    m, field = t5.model, "embed.t5.model"
    if m.startswith(TINY_PREFIX):
        return []
    if _looks_like_path(m):
        d = os.path.abspath(os.path.expanduser(m))
        ok = os.path.isfile(os.path.join(d, "config.json"))
        return [] if ok else [f"{field}: {m!r}: {d} holds no config.json; point it at a T5 saved with save_pretrained"]
    why = net.unless(_hf_cached(m, T5_FILES), _hub())
    return [_missing(field, repr(m), hf_cache(), why, f"hf download {m}",
                     f"set {field} to a local directory saved with save_pretrained")] if why else []


def _fid(name: str, net: _Net) -> list[str]:
    field = "evaluate.fid_features"
    if name.startswith("torchvision:"):
        parts = name.split(":", 2)
        if len(parts) == 3:
            ok = os.path.isfile(os.path.expanduser(parts[2]))
            return [] if ok else [f"{field}: {name!r}: the weights file {parts[2]} does not exist"]
        cache = torch_checkpoints()
        why = net.unless(os.path.isfile(os.path.join(cache, os.path.basename(INCEPTION_URL))), INCEPTION_URL)
        return [_missing(field, repr(name), cache, why,
                         "python -c \"import torchvision; torchvision.models.inception_v3(weights='IMAGENET1K_V1')\"",
                         f"name a local state dict: '{name}:/path/weights.pth'")] if why else []
    if name.startswith("tiny:"):
        return []
    ok = os.path.isfile(os.path.join(os.path.expanduser(name), "fid_features.json"))
    return [] if ok else [f"{field}: {name!r} holds no fid_features.json (a saved feature network); "
                          "use 'tiny:DIR' to build one there"]


def encoder_problems(spec, stages: Iterable[str] | None = None, probe: Probe | None = None) -> list[str]:
    """One line per pretrained model the spec names that this machine cannot get: the embed
    stage's CLIP and T5, the evaluate stage's FID feature network. ``stages``: the stages that
    will run (None: every stage the spec configures); ``probe``: asks whether a host answers
    (default :func:`head_ok`; never called with HF_HUB_OFFLINE=1)."""
    run = None if stages is None else set(stages)

    def runs(name: str) -> bool:
        return getattr(spec, name, None) is not None and (run is None or name in run)

    net, out = _Net(probe), []
    if runs("embed"):
        out += _clip(spec.embed.clip, net) + _t5(spec.embed.t5, net)
    if runs("evaluate"):
        out += _fid(spec.evaluate.fid_features, net)
    return out

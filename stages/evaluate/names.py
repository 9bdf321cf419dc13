"""FID feature-network names (``evaluate.fid_features``), checked without building anything
(torch-free: reading a spec stays light). stages/evaluate/metrics.py loads what they name."""
from __future__ import annotations


def feature_kind(name: str) -> str:
    """What the metric's name records: 'inception_v3', 'tiny' (or a saved network's kind)."""
    if name.startswith("torchvision:"):
        return name.split(":")[1]
    return "tiny"


def check_feature_name(name: str) -> str:
    """Spec-time check of ``evaluate.fid_features`` (no network is built)."""
    if name.startswith("torchvision:"):
        parts = name.split(":", 2)
        if parts[1] != "inception_v3":
            raise ValueError(f"fid_features {name!r}: the torchvision network must be inception_v3")
        return name
    if name.startswith("tiny:") and len(name) > len("tiny:"):
        return name
    if name and not name.startswith("tiny:"):
        return name  # a local directory holding a saved feature network
    raise ValueError(f"fid_features {name!r}: allowed 'torchvision:inception_v3[:/local/weights.pth]', "
                     "'tiny:DIR' or a directory holding a saved feature network")

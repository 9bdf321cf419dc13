"""``t2i export``: a trained model as a folder that stands alone, in the Hugging Face conventions.

Formats:

* ``diffusers``: ``config.json`` (``_class_name`` + every network constructor argument, the
  conditioning widths, the diffusion and conditioning-augmentation settings) and
  ``diffusion_pytorch_model.safetensors`` (the EMA weights), plus a model card ``README.md``
  (training data, steps, metrics) — the layout ``huggingface_hub`` uploads and diffusers users
  expect;
* ``folder``: the run's own ``final/`` files (``model.safetensors`` + ``config.json``) + the card.

:func:`load_exported` rebuilds the network from either folder with nothing but this package's
networks (no run, no flavor table). ``push_to_hub`` uploads the folder with ``huggingface_hub``.
"""
from __future__ import annotations

import json
from typing import Any

from pipeline import layout, store
from stages.training.final_weights import FinalConfig, network_from_config, read_final_config

# The diffusers layout's names (its conventions, not a run's: pipeline/layout.py has those).
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CARD = "README.md"
FORMATS = ("diffusers", "folder")


def export_model(final_dir: str, out_uri: str, *, fmt: str = "diffusers", card: dict[str, Any] | None = None) -> str:
    """Write the exported folder at ``out_uri`` (any store URI); returns it."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    config = read_final_config(final_dir)
    if not config.network:
        raise ValueError(f"{store.join(final_dir, layout.FINAL_CONFIG)} predates self-describing weights (no "
                         "'network' entry): extend or rerun the stage with this release to export it")
    weights = store.read_bytes(store.join(final_dir, layout.FINAL_WEIGHTS))
    if fmt == "diffusers":
        hf = {"_class_name": f"T2I{config.network['class']}", "_t2i_role": config.role,
              **config.network["config"],
              "t2i": config.model_dump(include={"role", "flavor", "cond_dims", "image_size", "low_res_size",
                                                "diffusion", "condaug", "step"})}
        store.write_bytes_atomic(store.join(out_uri, DIFFUSERS_WEIGHTS), weights)
        store.write_json(store.join(out_uri, DIFFUSERS_CONFIG), hf)
    else:  # the run's own final/ files, as training wrote them
        store.write_bytes_atomic(store.join(out_uri, layout.FINAL_WEIGHTS), weights)
        store.write_json(store.join(out_uri, layout.FINAL_CONFIG), config.to_json())
    store.write_bytes_atomic(store.join(out_uri, CARD), model_card(config, card or {}).encode())
    return out_uri


def load_exported(uri: str, device: str = "cpu") -> tuple[Any, FinalConfig]:
    """(network with the exported weights, its t2i config) from an exported folder of either format."""
    from safetensors.torch import load as st_load

    doc_uri = store.join(uri, DIFFUSERS_CONFIG)  # the same name in both formats
    doc = store.read_json(doc_uri)
    if "_class_name" in doc:  # diffusers layout
        cfg = {k: v for k, v in doc.items() if not k.startswith("_") and k != "t2i"}
        network = {"class": doc["_class_name"].removeprefix("T2I"), "config": cfg}
        config = FinalConfig.from_json({**(doc.get("t2i") or {}), "network": network}, f"{doc_uri} (t2i)")
        weights = store.join(uri, DIFFUSERS_WEIGHTS)
    else:
        config, weights = FinalConfig.from_json(doc, doc_uri), store.join(uri, layout.FINAL_WEIGHTS)
    net = network_from_config(config.network or {})
    net.load_state_dict(st_load(store.read_bytes(weights)))
    return net.to(device).eval(), config


def model_card(config: FinalConfig, info: dict[str, Any]) -> str:
    """A Hugging Face model card: what the model is, what it was trained on, how well it did."""
    metrics = info.get("metrics") or {}
    network = (config.network or {}).get("class", "?")
    lines = [
        "---", "library_name: t2i-pipeline", "tags: [text-to-image, diffusion]", "---", "",
        f"# {info.get('name') or config.role} ({network}, flavor `{config.flavor}`)", "",
        f"A {config.role} model of a text-to-image cascade trained with t2i-pipeline: "
        f"{info.get('description', '')}", "",
        "## Training", "",
        f"- steps: {config.step}",
        f"- data: {info.get('data', 'unknown')}",
        f"- samples seen: {info.get('samples', 'unknown')}",
        f"- conditioning widths: {json.dumps(config.cond_dims)}",
        f"- diffusion: {json.dumps(config.diffusion)}",
    ]
    if config.condaug:
        lines.append(f"- conditioning augmentation: {json.dumps(config.condaug)}")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Loading", "", "```python", "from stages.export.model_folder import load_exported",
              "net, config = load_exported('path/to/this/folder')", "```", ""]
    return "\n".join(lines)


def push_to_hub(folder: str, repo_id: str, *, private: bool = True) -> str:
    """Upload an exported local folder as a model repo (needs a network and a token)."""
    from huggingface_hub import HfApi  # heavy: only for --push-to-hub

    path = store.local_path(store.normalize(folder))
    if path is None:
        raise ValueError("--push-to-hub needs a local --out folder")
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=path, repo_id=repo_id, repo_type="model")
    return f"https://huggingface.co/{repo_id}"

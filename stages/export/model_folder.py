"""``t2i export``: a trained model as a folder that stands alone, in the Hugging Face conventions.

Formats:

* ``diffusers``: what ``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)``
  loads with nothing of this package installed: ``config.json`` (``_class_name``, ``auto_map``,
  every network constructor argument, and ``t2i``: the conditioning widths, the diffusion and
  conditioning-augmentation settings), ``diffusion_pytorch_model.safetensors`` (the EMA weights,
  as training wrote them) and the custom-code files generated from this package's networks
  (stages/export/diffusers_code.py: ``modeling_t2i.py`` + ``t2i_*.py``), plus a model card
  ``README.md`` (training data, steps, metrics) — the layout ``huggingface_hub`` uploads;
* ``folder``: the run's own ``final/`` files (``model.safetensors`` + ``config.json``) + the card.

:func:`load_exported` rebuilds the network from either folder with nothing but this package's
networks (no run, no flavor table). ``push_to_hub`` uploads the folder with ``huggingface_hub``.
"""
from __future__ import annotations

import json
from typing import Any

from pipeline import layout, store
from stages.export import diffusers_code
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
        net_class = config.network["class"]
        code = diffusers_code.modeling_files(net_class)  # before any write: a network it cannot ship fails here
        hf = {"_class_name": diffusers_code.class_name(net_class), "_t2i_role": config.role,
              "auto_map": diffusers_code.auto_map(net_class), **config.network["config"],
              "t2i": config.model_dump(include={"role", "flavor", "cond_dims", "image_size", "low_res_size",
                                                "diffusion", "condaug", "step"})}
        store.write_bytes_atomic(store.join(out_uri, DIFFUSERS_WEIGHTS), weights)
        for name, text in code.items():
            store.write_bytes_atomic(store.join(out_uri, name), text.encode())
        store.write_json(store.join(out_uri, DIFFUSERS_CONFIG), hf)  # last: it names the code
        for uri in store.listdir(out_uri):  # network files of an earlier export into this folder (other code)
            name = uri.rsplit("/", 1)[-1]
            if name.startswith("t2i_") and name.endswith(".py") and name not in code:
                store.remove(uri)
    else:  # the run's own final/ files, as training wrote them
        store.write_bytes_atomic(store.join(out_uri, layout.FINAL_WEIGHTS), weights)
        store.write_json(store.join(out_uri, layout.FINAL_CONFIG), config.to_json())
    store.write_bytes_atomic(store.join(out_uri, CARD), model_card(config, card or {}, fmt).encode())
    return out_uri


def load_exported(uri: str, device: str = "cpu") -> tuple[Any, FinalConfig]:
    """(network with the exported weights, its t2i config) from an exported folder of either format."""
    from safetensors.torch import load as st_load

    doc_uri = store.join(uri, DIFFUSERS_CONFIG)  # the same name in both formats
    doc = store.read_json(doc_uri)
    if "_class_name" in doc:  # diffusers layout
        cfg = {k: v for k, v in doc.items() if not k.startswith("_") and k not in ("t2i", "auto_map")}
        network = {"class": doc["_class_name"].removeprefix("T2I"), "config": cfg}
        config = FinalConfig.from_json({**(doc.get("t2i") or {}), "network": network}, f"{doc_uri} (t2i)")
        weights = store.join(uri, DIFFUSERS_WEIGHTS)
    else:
        config, weights = FinalConfig.from_json(doc, doc_uri), store.join(uri, layout.FINAL_WEIGHTS)
    net = network_from_config(config.network or {})
    net.load_state_dict(st_load(store.read_bytes(weights)))
    return net.to(device).eval(), config


def model_card(config: FinalConfig, info: dict[str, Any], fmt: str = "diffusers") -> str:
    """A Hugging Face model card: what the model is, what it was trained on, how well it did, how to load it."""
    metrics = info.get("metrics") or {}
    network = (config.network or {}).get("class", "?")
    lines = [
        "---", f"library_name: {'diffusers' if fmt == 'diffusers' else 't2i-pipeline'}",
        "tags: [text-to-image, diffusion]", "---", "",
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
    lines += ["", "## Loading", "", "```python"]
    if fmt == "diffusers":  # the custom code ships in the folder: diffusers and torch are all it needs
        lines += ["from diffusers import AutoModel",
                  "model = AutoModel.from_pretrained('path/to/this/folder', trust_remote_code=True)",
                  "# model.config.t2i: role, conditioning widths, diffusion settings; forward as in modeling_t2i.py",
                  "", "# or, with t2i-pipeline installed:"]
    lines += ["from stages.export.model_folder import load_exported",
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

"""``t2i export RUN --cascade C --format diffusers``: a whole cascade as a folder that
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads, with nothing
of this package installed.

The folder, in diffusers' pipeline layout:

    model_index.json        _class_name ["pipeline_t2i", "T2ICascadePipeline"], one entry per model
                            ["modeling_t2i", "T2I<network class>"], and ``t2i``: how the run samples
    pipeline_t2i.py         the pipeline (stages/export/pipeline_t2i.py), its imports renamed
    t2i_*.py                the sampling code it runs: stages/diffusion.py, condaug.py,
                            process_args.py and sampling/draw.py as they are (one source of truth
                            with ``t2i sample``; stages/export/diffusers_code.py)
    <role>/                 each model as ``--stage S --format diffusers`` writes it
    README.md               the card: what the cascade is, its encoders, how to call it

``t2i`` records what sampling needs and a folder cannot otherwise say: per model what it draws,
its conditioning (network keyword -> prompt feature, or the previous model's output), steps,
guidance, sampler, thresholding and diffusion settings (from the run's ``sample`` section, as
``t2i sample`` would use them), the cascade's SR settings and seed, and the text encoders by the
names the run used (hub names or local paths: nothing is downloaded here). CLIP guidance with the
noised CLIP is not exported: the pipeline samples with classifier-free guidance.
"""
from __future__ import annotations

import json
from importlib import metadata
from types import SimpleNamespace
from typing import Any

from pipeline import layout, store
from pipeline.context import StageFailed
from stages.export import diffusers_code
from stages.export.model_folder import CARD, export_model
from stages.models import model
from stages.sampling.cascade import draw_settings
from stages.sampling.config import CASCADES, SampleConfig, cascade_roles, stage_of
from stages.sampling.loading import diffusion_kwargs
from stages.training.final_weights import read_final_config, resolve_final

PIPELINE_MODULE = "pipeline_t2i"  # the file model_index.json's _class_name names (no dot: diffusers splits on it)
PIPELINE_CLASS = "T2ICascadePipeline"
MODEL_INDEX = "model_index.json"
DIFFUSERS_TESTED = "0.42.1"  # the diffusers this layout was checked with, when none is installed here
# t2i-pipeline's PromptFeatures fields (stages/sampling/loading.py): the pipeline's keyword inputs.
FEATURES = ("clip_text", "clip_tokens", "clip_mask", "t5_tokens", "t5_mask",
            "clip_ids", "clip_id_mask", "t5_ids", "t5_id_mask")
PREVIOUS = "previous"  # a conditioning input that is the previous model's output


def pipeline_files() -> dict[str, str]:
    """``{file name: source}`` of the folder's root code: ``pipeline_t2i.py`` and its modules."""
    mid = diffusers_code.PIPELINE_MODULES[0]
    files, renamed = diffusers_code.ship(mid)
    text = files.pop(f"{renamed[mid]}.py")
    del renamed[mid]
    files[f"{PIPELINE_MODULE}.py"] = text + "\n\n" + diffusers_code.import_all(renamed)
    return files


def conditioning(role: str, config) -> dict[str, str]:
    """The network keyword -> prompt feature (or ``previous``) map of ``role`` at sampling: its
    model module's ``sample_cond`` (stages/models/), called on the feature names themselves."""
    names = SimpleNamespace(**{f: f for f in FEATURES})
    cond = model(role).stage_spec.sample_cond(names, PREVIOUS, config)
    bad = {k: v for k, v in cond.items() if v not in (*FEATURES, PREVIOUS)}
    if bad:  # a sample_cond that computes, rather than picks, cannot be written down as a map
        raise ValueError(f"{role}: its sampling conditioning {sorted(bad)} is not a prompt feature")
    return dict(cond)


def _model_doc(role: str, config, cfg: SampleConfig) -> dict[str, Any]:
    """What the pipeline needs to draw with ``role`` as ``t2i sample`` does: draw()'s settings (the
    cascade-wide SR start and level are written once, beside the models) and the diffusion."""
    kw = draw_settings(role, config, cfg)
    del kw["sr_start_t"], kw["sr_aug_level"]
    diffusion = diffusion_kwargs(role, config, cfg.dynamic_threshold_percentile)
    return {**kw, "conditioning": conditioning(role, config),
            "diffusion": {**diffusion, "null_keys": list(diffusion["null_keys"])}}


def export_cascade(run_uri: str, cascade: str, out_uri: str, cfg: SampleConfig, *,
                   encoders: dict[str, Any] | None = None, card: dict[str, Any] | None = None) -> str:
    """Write the cascade's folder at ``out_uri``; returns it. ``cfg``: the sampling settings to
    record (the run's ``sample`` section); ``encoders``: the embed stage's encoders.json."""
    if cascade not in CASCADES:
        raise ValueError(f"--cascade must be one of {', '.join(CASCADES)} (got {cascade!r})")
    if cfg.guidance != "cfg":
        cfg = cfg.model_copy(update={"guidance": "cfg"})  # CLIP guidance is not exported (see above)
    roles = cascade_roles(cascade)
    finals = {}
    for role in roles:
        uri = layout.finished_stage_dir(run_uri, stage_of(role))
        if uri is None:
            raise StageFailed(f"the {cascade} cascade needs {stage_of(role)}, which {run_uri} has not finished: "
                              f"train it first (t2i resume {run_uri})")
        finals[role] = resolve_final(uri)
    code = pipeline_files()  # before any write: code that cannot be shipped fails here
    configs = {role: read_final_config(f) for role, f in finals.items()}
    models = {role: _model_doc(role, configs[role], cfg) for role in roles}
    features = sorted({f for m in models.values() for f in m["conditioning"].values() if f != PREVIOUS})
    for role in roles:
        export_model(finals[role], store.join(out_uri, role), fmt="diffusers",
                     card={"name": f"{(card or {}).get('name', cascade)}/{role}", "description": model(role).description})
    for name, text in code.items():
        store.write_bytes_atomic(store.join(out_uri, name), text.encode())
    for uri in store.listdir(out_uri):  # sampling code of an earlier export into this folder
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("t2i_") and name.endswith(".py") and name not in code:
            store.remove(uri)
    t2i = {"cascade": cascade, "cascade_index": list(CASCADES).index(cascade), "roles": list(roles),
           "features": features, "models": models, "seed": cfg.seed, "sr_start_t": cfg.sr_start_t,
           "sr_aug_level": cfg.sr_aug_level, "encoders": encoders or {}}
    index = {"_class_name": [PIPELINE_MODULE, PIPELINE_CLASS], "_diffusers_version": _diffusers_version(),
             **{role: [diffusers_code.MODELING_MODULE, diffusers_code.class_name(configs[role].network["class"])]
                for role in roles},
             "t2i": t2i}
    store.write_bytes_atomic(store.join(out_uri, CARD), cascade_card(t2i, card or {}).encode())
    store.write_bytes_atomic(store.join(out_uri, MODEL_INDEX), json.dumps(index, indent=2).encode())  # last
    return out_uri


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return DIFFUSERS_TESTED


def cascade_card(t2i: dict[str, Any], info: dict[str, Any]) -> str:
    """The folder's model card: the cascade, its models, its encoders, and how to call it."""
    enc = t2i["encoders"]
    names = {k: (enc.get(k) or {}).get("model") for k in ("clip", "t5")}
    kwargs = ", ".join(f"{f}=..." for f in t2i["features"])
    lines = ["---", "library_name: diffusers", "tags: [text-to-image, diffusion]", "---", "",
             f"# {info.get('name') or t2i['cascade']}: the {t2i['cascade']} cascade of a t2i-pipeline run", "",
             " -> ".join(t2i["roles"]) + ", each in its own folder (its card says how it was trained).", "",
             "## Text encoders", "",
             "The pipeline reads the prompt's features, as the run's encoders give them (named here as the run "
             "named them; the export downloaded nothing):", "",
             f"- CLIP: `{names['clip']}`", f"- T5: `{names['t5']}`", "",
             "## Sampling", "", "```python", "from diffusers import DiffusionPipeline",
             "pipe = DiffusionPipeline.from_pretrained('path/to/this/folder', trust_remote_code=True)",
             f"images = pipe({kwargs}, seed={t2i['seed']}).images",
             "```", "",
             "Image i of a call has the seed `seed + i` (or `seeds=[...]`), and its noise depends on that alone: "
             "with the same features and settings the images are those `t2i sample` draws. Defaults (the run's "
             "sample section):", "", "| model | steps | guidance | sampler |", "|---|---|---|---|"]
    lines += [f"| {r} | {m['steps']} | {m['guidance_scale']} | {m['sampler']} |" for r, m in t2i["models"].items()]
    return "\n".join(lines) + "\n"

"""The run spec: YAML -> one typed config per stage, validated before any worker starts.

Each stage owns its config class (docs/design.md: one typed config per stage, owned by that stage);
this module only composes them, adds ``store`` and ``cluster``, and turns pydantic's errors into
messages that name the field path and what is allowed.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from pipeline.configbase import StrictModel
from pipeline.run.graph import STAGES, stage_config_classes
from pipeline.store import SUPPORTED_SCHEMES, normalize, scheme_of
from stages.models import MODELS, chained_pairs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_SPEC = CONFIG_DIR / "demo.yaml"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SpecError(ValueError):
    """A run spec that cannot be run; the message is meant for the user as is."""


class StoreConfig(StrictModel):
    uri: str = Field("file://./runs", description="Root of the artifact store; runs live at <uri>/<run_id>. "
                     "file:// (default), s3:// (endpoint/credentials from the AWS environment) or gs:// (needs gcsfs).")

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = scheme_of(v)
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"unsupported URI scheme {scheme!r}; allowed: {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}")
        if scheme == "gs":
            try:
                import gcsfs  # noqa: F401  (optional: the gcs extra)
            except ImportError as e:
                raise ValueError("gs:// needs gcsfs: pip install 't2i-pipeline[gcs]'") from e
        return normalize(v) if scheme == "file" else v.rstrip("/")


class ClusterConfig(StrictModel):
    address: Optional[str] = Field(None, description="Ray address: null starts a local Ray sized to this machine; "
                                   "'auto', 'ray://host:10001' or 'host:6379' join an existing cluster.")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the local Ray (default: all of this machine's).")
    num_gpus: Optional[int] = Field(None, ge=0, description="GPUs of the local Ray (default: detected).")
    include_dashboard: bool = Field(False, description="Start the Ray dashboard with a local Ray.")
    dashboard_host: str = Field("127.0.0.1", description="Interface the local dashboard binds to; loopback unless you need it remotely.")
    use_ray: bool = Field(True, description="false runs every stage in this process, one after another (no Ray at all).")


def _run_spec_model():
    fields: dict[str, Any] = {
        "run_id": (str, Field(..., description="Name of the run; its artifacts live at <store.uri>/<run_id>.")),
        "seed": (int, Field(0, ge=0, description=(
            "The run's seed: every stage with randomness (training: initialization, noise, dropout and data "
            "order; sampling and evaluation: the noise) takes it unless its section sets its own `seed`. "
            "The download corpus is data, not a draw: `download.demo.seed` stays its own."))),
        "store": (StoreConfig, Field(default_factory=StoreConfig)),
        "cluster": (ClusterConfig, Field(default_factory=ClusterConfig)),
    }
    for stage in STAGES:
        cls = stage_config_classes()[stage.name]
        if stage.required:
            fields[stage.name] = (cls, Field(..., description=stage.description))
        else:
            fields[stage.name] = (Optional[cls], Field(None, description=stage.description + " Omit to skip."))
    model = create_model("RunSpec", __base__=StrictModel, **fields)
    return model


_RUNSPEC = None


def RunSpec():  # noqa: N802 - a lazily built class
    """The composed spec model (built on first use: stage modules import torch)."""
    global _RUNSPEC
    if _RUNSPEC is None:
        _RUNSPEC = _run_spec_model()
    return _RUNSPEC


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid run spec {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the shipped specs in pipeline/configs/)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        # Our own validators already say what they got; pydantic's built-in checks do not.
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) or "(got " in msg else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def parse_spec(data: dict, source: str = "<dict>"):
    if not isinstance(data, dict):
        raise SpecError(f"invalid run spec {source}: the top level must be a mapping of sections, got {type(data).__name__}")
    run_id = data.get("run_id")
    if isinstance(run_id, str) and not RUN_ID_RE.match(run_id):
        raise SpecError(f"invalid run spec {source}:\n  run_id: must match {RUN_ID_RE.pattern} (got {run_id!r})")
    data = with_stage_seeds(data)
    try:
        spec = RunSpec().model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source)) from None
    problems = cross_stage_problems(spec)
    if problems:
        raise SpecError("\n".join([f"invalid run spec {source}:"] + [f"  {p}" for p in problems]))
    return spec




def with_stage_seeds(data: dict) -> dict:
    """A copy of ``data`` in which every seeded section that names no ``seed`` of its own takes the
    spec's top-level ``seed`` (default 0), so one number changes every draw of a run and a section
    can still pin its own. Sections that are not mappings are left for validation to report."""
    if "seed" not in data:
        return data  # every section's own default is 0, the run seed's default: nothing to add
    seed = data["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return data  # validation names the field, once
    out = dict(data)
    classes = stage_config_classes()
    for stage in STAGES:
        section = out.get(stage.name)
        if not isinstance(section, dict):
            continue
        if "seed" in classes[stage.name].model_fields and "seed" not in section:
            out[stage.name] = {**section, "seed": seed}
        elif stage.name == "evaluate" and seed != 0:
            # Its sampling settings are the sample section's fields, kept as written (a dict): 0 is
            # their default, and leaving it out keeps a saved spec.yaml reading back the same.
            sampling = section.get("sampling", {})
            if isinstance(sampling, dict) and "seed" not in sampling:
                out[stage.name] = {**section, "sampling": {**sampling, "seed": seed}}
    return out


def cross_stage_problems(spec) -> list[str]:
    """Checks that need more than one field: flavors exist, the cascade's sizes chain up,
    the downloaded images are large enough for every model that trains on them."""
    problems: list[str] = []
    flavors = {}
    for stage, role, net in ((m.stage, m.role, m.network_role) for m in MODELS):
        cfg = getattr(spec, stage, None)
        if cfg is None:
            continue
        from stages.nets.flavors import get_flavor, list_flavors  # torch: reading a spec must not load it

        try:
            flavors[role] = get_flavor(net, cfg.flavor)
        except ValueError:
            allowed = sorted(f.name for f in list_flavors() if f.role == net)
            problems.append(f"{stage}.flavor: unknown flavor {cfg.flavor!r} for {role}; allowed: {', '.join(allowed)}")
    for role, f in flavors.items():
        if f.low_res_size is not None and f.image_size is not None and f.image_size <= f.low_res_size:
            problems.append(f"train_{role}.flavor: an SR model must output more pixels than it takes "
                            f"({f.low_res_size} -> {f.image_size})")
    for lo, hi in chained_pairs():
        if lo in flavors and hi in flavors and flavors[lo].image_size != flavors[hi].low_res_size:
            problems.append(f"train_{hi}.flavor: takes {flavors[hi].low_res_size}px input but train_{lo} "
                            f"({flavors[lo].name}) makes {flavors[lo].image_size}px; pick matching flavors")
    sample = getattr(spec, "sample", None)
    if sample is not None:
        missing = [st for st in sample.required_stages() if getattr(spec, st, None) is None]
        if missing:
            problems.append(f"sample.cascade: {sample.cascade!r} samples through {', '.join(missing)}, which this "
                            f"spec does not train; add them, pick another cascade, or set sample.max_stage")
        if getattr(spec, "embed", None) is None:
            problems.append("sample: needs the embed stage (it reloads the encoders to embed the prompts)")
    problems += _evaluate_problems(spec)
    problems += _refiner_problems(spec)
    dl = getattr(spec, "download", None)
    if dl is not None:
        for role, f in flavors.items():
            if f.image_size and dl.image_size < f.image_size:
                problems.append(f"download.image_size: {dl.image_size}px is smaller than train_{role} "
                                f"({f.name}) needs ({f.image_size}px); raise it to at least {f.image_size}")
    return problems


def _refiner_problems(spec) -> list[str]:
    """An upsampler trained only on t <= diffusion.train_t_max (a low-noise refiner) has never seen
    the noise levels above it: sampling must start at or below that level."""
    problems = []
    for m in (m for m in MODELS if m.upsampler):
        cfg = getattr(spec, m.stage, None)
        t_max = getattr(getattr(cfg, "diffusion", None), "train_t_max", 1.0)
        if cfg is None or t_max >= 1.0:
            continue
        sample, evaluate = getattr(spec, "sample", None), getattr(spec, "evaluate", None)
        starts = [("sample", getattr(sample, "sr_start_t", None)),
                  ("evaluate.sampling", None if evaluate is None else evaluate.sampling.get("sr_start_t", 1.0))]
        for name, start in starts:
            if start is not None and start > t_max:
                problems.append(f"{name}.sr_start_t: {start} is above {m.stage}.diffusion.train_t_max ({t_max}), "
                                f"the highest noise level that model was trained on; set it to at most {t_max}")
    return problems


def _evaluate_problems(spec) -> list[str]:
    """The evaluate stage samples its cascades like sample does and needs a held-out split."""
    ev = getattr(spec, "evaluate", None)
    if ev is None:
        return []
    problems = []
    missing = [st for st in ev.required_stages() if getattr(spec, st, None) is None]
    if missing:
        problems.append(f"evaluate.cascade: {ev.cascade!r} samples through {', '.join(missing)}, which this spec "
                        f"does not train; add them, pick another cascade, or set evaluate.sampling.max_stage")
    embed = getattr(spec, "embed", None)
    if embed is None:
        problems.append("evaluate: needs the embed stage (its held-out split and encoders)")
    elif embed.holdout_fraction == 0 and (embed.holdout_min == 0 or embed.holdout_max_fraction == 0):
        problems.append("evaluate: embed holds out no samples (embed.holdout_fraction and holdout_min are 0); "
                        "set embed.holdout_fraction or embed.holdout_min so there is something to evaluate on")
    return problems


def load_spec(path: str | os.PathLike | None = None, overrides: dict | None = None):
    """Read, merge ``overrides`` (dotted keys) and validate a YAML spec.

    Relative paths inside a spec (the URL list, local encoder dirs) are resolved by the stages
    against the current directory, like every other CLI tool; the shipped specs are written for
    the repository root.
    """
    path = Path(path) if path else DEFAULT_SPEC
    if not path.exists():
        raise SpecError(f"run spec {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())  # safe_load: a spec is data, never code
    except yaml.YAMLError as e:
        raise SpecError(f"run spec {path} is not valid YAML: {e}") from None
    # YAML anchors (`train_base: *debug`) share one dict between sections: copy them apart so an
    # override of one section (--set train_base.steps=8) never changes the others.
    data = json.loads(json.dumps(data, default=str))
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return parse_spec(data, str(path))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SpecError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", 3); the value is parsed as YAML so numbers and booleans are typed."""
    if "=" not in text:
        raise SpecError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def run_uri(spec) -> str:
    return f"{spec.store.uri.rstrip('/')}/{spec.run_id}"


def spec_to_yaml(spec) -> str:
    # None must survive the round trip: `pretrained: null` is not the same as the default tag.
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)

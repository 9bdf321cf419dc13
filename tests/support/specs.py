"""Run specs for tests: the shipped smoke spec, changed where a test needs something else.

Every spec a test writes starts from ``pipeline/configs/smoke.yaml`` (the one spec the tests,
the benchmarks and the README share) and says only what differs, so a reader sees at once what
the test is about and the smoke spec stays the single description of "the smallest run".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE_SPEC = REPO / "pipeline" / "configs" / "smoke.yaml"
DEMO_SPEC = REPO / "pipeline" / "configs" / "demo.yaml"
# The stage sections of a run spec; run_id, store and cluster are always kept.
_ALWAYS = ("run_id", "store", "cluster")
TRAIN_STAGES = ("train_prior", "train_decoder", "train_base", "train_sr256", "train_sr1024")  # the 'both' cascades'


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def smoke_spec(*, only: Iterable[str] | None = None, **changes) -> dict:
    """The shipped smoke spec as a plain dict, changed section by section.

    ``changes``: a dict is merged into its section (recursively; a None inside removes that key),
    None removes the section, anything else replaces it. ``only``: the stage sections to keep
    (run_id, store and cluster always stay); the others are removed before ``changes`` apply.
    """
    data = yaml.safe_load(SMOKE_SPEC.read_text())
    data = json.loads(json.dumps(data))  # the YAML anchors share dicts: copy them apart
    if only is not None:
        keep = set(_ALWAYS) | set(only)
        data = {k: v for k, v in data.items() if k in keep}
    return _merge(data, changes)


def tiny_embed(encoders: str | Path, *, max_length: int = 32, **changes) -> dict:
    """The smoke spec's embed section changes for tiny encoders built in ``encoders`` (instead of
    ./runs/_encoders), with the smoke spec's actor and held-out settings left at their defaults."""
    return {"clip": {"model": f"tiny:{encoders}"},  # the smoke spec's pretrained: null stays
            "t5": {"model": f"tiny:{encoders}", "max_length": max_length},
            "gpus_per_actor": None, "num_actors": None, "holdout_min": None, "holdout_max_fraction": None, **changes}


def write_spec(path: str | Path, data: dict) -> str:
    """Write ``data`` as a YAML spec file; returns its path."""
    Path(path).write_text(yaml.safe_dump(data))
    return str(path)


# ----------------------------------------------------------------------------- spec mistakes
# Each kind of mistake in a spec and what its one error line must say (a regex): checked by
# tests/unit/test_spec.py, counted in the reliability summary by tests/reliability/test_reliability_inputs.py.
SPEC_MISTAKES = [
    ("download.image_sizee", 64, r"download\.image_sizee: unknown key"),
    ("bogus_section", {}, r"bogus_section: unknown key"),
    ("download.image_size", "big", r"download\.image_size: .*integer.*'big'"),
    ("download.image_size", -64, r"download\.image_size: .*greater than 0"),
    ("train_base.batch_size", 0, r"train_base\.batch_size: batch_size must be > 0 \(got 0\)"),
    ("train_base.zero_stage", 4, r"train_base\.zero_stage: zero_stage must be one of 0, 1, 2, 3"),
    ("train_base.lr", -1.0, r"train_base\.lr: lr must be > 0"),
    ("train_decoder.cfg_drop_text", 1.5, r"train_decoder\.cfg_drop_text: .*within \[0, 1\]"),
    ("train_base.flavor", "huge", r"train_base\.flavor: unknown flavor 'huge' for base; allowed: .*base64-2b.*demo"),
    ("train_sr256.flavor", "sr256-600m", r"train_sr256\.flavor: takes 64px input but train_base \(demo\) makes 16px"),
    ("download.image_size", 32, r"download\.image_size: 32px is smaller than train_sr1024"),
    ("store.uri", "ftp://host/runs", r"store\.uri: unsupported URI scheme 'ftp'; allowed: file://, s3://, gs://"),
    ("download.url_list", "/nonexistent/urls.parquet", r"download\.url_list: .*/nonexistent/urls\.parquet"),
    ("run_id", "../escape", r"run_id: must match"),
    ("embed.batch_size", 0, r"embed\.batch_size: .*greater than or equal to 1"),
    ("sample.cascade", "dalle3", r"sample\.cascade: .*'unclip', 'imagen', 'glide', 'both' or 'all'"),
]


def set_field(path: str, value):
    """A mutation of a spec dict: set the dotted ``path`` to ``value``."""
    def f(d):
        node = d
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return f


def demo_spec_error(mutate) -> str:
    """The SpecError message for the shipped demo spec changed by ``mutate`` (it must fail)."""
    import copy

    from pipeline.run.spec import SpecError, parse_spec

    data = copy.deepcopy(yaml.safe_load(DEMO_SPEC.read_text()))
    mutate(data)
    with pytest.raises(SpecError) as ei:
        parse_spec(data, "t.yaml")
    return str(ei.value)

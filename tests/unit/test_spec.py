"""Run spec validation: every shipped spec parses; every kind of mistake names its field."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.run.spec import CONFIG_DIR, SpecError, load_spec, parse_override, parse_spec, spec_to_yaml
from tests.support.specs import DEMO_SPEC, SMOKE_SPEC, SPEC_MISTAKES, demo_spec_error, set_field

DEMO = yaml.safe_load(DEMO_SPEC.read_text())


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_parses_and_round_trips(path):
    spec = load_spec(path)
    again = parse_spec(yaml.safe_load(spec_to_yaml(spec)), "round trip")
    assert again.model_dump() == spec.model_dump(), "saved spec.yaml must reproduce the same configs"


@pytest.mark.parametrize("path,value,expect", SPEC_MISTAKES)
def test_mistakes_name_the_field_and_what_is_allowed(path, value, expect):
    import re

    msg = demo_spec_error(set_field(path, value))
    assert re.search(expect, msg), msg
    assert "Traceback" not in msg


def test_sample_needs_the_models_of_its_cascade():
    msg = demo_spec_error(lambda d: d.pop("train_prior"))
    assert "sample.cascade: 'both' samples through train_prior" in msg
    data = copy.deepcopy(DEMO)
    data.pop("train_prior"), data.pop("train_decoder")
    data["sample"]["cascade"] = "imagen"
    assert parse_spec(data).sample.cascade == "imagen"


def test_missing_required_section():
    msg = demo_spec_error(lambda d: d.pop("download"))
    assert "download: required field is missing" in msg


def test_several_mistakes_reported_together():
    def f(d):
        d["train_base"]["batch_size"] = -1
        d["train_prior"]["steps"] = 0
    msg = demo_spec_error(f)
    assert "train_base.batch_size" in msg and "train_prior.steps" in msg


def test_omitted_stage_is_skipped_not_an_error():
    data = {k: v for k, v in DEMO.items() if k in ("run_id", "store", "download")}
    spec = parse_spec(data)
    assert spec.embed is None and spec.train_base is None


def test_overrides_are_typed_and_validated(tmp_path: Path):
    assert parse_override("train_base.steps=7") == ("train_base.steps", 7)
    assert parse_override("cluster.use_ray=false") == ("cluster.use_ray", False)
    spec = load_spec(CONFIG_DIR / "demo.yaml", {"train_base.steps": 70})
    assert spec.train_base.steps == 70
    with pytest.raises(SpecError, match="train_base.steps: steps must be > 0"):
        load_spec(CONFIG_DIR / "demo.yaml", {"train_base.steps": 0})


def test_yaml_is_loaded_safely(tmp_path: Path):
    p = tmp_path / "evil.yaml"
    p.write_text("run_id: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def test_missing_spec_file():
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("/nonexistent/spec.yaml")


def test_refiner_upsampler_must_be_sampled_from_its_noise_range():
    """An SR model trained only on t <= train_t_max cannot start sampling above it."""
    from pipeline.run.spec import SpecError, load_spec

    low = {"train_sr256.diffusion.train_t_max": 0.2}
    with pytest.raises(SpecError, match=r"sample\.sr_start_t: 1\.0 is above train_sr256\.diffusion\.train_t_max"):
        load_spec(SMOKE_SPEC, {**low, "sample.sr_start_t": 1.0})
    spec = load_spec(SMOKE_SPEC, {**low, "sample.sr_start_t": 0.1,
                                                     "evaluate.sampling": {"sr_start_t": 0.1}})
    assert spec.train_sr256.diffusion.train_t_max == 0.2


def test_the_run_seed_reaches_every_seeded_stage_unless_a_section_pins_its_own():
    data = copy.deepcopy(DEMO)
    data["seed"] = 7
    data["train_decoder"]["seed"] = 3
    spec = parse_spec(data)
    seeded = {name: getattr(spec, name).seed for name in ("train_prior", "train_base", "train_sr256",
                                                          "train_sr1024", "sample")}
    assert seeded == dict.fromkeys(seeded, 7)
    assert spec.train_decoder.seed == 3 and spec.evaluate.sampling["seed"] == 7
    assert spec.download.demo.seed == DEMO["download"]["demo"]["seed"], "the corpus is data, not a draw"
    # No run seed: the sections keep their own defaults and a saved spec reads back the same.
    plain = parse_spec(copy.deepcopy(DEMO))
    assert plain.seed == 0 and plain.train_base.seed == 0 and "seed" not in plain.evaluate.sampling
    again = parse_spec(yaml.safe_load(spec_to_yaml(spec)), "round trip")
    assert again.model_dump() == spec.model_dump()


@pytest.mark.parametrize("value,expect", [(-1, "seed: Input should be greater than or equal to 0"),
                                          ("x", "seed: Input should be a valid integer")])
def test_a_bad_run_seed_is_named_once(value, expect):
    data = copy.deepcopy(DEMO)
    data["seed"] = value
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert expect in str(e.value) and "train_base.seed" not in str(e.value)

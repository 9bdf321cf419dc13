"""Adding a model is shown, not claimed: a toy model defined in the tests (tests/support/toy_model.py)
joins the registry through ``T2I_MODELS``, the path any model outside the package takes, and is
then trained in a smoke run and sampled like the shipped ones. Nothing in pipeline/, stages/ or
data_prep/ names it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import layout, store
from pipeline import manifest as mf

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SUPPORT), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "T2I_MODELS": "toy_model", "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def _python(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_the_registry_takes_the_toy_model_from_its_own_module():
    out = _python("import stages.models as m; from stages.sampling.config import SampleConfig\n"
                  "print(m.CASCADES['toy'], m.by_stage('train_toy').network_role, m.model('toy').module)\n"
                  "print(SampleConfig(cascade='toy', prompts=['x']).required_stages())")
    assert out.split("\n")[:2] == ["('toy',) base toy_model", "['train_toy']"]
    # The shipped cascades keep their order (their sampling seeds depend on it).
    assert "'unclip', 'imagen', 'glide', 'toy'" in _python("import stages.models as m; print(list(m.CASCADES))")


def test_the_toy_model_trains_in_a_smoke_run_and_samples(smoke_run, tmp_path):
    """The session's smoke run is copied (download and embed are found done); the spec adds
    train_toy and samples the toy cascade: only those two stages run."""
    cwd, _ = smoke_run
    shutil.copytree(Path(cwd) / "runs", tmp_path / "runs")
    spec = yaml.safe_load((REPO / "pipeline" / "configs" / "smoke.yaml").read_text())
    for section in [k for k in spec if k.startswith("train_")] + ["evaluate"]:
        spec.pop(section)
    spec["train_toy"] = {"flavor": "debug", "steps": 3, "batch_size": 4, "log_every": 1, "loader_workers": 0}
    spec["sample"] = {"cascade": "toy", "steps": 2, "prompts": ["a large red circle in the center on a white background"]}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))

    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "toy.yaml", "--no-ray"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=_env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert "download: done already" in p.stdout and "embed: done already" in p.stdout, p.stdout

    run = store.normalize(str(tmp_path / "runs" / "smoke"))
    toy = layout.read_current(run, "train_toy")
    manifest = mf.read_manifest(toy)
    assert manifest["counts"]["steps"] == 3
    config = store.read_json(store.join(manifest["outputs"]["config"]))
    assert config["role"] == "toy" and config["network"]["class"] == "UNet"  # the base family, its own name

    sample = mf.read_manifest(layout.read_current(run, "sample"))
    assert "toy_demo_colour_accuracy" in sample["metrics"], sample["metrics"]
    pngs = [u for u in store.glob(store.join(sample["out_uri"], "**", "*.png")) if "toy" in u]
    assert pngs, "the toy cascade wrote no image"

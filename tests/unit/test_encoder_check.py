"""Encoders checked before any work (issue 27): a spec naming a model this machine cannot get fails
before the first stage, in one line per model naming the field and the fix (data_prep/encoder_check.py).

Nothing here reaches a network: every test runs with HF_HUB_OFFLINE=1 (no probe at all) or hands
``encoder_problems`` a fake probe; the caches are empty temporary folders.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_prep.encoder_check import INCEPTION_URL, encoder_problems
from pipeline.run.spec import load_spec
from tests.support.cli import t2i
from tests.support.specs import DEMO_SPEC, smoke_spec, write_spec

CLIP_L = {"embed.clip.model": "ViT-L-14", "embed.clip.pretrained": "openai"}
T5_XXL = {"embed.t5.model": "google/t5-v1_1-xxl"}


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An offline machine with empty caches; returns the HF_HOME."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf"


def no_probe(url: str) -> bool:
    raise AssertionError(f"probed {url} although HF_HUB_OFFLINE=1")


def fake_hub_file(hf_home: Path, repo: str, filename: str) -> None:
    """``filename`` of ``repo`` in the hub cache layout try_to_load_from_cache reads."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0" * 40)
    (root / "snapshots" / ("0" * 40) / filename).parent.mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / ("0" * 40) / filename).write_bytes(b"x")


def test_uncached_clip_offline_is_one_line_naming_the_field_and_the_fix(offline):
    problems = encoder_problems(load_spec(DEMO_SPEC, CLIP_L), probe=no_probe)
    assert len(problems) == 1, problems
    line = problems[0]
    assert "\n" not in line
    assert line.startswith("embed.clip.model: 'ViT-L-14' (pretrained 'openai') is not in the local cache")
    assert str(offline / "hub") in line and "HF_HUB_OFFLINE" in line
    assert "open_clip.create_model_and_transforms('ViT-L-14', pretrained='openai')" in line
    assert "or set embed.clip.model to a local" in line and "Encoders are checked before any work" in line


def test_uncached_t5_offline(offline):
    problems = encoder_problems(load_spec(DEMO_SPEC, T5_XXL), probe=no_probe)
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert problems[0].startswith("embed.t5.model: 'google/t5-v1_1-xxl' is not in the local cache")
    assert "`hf download google/t5-v1_1-xxl`" in problems[0]
    assert "set embed.t5.model to a local directory saved with save_pretrained" in problems[0]


def test_both_hub_encoders_give_two_lines(offline):
    problems = encoder_problems(load_spec(DEMO_SPEC, {**CLIP_L, **T5_XXL}), probe=no_probe)
    assert [p.split(":")[0] for p in problems] == ["embed.clip.model", "embed.t5.model"]


def test_tiny_and_local_copies_pass(offline, tmp_path):
    assert encoder_problems(load_spec(DEMO_SPEC), probe=no_probe) == []  # tiny: built on demand
    clip_dir, t5_dir = tmp_path / "clip", tmp_path / "t5"
    clip_dir.mkdir(), t5_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text("{}")
    (t5_dir / "config.json").write_text("{}")
    spec = load_spec(DEMO_SPEC, {"embed.clip.model": str(clip_dir), "embed.t5.model": str(t5_dir)})
    assert encoder_problems(spec, probe=no_probe) == []
    (clip_dir / "open_clip_config.json").unlink()
    (problem,) = encoder_problems(spec, probe=no_probe)
    assert problem.startswith(f"embed.clip.model: '{clip_dir}': {clip_dir} holds no open_clip_config.json")


def test_cached_weights_pass_offline(offline):
    from open_clip.pretrained import get_pretrained_cfg

    repo, name = os.path.split(get_pretrained_cfg("ViT-L-14", "openai")["hf_hub"])
    fake_hub_file(offline, repo, name or "open_clip_model.safetensors")
    for f in ("config.json", "spiece.model", "pytorch_model.bin"):
        fake_hub_file(offline, "google/t5-v1_1-xxl", f)
    assert encoder_problems(load_spec(DEMO_SPEC, {**CLIP_L, **T5_XXL}), probe=no_probe) == []
    (offline / "hub" / "models--google--t5-v1_1-xxl" / "snapshots" / ("0" * 40) / "pytorch_model.bin").unlink()
    (problem,) = encoder_problems(load_spec(DEMO_SPEC, {**CLIP_L, **T5_XXL}), probe=no_probe)
    assert problem.startswith("embed.t5.model:")  # config without weights is not enough


def test_only_stages_that_will_run_are_checked(offline):
    spec = load_spec(DEMO_SPEC, {**CLIP_L, "evaluate.fid_features": "torchvision:inception_v3"})
    assert encoder_problems(spec, ["train_base", "sample"], probe=no_probe) == []  # embed done already
    (fid,) = encoder_problems(spec, ["evaluate"], probe=no_probe)
    assert fid.startswith("evaluate.fid_features: 'torchvision:inception_v3' is not in the local cache")
    assert "torchvision:inception_v3:/path/weights.pth" in fid
    ckpt = offline.parent / "torch" / "hub" / "checkpoints" / os.path.basename(INCEPTION_URL)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert encoder_problems(spec, ["evaluate"], probe=no_probe) == []


def test_inception_url_is_torchvisions():
    from torchvision.models import Inception_V3_Weights

    assert Inception_V3_Weights.IMAGENET1K_V1.url == INCEPTION_URL


def test_online_uses_the_probe_once_per_host(offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    asked: list[str] = []

    def probe(answer: bool):
        def f(url: str) -> bool:
            asked.append(url)
            return answer
        return f

    spec = load_spec(DEMO_SPEC, {**CLIP_L, **T5_XXL})
    assert encoder_problems(spec, probe=probe(True)) == []  # not cached, but the hub answers: embed downloads
    assert asked == ["https://huggingface.co"]
    problems = encoder_problems(spec, probe=probe(False))
    assert len(problems) == 2 and all("huggingface.co did not answer" in p for p in problems), problems


def test_t2i_run_fails_before_the_download(tmp_path):
    """What a new user sees: `t2i run` with ViT-L-14/openai, no network, empty cache."""
    spec = write_spec(tmp_path / "spec.yaml", smoke_spec(embed={"clip": {"model": "ViT-L-14", "pretrained": "openai"}}))
    r = t2i("run", spec, "--no-ray", cwd=tmp_path,
            env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": "", "HUGGINGFACE_HUB_CACHE": ""})
    assert r.code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: embed.clip.model: 'ViT-L-14' (pretrained 'openai')"), r.output
    assert "pre-fetch it on a machine with network" in errors[0]
    assert "Failed to download" not in r.output and "▶" not in r.stdout
    assert (tmp_path / "runs" / "smoke").is_dir() and not (tmp_path / "runs" / "smoke" / "download").exists()

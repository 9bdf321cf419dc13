"""Runs: the session's finished smoke run (a fixture), copies of it, and trained runs forged in the
real formats.

Fixtures (a pytest plugin, listed in tests/conftest.py):

* ``tiny_encoders``: the tiny CLIP/T5, built once per session (a folder; name it ``tiny:<folder>``);
* ``smoke_run``: one finished ``t2i run pipeline/configs/smoke.yaml --no-ray``, shared by every
  test that only reads a finished run. A test that changes a run works on a copy (:func:`copy_run`).

Helpers: :func:`copy_run`, :func:`write_trained_run`, :func:`write_random_final`.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import pytest

from tests.support.cli import t2i
from tests.support.specs import SMOKE_SPEC

# Every model a trained run can hold; the first five are the default ('both') cascades'.
CASCADE_ROLES = ("prior", "decoder", "base", "sr256", "sr1024")
ALL_ROLES = CASCADE_ROLES + ("glide", "noised_clip")
# Files of a run that name its folder (manifests, markers, spec.yaml, reports): rewritten by copy_run.
_TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".html", ".log", ".txt")


class SmokeRun(tuple):
    """``(working dir, run URI)`` of the session's smoke run; ``seconds``: how long `t2i run` took."""

    seconds: float

    def __new__(cls, cwd: Path, run: str, seconds: float):
        self = super().__new__(cls, (cwd, run))
        self.seconds = seconds
        return self


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> Path:
    """The tiny CLIP and T5 (data_prep.tiny_encoders), built once for the session: ``tiny:<this folder>``."""
    from data_prep.tiny_encoders import ensure_tiny_encoders

    root = tmp_path_factory.mktemp("tiny-encoders")
    ensure_tiny_encoders(root)
    return root


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """One finished run of the shipped smoke spec (no Ray), shared by the tests that only read it:
    ``(working dir, run URI)``. Tests that change a run work on a copy (copy_run)."""
    cwd = tmp_path_factory.mktemp("smoke-shared")
    r = t2i("run", SMOKE_SPEC, "--no-ray", cwd=cwd, timeout=600)
    assert r.code == 0, r.output
    return SmokeRun(cwd, f"file://{cwd}/runs/smoke", r.seconds)


def copy_run(src: str | Path, dest: str | Path) -> Path:
    """Copy the working directory ``src`` of a finished run (its ``runs/`` included) to ``dest``
    and point the copy at itself: manifests, markers and the saved spec record absolute URIs."""
    src, dest = Path(src), Path(dest)
    shutil.copytree(src, dest, symlinks=True)
    old, new = str(src).encode(), str(dest).encode()
    for p in dest.rglob("*"):
        if p.suffix in _TEXT_SUFFIXES and p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            if old in data:
                p.write_bytes(data.replace(old, new))
    return dest


# ----------------------------------------------------------------------------- trained runs
def write_random_final(run: str, role: str, dims: dict, *, seed: int, step: int, stage: str | None = None,
                       **config) -> str:
    """``<run>/<stage>/final/step_N/`` of a debug-flavor ``role`` holding random weights, written
    by the training loop's own ``write_final``. The weights are perturbed away from the
    zero-initialised output layers, so conditioning really reaches the output. ``config``:
    FinalConfig fields to change (e.g. image_size). Returns the stage folder."""
    import torch

    from pipeline import store
    from stages.models import model as model_def
    from stages.nets.flavors import build_network, get_flavor
    from stages.training.final_weights import FinalConfig, network_config, write_final

    torch.manual_seed(seed)
    net = build_network(role, "debug", dims)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = model_def(role).config()  # the stage config's defaults: its diffusion and condaug settings
    fl = get_flavor(role, "debug")
    stage_uri = store.join(run, stage or f"train_{role}")
    write_final(stage_uri, net.state_dict(), FinalConfig(**{
        "role": role, "flavor": "debug", "cond_dims": dims, "image_size": fl.image_size,
        "low_res_size": fl.low_res_size, "diffusion": cfg.diffusion.model_dump(),
        "condaug": cfg.condaug.model_dump(mode="json") if hasattr(cfg, "condaug") else None, "step": step,
        "network": network_config(net), **config}))
    return stage_uri


def write_trained_run(root: str | Path, encoders: str | Path, roles: Iterable[str] = ALL_ROLES, *, step: int = 3,
                      metrics: Iterable[str] = CASCADE_ROLES) -> str:
    """A run at ``<root>/run`` as sampling and evaluation read it: ``embed/encoders.json`` naming
    the tiny encoders in ``encoders`` (written by ``write_encoders_doc``) and, for each of
    ``roles``, ``train_<role>/final/step_<step>/`` with random weights (write_random_final).
    The roles in ``metrics`` also get a 4-row metrics.jsonl (the report's training curves).
    Returns the run URI."""
    from data_prep.encoders import ClipConfig, T5Config, load_clip, load_t5
    from data_prep.encoders_doc import EncodersDoc, write_encoders_doc
    from pipeline import store

    clip_cfg, t5_cfg = ClipConfig(model=f"tiny:{encoders}"), T5Config(model=f"tiny:{encoders}", max_length=32)
    clip, t5 = load_clip(clip_cfg, device="cpu"), load_t5(t5_cfg, device="cpu")
    dims = {"clip_dim": clip.dim, "clip_token_dim": clip.token_dim, "t5_dim": t5.dim}
    run = store.normalize(str(Path(root) / "run"))
    write_encoders_doc(store.join(run, "embed"), EncodersDoc(clip=clip_cfg.model_dump(), t5=t5_cfg.model_dump(), **dims))
    metrics = set(metrics)
    for i, role in enumerate(roles):
        stage_uri = write_random_final(run, role, dims, seed=i, step=step)
        if role in metrics:
            rows = [f'{{"step": {s}, "loss": {1.0 / (s + 1)}, "grad_norm": 1.0, "lr": 0.0001, "samples_per_s": 5.0}}'
                    for s in range(4)]
            store.write_bytes_atomic(store.join(stage_uri, "metrics.jsonl"), "\n".join(rows).encode())
    return run

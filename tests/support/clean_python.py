"""A Python that has diffusers and torch but not t2i-pipeline: where an exported folder is loaded as
its users load it (tests/stages/test_export_diffusers.py, test_export_cascade.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Prepended to every probe: imports of the repo's packages fail there (the editable install's finder
# would still find them), and torch computes on one thread, as the tests' reference side does.
PROLOGUE = r"""
import importlib.abc, json, sys
class NoT2I(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pipeline", "stages", "data_prep", "tests"):
            raise ImportError(f"{name}: the exported folder must not need t2i-pipeline")
sys.meta_path.insert(0, NoT2I())
import torch, diffusers
torch.set_num_threads(1)
"""
# The probe's last line of output: what it found, and which of the repo's modules it imported (none).
EPILOGUE = r"""
report["t2i_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages", "data_prep"))
print(json.dumps(report))
"""


def run_probe(probe: str, root: Path, args: list[str], timeout: float = 300) -> dict:
    """Run ``probe`` (which fills ``report``) with ``sys.argv[1:] = [root, *args]`` from an empty
    folder, no PYTHONPATH, offline, with diffusers' module cache under ``root``; its report."""
    clean = root / "clean-cwd"
    clean.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "hf-modules"), PYTHONNOUSERSITE="1")
    p = subprocess.run([sys.executable, "-c", PROLOGUE + probe + EPILOGUE, str(root), *args], cwd=clean, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "not expected and will be ignored" not in p.stderr, p.stderr  # config.json matches the class
    return json.loads(p.stdout.strip().splitlines()[-1])

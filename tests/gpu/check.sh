#!/usr/bin/env bash
# GPU check of issue 8 (t2i bench + the fast path) on one CUDA host, ~6 minutes on an H200.
#
# The host has torch, transformers, open_clip's deps, no Ray. Before: on the dev machine, from the
# project root with .venv built, `../shared/tools/device-wheels.sh` fills .whl/ (DeepSpeed,
# pydantic, open_clip, ...). This script installs them (as that script's header says) when
# /tmp/site does not exist yet, then runs
#   1. pytest -m gpu tests/gpu      (fused SDPA kernels accept our layouts; bf16 bench gives MFU)
#   2. python tests/gpu/test_gpu.py (paper-scale train benchmarks plain vs ZeRO 0/2/3, loader vs
#                                    step, ViT-L/14 + T5-XXL embed; one subprocess and timeout per
#                                    item, failures reported, the summary table printed last)
# From a dev session with the device tool: build .whl/ first, then run this script with carry [".whl"]
# (.whl/ is git-ignored, so it only travels when carried; it is well under the 64 MiB limit).
# `t2i bench ...` itself also needs typer/rich/shellingham on the host (EXTRA_WHEELS="typer rich
# shellingham"); this script does not: it calls the benchmark modules directly.
# Options: --quick (small flavors: a smoke test of the driver), GPU_CHECK_BUDGET_S (default 420).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [ ! -d /tmp/site ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || echo "wheel install failed"
fi
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import ray" 2>/dev/null && echo "note: ray is importable here; the bench path does not use it"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/gpu || echo "pytest -m gpu: FAILED (continuing)"
else
  echo "pytest not installed: skipping pytest -m gpu"
fi
timeout "${GPU_CHECK_TIMEOUT_S:-540}" "$PY" tests/gpu/test_gpu.py "$@"

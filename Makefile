# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

# torch/torchvision first (pinned builds that pip takes from local disk here); DeepSpeed ships
# only a source archive whose setup imports torch, so it builds without isolation and without
# its CUDA ops (they are JIT-built on a GPU host when first used).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip wheel setuptools
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -q -e '.[test]'
	# The demo's tiny CLIP is trained once per user (~1 min), as installing a real CLIP downloads it.
	HF_HUB_OFFLINE=1 $(PY) -m data_prep.tiny_encoders
	touch $(STAMP)

.PHONY: venv demo test test-fast reliability clean-runs gpu-check
venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/t2i run pipeline/configs/demo.yaml
	$(VENV)/bin/t2i status runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra --durations=15 tests

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not cluster" tests

reliability: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m reliability tests

gpu-check:
	bash tests/gpu/check.sh

clean-runs:
	rm -rf runs

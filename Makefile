# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

# The pins of the venv and of the container image (`make image` passes them to the Dockerfile as
# --build-arg; its ARG defaults must equal them: tests/unit/test_container_image.py checks).
TORCH_VERSION       := 2.14.1
TORCHVISION_VERSION := 0.29.1
DEEPSPEED_SPEC      := deepspeed>=0.16
RAY_VERSION         := 2.60.0
RAY_VARIANT         := py311-cpu

# torch/torchvision first (pinned builds that pip takes from local disk here); DeepSpeed ships
# only a source archive whose setup imports torch, so it builds without isolation and without
# its CUDA ops (they are JIT-built on a GPU host when first used).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip wheel setuptools
	$(PIP) install -q torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install -q -e '.[test]'
	# The demo's tiny CLIP is trained once per user (~1 min), as installing a real CLIP downloads it.
	HF_HUB_OFFLINE=1 $(PY) -m data_prep.tiny_encoders
	touch $(STAMP)

.PHONY: venv demo test test-fast reliability clean-runs gpu-check image
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

# The container image the KubeRay manifests name (Dockerfile; cluster/README.md, "Run on Kubernetes
# (KubeRay)"). Another builder: `make image OCI=podman` (or OCI=buildah); another base:
# `make image RAY_VARIANT=py311-gpu` (CUDA, for GPU nodes); another name: `make image IMAGE=...`.
T2I_VERSION = $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= t2i-pipeline:$(T2I_VERSION)
OCI   ?= docker

image:
	$(OCI) build -t $(IMAGE) -f Dockerfile \
	  --build-arg RAY_VERSION=$(RAY_VERSION) --build-arg RAY_VARIANT=$(RAY_VARIANT) \
	  --build-arg TORCH_VERSION=$(TORCH_VERSION) --build-arg TORCHVISION_VERSION=$(TORCHVISION_VERSION) \
	  --build-arg "DEEPSPEED_SPEC=$(DEEPSPEED_SPEC)" .

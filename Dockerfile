# The image the KubeRay manifests name (cluster/kuberay/*.yaml: REGISTRY/t2i-pipeline:<version>).
# Build it with `make image`, which passes the Makefile's pins as --build-arg; the defaults below
# must equal them (tests/unit/test_container_image.py checks). Guide: cluster/README.md,
# "Run on Kubernetes (KubeRay)".
#
# Base: the Ray image of the pinned Ray version, Python 3.11. CPU by default; for GPU nodes pick a
# CUDA variant, e.g. `make image RAY_VARIANT=py311-gpu` (or py311-cu121, py311-cu128, ...).
ARG RAY_VERSION=2.60.0
ARG RAY_VARIANT=py311-cpu
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-${RAY_VARIANT}
FROM ${BASE_IMAGE}

ARG RAY_VERSION
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG DEEPSPEED_SPEC="deepspeed>=0.16"
# Optional: a torch wheel index (e.g. https://download.pytorch.org/whl/cpu for a smaller CPU-only image).
ARG TORCH_INDEX_URL=

# The Ray image's own non-root user (uid 1000, group users); its Python lives in its home, so pip
# installs need no root. Never switch back to root below.
USER ray
WORKDIR /home/ray

# Same order as the Makefile: torch first; DeepSpeed is a source archive whose setup imports torch,
# so no build isolation, and no prebuilt ops (DS_BUILD_OPS=0: they are JIT-built on first use).
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
RUN DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation "${DEEPSPEED_SPEC}"

# The project itself, installed (not editable) from the build context; .dockerignore keeps runs,
# venvs, caches and .git out. Ray stays the base image's version (a resolver that wanted another
# fails the build here instead of replacing it).
COPY --chown=1000:100 . /tmp/t2i-pipeline
RUN pip install --no-cache-dir /tmp/t2i-pipeline "ray[data,train,default]==${RAY_VERSION}" \
 && rm -rf /tmp/t2i-pipeline

# Build-time smoke check: the CLI starts, the pins are the ones installed, and we are not root.
RUN t2i --version \
 && python -c "import sys, torch, torchvision, ray; \
v = lambda m: m.__version__.split('+')[0]; \
got = (v(torch), v(torchvision), ray.__version__); \
want = ('${TORCH_VERSION}', '${TORCHVISION_VERSION}', '${RAY_VERSION}'); \
sys.exit(0 if got == want else f'installed {got}, pinned {want}')" \
 && test "$(id -u)" != 0

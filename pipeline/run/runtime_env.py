"""The package part of ``t2i submit --pip``'s runtime env: Ray's ``uv`` plugin where the Ray has it,
else its ``pip`` one (pipeline/run/submit.py ``build_runtime_env`` calls :func:`package_env`).

The packages are pyproject's ``[project].dependencies`` with the Makefile's pins applied (one source:
the Makefile's ``TORCH_VERSION``, ``TORCHVISION_VERSION``, ``DEEPSPEED_SPEC``, the same ones the venv
and the container image use), and DeepSpeed is built without its prebuilt ops (``DS_BUILD_OPS=0`` in
the env's env_vars; they are JIT-built on a GPU host when first used).

Ray's uv plugin (Ray >= 2.40: ``ray/_private/runtime_env/uv.py``) clones the node's virtualenv (or
makes one with ``--system-site-packages``), so whatever the node's Python already has satisfies the
pins without a download; it runs ``python -m uv pip install`` in it and, when that venv has no
``uv``, first ``pip install uv`` (from the node's pip index). We drop the plugin's default
``--no-cache`` so repeat installs (a new env hash, another node) reuse uv's cache.

Which installer: decided by this client's Ray (the preflight already refuses a cluster whose Ray
differs in major.minor): ``auto`` takes ``uv`` when the client's Ray knows the ``uv`` field."""
from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

from pipeline.run.job_errors import SubmitError

INSTALLERS = ("auto", "uv", "pip")
# pyproject name -> the Makefile variable that pins it, and how the pin reads as a requirement.
MAKEFILE_PINS = {"torch": ("TORCH_VERSION", "torch=={}"), "torchvision": ("TORCHVISION_VERSION", "torchvision=={}"),
                 "deepspeed": ("DEEPSPEED_SPEC", "{}")}
ENV_VARS = {"DS_BUILD_OPS": "0"}  # DeepSpeed from its source archive, without compiling its ops
UV_INSTALL_OPTIONS: list[str] = []  # not the plugin's default ["--no-cache"]: reuse uv's cache


class InstallerError(SubmitError):
    pass


def makefile_vars(root: Path) -> dict[str, str]:
    """``NAME := value`` / ``NAME ?= value`` / ``NAME = value`` lines of ``root/Makefile`` ({} when
    there is none, e.g. an installed package: then pyproject's ranges alone)."""
    try:
        text = (root / "Makefile").read_text()
    except OSError:
        return {}
    found = re.findall(r"^([A-Z][A-Z0-9_]*)\s*[:?]?=\s*(.*?)\s*$", text, flags=re.M)
    return {k: v for k, v in found}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pinned_requirements(root: Path) -> list[str]:
    """pyproject's dependencies, torch/torchvision/DeepSpeed replaced by the Makefile's pins."""
    with open(root / "pyproject.toml", "rb") as f:
        deps = list(tomllib.load(f)["project"]["dependencies"])
    mk = makefile_vars(root)
    out = []
    for dep in deps:
        var, fmt = MAKEFILE_PINS.get(_name(dep), (None, None))
        out.append(fmt.format(mk[var]) if var and mk.get(var) else dep)
    return out


def ray_supports_uv() -> bool:
    """Whether this client's Ray has the ``uv`` runtime-env field (and so, by the preflight's
    major.minor check, the cluster's)."""
    try:
        from ray.runtime_env import RuntimeEnv

        known = getattr(RuntimeEnv, "known_fields", set())
        return "uv" in known and importlib.util.find_spec("ray._private.runtime_env.uv") is not None
    except Exception:  # noqa: BLE001 - no Ray / an odd one: pip
        return False


def choose_installer(requested: str = "auto") -> str:
    if requested not in INSTALLERS:
        raise InstallerError(f"--pip-installer must be one of {', '.join(INSTALLERS)}, not {requested!r}")
    if requested == "auto":
        return "uv" if ray_supports_uv() else "pip"
    if requested == "uv" and not ray_supports_uv():
        import ray

        raise InstallerError(f"--pip-installer uv: Ray {ray.__version__} has no `uv` runtime env (Ray >= 2.40 has); "
                             f"use --pip-installer pip")
    return requested


def package_env(root: Path, installer: str = "auto") -> tuple[dict, dict]:
    """``({"uv": …} or {"pip": …}, env_vars)`` for the runtime env of ``--pip``."""
    packages = pinned_requirements(root)
    if choose_installer(installer) == "uv":
        field = {"uv": {"packages": packages, "uv_check": False, "uv_pip_install_options": list(UV_INSTALL_OPTIONS)}}
    else:
        field = {"pip": {"packages": packages, "pip_check": False}}
    return field, dict(ENV_VARS)

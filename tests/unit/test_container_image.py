"""The container image (Dockerfile, .dockerignore, `make image`) against everything else that pins
or names it.

One set of pins: the Makefile's variables install the venv and are passed by `make image` as
--build-arg, the Dockerfile's ARG defaults equal them, pyproject's requirements admit them, and the
launcher configs' setup commands ask for the same. One tag: the one `make image` builds
(t2i-pipeline:<pyproject version>) is the one every Kubernetes manifest in cluster/ names (after a
registry prefix), and the Ray version of its base image is the manifests' `rayVersion` and the
launcher configs' images'. These checks read the files and `make -n`; nothing is built.

The one test that builds the image (slow) runs only where an OCI builder works and
T2I_IMAGE_TEST=1 asks for it; otherwise it is skipped, saying which builders were looked for and
why none could be used.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.support.specs import REPO

CLUSTER = REPO / "cluster"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
IMAGE_NAME = "t2i-pipeline"
# The build args that are pins: each comes from the Makefile, each has a Dockerfile default.
PIN_ARGS = ("RAY_VERSION", "RAY_VARIANT", "TORCH_VERSION", "TORCHVISION_VERSION", "DEEPSPEED_SPEC")


# --- readers ----------------------------------------------------------------------------------

def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement(name: str) -> Requirement:
    found = [Requirement(d) for d in _pyproject()["project"]["dependencies"] if Requirement(d).name == name]
    assert len(found) == 1, f"pyproject should list {name} once, found {found}"
    return found[0]


def _dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _dockerfile_arg_defaults() -> dict[str, str]:
    """ARG NAME=default, first default wins (a later bare `ARG NAME` only re-declares it after
    FROM); `${NAME}` in a default is expanded from the ARGs above it, as the builder does."""
    defaults: dict[str, str] = {}
    for ln in _dockerfile_lines():
        m = re.fullmatch(r"ARG\s+(\w+)(?:=(.*))?", ln)
        if m and m.group(2) is not None and m.group(1) not in defaults:
            defaults[m.group(1)] = re.sub(r"\$\{(\w+)\}", lambda v: defaults.get(v.group(1), ""),
                                          _unquote(m.group(2)))
    return defaults


def _make_dry_run(target: str, *overrides: str) -> str:
    """What `make TARGET` would run (-n -B: print every command, run none), from a clean
    environment so a user's IMAGE/OCI does not leak in."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in {"IMAGE", "OCI", "MAKEFLAGS", "MAKELEVEL", "MFLAGS"}}
    out = subprocess.run(["make", "-n", "-B", "--no-print-directory", target, *overrides], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _make_image_command(*overrides: str) -> tuple[list[str], str, dict[str, str]]:
    """(argv, tag, build args) of the build `make image` runs."""
    argv = shlex.split(_make_dry_run("image", *overrides).replace("\\\n", " "))
    tag = argv[argv.index("-t") + 1]
    build_args = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--build-arg")
    return argv, tag, build_args


def _venv_pins() -> dict[str, str]:
    """The pins the venv recipe ($(STAMP)) installs, read from the commands make would run."""
    recipe = _make_dry_run(".venv/.installed")
    torch = re.search(r"install -q torch==(\S+) torchvision==(\S+)", recipe)
    ds = re.search(r'DS_BUILD_OPS=0 \S+ -m pip install -q --no-build-isolation "([^"]+)"', recipe)
    assert torch and ds, f"venv recipe no longer installs torch/torchvision/DeepSpeed as expected:\n{recipe}"
    return {"TORCH_VERSION": torch.group(1), "TORCHVISION_VERSION": torch.group(2), "DEEPSPEED_SPEC": ds.group(1)}


def _python_of_variant(variant: str) -> str:
    m = re.match(r"py(\d)(\d+)-", variant)
    assert m, f"Ray image variant {variant!r} should start with pyXY-"
    return f"{m.group(1)}.{m.group(2)}"


def _walk(node, key: str):
    """Every value of `key` anywhere under node."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _cluster_yamls() -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """(launcher configs, Kubernetes manifests) under cluster/, by path; a YAML that is neither
    fails here, so a new file cannot slip past the image checks."""
    launchers, manifests = {}, {}
    for path in sorted(CLUSTER.rglob("*.yaml")):
        rel = str(path.relative_to(REPO))
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if len(docs) == 1 and "provider" in docs[0]:
            launchers[rel] = docs[0]
        elif docs and all("apiVersion" in d and "kind" in d for d in docs):
            manifests[rel] = docs
        else:
            pytest.fail(f"{rel}: neither a Ray cluster launcher config nor Kubernetes manifests")
    assert launchers and manifests, (launchers.keys(), manifests.keys())
    return launchers, manifests


# --- pins: Makefile, Dockerfile, pyproject ----------------------------------------------------

def test_make_image_passes_the_venv_pins_and_the_dockerfile_defaults_equal_them():
    _, _, build_args = _make_image_command()
    defaults = _dockerfile_arg_defaults()
    venv = _venv_pins()
    for name in PIN_ARGS:
        assert name in build_args, f"`make image` should pass --build-arg {name}"
        assert defaults.get(name) == build_args[name], \
            f"Dockerfile ARG {name} defaults to {defaults.get(name)!r}, `make image` passes {build_args[name]!r}"
    for name, pin in venv.items():
        assert build_args[name] == pin, f"the venv installs {name}={pin!r}, the image {build_args[name]!r}"
    # No other pin hides in the Dockerfile: every ARG with a non-empty default is one of the above
    # or derived from them (the base image name).
    unsourced = {k for k, v in defaults.items() if v and k not in PIN_ARGS and k != "BASE_IMAGE"}
    assert not unsourced, f"Dockerfile ARGs with defaults the Makefile does not pass: {unsourced}"
    assert defaults["BASE_IMAGE"] == f"rayproject/ray:{defaults['RAY_VERSION']}-{defaults['RAY_VARIANT']}"


def test_the_pins_satisfy_pyproject():
    _, _, pins = _make_image_command()
    project = _pyproject()["project"]
    for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION"), ("ray", "RAY_VERSION")):
        spec = _requirement(name).specifier
        assert Version(pins[arg]) in spec, f"{arg}={pins[arg]} is outside pyproject's {name}{spec}"
    assert Requirement(pins["DEEPSPEED_SPEC"]) == _requirement("deepspeed"), \
        f"DeepSpeed: the Makefile asks {pins['DEEPSPEED_SPEC']!r}, pyproject {_requirement('deepspeed')}"
    python = _python_of_variant(pins["RAY_VARIANT"])
    assert Version(python) in SpecifierSet(project["requires-python"]), \
        f"the base image's Python {python} does not satisfy requires-python {project['requires-python']}"


def test_make_image_builds_the_pyproject_version_with_the_builder_asked_for():
    version = _pyproject()["project"]["version"]
    argv, tag, _ = _make_image_command()
    assert argv[:2] == ["docker", "build"] and argv[-1] == "." and tag == f"{IMAGE_NAME}:{version}"
    argv, tag, args = _make_image_command("OCI=podman", "IMAGE=registry.example/t2i:x", "RAY_VARIANT=py311-gpu")
    assert argv[:2] == ["podman", "build"] and tag == "registry.example/t2i:x" and args["RAY_VARIANT"] == "py311-gpu"


# --- the Dockerfile itself --------------------------------------------------------------------

def test_dockerfile_installs_like_the_makefile_as_a_non_root_user_and_smoke_checks():
    lines = _dockerfile_lines()
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE}"], froms
    after_from = lines[lines.index(froms[0]):]
    users = [ln.split()[1] for ln in after_from if ln.startswith("USER ")]
    assert users == ["ray"], f"the image should switch once to the Ray image's user 'ray', got USER {users}"
    runs = [ln for ln in after_from if ln.startswith("RUN ")]
    assert runs and all(lines.index(r) > lines.index("USER ray") for r in runs), "every RUN should run as ray"
    # Same order as the Makefile: torch, DeepSpeed without isolation and ops, then the package.
    i_torch = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    i_ds = next(i for i, r in enumerate(runs) if "DS_BUILD_OPS=0" in r and "--no-build-isolation" in r
                and '"${DEEPSPEED_SPEC}"' in r)
    i_pkg = next(i for i, r in enumerate(runs) if "pip install --no-cache-dir /tmp/t2i-pipeline" in r)
    assert i_torch < i_ds < i_pkg
    assert not any(re.search(r"pip install[^&]*\s-e\s", r) for r in runs), "the image installs the package, not editable"
    assert any("t2i --version" in r for r in runs[i_pkg:]), "the build should end by running `t2i --version`"


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: relative to the context root, `**` any number
    of directories, `*` and `?` within one path element."""
    pat, out, i = pattern.strip().lstrip("/"), "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pat[i] == "[":
            j = pat.index("]", i)
            out, i = out + pat[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    return re.compile(out.rstrip("/") + r"\Z")


def _ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Last matching rule wins; a rule matching a parent directory excludes what is below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_runs_venvs_and_caches_out_and_the_package_in():
    rules = []
    for ln in DOCKERIGNORE.read_text().splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            rules.append((ln.startswith("!"), _ignore_regex(ln.lstrip("!"))))
    for path in (".git/HEAD", ".venv/bin/python", "runs/demo/_RUN.json", "data_prep/runs/x", ".whl/torch.whl",
                 "pipeline/__pycache__/cli.cpython-311.pyc", "stages/nets/__pycache__/x.pyc",
                 "t2i_pipeline.egg-info/PKG-INFO", ".pytest_cache/v/x", ".mypy_cache/x", ".ruff_cache/x",
                 ".benchmarks/Linux/0001.json", "tests/unit/test_spec.py", "tmp/x", "build/lib/x", "dist/x.whl",
                 "stages/weights.safetensors", "x.pt"):
        assert _ignored(path, rules), f".dockerignore should keep {path} out of the build context"
    # What the install needs: pyproject.toml, its readme, and every tracked file of the packages
    # pyproject's find-include names (package data included).
    includes = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    roots = {inc.rstrip("*").rstrip(".") for inc in includes}
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        tracked = listed.stdout.split()
    else:  # not a git checkout: the packages' files on disk
        tracked = [str(p.relative_to(REPO)) for r in roots for p in (REPO / r).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    needed = [f for f in tracked if f.split("/")[0] in roots] + ["pyproject.toml", _pyproject()["project"]["readme"]]
    assert len(needed) > 20
    kept_out = [f for f in needed if _ignored(f, rules)]
    assert not kept_out, f".dockerignore keeps files the install needs out of the context: {kept_out}"


# --- every config that names an image ---------------------------------------------------------

def test_every_kubernetes_manifest_names_the_image_make_image_builds():
    _, tag, pins = _make_image_command()
    _, manifests = _cluster_yamls()
    named = set()
    for rel, docs in manifests.items():
        images = list(_walk(docs, "image"))
        assert images, f"{rel} names no image"
        for image in images:
            registry, _, name_tag = image.rpartition("/")
            assert registry and name_tag == tag, \
                f"{rel} names image {image!r}; it should be <your registry>/{tag}, the tag `make image` builds"
            named.add(image)
        for ray_version in _walk(docs, "rayVersion"):
            assert ray_version == pins["RAY_VERSION"], f"{rel}: rayVersion {ray_version} != image's Ray {pins['RAY_VERSION']}"
    assert len(named) == 1, f"the manifests should all name one image (one registry to replace), got {sorted(named)}"


def test_launcher_configs_run_the_image_base_and_install_the_same_pins():
    """The `ray up` configs do not use the t2i image: they start the Ray image the Dockerfile builds
    on (same Ray version and Python) and install the project with setup_commands, which must ask
    for what the pins satisfy."""
    _, _, pins = _make_image_command()
    python = _python_of_variant(pins["RAY_VARIANT"]).replace(".", "")
    base = re.compile(rf"rayproject/ray:{re.escape(pins['RAY_VERSION'])}-py{python}-(cpu|gpu|cu\d+)")
    launchers, _ = _cluster_yamls()
    for rel, cfg in launchers.items():
        images = [v for key in ("image", "head_image", "worker_image") for v in _walk(cfg, key)]
        assert images, f"{rel} names no docker image"
        for image in images:
            assert base.fullmatch(image), f"{rel} runs {image!r}; the Dockerfile's base is rayproject/ray:" \
                                         f"{pins['RAY_VERSION']}-py{python}-*"
        asked = {}
        for cmd in cfg.get("setup_commands", []):
            for word in shlex.split(cmd):
                try:
                    req = Requirement(word)
                except InvalidRequirement:
                    continue
                if req.name in {"torch", "torchvision", "deepspeed", "ray"} and req.specifier:
                    asked[req.name] = req
        assert {"torch", "torchvision", "deepspeed"} <= asked.keys(), f"{rel} setup_commands: {asked}"
        for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
            assert Version(pins[arg]) in asked[name].specifier, f"{rel} asks {asked[name]}, the image pins {pins[arg]}"
        assert asked["deepspeed"] == Requirement(pins["DEEPSPEED_SPEC"]), f"{rel} asks {asked['deepspeed']}"


def test_cluster_readme_explains_building_and_pushing_the_image():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("## Run on Kubernetes (KubeRay)", "make image", "docker push", "REGISTRY",
                   "kubectl apply -f cluster/kuberay/raycluster.yaml", "port-forward",
                   "t2i submit", "--address http://127.0.0.1:8265"):
        assert needle in text, f"cluster/README.md should mention {needle!r}"


# --- building it, where a builder works -------------------------------------------------------

def _quiet(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {e.timeout:.0f} s")


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def _probe_builders() -> tuple[list[str], list[str]]:
    """(usable builders, why each of the others is not usable)."""
    usable, why = [], []
    docker = shutil.which("docker")
    if docker is None:
        why.append("docker: not installed")
    elif (info := _quiet([docker, "info", "--format", "{{.ServerVersion}}"], 30)).returncode == 0:
        usable.append("docker")
    else:
        host = os.environ.get("DOCKER_HOST")
        sock = "/var/run/docker.sock"
        where = f"DOCKER_HOST={host}" if host else (f"{sock} missing" if not os.path.exists(sock) else sock)
        why.append(f"docker: CLI at {docker} but no daemon ({where}: {_last_line(info)})")
    if "docker" not in usable:
        dockerd = shutil.which("dockerd")
        why.append(f"dockerd: installed at {dockerd} but not running (tests start no daemons)" if dockerd
                   else "dockerd: not installed")
    for tool in ("podman", "buildah"):
        exe = shutil.which(tool)
        if exe is None:
            why.append(f"{tool}: not installed")
        elif (info := _quiet([exe, "info"], 60)).returncode == 0:
            usable.append(tool)
        else:
            why.append(f"{tool}: installed but `{tool} info` fails ({_last_line(info)})")
    kaniko = shutil.which("kaniko") or ("/kaniko/executor" if os.path.exists("/kaniko/executor") else None)
    why.append(f"kaniko: {kaniko} builds and pushes only, nothing here to run the image" if kaniko
               else "kaniko: not installed")
    return usable, why


def _run_in_image(builder: str, image: str, command: str) -> subprocess.CompletedProcess:
    if builder != "buildah":
        return _quiet([builder, "run", "--rm", image, "sh", "-c", command], 300)
    made = _quiet(["buildah", "from", image], 300)
    assert made.returncode == 0, made.stderr
    container = made.stdout.strip().splitlines()[-1]
    try:
        return _quiet(["buildah", "run", container, "--", "sh", "-c", command], 300)
    finally:
        _quiet(["buildah", "rm", container])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_image_builds_and_runs_t2i_version():
    usable, why = _probe_builders()
    if not usable:
        pytest.skip("no working OCI builder: " + "; ".join(why))
    builder = usable[0]
    if os.environ.get("T2I_IMAGE_TEST") != "1":
        pytest.skip(f"{builder} works, but the build pulls the Ray base image and several GB of wheels: "
                    "set T2I_IMAGE_TEST=1 to run it")
    _, _, pins = _make_image_command()
    base = f"rayproject/ray:{pins['RAY_VERSION']}-{pins['RAY_VARIANT']}"
    present = {"docker": ["docker", "image", "inspect", base], "podman": ["podman", "image", "exists", base],
               "buildah": ["buildah", "inspect", "--type", "image", base]}[builder]
    if _quiet(present).returncode != 0:
        pulled = _quiet([builder, "pull", base], 1800)
        if pulled.returncode != 0:
            pytest.skip(f"{builder} works, but the base image {base} is not in its local store and pulling it "
                        f"failed (no network to the registry?): {_last_line(pulled)}")
    version = _pyproject()["project"]["version"]
    image = f"localhost/{IMAGE_NAME}-selftest:{version}-{os.getpid()}"
    try:
        built = subprocess.run(["make", "--no-print-directory", "image", f"OCI={builder}", f"IMAGE={image}"],
                               cwd=REPO, capture_output=True, text=True, timeout=3300)
        assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
        ran = _run_in_image(builder, image, "t2i --version && id -u")
        assert ran.returncode == 0, ran.stderr
        out = ran.stdout.split()
        assert ran.stdout.splitlines()[0] == f"t2i-pipeline {version}", ran.stdout
        assert out[-1] != "0", f"the image runs as root: {ran.stdout}"
    finally:
        _quiet([builder, "rmi", image], 300)

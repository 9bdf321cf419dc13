"""Preflight for ``t2i submit``: can the cluster's ``python`` run this job? Asked before the job exists.

Why: a job whose node ``python`` lacks the package's dependencies is accepted by the Jobs API and
dies on the head with ``ModuleNotFoundError`` -- on a real cluster after queueing for GPUs, and
only ``t2i status`` shows it afterwards. So before the run's job is created, t2i asks the
cluster: its dashboard for its Ray version, and a short probe job -- ``python -c`` with the
*same runtime env* the real job gets (working dir, env vars, and with ``--pip`` the pip install,
which Ray then reuses for the real job) -- for the versions its ``python`` has of every
``[project].dependencies`` entry, t2i-pipeline itself, and whether the shipped ``pipeline.cli``
imports. These are compared with this client's (t2i-pipeline exactly when installed there, Ray
major.minor, torch's release, DeepSpeed exactly, and each dependency's pyproject range); a
mismatch refuses the submission in one line that names what is missing or different and the
ways out. ``--no-check`` skips all of it. The probe job stays in the cluster's job list (its
output is what ``t2i logs <probe id>`` shows); no run job, ``_JOB.json`` or spec is written.
"""
from __future__ import annotations

import copy
import json
import shlex
import time
import uuid
from importlib import metadata
from typing import Callable

from pipeline.run.job_errors import TERMINAL_STATES, SubmitError

MARKER = "T2I_PROBE "
PACKAGE = "t2i-pipeline"
DEFAULT_TIMEOUT_S = 600.0  # a first --pip install of torch + DeepSpeed takes minutes
WAYS_OUT = ("submit with --pip (installs pyproject's dependencies in the job's runtime env), run the cluster "
            "from the image `make image` builds, or start it from an environment that has t2i-pipeline "
            "installed; --no-check skips this check")


def requirement_names(requirements: list[str]) -> list[str]:
    from packaging.requirements import Requirement  # packaging: a dependency of ray

    return [Requirement(r).name for r in requirements]


def local_versions(names: list[str]) -> dict[str, str | None]:
    """This client's installed versions of ``names`` (None: not installed here)."""
    return {n: _version(n) for n in names}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def probe_entrypoint(names: list[str]) -> str:
    """``python -c …`` printing one ``T2I_PROBE {json}`` line: the interpreter, the versions of
    ``names`` it has (metadata only: fast, and what pip decides by) and whether the shipped
    ``pipeline.cli`` (typer, rich, pydantic, yaml, …) imports from the job's working dir."""
    code = "\n".join([
        "import json, sys",
        "from importlib import metadata as m",
        "def v(d):",
        "    try: return m.version(d)",
        "    except Exception: return None",
        f'r = {{"python": sys.version.split()[0], "executable": sys.executable, '
        f'"versions": {{d: v(d) for d in {json.dumps(sorted(set(names)))}}}, "import_error": None}}',
        "try:",
        "    import pipeline.cli",
        "except BaseException as e:",
        '    r["import_error"] = type(e).__name__ + ": " + str(e)',
        f"print({json.dumps(MARKER)} + json.dumps(r), flush=True)",
    ])
    return f"python -c {shlex.quote(code)}"


def _release(v: str) -> tuple:
    from packaging.version import Version

    return Version(v).release


def compare(here: dict[str, str | None], there: dict[str, str | None], requirements: list[str],
            cluster_ray: str | None) -> tuple[list[str], list[str]]:
    """(missing, different) between this client (``here``) and the probe's python (``there``);
    ``cluster_ray`` is the version the dashboard reports (the Ray the cluster runs)."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    missing, different = [], []
    for req in map(Requirement, requirements):
        v = there.get(req.name)
        if v is None:
            missing.append(req.name)
            continue
        try:
            if req.specifier and not req.specifier.contains(Version(v), prereleases=True):
                different.append(f"{req.name} {v} there (pyproject wants {req.specifier})")
        except InvalidVersion:
            pass
    mine, theirs = here.get(PACKAGE), there.get(PACKAGE)
    if mine and theirs and mine != theirs:
        different.append(f"{PACKAGE} {theirs} installed there vs {mine} here")
    ray_here, ray_job = here.get("ray"), there.get("ray")
    if cluster_ray and ray_here and _release(cluster_ray)[:2] != _release(ray_here)[:2]:
        different.append(f"the cluster runs Ray {cluster_ray} vs {ray_here} here (major.minor must match)")
    if cluster_ray and ray_job and ray_job != cluster_ray:
        different.append(f"the job's python has ray {ray_job} but the cluster runs Ray {cluster_ray}")
    for name, key in (("torch", _release), ("deepspeed", lambda v: Version(v).public)):
        a, b = here.get(name), there.get(name)
        if a and b and key(a) != key(b):
            different.append(f"{name} {b} there vs {a} here")
    return missing, different


def _problem_line(result: dict, missing: list[str], different: list[str], n_deps: int, pip: bool) -> str:
    where = f"its python ({result.get('executable')}, Python {result.get('python')})"
    parts = []
    if missing:
        first = ("ray", "torch", "deepspeed")  # the ones that decide whether the job can even start
        shown = ", ".join(sorted(missing, key=lambda n: (n not in first, first.index(n) if n in first else 0)))
        parts.append(f"{where} lacks {shown} ({len(missing)} of {n_deps} dependencies)")
    elif result.get("import_error"):
        parts.append(f"{where} cannot import the shipped pipeline.cli ({result['import_error']})")
    if different:
        parts.append(("differs: " if parts else f"{where} differs: ") + "; ".join(different))
    head = "even with --pip, " if pip else ""
    return f"{head}the cluster cannot run this job: " + "; ".join(parts)


def run_probe(client, runtime_env: dict, entrypoint: str, *, run_id: str, run_uri: str,
              timeout_s: float) -> tuple[dict | None, str, float, str, str]:
    """Submit the probe job and wait for it. Returns (parsed result or None, probe id, seconds,
    final status, the job's message or last output line for a probe that printed nothing)."""
    sid = f"t2i-probe-{run_id}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:4]}"
    t0 = time.monotonic()
    client.submit_job(entrypoint=entrypoint, runtime_env=copy.deepcopy(runtime_env), submission_id=sid,
                      metadata={"t2i_probe_for": run_uri})
    status = "PENDING"
    while time.monotonic() - t0 < timeout_s:
        status = str(client.get_job_status(sid).value)
        if status in TERMINAL_STATES:
            break
        time.sleep(0.3)
    seconds = time.monotonic() - t0
    if status not in TERMINAL_STATES:
        try:
            client.stop_job(sid)
        except Exception:  # noqa: BLE001 - best effort; it is tiny
            pass
        return None, sid, seconds, status, ""
    out = client.get_job_logs(sid) or ""
    for line in reversed(out.splitlines()):
        if line.startswith(MARKER):
            try:
                return json.loads(line[len(MARKER):]), sid, seconds, status, ""
            except ValueError:
                break
    info = client.get_job_info(sid)
    last = next((ln.strip() for ln in reversed(out.splitlines()) if ln.strip()), "")
    message = (info.message or "").strip().splitlines()
    return None, sid, seconds, status, last or (message[0] if message else "")


def preflight(client, runtime_env: dict, *, cluster_ray: str | None, requirements: list[str], run_id: str,
              run_uri: str, pip: bool, timeout_s: float = DEFAULT_TIMEOUT_S,
              log: Callable[[str], None] = print) -> dict:
    """Refuse (SubmitError, one line) unless the cluster's job ``python`` matches this client.

    ``runtime_env`` is the real job's (copied, never changed here). Returns what the probe found.
    """
    names = requirement_names(requirements)
    dists = sorted(set(names) | {PACKAGE, "ray", "torch", "deepspeed"})
    here = local_versions(dists)
    # Ray first: the dashboard already said which one the cluster runs, no probe needed to refuse.
    if cluster_ray and here.get("ray") and _release(cluster_ray)[:2] != _release(here["ray"])[:2]:
        raise SubmitError(f"the cluster runs Ray {cluster_ray} but this client has {here['ray']} (major.minor must "
                          f"match); use a client venv with ray=={cluster_ray}, or a cluster on Ray {here['ray']}; "
                          "--no-check skips this check")
    slow = (" (--pip: the probe installs the dependencies first, which can take minutes the first time; "
            "Ray caches it and the run's job reuses it)") if pip else ""
    log(f"checking the cluster's environment with a probe job in the job's runtime env{slow}")
    try:
        result, sid, seconds, status, last = run_probe(client, runtime_env, probe_entrypoint(dists), run_id=run_id,
                                                       run_uri=run_uri, timeout_s=timeout_s)
    except SubmitError:
        raise
    except Exception as e:  # noqa: BLE001 - the Jobs API's errors come in many types
        raise SubmitError(f"the cluster check failed to run its probe job: {str(e).splitlines()[0] if str(e) else e}; "
                          "--no-check skips this check") from None
    took = f"probe job {sid}: {seconds:.1f} s"
    if result is None and status not in TERMINAL_STATES:
        raise SubmitError(f"the cluster check did not finish within {timeout_s:.0f} s (probe still {status}; "
                          f"{took}); raise --check-timeout (a first --pip install takes minutes) or pass --no-check")
    if result is None:
        raise SubmitError(f"the cluster's job python could not run the check ({status}: {last[:300]}); "
                          f"{WAYS_OUT} ({took})")
    there = result.get("versions") or {}
    missing, different = compare(here, there, requirements, cluster_ray)
    if missing or different or result.get("import_error"):
        raise SubmitError(f"{_problem_line(result, missing, different, len(names), pip)} — {WAYS_OUT} ({took})")
    shown = ", ".join(f"{n} {there[n]}" for n in (PACKAGE, "ray", "torch", "deepspeed") if there.get(n))
    log(f"cluster check passed: {shown}, Python {result.get('python')} ({result.get('executable')}); {took}")
    return dict(result, probe_id=sid, probe_s=round(seconds, 2))


__all__ = ["DEFAULT_TIMEOUT_S", "compare", "local_versions", "preflight", "probe_entrypoint", "run_probe"]

"""Submitting a run to a Ray cluster as a Ray job, and following it afterwards.

``t2i submit`` validates the spec here (a bad spec never reaches the cluster), ships the project
source plus the *validated* spec to the cluster through the job's runtime_env, and starts
``python -m pipeline.cli run <spec> --address auto`` as the job's entrypoint: the job driver then
runs the same runner as a local ``t2i run``, on the cluster. The job id is recorded in
``<run>/_JOB.json`` so ``t2i logs/stop/status`` accept either the job id or the run.

An existing run is submitted the same way with the verb a local user would type: ``t2i submit RUN
--stage S`` (``--from S``, ``--rerun``) starts ``python -m pipeline.cli resume RUN --stage S --address
auto`` (or ``rerun``), so the job runs exactly the local ``t2i resume``/``rerun`` against the run's
saved spec.yaml (``--set`` changes that saved spec first, as ``t2i run SPEC --set`` would). Each
submission is recorded in ``_JOB.json``: its top level is the latest job (what ``logs/stop/status``
read), earlier ones are kept under ``history``. A run whose latest job is still PENDING/RUNNING is
refused; two drivers that get past that anyway (two submits at the same instant, a local ``t2i
resume`` beside a job) are kept apart by the stage leases (pipeline/run/lease.py).

Every call to the dashboard carries its token when it wants one (pipeline/run/ray_auth.py: Ray's
token file or variables, whatever RAY_AUTH_MODE says -- as an HTTP header only), and before the
run's job is created a probe job checks the cluster's ``python`` (pipeline/run/submit_check.py).

Nothing secret is shipped or recorded: the runtime_env is visible to anyone who can read the
dashboard, so store credentials must come from the cluster itself (instance profile / workload
identity / Kubernetes secret); only non-secret endpoint and offline settings are forwarded.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import yaml

from pipeline import layout, store
from pipeline.run.job_errors import TERMINAL_STATES, AuthError, SubmitError  # noqa: F401 (callers import them from here)
from pipeline.run.job_record import HISTORY_KEY, JobRecord, read_job_history, read_job_record, write_job_record  # noqa: F401
from pipeline.run.ray_auth import TokenError, open_dashboard
from pipeline.run.runner import save_spec, targets
from pipeline.run.spec import SpecError, _set_dotted, load_spec, parse_spec, run_uri, spec_to_yaml

JOB_FILE = layout.JOB  # kept: the CLI and tests import it from here
# Where the validated spec lands inside the shipped working dir (relative to it).
SHIPPED_SPEC_DIR = "_t2i_submit"
# Never shipped: environments, run outputs, wheels, VCS data, caches, test data. Ray also honours
# every .gitignore in the tree, so ignored artifacts (weights, shards) stay home too.
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", ".git", "runs", "*.whl", ".whl", "__pycache__", "*.pyc", "*.egg-info",
    ".pytest_cache", "build", "dist", "tests/data", "tests/**/data",
]
# Forwarded to the job when set here: endpoints and offline switches, never keys or tokens.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "RAY_USAGE_STATS_ENABLED")
ACTIVE_STATES = ("PENDING", "RUNNING")
# Fields of the run's identity: --set on an existing run may not change them (it would be another run).
RUN_IDENTITY_KEYS = ("run_id", "store", "store.uri")


# --- addresses -------------------------------------------------------------------------------

def dashboard_address(address: str | None) -> str:
    """The Jobs API address: ``http(s)://host:port``. ``host:port`` gets ``http://``; a Ray
    client (``ray://``) or GCS address is not the dashboard and is rejected with a hint."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard, "
                          "e.g. forwarded with `ray dashboard cluster/aws.yaml`) or set RAY_API_SERVER_ADDRESS")
    if address.startswith("ray://") or address == "auto":
        raise SubmitError(f"--address {address!r} is a Ray client/GCS address; jobs are submitted to the "
                          "dashboard: --address http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address!r}: expected http://HOST:PORT of the Ray dashboard")
    return address.rstrip("/")


def redact_address(address: str) -> str:
    """The address without any user:password part, for files and logs."""
    parts = urlsplit(address)
    if parts.username is None and parts.password is None:
        return address
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(address: str | None, log: Callable[[str], None] | None = None):
    """``(JobSubmissionClient, Dashboard)`` for the dashboard at ``address``, with its token (if
    it wants one) in the client's headers. AuthError for a missing or refused token."""
    from ray.job_submission import JobSubmissionClient  # ray: loaded only by the job commands

    addr = dashboard_address(address)
    shown = redact_address(addr)
    try:
        dash = open_dashboard(addr, log=log)
        dash.address = shown
        return JobSubmissionClient(addr, headers=dict(dash.headers)), dash
    except TokenError as e:
        raise AuthError(str(e).replace(addr, shown)) from None
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        raise SubmitError(f"cannot reach the Ray dashboard at {shown}: {one_line(e)}") from None


def job_client(address: str | None, log: Callable[[str], None] | None = None):
    return connect(address, log)[0]


def one_line(e: BaseException) -> str:
    """An exception from Ray or requests as one line (Ray's auth errors are a paragraph)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --- what gets shipped -----------------------------------------------------------------------

def project_root() -> Path:
    """The source checkout that holds ``pipeline/`` (shipped as the job's working dir)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise SubmitError(f"t2i submit ships the project source, but {root} is not a source checkout "
                          "(no pyproject.toml); submit from a clone of the repository")
    return root


def project_requirements(root: Path | None = None) -> list[str]:
    """The ``[project].dependencies`` of pyproject.toml: the pip list a bare cluster image needs."""
    root = root or project_root()
    with open(root / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def submission_id_for(run_id: str, now: float | None = None) -> str:
    """``t2i-<run_id>-<UTC time>``: readable, tied to the run, unique per submission (Ray
    refuses to reuse a submission id, and a run may be submitted again to resume it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"t2i-{re.sub(r'[^A-Za-z0-9._-]', '-', run_id)}-{stamp}"


def build_runtime_env(working_dir: str, *, pip: bool | str, root: Path | None = None) -> dict:
    """``pip``: False, or the installer of ``--pip`` (True/"auto", "uv", "pip"; pipeline/run/runtime_env.py)."""
    env: dict = {"working_dir": working_dir, "excludes": list(WORKING_DIR_EXCLUDES)}
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    # The driver's ray.init (pipeline/run/ray_scheduler.py) adds env_vars of its own; Ray refuses to merge a
    # job's and a driver's runtime_env that share a key unless told which wins (the driver's).
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    env["env_vars"] = env_vars
    if pip:
        from pipeline.run.runtime_env import package_env  # ray: loaded only when --pip builds a runtime env

        field, extra_vars = package_env(root or project_root(), "auto" if pip is True else pip)
        env.update(field)
        env_vars.update(extra_vars)
    return env


@contextmanager
def staged_working_dir(root: Path, spec_name: str | None = None, spec_yaml: str = "") -> Iterator[str]:
    """A temporary directory that looks like the checkout plus ``_t2i_submit/<spec_name>`` (no
    spec file when ``spec_name`` is None: a resume/rerun job reads the run's own spec.yaml).

    Top-level entries are symlinks (Ray's packager follows them), so nothing is copied and the
    checkout itself is never written to. Excluded entries are left out here already.
    """
    tmp = tempfile.mkdtemp(prefix="t2i-submit-")
    try:
        skip = {".venv", "venv", ".git", "runs", SHIPPED_SPEC_DIR}
        for entry in root.iterdir():
            if entry.name not in skip:
                os.symlink(entry, os.path.join(tmp, entry.name))
        if spec_name is not None:
            os.makedirs(os.path.join(tmp, SHIPPED_SPEC_DIR))
            with open(os.path.join(tmp, SHIPPED_SPEC_DIR, spec_name), "w") as f:
                f.write(spec_yaml)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def entrypoint_for(spec_rel_path: str) -> str:
    return verb_entrypoint("run", [spec_rel_path])


def verb_entrypoint(verb: str, args: list[str]) -> str:
    """``python -m pipeline.cli VERB ARGS --address auto``: the local CLI command, run by the job.
    ``python`` is the cluster's interpreter (the image's / the nodes' venv), not this one."""
    return " ".join(["python -m pipeline.cli", verb, *(shlex.quote(a) for a in args), "--address auto"])


def verb_args(run: str, stage: str | None, from_stage: str | None) -> list[str]:
    """The arguments of ``t2i resume/rerun`` for ``run`` (a URI) and ``--stage`` / ``--from``."""
    return [run] + (["--stage", stage] if stage else []) + (["--from", from_stage] if from_stage else [])


# --- submit / logs / stop / status -----------------------------------------------------------

def locality_warnings(spec, root: Path) -> list[str]:
    """What in the spec will not work as intended on a remote cluster: paths only this machine can
    read (fine when the nodes share this filesystem, as in the local test cluster -- hence
    warnings, not errors) and a run that would not use the cluster at all."""
    out = []
    if not spec.cluster.use_ray:
        out.append("cluster.use_ray is false: every stage would run inside the job's driver on the head node")
    if store.scheme_of(spec.store.uri) == "file":
        out.append(f"store.uri {spec.store.uri} is a local path: the cluster's nodes must share this "
                   "filesystem (use s3:// or gs:// for a real cluster)")
    url_list = getattr(getattr(spec, "download", None), "url_list", "demo")
    if url_list != "demo" and store.scheme_of(url_list) == "file":
        path = Path(store.local_path(store.normalize(url_list))).resolve()
        if root not in path.parents:
            out.append(f"download.url_list {url_list} is a local file outside the shipped checkout: "
                       "the cluster cannot read it (put it in object storage)")
    return out


def resolve_target(target: str) -> tuple[str, str]:
    """What ``t2i submit TARGET`` names: ``("spec", path)`` for an existing YAML file, ``("run",
    uri)`` for an existing run (a URI, a path, or a bare id under ./runs, as ``t2i resume`` reads
    it) with a saved spec.yaml. Both at once is refused, naming the spelling that picks each."""
    is_file = "://" not in target and os.path.isfile(target)
    candidates = [store.normalize(target)]
    if "://" not in target and os.sep not in target:
        candidates.append(store.normalize(os.path.join("runs", target)))  # a bare run id, as t2i resume reads it
    runs = []
    for uri in dict.fromkeys(candidates):
        try:
            if store.exists(layout.run_spec_uri(uri)):
                runs.append(uri)
        except Exception:  # noqa: BLE001 - an unreadable store is "not a run" here; the spec path decides
            pass
    if is_file and runs:
        raise SubmitError(f"{target} is both a spec file and the run {runs[0]}: pass ./{target} for the spec "
                          f"or {runs[0]} for the run")
    if is_file:
        return "spec", target
    if runs:
        return "run", runs[0]
    if target.endswith((".yaml", ".yml")):
        return "spec", target  # load_spec says "run spec … does not exist"
    raise SubmitError(f"{target} is neither a run spec file nor a run (no {layout.run_spec_uri(candidates[-1])})")


def load_run_for_submit(run: str, overrides: dict | None = None):
    """The spec ``run`` (a URI) was last started with, with ``overrides`` applied and validated
    here. Overrides may not move the run (run_id, store.uri): that would be another run."""
    moved = sorted(k for k in (overrides or {}) if k in RUN_IDENTITY_KEYS)
    if moved:
        raise SpecError(f"--set {moved[0]}=… would make another run; an existing run keeps its run_id and store "
                        "(submit a spec file for a new run)")
    uri = layout.run_spec_uri(run)
    try:
        data = yaml.safe_load(store.read_bytes(uri))
    except Exception as e:  # noqa: BLE001 - a missing or unreadable spec.yaml: one line
        raise SubmitError(f"{run} is not a run: cannot read {uri} ({one_line(e)})") from None
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    spec = parse_spec(data, uri)
    if store.normalize(run_uri(spec)) != store.normalize(run):
        raise SubmitError(f"{uri} names the run {run_uri(spec)}, not {run} (moved or copied?); "
                          f"submit the run where its spec says it lives")
    return spec


def _refuse_if_active(client, addr: str, ruri: str) -> None:
    """One driver per run: a run whose latest job on this cluster is PENDING/RUNNING is refused."""
    previous = read_job_record(ruri)
    if not previous or redact_address(addr) != previous.get("address"):
        return
    try:
        state = str(client.get_job_status(previous["submission_id"]).value)
    except Exception:  # noqa: BLE001 - an unknown old job (cluster restarted) is no conflict
        state = None
    if state in ACTIVE_STATES:
        raise SubmitError(f"run {ruri} already has job {previous['submission_id']} {state} on this cluster; "
                          f"stop it first (t2i stop {previous['submission_id']} --address {redact_address(addr)}) "
                          "or wait for it — two drivers on one run would race on its stages")


def submit_run(spec_path: str | os.PathLike, address: str | None, overrides: dict | None = None, *,
               pip: bool = False, log: Callable[[str], None] = print, check: bool = True,
               check_timeout_s: float | None = None) -> JobRecord:
    """Validate ``spec_path`` (+ dotted ``overrides``) here, then submit it as a Ray job running
    ``t2i run`` on the shipped, validated spec.

    Raises SpecError for a bad spec (before anything touches the cluster) and SubmitError for an
    unreachable cluster, a missing or refused token (AuthError), a run that already has an active
    job, or -- with ``check`` -- a cluster whose job ``python`` cannot run it (submit_check.py).
    """
    spec = load_spec(spec_path, overrides)  # fails here, before any network call
    spec_rel = f"{SHIPPED_SPEC_DIR}/{spec.run_id}.yaml"
    return _submit(spec, address, verb="run", args=[spec_rel], spec_path=spec_rel,
                   shipped=(f"{spec.run_id}.yaml", spec_to_yaml(spec)), overrides=overrides, pip=pip, log=log,
                   check=check, check_timeout_s=check_timeout_s)


def submit_existing_run(run: str, address: str | None, overrides: dict | None = None, *,
                        stage: str | None = None, from_stage: str | None = None, rerun: bool = False,
                        pip: bool = False, log: Callable[[str], None] = print, check: bool = True,
                        check_timeout_s: float | None = None) -> JobRecord:
    """Submit ``t2i resume RUN [--stage S | --from S]`` (``rerun``: ``t2i rerun``) as a Ray job.

    ``run`` is the run's URI; its saved spec.yaml is what the job reads. ``overrides`` change that
    saved spec (validated here; written just before the job is created, put back if creating it
    fails), e.g. ``train_base.steps`` raised: the job extends the finished attempt.
    """
    from pipeline.context import StageFailed  # the runner's own error type for a bad --stage/--from


    verb = "rerun" if rerun else "resume"
    if rerun and not (stage or from_stage):
        raise SubmitError("name what to start afresh: --rerun with --stage STAGE or --from STAGE")
    run = store.normalize(run)
    spec = load_run_for_submit(run, overrides)
    address = address or (read_job_record(run) or {}).get("address")  # default: the cluster it last ran on
    try:
        targets(spec, stage, from_stage)  # the same check the job's `t2i resume/rerun` makes, here first
    except (StageFailed, KeyError) as e:
        raise SubmitError(str(e).strip("'\"")) from None
    return _submit(spec, address, verb=verb, args=verb_args(run, stage, from_stage),
                   spec_path=layout.run_spec_uri(run), shipped=None, overrides=overrides, pip=pip, log=log,
                   check=check, check_timeout_s=check_timeout_s, new_run_spec=bool(overrides))


def _submit(spec, address: str | None, *, verb: str, args: list[str], spec_path: str,
            shipped: tuple[str, str] | None, overrides: dict | None, pip: bool, log: Callable[[str], None],
            check: bool, check_timeout_s: float | None, new_run_spec: bool = False) -> JobRecord:
    """The job for ``t2i VERB ARGS --address auto``: refuse a second driver, check the cluster,
    create the job, record it. ``new_run_spec``: write ``spec`` as the run's spec.yaml before the
    job exists (the job reads it), restoring the old one if the job cannot be created."""
    ruri = run_uri(spec)
    addr = dashboard_address(address)
    client, dash = connect(addr, log)
    _refuse_if_active(client, addr, ruri)
    entrypoint = verb_entrypoint(verb, args)
    root = project_root()
    for w in locality_warnings(spec, root):
        log(f"warning: {w}")
    with staged_working_dir(root, *(shipped or (None, ""))) as wd:
        runtime_env = build_runtime_env(wd, pip=pip, root=root)
        if check:  # before the run's job exists; the probe gets the same runtime env
            from pipeline.run import submit_check  # imports this module: loaded late

            submit_check.preflight(client, runtime_env, cluster_ray=dash.ray_version, pip=pip,
                                   requirements=project_requirements(root), run_id=spec.run_id, run_uri=ruri,
                                   timeout_s=check_timeout_s or submit_check.DEFAULT_TIMEOUT_S, log=log)
        sid = submission_id_for(spec.run_id)
        runtime_env["env_vars"]["T2I_JOB_ID"] = sid  # the job driver's leases name it (pipeline/run/lease.py)
        spec_uri = layout.run_spec_uri(ruri)
        old_spec = None
        if new_run_spec:
            old_spec = store.read_bytes(spec_uri) if store.exists(spec_uri) else None
            save_spec(spec)
            log(f"{spec_uri}: updated with --set {', '.join(f'{k}={v}' for k, v in (overrides or {}).items())}")
        try:
            client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=sid,
                              metadata={"t2i_run_uri": ruri, "t2i_run_id": spec.run_id, "t2i_verb": verb})
        except Exception as e:  # noqa: BLE001 - surfaced with the address, never a traceback
            if old_spec is not None:
                store.write_bytes_atomic(spec_uri, old_spec)  # no job: the run's spec is as it was
            raise SubmitError(f"submitting to {redact_address(addr)} failed: {one_line(e)}") from None
    record = JobRecord(submission_id=sid, address=redact_address(addr), run_uri=ruri, run_id=spec.run_id,
                       entrypoint=entrypoint, spec_path=spec_path, pip=bool(pip), submitted_at=time.time(),
                       forwarded_env=sorted(k for k in runtime_env["env_vars"] if k in FORWARDED_ENV),
                       verb=verb, args=list(args), overrides=dict(overrides or {}))
    try:
        if verb == "run":
            # spec.yaml now (the driver writes the same bytes when it starts) so `t2i status RUN`
            # shows pending stages straight away; then the job record.
            save_spec(spec)
        write_job_record(ruri, record)
    except Exception as e:  # noqa: BLE001 - the job runs regardless; say how to find it
        log(f"warning: job {sid} submitted, but recording it in {ruri}/{JOB_FILE} failed ({e}); "
            f"use the job id with t2i logs/stop")
    return record


def resolve_job(job_or_run: str, address: str | None = None) -> tuple[str, str]:
    """(submission id, dashboard address) for a job id or a run (URI, path or id under ./runs).

    A run is recognised by its ``_JOB.json``; the address defaults to the one recorded there.
    """
    record = None
    candidates = [job_or_run]
    if "://" not in job_or_run and os.sep not in job_or_run:
        candidates.append(os.path.join("runs", job_or_run))
    for cand in candidates:
        if "://" in cand or os.path.isdir(cand):
            record = read_job_record(store.normalize(cand))
        if record:
            break
    if record:
        return record["submission_id"], dashboard_address(address or record.get("address"))
    return job_or_run, dashboard_address(address)


def job_logs(job_or_run: str, address: str | None = None, *, follow: bool = False,
             write: Callable[[str], None] = lambda s: (sys.stdout.write(s), sys.stdout.flush()),
             log: Callable[[str], None] | None = None) -> str:
    """Print the job's driver output; with ``follow`` keep printing until the job ends.
    Returns the submission id. ``log`` gets t2i's own lines (where the token came from)."""
    sid, addr = resolve_job(job_or_run, address)
    client = job_client(addr, log)
    try:
        if not follow:
            write(client.get_job_logs(sid))
            return sid

        async def _tail() -> None:
            async for chunk in client.tail_job_logs(sid):
                write(chunk)

        asyncio.run(_tail())
    except SubmitError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"logs of job {sid} at {redact_address(addr)}: {one_line(e)}") from None
    return sid


def stop_job(job_or_run: str, address: str | None = None, *, wait_s: float = 30.0,
             log: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Ask Ray to stop the job (SIGTERM to the driver, then SIGKILL) and wait until it has a
    terminal state. Returns (submission id, final status)."""
    sid, addr = resolve_job(job_or_run, address)
    client = job_client(addr, log)
    try:
        status = str(client.get_job_status(sid).value)
        if status in TERMINAL_STATES:
            return sid, status
        client.stop_job(sid)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            status = str(client.get_job_status(sid).value)
            if status in TERMINAL_STATES:
                break
            time.sleep(0.5)
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"stopping job {sid} at {redact_address(addr)}: {one_line(e)}") from None
    return sid, status


def job_status(run: str, address: str | None = None) -> dict | None:
    """The run's latest job as ``{"submission_id", "address", "status", "message", "token_source", "auth_error",
    "verb", "args"}``;
    None when the run was not submitted. ``status`` is None when the dashboard cannot be reached
    or refuses t2i's token (``message`` says why, ``auth_error`` tells which)."""
    record = read_job_record(run)
    if not record:
        return None
    sid = record["submission_id"]
    what = {"verb": record.get("verb", "run"), "args": record.get("args") or []}
    try:
        addr = dashboard_address(address or record.get("address"))
        client, dash = connect(addr)
        info = client.get_job_info(sid)
        return {"submission_id": sid, "address": redact_address(addr), "status": str(info.status.value),
                "message": info.message or "", "auth_error": False,
                "token_source": dash.token_source and dash.token_source.split(" (")[0], **what}  # short: one line
    except Exception as e:  # noqa: BLE001 - status must still show the stages
        return {"submission_id": sid, "address": record.get("address"), "status": None, "message": one_line(e),
                "token_source": None, "auth_error": isinstance(e, AuthError), **what}


def job_status_line(run: str, address: str | None = None) -> str | None:
    """One line for ``t2i status``: ``job t2i-demo-…: RUNNING at http://…``; None if not submitted."""
    st = job_status(run, address)
    if st is None:
        return None
    if st["auth_error"]:
        return f"job {st['submission_id']}: status unknown — {st['message']}"
    if st["status"] is None:
        return f"job {st['submission_id']}: status unknown ({st['address']} unreachable: {st['message'][:200]})"
    msg = f" — {st['message']}" if st["message"] and st["status"] in ("FAILED", "STOPPED") else ""
    token = f" (token from {st['token_source']})" if st["token_source"] else ""
    return f"job {st['submission_id']}: {st['status']} at {st['address']}{msg}{token}{_verb_note(st)}"


def _verb_note(st: dict) -> str:
    """``; ran t2i resume --stage train_base`` for a job that resumed or reran stages (nothing for a run)."""
    verb, args = st.get("verb") or "run", list(st.get("args") or [])
    if verb == "run":
        return ""
    return "; ran " + " ".join(["t2i", verb, *args[1:]] if args else ["t2i", verb])


__all__ = ["JOB_FILE", "AuthError", "JobRecord", "SubmitError", "SpecError", "build_runtime_env", "connect",
           "dashboard_address", "entrypoint_for", "job_logs", "job_status", "job_status_line", "load_run_for_submit",
           "project_requirements", "read_job_history", "read_job_record", "resolve_job", "resolve_target", "stop_job",
           "submission_id_for", "submit_existing_run", "submit_run", "verb_entrypoint", "write_job_record"]

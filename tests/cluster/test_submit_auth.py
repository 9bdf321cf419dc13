"""``t2i submit/logs/stop/status`` against a head started as users get it now: token auth on.

One ``ray start --head`` on 127.0.0.1 (tests/support/cluster.py), but -- unlike the other cluster
tests -- without ``RAY_AUTH_MODE=disabled``: its HOME is a private directory where
``ray get-auth-token --generate`` wrote ``~/.ray/auth_token``, and Ray 2.60's ``ray start --head``
turns token auth on when that file exists (nothing sets RAY_AUTH_MODE by hand). t2i's own calls
never see RAY_AUTH_MODE either; they find the token where users hold it (here: a HOME with the
same ``.ray/auth_token``; the real ~/.ray is never touched).

"A node whose ``python`` lacks the package" is simulated honestly for the job entrypoint: the
head's PATH starts with a directory whose ``python`` is a wrapper the tests switch between the
venv's interpreter and the system /usr/bin/python3 (which has none of the dependencies). Ray's
own processes use absolute interpreter paths; only a job's ``python …`` entrypoint resolves it
through PATH, exactly as on a cluster image whose ``python`` is not the project's environment.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.auth_cluster import AUTH_VARS, SYSTEM_PYTHON
from tests.support.auth_cluster import client as _client
from tests.support.auth_cluster import wait_succeeded
from tests.support.auth_cluster import download_spec as _spec
from tests.support.auth_cluster import node_python as _node_python
from tests.support.cluster import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(240)]

def _errors(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.strip()]


def test_token_precedence_is_rays_whatever_auth_mode_says(tmp_path, monkeypatch):
    from pipeline.run.ray_auth import TokenError, find_token

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "tok"
    path.write_text("from-path")
    env = {"RAY_AUTH_MODE": "disabled"}
    assert find_token(env) == ("from-home", f"~/.ray/auth_token ({tmp_path}/.ray/auth_token)")
    assert find_token(dict(env, RAY_AUTH_TOKEN_PATH=str(path)))[0] == "from-path"
    assert find_token(dict(env, RAY_AUTH_TOKEN_PATH=str(path), RAY_AUTH_TOKEN="from-env")) == ("from-env", "RAY_AUTH_TOKEN")
    with pytest.raises(TokenError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})  # never falls through to ~/.ray
    (tmp_path / ".ray" / "auth_token").unlink()
    assert find_token({}) is None


def test_missing_or_wrong_token_one_line_exit_2(user_env, cli, tmp_path, monkeypatch):
    c = user_env
    spec, run = _spec(tmp_path, "auth-wrong")
    before = {j.submission_id for j in _client(c).list_jobs()}

    # A wrong token, in a real process: one line on stderr, exit 2, no traceback, no job, no record.
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env["RAY_AUTH_TOKEN"] = "not-the-token-0123456789"
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", spec, "--address", c.dashboard_url],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert len(_errors(p.stderr)) == 1 and "Traceback" not in p.stderr + p.stdout, p.stderr
    assert "refused the token from RAY_AUTH_TOKEN" in p.stderr and "ray get-auth-token" in p.stderr
    assert "not-the-token" not in p.stderr + p.stdout
    assert not run.exists()

    # No token anywhere: names where t2i looked and what to do; the same for logs and stop.
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    monkeypatch.setenv("HOME", str(empty_home))
    for args in (("submit", spec), ("logs", "t2i-nope"), ("stop", "t2i-nope")):
        res = cli(*args, "--address", c.dashboard_url)
        assert res.exit_code == 2, res.output
        assert len(_errors(res.output)) == 1, res.output
        line = res.output
        assert f"the dashboard at {c.dashboard_url} requires a token" in line
        assert "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token" in line
        assert "ray get-auth-token" in line and "KubeRay secret" in line
    # A wrong token file named by RAY_AUTH_TOKEN_PATH: refused, naming that source.
    bad = tmp_path / "bad-token"
    bad.write_text("wrong\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(bad))
    res = cli("logs", "t2i-nope", "--address", c.dashboard_url)
    assert res.exit_code == 2 and "refused the token from RAY_AUTH_TOKEN_PATH" in res.output, res.output
    assert {j.submission_id for j in _client(c).list_jobs()} == before


def test_node_python_without_the_package_is_refused_before_the_job_exists(user_env, cli, tmp_path):
    c = user_env
    spec, run = _spec(tmp_path, "auth-nopkg")
    before = {j.submission_id for j in _client(c).list_jobs()}
    _node_python(c, SYSTEM_PYTHON)
    try:
        res = cli("submit", spec, "--address", c.dashboard_url)  # no --pip
    finally:
        _node_python(c, sys.executable)
    assert res.exit_code == 2, res.output
    err = [ln for ln in _errors(res.output) if ln.startswith("error:")]
    assert len(err) == 1, res.output
    assert "the cluster cannot run this job" in err[0] and SYSTEM_PYTHON in err[0]
    assert "lacks" in err[0] and "typer" in err[0] and "torch" in err[0]
    assert "--pip" in err[0] and "make image" in err[0] and "--no-check" in err[0]
    assert "probe job t2i-probe-auth-nopkg-" in err[0] and " s)" in err[0]  # how long the probe took
    new = {j.submission_id: j for j in _client(c).list_jobs()}
    added = set(new) - before
    assert len(added) == 1 and next(iter(added)).startswith("t2i-probe-auth-nopkg-"), added  # no run job
    assert not (run / "_JOB.json").exists() and not run.exists()


def test_token_from_home_submit_status_logs_stop_and_the_token_goes_nowhere(user_env, cli, tmp_path):
    c = user_env
    spec, run = _spec(tmp_path, "auth-ok")
    outputs = []
    res = cli("submit", spec, "--address", c.dashboard_url)
    outputs.append(res.output)
    assert res.exit_code == 0, res.output
    assert "using the token from ~/.ray/auth_token" in res.output
    assert "cluster check passed" in res.output and "probe job t2i-probe-auth-ok-" in res.output
    sid = res.output.strip().splitlines()[-1]
    assert sid.startswith("t2i-auth-ok-")

    client = _client(c)
    wait_succeeded(client, sid, timeout=150)
    info = client.get_job_info(sid)
    job_logs = client.get_job_logs(sid)

    for args in (("status", str(run)), ("logs", str(run)), ("logs", sid, "--address", c.dashboard_url, "--follow"),
                 ("stop", str(run))):
        r = cli(*args)
        outputs.append(r.output)
        assert r.exit_code == 0, (args, r.output)
    status_out, logs_out, follow_out, stop_out = outputs[1:]
    line = " ".join(status_out.split())  # rich wraps the job line at the runner's 80 columns
    assert f"job {sid}: SUCCEEDED at {c.dashboard_url} (token from ~/.ray/auth_token)" in line, status_out
    from pipeline.run.planning import run_status  # the table's stage rows (rich may fold its cells at 80 columns)

    assert {r["stage"]: r["state"] for r in run_status(f"file://{run}")} == {"download": "done"}
    assert "download" in logs_out and "download" in follow_out
    assert "SUCCEEDED" in stop_out

    # The token is nowhere: run folder (with _JOB.json), the jobs' runtime envs, metadata and
    # output (the run's and the probe's), the CLI's output.
    assert (run / "_JOB.json").exists()
    for f in run.rglob("*"):
        if f.is_file():
            assert c.token.encode() not in f.read_bytes(), f
    probe = [j for j in client.list_jobs() if j.submission_id.startswith("t2i-probe-auth-ok-")]
    assert len(probe) == 1 and str(probe[0].status.value) == "SUCCEEDED"
    for job in (info, probe[0]):
        shown = json.dumps({"runtime_env": job.runtime_env, "metadata": job.metadata, "entrypoint": job.entrypoint})
        assert c.token not in shown
        assert c.token not in client.get_job_logs(job.submission_id)
    for out in outputs:
        assert c.token not in out

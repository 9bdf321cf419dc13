"""A Ray head started as users get it now: token auth on (Ray's default when ``~/.ray/auth_token``
exists), in a private HOME, with a switchable ``python`` on its PATH. Shared by the tests under
tests/cluster/ that talk to a token-auth dashboard (test_submit_auth.py explains the set-up): one
head for that package (tests/cluster/conftest.py), torn down after its last test."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cluster import VENV_BIN, LocalRayCluster
from tests.support.specs import smoke_spec, write_spec

SYSTEM_PYTHON = "/usr/bin/python3"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="package")
def auth_cluster():
    c = LocalRayCluster()
    home = Path(c.root) / "home"
    shim = Path(c.root) / "shim"
    home.mkdir()
    shim.mkdir()
    c.shim = shim
    node_python(c, sys.executable)
    for var in AUTH_VARS:
        c.env.pop(var, None)  # Ray's default decides: token auth, because the token file exists
    c.env["HOME"] = str(home)
    c.env["PATH"] = f"{shim}{os.pathsep}{c.env['PATH']}"
    gen = subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=c.env, cwd=c.root,
                         capture_output=True, text=True, timeout=60)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert gen.returncode == 0 and token, gen.stderr
    c.home, c.token = home, token
    try:
        c.start_head()
        wait_up(c)
        yield c
    finally:
        c.shutdown()
        leftovers = [p.pid for p in c._ours() if p.is_running() and p.status() != "zombie"]
        c.remove_files()
        assert not leftovers, f"processes of the test cluster still alive: {leftovers}"


def headers(c) -> dict:
    return {"Authorization": f"Bearer {c.token}"}


def wait_up(c, timeout: float = 120.0) -> None:
    """Until the dashboard answers the Jobs API with the token (and says it wants one)."""
    import requests

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if c.nodes[0].proc.poll() is not None:
            raise RuntimeError(f"ray head exited:\n{c.logs()}")
        c._record_descendants()
        try:
            bare = requests.get(f"{c.dashboard_url}/api/jobs/", timeout=5)
            ok = requests.get(f"{c.dashboard_url}/api/jobs/", headers=headers(c), timeout=5)
            nodes = requests.get(f"{c.dashboard_url}/api/v0/nodes", headers=headers(c), timeout=5)
            if ok.status_code == 200 and nodes.status_code == 200 and "ALIVE" in nodes.text:
                assert bare.status_code == 401, f"the head did not turn token auth on: {bare.status_code}"
                return
            last = (ok.status_code, nodes.status_code)
        except requests.RequestException as e:
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"head not up in {timeout}s: {last}\n{c.logs()}")


def client(c):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(c.dashboard_url, headers=headers(c))


def node_python(c, target: str) -> None:
    """Which interpreter a job's ``python`` is on the head (see the module docstring). A script
    that execs it by its own path, not a symlink: a venv's python finds its venv from its path."""
    tmp = c.shim / "python.new"
    tmp.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    tmp.chmod(0o755)
    tmp.replace(c.shim / "python")


@pytest.fixture
def user_env(auth_cluster, monkeypatch):
    """t2i's process as a user's shell after ``ray start --head``: the token in ~/.ray/auth_token,
    no Ray auth variable set."""
    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(auth_cluster.home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return auth_cluster


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


def download_spec(tmp_path: Path, run_id: str) -> tuple[str, Path]:
    download = {"image_size": 32, "number_sample_per_shard": 64, "processes_count": None,
                "demo": {"num_images": 8, "image_size": 32, "seed": None}}
    spec = write_spec(tmp_path / f"{run_id}.yaml",
                      smoke_spec(only=("download",), run_id=run_id, store={"uri": f"file://{tmp_path}/store"},
                                 cluster=None, download=download))
    return spec, tmp_path / "store" / run_id


def wait_succeeded(client, sid: str, timeout: float = 150.0) -> str:
    """Poll job ``sid`` until it ends; assert it SUCCEEDED (the message and log tail say why not)."""
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = str(client.get_job_status(sid).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    assert status == "SUCCEEDED", f"{sid}: {status} {client.get_job_info(sid).message}\n{client.get_job_logs(sid)[-4000:]}"
    return status

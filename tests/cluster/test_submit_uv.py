"""``t2i submit --pip`` with Ray's ``uv`` runtime env (pipeline/run/runtime_env.py), on the token-auth
local head the tests of this package share (tests/support/auth_cluster.py).

The unit part checks the runtime env ``--pip`` builds (installer choice, the Makefile's pins,
DS_BUILD_OPS=0); the cluster part submits the download-only smoke spec with ``--pip-installer uv``
and checks the job succeeded with a ``uv`` runtime env. The head's node venv already has every
requirement at the pinned versions, so uv's install is an audit (plus ``pip install uv`` into the
cloned venv when the node's venv has no uv)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.auth_cluster import client as _client
from tests.support.auth_cluster import wait_succeeded
from tests.support.auth_cluster import download_spec as _spec
from tests.support.cluster import REPO


def _makefile_pin(name: str) -> str:
    from pipeline.run.runtime_env import makefile_vars

    return makefile_vars(REPO)[name]


@pytest.mark.parametrize("installer", ["uv", "pip", "auto", True])
def test_pip_runtime_env_pins_and_installer(installer):
    from pipeline.run.runtime_env import ray_supports_uv
    from pipeline.run.submit import build_runtime_env, project_requirements

    env = build_runtime_env("/nowhere", pip=installer, root=REPO)
    want = "pip" if installer == "pip" or not ray_supports_uv() else "uv"
    other = {"uv": "pip", "pip": "uv"}[want]
    assert want in env and other not in env, env
    packages = env[want]["packages"]
    assert f"torch=={_makefile_pin('TORCH_VERSION')}" in packages
    assert f"torchvision=={_makefile_pin('TORCHVISION_VERSION')}" in packages
    assert _makefile_pin("DEEPSPEED_SPEC") in packages
    assert len(packages) == len(project_requirements(REPO))
    assert env["env_vars"]["DS_BUILD_OPS"] == "0"
    if want == "uv":
        assert "--no-cache" not in env["uv"]["uv_pip_install_options"]  # uv's cache makes repeats fast
    assert "uv" not in build_runtime_env("/nowhere", pip=False, root=REPO)


def test_pip_installer_refused_values(cli, tmp_path):
    res = cli("submit", str(tmp_path / "x.yaml"), "--pip", "--pip-installer", "conda")
    assert res.exit_code == 2 and "--pip-installer must be auto, uv or pip" in res.output, res.output


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_pip_with_uv_runs_the_job_in_a_uv_env(user_env, cli, tmp_path):
    from pipeline.run.runtime_env import ray_supports_uv

    if not ray_supports_uv():
        pytest.skip("this Ray has no uv runtime env")
    c = user_env
    spec, run = _spec(tmp_path, "uv-ok")
    t0 = time.monotonic()
    res = cli("submit", spec, "--address", c.dashboard_url, "--pip", "--pip-installer", "uv")
    assert res.exit_code == 0, res.output
    sid = res.output.strip().splitlines()[-1]
    client = _client(c)
    wait_succeeded(client, sid, timeout=240)
    info = client.get_job_info(sid)
    logs = client.get_job_logs(sid)
    assert "download: started" in logs
    assert "uv" in info.runtime_env and "pip" not in info.runtime_env, info.runtime_env
    assert f"torch=={_makefile_pin('TORCH_VERSION')}" in info.runtime_env["uv"]["packages"]
    assert info.runtime_env["env_vars"]["DS_BUILD_OPS"] == "0"
    # The job's python was the uv env's (Ray's uv plugin puts its virtualenv's python first).
    print(f"uv submit-to-success: {time.monotonic() - t0:.1f}s")
    assert (Path(run) / "_JOB.json").exists()

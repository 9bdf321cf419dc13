"""A real two-node Ray cluster on this machine: submit runs through the Jobs API, pin a stage to
the node that has a custom resource, read logs, stop a job (each job's driver joins with
``--address auto``), and drive the cluster directly with ``t2i run --address HOST:PORT``.

The cluster is started with ``ray start`` (head with dashboard on 127.0.0.1 + one worker node
with ``{"special_node": 1}``), each node with one CPU and its own temp dir; see
tests/support/cluster.py for why teardown kills our processes by PID instead of ``ray stop``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cluster import REPO, LocalRayCluster
from tests.support.specs import smoke_spec, write_spec

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

SPECIAL = "special_node"
HEAD = "t2i_test_head"  # a resource only the head has: the ray:// run is pinned there, the job to SPECIAL


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster()
    try:
        c.start_head(resources={HEAD: 1})
        c.wait_until_up(1)  # the GCS must be up before a node can join it
        c.add_node("n1", resources={SPECIAL: 1})
        c.nodes_info = c.wait_until_up(2)
        yield c
    finally:
        killed_late = c.shutdown()
        leftovers = [p.pid for p in c._ours() if p.is_running() and p.status() != "zombie"]
        # Ray wrote its address file into our temp dirs, never into the shared /tmp/ray.
        shared = Path("/tmp/ray/ray_current_cluster")
        points_at_us = shared.exists() and str(c.gcs_port) in shared.read_text()
        c.remove_files()
        assert not leftovers, f"processes of the test cluster still alive: {leftovers}"
        assert not points_at_us, "/tmp/ray/ray_current_cluster points at the test cluster"
        assert "RAY_ADDRESS" not in os.environ
        del killed_late


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        res = runner.invoke(app, list(args), catch_exceptions=False)
        return res

    return invoke


def _write_spec(path: Path, run_id: str, store_uri: str, *, num_images: int = 12,
                resources: dict | None = None) -> Path:
    """The smoke spec's download alone (one shard of 32px images), on the cluster's defaults."""
    download = {"image_size": 32, "number_sample_per_shard": 64, "processes_count": None,
                "demo": {"num_images": num_images, "image_size": 32, "seed": None}}
    if resources is not None:
        download["resources"] = resources
    write_spec(path, smoke_spec(only=("download",), run_id=run_id, store={"uri": store_uri}, cluster=None,
                                download=download))
    return path


def _wait_job(cluster, sid: str, states=("SUCCEEDED", "FAILED", "STOPPED"), timeout: float = 150.0) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = str(client.get_job_status(sid).value)
        if status in states:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"job {sid} still {status} after {timeout}s; logs:\n{client.get_job_logs(sid)[-3000:]}")


def _node_with(cluster, resource: str) -> str:
    ids = [n["node_id"] for n in cluster.nodes_info if resource in n["resources"]]
    assert len(ids) == 1, cluster.nodes_info
    return ids[0]


def test_submit_runs_on_cluster_pinned_logs_and_status(cluster, direct_run, cli, tmp_path, monkeypatch):
    from pipeline import store
    from pipeline.run.planning import run_status, stage_uri
    from pipeline.run.submit import JOB_FILE, job_status_line

    spec = _write_spec(tmp_path / "spec.yaml", "cluster-submit", f"file://{tmp_path}/store",
                       resources={SPECIAL: 1})
    # A secret in the submitter's environment must never reach the job or the run record.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship-this-secret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli("submit", str(spec), "--address", cluster.dashboard_url, "--set", "download.timeout=5")
    assert res.exit_code == 0, res.output
    sid = res.output.strip().splitlines()[-1]
    assert sid.startswith("t2i-cluster-submit-")
    run = f"file://{tmp_path}/store/cluster-submit"

    record = store.read_json(store.join(run, JOB_FILE))
    assert record["submission_id"] == sid and record["address"] == cluster.dashboard_url
    assert record["entrypoint"].endswith("--address auto")
    assert "do-not-ship" not in json.dumps(record)

    status = _wait_job(cluster, sid)
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(cluster.dashboard_url).get_job_info(sid)
    assert status == "SUCCEEDED", f"{info.message}\n{JobSubmissionClient(cluster.dashboard_url).get_job_logs(sid)[-4000:]}"
    assert "do-not-ship" not in json.dumps(info.runtime_env)
    assert info.runtime_env["env_vars"].get("HF_HUB_OFFLINE") == "1"
    assert "pip" not in info.runtime_env  # --no-pip is the default: the nodes share this venv

    # The stage really ran: its manifest, written last, with the override applied.
    manifest = store.read_json(store.join(stage_uri(run, "download"), "_MANIFEST.json"))
    assert manifest["counts"]["successes"] == 12
    assert manifest["config"]["timeout"] == 5
    node_ids = {n["node_id"] for n in cluster.nodes_info}
    assert manifest["node"]["node_id"] in node_ids, (manifest["node"], node_ids)
    assert manifest["node"]["node_id"] == _node_with(cluster, SPECIAL)  # the pinned stage ran there

    # t2i logs, by run dir and by job id: the driver's own output.
    by_run = cli("logs", run)
    assert by_run.exit_code == 0, by_run.output
    assert "download" in by_run.output and "finished" in by_run.output
    by_id = cli("logs", sid, "--address", cluster.dashboard_url)
    assert by_id.exit_code == 0 and "download" in by_id.output
    followed = cli("logs", sid, "--address", cluster.dashboard_url, "--follow")  # a finished job: returns
    assert followed.exit_code == 0 and "download" in followed.output

    # t2i status's pieces: stage states from the store, plus the job line.
    rows = {r["stage"]: r for r in run_status(run)}
    assert rows["download"]["state"] == "done"
    line = job_status_line(run)
    assert line.startswith(f"job {sid}: SUCCEEDED at {cluster.dashboard_url}")
    shown = cli("status", run)
    assert shown.exit_code == 0 and f"job {sid}: SUCCEEDED" in shown.output and "done" in shown.output

    # Stopping a finished job is a no-op that says so.
    again = cli("stop", run)
    assert again.exit_code == 0 and "SUCCEEDED" in again.output


def test_stop_a_running_job(cluster, cli, tmp_path):
    from pipeline import store
    from pipeline.run.planning import stage_uri
    from pipeline.run.submit import job_status_line

    # A stage that asks for a resource no node has waits forever: the job is running, cheaply.
    spec = _write_spec(tmp_path / "long.yaml", "cluster-stop", f"file://{tmp_path}/store",
                       resources={"no_such_node": 1})
    res = cli("submit", str(spec), "--address", cluster.dashboard_url)
    assert res.exit_code == 0, res.output
    sid = res.output.strip().splitlines()[-1]
    run = f"file://{tmp_path}/store/cluster-stop"
    assert _wait_job(cluster, sid, states=("RUNNING", "SUCCEEDED", "FAILED")) == "RUNNING"

    # A second submission of the same run while it runs would race with it: refused.
    dup = cli("submit", str(spec), "--address", cluster.dashboard_url)
    assert dup.exit_code == 2 and "already has job" in dup.output

    stopped = cli("stop", run, "--wait", "60")
    assert stopped.exit_code == 0, stopped.output
    assert f"job {sid}: STOPPED" in stopped.output
    assert "STOPPED" in job_status_line(run)
    # A stopped stage never looks complete.
    assert not store.exists(store.join(stage_uri(run, "download"), "_MANIFEST.json"))

    # Once stopped, the run may be submitted again (that is how a run is resumed): a new job id.
    again = cli("submit", str(spec), "--address", cluster.dashboard_url)
    assert again.exit_code == 0, again.output
    sid2 = again.output.strip().splitlines()[-1]
    assert sid2 != sid
    assert f"job {sid2}: STOPPED" in cli("stop", sid2, "--address", cluster.dashboard_url).output


@pytest.fixture(scope="module")
def direct_run(cluster, tmp_path_factory):
    """``t2i run --address HOST:GCS_PORT`` -- a driver joining the existing cluster, which is what
    ``--address auto`` resolves to on a head node -- started as soon as the cluster is up, in the
    background: it is mostly interpreter start-up and img2dataset imports, which overlap well with
    the job tests. (Ray Client, ``ray://``, works too but its server gives a new client 30 s to
    start, which a loaded 2-core machine does not always meet: not something to gate tests on.)"""
    tmp = tmp_path_factory.mktemp("direct")
    spec = _write_spec(tmp / "direct.yaml", "cluster-direct", f"file://{tmp}/store", num_images=8,
                       resources={HEAD: 1})
    address = cluster.gcs_address
    log = open(tmp / "driver.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(spec),
                             "--address", address], cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, tmp, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_run_with_address_drives_the_cluster(cluster, direct_run):
    """``t2i run --address HOST:PORT`` runs the stages on the existing cluster, not a private Ray."""
    from pipeline import store

    proc, tmp, log = direct_run
    rc = proc.wait(timeout=150)
    log.seek(0)
    assert rc == 0, log.read()[-4000:]
    from pipeline.run.planning import stage_uri

    manifest = store.read_json(store.join(stage_uri(f"file://{tmp}/store/cluster-direct", "download"), "_MANIFEST.json"))
    assert manifest["counts"]["successes"] == 8
    # It ran on one of *this* cluster's nodes, not in a private local Ray -- on the one it asked for.
    assert manifest["node"]["node_id"] in {n["node_id"] for n in cluster.nodes_info}
    assert manifest["node"]["node_id"] == _node_with(cluster, HEAD)

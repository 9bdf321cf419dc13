"""One driver per run (issue 25): two `t2i run` of one spec on one store, a second driver that
waits, and a SIGKILLed driver whose lease expires and is taken over by `t2i resume`."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.cli import t2i
from tests.support.specs import smoke_spec, write_spec

pytestmark = pytest.mark.slow
STAGES = ("download", "embed", "train_prior")  # enough of the run to hold leases a while
FAST = {"T2I_LEASE_INTERVAL_S": "1"}  # heartbeats every second: a silent lease expires after 4 s


def _driver(cwd, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **FAST, **(env or {})})


def _wait_for(pattern: str, limit_s: float = 120) -> str:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        found = glob.glob(pattern)
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"nothing matched {pattern} within {limit_s:.0f} s")


def _manifests(run: str) -> dict[str, dict]:
    out = {}
    for stage in STAGES:
        [m] = glob.glob(os.path.join(run, stage, "*", "_MANIFEST.json"))
        with open(m) as f:
            out[stage] = json.load(f)
    return out


def test_two_drivers_on_one_run_one_trains_the_other_refuses_or_waits(tmp_path):
    # a longer prior: the first driver must still be at work when the waiting driver starts
    spec = write_spec(tmp_path / "spec.yaml", smoke_spec(only=STAGES, run_id="leases", train_prior={"steps": 200}))
    run = str(tmp_path / "runs" / "leases")
    first = _driver(tmp_path, "run", spec, "--no-ray")
    _wait_for(os.path.join(run, "download", "*", "_LEASE.json"))
    second = t2i("run", spec, "--no-ray", cwd=tmp_path, env=FAST, timeout=120)
    waiting = _driver(tmp_path, "run", spec, "--no-ray", "--wait")
    assert second.code == 3, second.output
    assert second.seconds < 30
    status = t2i("status", run, "--json", cwd=tmp_path, timeout=120)
    rows = {r["stage"]: r for r in json.loads(status.stdout)["stages"]}
    held = [r["lease"]["owner"]["pid"] for r in rows.values() if r["lease"]]
    assert held and set(held) == {first.pid}, rows  # who works on the unfinished stages
    assert f"download is being worked on by pid {first.pid}" in second.stderr, second.stderr
    assert "--wait" in second.stderr and "--take-over" in second.stderr
    out, _ = first.communicate(timeout=400)
    assert first.returncode == 0, out[-3000:]
    waited, _ = waiting.communicate(timeout=400)
    assert waiting.returncode == 0, waited[-3000:]  # after the first finished: every stage done already, a no-op
    assert "… waiting: " in waited and "being worked on by pid" in waited, waited[-3000:]
    assert all(f"✓ {s}: done already" in waited for s in STAGES), waited[-3000:]
    for stage, m in _manifests(run).items():  # one writer per attempt: the first driver, no takeover
        assert m["lease"]["owner"]["pid"] == first.pid and "lease_takeovers" not in m["counts"], stage
    assert not glob.glob(os.path.join(run, "*", "*", "_LEASE.json"))  # all released


def test_a_killed_drivers_lease_expires_and_resume_takes_over(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", smoke_spec(only=STAGES, run_id="killed"))
    run = str(tmp_path / "runs" / "killed")
    slow = {"T2I_LEASE_INTERVAL_S": "3"}  # expiry after 12 s: room for a loaded box to start `t2i` in between
    first = _driver(tmp_path, "run", spec, "--no-ray", env=slow)
    _wait_for(os.path.join(run, "train_prior", "*", "_STARTED.json"), limit_s=300)
    os.kill(first.pid, signal.SIGKILL)  # no finally, no release: only the heartbeats stop
    first.communicate(timeout=60)
    # Another host would wait for the lease to expire (4 silent intervals); seen from another host:
    lease_file = _wait_for(os.path.join(run, "train_prior", "*", "_LEASE.json"))
    with open(lease_file) as f:
        lease = json.load(f)
    lease["owner"]["host"], lease["heartbeat"] = "another-host", time.time()
    with open(lease_file, "w") as f:
        json.dump(lease, f)
    early = t2i("resume", run, "--no-ray", cwd=tmp_path, env=slow, timeout=120)
    assert early.code == 3 and "pid" in early.stderr and "another-host" in early.stderr, early.output
    time.sleep(max(0.0, lease["heartbeat"] + 13 - time.time()))  # past 4 silent intervals
    late = t2i("resume", run, "--no-ray", cwd=tmp_path, env=slow, timeout=400)
    assert late.code == 0, late.output
    assert "taking over the lease" in late.stdout and "(expired)" in late.stdout
    prior = _manifests(run)["train_prior"]
    assert prior["counts"]["lease_takeovers"] == 1 and prior["lease"]["took_over_from"]["pid"] == first.pid


def test_a_killed_driver_on_this_host_is_taken_over_at_once(tmp_path):
    """The owner ran here and its process is gone: `t2i resume` need not wait for the expiry."""
    spec = write_spec(tmp_path / "spec.yaml", smoke_spec(only=("download",), run_id="here"))
    run = str(tmp_path / "runs" / "here")
    first = _driver(tmp_path, "run", spec, "--no-ray", env={"T2I_LEASE_INTERVAL_S": "600"})
    _wait_for(os.path.join(run, "download", "*", "_LEASE.json"))
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    again = t2i("resume", run, "--no-ray", cwd=tmp_path, env={"T2I_LEASE_INTERVAL_S": "600"}, timeout=300)
    assert again.code == 0, again.output
    assert "(its process is gone)" in again.stdout


def test_on_s3_the_second_driver_refuses_and_ctrl_c_releases_the_lease(tmp_path, s3_bucket):
    """The same on moto's S3 server (the lease taken by a conditional PUT): the second driver
    refuses naming the first; Ctrl-C (SIGINT) on the first releases what it held."""
    from pipeline import store

    spec = write_spec(tmp_path / "spec.yaml", smoke_spec(only=("download", "embed"), run_id="s3lease",
                                                         store={"uri": f"{s3_bucket}/runs"}))
    first = _driver(tmp_path, "run", spec, "--no-ray")
    end = time.monotonic() + 120
    while not store.glob(f"{s3_bucket}/runs/s3lease/download/*/_LEASE.json"):
        assert time.monotonic() < end and first.poll() is None, "the first driver took no lease"
        time.sleep(0.3)
    second = t2i("run", spec, "--no-ray", cwd=tmp_path, env=FAST, timeout=120)
    assert second.code == 3 and f"by pid {first.pid}" in second.stderr, second.output
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
    assert not store.glob(f"{s3_bucket}/runs/s3lease/*/*/_LEASE.json"), out[-3000:]

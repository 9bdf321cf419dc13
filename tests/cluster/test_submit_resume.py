"""``t2i submit RUN --stage S``: one stage of an existing run resumed as a Ray job (issue 30).

The head is test_submit_auth.py's (token auth on as Ray's default, a private HOME holding
``~/.ray/auth_token``, nothing setting RAY_AUTH_MODE): its fixtures are imported, not copied.
A tiny run (download, embed, train_base for 4 steps, a checkpoint every 2) is submitted as a
spec; then ``t2i submit RUN --stage train_base --set train_base.steps=8`` must run ``t2i resume
RUN --stage train_base`` as a job -- the same CLI path as a local resume -- which continues the
finished attempt from its step-4 checkpoint instead of restarting it, leaves download and embed
alone, and is recorded in ``_JOB.json`` beside the first job. A second submission while that job
is pending or running is refused in one line naming it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from pipeline import layout, store
from tests.support.auth_cluster import client as _client
from tests.support.auth_cluster import wait_succeeded
from tests.support.specs import smoke_spec, tiny_embed, write_spec

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]

RUN_ID = "resume-job"


def _spec(tmp_path: Path, run_id: str = RUN_ID, store_uri: str | None = None, encoders: Path | None = None) -> str:
    return write_spec(tmp_path / f"{run_id}.yaml", smoke_spec(
        only=("download", "embed", "train_base"), run_id=run_id, store={"uri": store_uri or f"file://{tmp_path}/store"},
        # The stages run inside the job's driver: what is under test is the path from `t2i submit`
        # to the job's `t2i resume`, not how stages are placed (test_cluster_multinode.py), and a
        # 1-CPU head on a shared 2-core machine stays under two minutes this way.
        cluster={"use_ray": False},
        download={"demo": {"num_images": 16, "image_size": 32, "seed": 7}, "image_size": 32,
                  "number_sample_per_shard": 8},
        # Built already (the session's tiny_encoders, from the per-user cache): the head's private
        # HOME has no cache, and training the tiny CLIP there would take minutes.
        embed=tiny_embed(encoders or tmp_path / "enc", max_length=16, batch_size=8),
        train_base={"steps": 4, "checkpoint_every_steps": 2, "batch_size": 4}))


def _manifest(run: str, stage: str) -> dict:
    from pipeline.run.planning import finished_attempt

    return store.read_json(store.join(finished_attempt(run, stage), layout.MANIFEST))


def test_submit_takes_a_spec_or_a_run_and_says_which_flags_need_a_run(tmp_path, monkeypatch, cli):  # noqa: F811
    from pipeline.run.submit import SubmitError, resolve_target, verb_args, verb_entrypoint

    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, "r1", f"file://{tmp_path}/runs")
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(Path(spec).read_text())  # as `t2i run` saves it
    assert resolve_target(spec) == ("spec", spec)
    assert resolve_target("r1") == ("run", f"file://{run}")  # a bare id under ./runs, as t2i resume reads it
    assert resolve_target(str(run)) == ("run", f"file://{run}")
    (tmp_path / "r1").write_text("run_id: r1\n")  # a file and a run with one name: refused, naming both spellings
    with pytest.raises(SubmitError, match=r"r1 is both a spec file and the run file://.*/runs/r1: pass \./r1"):
        resolve_target("r1")
    assert resolve_target("./r1") == ("spec", "./r1")
    with pytest.raises(SubmitError, match="neither a run spec file nor a run"):
        resolve_target("no-such-run")

    # What a job runs: the local command line, word for word (rerun: new attempts, as `t2i rerun`).
    assert (verb_entrypoint("rerun", verb_args("s3://b/runs/r 1", None, "train_base"))
            == "python -m pipeline.cli rerun 's3://b/runs/r 1' --from train_base --address auto")

    moved = tmp_path / "elsewhere" / "r1"  # a run folder whose spec says it lives in ./runs
    moved.mkdir(parents=True)
    (moved / "spec.yaml").write_text(Path(spec).read_text())

    # --stage/--from/--rerun with a spec, --rerun without a stage, a --set that would move the run:
    # a copied run: one line, exit 2, before any network call (no --address is given, none is needed).
    for args, says in ((("submit", spec, "--stage", "train_base"), "take an existing run, not a spec file"),
                       (("submit", str(run), "--rerun"), "--rerun with --stage STAGE or --from STAGE"),
                       (("submit", str(run), "--stage", "train_sr256"), "not configured in this run's spec"),
                       (("submit", str(run), "--set", "run_id=other"), "--set run_id=… would make another run"),
                       (("submit", str(moved), "--stage", "train_base"), "(moved or copied?)")):
        res = cli(*args)
        assert res.exit_code == 2, (args, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and says in " ".join(res.output.split()), (args, res.output)


def test_submit_run_stage_resumes_it_as_a_job(tiny_encoders, user_env, cli, tmp_path):  # noqa: F811
    c = user_env
    client = _client(c)
    spec = _spec(tmp_path, encoders=tiny_encoders)
    run = f"file://{tmp_path}/store/{RUN_ID}"
    t0 = time.monotonic()

    res = cli("submit", spec, "--address", c.dashboard_url, "--no-check")
    assert res.exit_code == 0, res.output
    first = res.output.strip().splitlines()[-1]
    wait_succeeded(client, first)
    before = {s: _manifest(run, s) for s in ("download", "embed", "train_base")}
    assert before["train_base"]["counts"]["steps"] == 4 and "resumed_from_step" not in before["train_base"]["counts"]
    t_first = time.monotonic() - t0

    # Raise the steps and resume just train_base, as a job; the address comes from _JOB.json. The
    # preflight probe runs too (it is part of the path a user gets).
    res = cli("submit", run, "--stage", "train_base", "--set", "train_base.steps=8")
    assert res.exit_code == 0, res.output
    second = res.output.strip().splitlines()[-1]
    assert second.startswith(f"t2i-{RUN_ID}-") and second != first
    out = " ".join(res.output.split())
    assert f"submitted `t2i resume {run} --stage train_base` as job {second}" in out, res.output
    assert "cluster check passed" in out and "updated with --set train_base.steps=8" in out, res.output

    # One driver per run: a second submission while that job is pending/running is one line, exit 2.
    again = cli("submit", run, "--stage", "train_base")
    assert str(client.get_job_status(second).value) in ("PENDING", "RUNNING")  # still active after the refusal
    assert again.exit_code == 2, again.output
    lines = [ln for ln in again.output.splitlines() if ln.strip() and "token from" not in ln]
    assert len(lines) == 1 and f"already has job {second}" in lines[0], again.output
    n_jobs = len([j for j in client.list_jobs() if j.submission_id.startswith(f"t2i-{RUN_ID}-")])
    assert n_jobs == 2  # the refused one created nothing

    wait_succeeded(client, second)
    info = client.get_job_info(second)
    # The job ran the local CLI's resume path, on the run's (updated) saved spec.
    assert info.entrypoint == f"python -m pipeline.cli resume {run} --stage train_base --address auto"
    assert "resumed from checkpoint step 4" in client.get_job_logs(second)
    after = {s: _manifest(run, s) for s in ("download", "embed", "train_base")}
    counts = after["train_base"]["counts"]
    assert counts["steps"] == 8 and counts["resumed_from_step"] == 4, counts  # continued, not restarted
    assert after["train_base"]["out_uri"] == before["train_base"]["out_uri"]  # the same attempt, extended
    for s in ("download", "embed"):  # untouched
        assert after[s]["finished_at"] == before[s]["finished_at"], s

    # t2i status: the stage's row says it resumed from step 4; the job line says what the job ran.
    st = cli("status", run)
    assert st.exit_code == 0, st.output
    text = " ".join(st.output.split())
    assert f"job {second}: SUCCEEDED at {c.dashboard_url}" in text, st.output
    assert "; ran t2i resume --stage train_base" in text, st.output
    rows = json.loads(cli("status", run, "--json").output)["stages"]
    tb = next(r for r in rows if r["stage"] == "train_base")
    assert tb["state"] == "done" and tb["counts"]["resumed_from_step"] == 4 and tb["counts"]["steps"] == 8

    # _JOB.json: the latest job at the top level (what logs/stop/status read), the first kept in history.
    record = store.read_json(store.join(run, layout.JOB))
    assert record["submission_id"] == second and record["verb"] == "resume"
    assert record["args"] == [run, "--stage", "train_base"]
    assert record["overrides"] == {"train_base.steps": 8}
    assert record["spec_path"] == f"{run}/spec.yaml"
    assert [(h["submission_id"], h["verb"]) for h in record["history"]] == [(first, "run")]
    assert c.token not in json.dumps(record)
    print(f"\nfirst job (download+embed+train_base) {t_first:.1f}s; "
          f"whole test {time.monotonic() - t0:.1f}s", file=sys.stderr)

"""`t2i run`, `status` and `resume` end to end on the data stages (real img2dataset, tiny encoders).

One run is driven through its whole life: first run, no-op re-run, a no-op resume of a finished
stage, reruns as new attempts (one stage / one stage and downstream), a changed config making new
attempts beside the old ones, an interrupted stage resumed in place, and a failing stage reported
without a traceback.
"""
from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from pipeline import manifest as mf
from pipeline import store
from pipeline.cli import app
from pipeline.run.planning import stage_uri
from tests.support.specs import smoke_spec, tiny_embed, write_spec

pytestmark = pytest.mark.slow


def _spec(tmp_path, **download_overrides) -> str:
    """The smoke spec's download and embed: 40 images with 10% bad rows, 16 a shard, tiny encoders."""
    data = smoke_spec(
        only=("download", "embed"), run_id="r1", store={"uri": f"file://{tmp_path / 'store'}"},
        cluster={"use_ray": False},
        download={"demo": {"num_images": 40, "seed": 1, "bad_fraction": 0.1}, "number_sample_per_shard": 16,
                  "min_success_rate": 0.5, **download_overrides},
        embed=tiny_embed(tmp_path / "enc", batch_size=16))
    return write_spec(tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.yaml", data)


def _cli(*args):
    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def _finished(run: str, stage: str) -> float:
    return store.read_json(store.join(stage_uri(run, stage), mf.MANIFEST))["finished_at"]


def test_run_status_resume_lifecycle(tmp_path):
    spec = _spec(tmp_path)
    run = f"file://{tmp_path}/store/r1"

    code, out = _cli("run", spec)
    assert code == 0, out
    dl = store.read_json(store.join(stage_uri(run, "download"), mf.MANIFEST))
    assert dl["counts"]["successes"] == 36 and dl["counts"]["total"] == 40, dl["counts"]
    assert any(f["path"].endswith(".tar") and f["bytes"] > 0 for f in dl["files"])
    emb = store.read_json(store.join(stage_uri(run, "embed"), mf.MANIFEST))
    assert emb["counts"]["n_embedded"] == 36
    t_dl, t_emb = _finished(run, "download"), _finished(run, "embed")

    code, out = _cli("status", run)
    assert code == 0 and out.count("done") == 2, out

    # Same spec: a no-op.
    code, out = _cli("run", spec)
    assert code == 0 and "download: done already" in out and "embed: done already" in out, out
    assert (_finished(run, "download"), _finished(run, "embed")) == (t_dl, t_emb)

    # resume --stage of a finished stage: a no-op (resume never restarts or deletes).
    code, out = _cli("resume", run, "--stage", "embed")
    assert code == 0 and "embed: done already" in out, out
    assert _finished(run, "embed") == t_emb

    # rerun --stage: a new attempt of embed beside the old one; download untouched.
    old_embed = stage_uri(run, "embed")
    code, out = _cli("rerun", run, "--stage", "embed")
    assert code == 0, out
    assert stage_uri(run, "embed") != old_embed and store.exists(store.join(old_embed, mf.MANIFEST))
    assert _finished(run, "download") == t_dl and _finished(run, "embed") > t_emb
    t_emb = _finished(run, "embed")

    # A changed download config: new download and embed attempts; the old ones stay, intact.
    old_dl, old_emb = stage_uri(run, "download"), stage_uri(run, "embed")
    spec2 = _spec(tmp_path, min_image_size=8)
    code, out = _cli("run", spec2)
    assert code == 0, out
    assert stage_uri(run, "download") != old_dl and stage_uri(run, "embed") != old_emb
    assert store.read_json(store.join(old_dl, mf.MANIFEST))["finished_at"] == t_dl
    assert store.read_json(store.join(old_emb, mf.MANIFEST))["finished_at"] == t_emb
    t_dl, t_emb = _finished(run, "download"), _finished(run, "embed")
    code, out = _cli("status", run)
    assert code == 0 and "superseded" in out and old_dl.rsplit("/", 1)[-1] in out, out

    # rerun --from: the stage and its downstream as new attempts.
    code, out = _cli("rerun", run, "--from", "download")
    assert code == 0, out
    assert _finished(run, "download") > t_dl and _finished(run, "embed") > t_emb

    # A stage killed half-way: no manifest, its finished shards kept, resumed in place.
    emb_uri = stage_uri(run, "embed")
    done_markers = store.glob(store.join(emb_uri, "shards", "*.done.json"))
    kept = store.read_bytes(done_markers[0])
    store.remove(mf.manifest_uri(emb_uri))
    store.remove(done_markers[-1])
    code, out = _cli("status", run)
    assert "partial" in out, out
    code, out = _cli("resume", run)
    assert code == 0, out
    assert store.read_bytes(done_markers[0]) == kept, "a finished shard must not be embedded again"
    assert store.exists(done_markers[-1])
    assert store.read_json(store.join(emb_uri, mf.MANIFEST))["counts"]["n_embedded"] == 36


def test_failing_stage_is_reported_and_blocks_downstream(tmp_path):
    spec = _spec(tmp_path, min_success_rate=0.99)
    run = f"file://{tmp_path}/store/r1"
    code, out = _CliRunnerBoth("run", spec)
    assert code == 1
    assert "download" in out and "success rate" in out.lower(), out
    assert "Traceback" not in out
    assert not store.exists(store.join(stage_uri(run, "download"), mf.MANIFEST)), "a failed stage never looks done"
    code, out = _cli("status", run)
    assert "failed" in out, out
    err = store.read_json(store.join(stage_uri(run, "download"), "_ERROR.json"))
    assert "success rate" in err["error"].lower()


def _CliRunnerBoth(*args):  # noqa: N802 - stdout and stderr together
    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def test_resume_rejects_unknown_stage_and_non_run(tmp_path):
    code, out = _CliRunnerBoth("resume", str(tmp_path / "nope"))
    assert code == 2 and "is not a run" in out
    spec = _spec(tmp_path)
    run = f"file://{tmp_path}/store/r1"
    from pipeline.run.runner import save_spec
    from pipeline.run.spec import load_spec

    save_spec(load_spec(spec))
    code, out = _CliRunnerBoth("resume", run, "--stage", "train_nothing")
    assert code == 2 and "unknown stage 'train_nothing'" in out, out
    code, out = _CliRunnerBoth("resume", run, "--stage", "train_base")
    assert code == 2 and "not configured" in out, out

"""The CLI as a user meets it, on a finished smoke run: machine-readable status, exports that
stand alone, and one clear line (no traceback) for every kind of mistake."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.support.cli import t2i
from tests.support.specs import REPO

pytestmark = pytest.mark.slow


def test_status_json_is_fast_and_complete(smoke_run):
    cwd, run = smoke_run
    t0 = time.time()
    code, out, err = t2i("status", run, "--json", cwd=cwd)
    elapsed = time.time() - t0
    assert code == 0, err
    doc = json.loads(out)
    stages = {r["stage"]: r for r in doc["stages"]}
    assert set(stages) >= {"download", "embed", "train_base", "sample"}
    assert all(r["state"] == "done" for r in stages.values()), stages
    for r in stages.values():
        assert {"attempt", "uri", "counts", "metrics", "duration_s", "superseded"} <= set(r)
    assert stages["train_base"]["counts"]["steps"] == 4 and "final_loss" in stages["train_base"]["metrics"]
    assert elapsed < 5, f"status took {elapsed:.1f}s (a fresh interpreter included; target < 2 s on an idle machine)"


def test_export_reloads_without_the_run(smoke_run, tmp_path):
    cwd, run = smoke_run
    for fmt in ("diffusers", "folder"):
        out = tmp_path / fmt
        code, stdout, err = t2i("export", run, "--stage", "train_base", "--out", str(out), "--format", fmt, cwd=cwd)
        assert code == 0, err
        moved = tmp_path / f"{fmt}-moved"
        shutil.move(str(out), moved)  # nothing points back at the run
        probe = ("import sys; from stages.export.model_folder import load_exported; net, cfg = load_exported(sys.argv[1]); "
                 "print(type(net).__name__, cfg.step, sum(p.numel() for p in net.parameters()))")
        p = subprocess.run([sys.executable, "-c", probe, str(moved)], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        name, step, n = p.stdout.split()
        assert name == "UNet" and step == "4" and int(n) > 0
        assert "## Training" in (moved / "README.md").read_text()


@pytest.mark.parametrize("args,expect", [
    (("status", "/nonexistent/run"), "is not a run"),
    (("resume", "/nonexistent/run"), "is not a run"),
    (("gc", "/nonexistent/run"), "is not a run"),
    (("run", "/nonexistent/spec.yaml"), "does not exist"),
    (("run", "pipeline/configs/smoke.yaml", "--set", "train_base.steps=-1"), "train_base.steps"),
    (("run", "pipeline/configs/smoke.yaml", "--set", "nonsense"), "section.field=value"),
    (("rerun", "RUN"), "--stage STAGE or --from STAGE"),
    (("resume", "RUN", "--stage", "train_nothing"), "unknown stage"),
    (("export", "RUN", "--stage", "train_nothing", "--out", "x"), "unknown training stage"),
    (("export", "RUN", "--stage", "train_base", "--out", "x", "--format", "onnx"), "--format must be one of"),
    (("sample", "/nonexistent/run", "--prompt", "a red circle"), "/nonexistent/run"),
    (("status", "RUN", "--frobnicate"), "No such option"),
])
def test_mistakes_get_one_clear_line(smoke_run, args, expect):
    cwd, run = smoke_run
    args = tuple(run if a == "RUN" else str(REPO / a) if a.startswith("pipeline/") else a for a in args)
    code, out, err = t2i(*args, cwd=cwd)
    text = out + err
    assert code == 2, (code, text)
    assert expect in text, text
    assert "Traceback" not in text, text


def test_help_and_version(tmp_path):
    code, out, _ = t2i("-h", cwd=tmp_path)
    assert code == 0 and "resume" in out and "gc" in out
    code, out, _ = t2i("--version", cwd=tmp_path)
    assert code == 0 and out.startswith("t2i-pipeline ")


def test_sample_reproduces_the_stage_from_another_directory(smoke_run, tmp_path):
    """`t2i sample` starts from the run's own sample section: the smoke spec's prompt and seed give
    the sample stage's images bit for bit, from any working directory (the encoders are found
    from the run, not from the current directory)."""
    from pipeline import store
    from pipeline.run.planning import stage_uri

    cwd, run = smoke_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    prompt = "a large red circle in the center on a white background"
    out = tmp_path / "cli"
    code, stdout, err = t2i("sample", run, "--prompt", prompt, "--seed", "0", "--out", str(out), cwd=elsewhere)
    assert code == 0, err
    stage_dir = store.local_path(stage_uri(run, "sample"))
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 3  # the smoke spec samples all three cascades
    for name in pngs:
        assert (out / name).read_bytes() == open(os.path.join(stage_dir, name), "rb").read(), name
    # the same image by its number in the stage's samples.json: no prompt or seed to copy
    code, _, err = t2i("sample", run, "--from-sample", "0", "--out", str(tmp_path / "n0"), cwd=elsewhere)
    assert code == 0, err
    again = sorted(p.name for p in (tmp_path / "n0").glob("*.png") if p.name != "grid.png")
    assert again == pngs
    for name in again:
        assert (tmp_path / "n0" / name).read_bytes() == (out / name).read_bytes(), name


def test_sample_flags_name_themselves_in_errors(smoke_run, tmp_path):
    """A bad --guidance-mode / --clip-guidance is refused naming the flag (not the spec field) and
    what is allowed, before any model is loaded."""
    cwd, run = smoke_run
    code, _, err = t2i("sample", run, "--prompt", "a red circle", "--guidance-mode", "strong",
                       "--out", str(tmp_path / "x"), cwd=cwd)
    assert code != 0 and "--guidance-mode" in err and "'compare'" in err and "Traceback" not in err
    code, _, err = t2i("sample", run, "--prompt", "a red circle", "--guidance-mode", "clip",
                       "--clip-guidance", "prior=1", "--out", str(tmp_path / "y"), cwd=cwd)
    assert code != 0 and "--clip-guidance" in err and "prior" in err and "Traceback" not in err


def test_whole_run_report_has_the_evaluation(smoke_run):
    """Sample and evaluate run side by side, so the run ends by rebuilding <run>/report.html with
    the evaluation; `t2i report` rebuilds it on demand."""
    cwd, run = smoke_run
    path = cwd / "runs" / "smoke" / "report.html"
    assert path.is_file(), "the run did not write its whole-run report"
    first = path.read_text()
    assert "<h2>Evaluation</h2>" in first and "prior_cosine_similarity" in first
    path.unlink()
    code, out, err = t2i("report", run, cwd=cwd)
    assert code == 0, err
    assert "report:" in out and path.read_text().count("<h2>Evaluation</h2>") == 1
    code, out, err = t2i("report", "/nonexistent/run", cwd=cwd)
    assert code != 0 and "is not a run" in err and "Traceback" not in err

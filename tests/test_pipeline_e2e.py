"""The whole pipeline, end to end on a local Ray, at the smallest flavors.

download (img2dataset from loopback) -> embed (Ray Data, tiny encoders) -> five trainings
(Ray Train + DeepSpeed on CPU) -> sample (both cascades) -> report; then a second run is a no-op.
"""
from __future__ import annotations

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.run.planning import stage_uri
from stages.training.final_weights import resolve_final
from pipeline import manifest as mf
from pipeline import store
from pipeline.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRAIN = {"flavor": "debug", "steps": 2, "batch_size": 4, "checkpoint_every_steps": 1, "log_every": 1,
         "loader_workers": 0}


def test_whole_pipeline_on_ray(tmp_path):
    enc = tmp_path / "enc"
    spec = {
        "run_id": "e2e",
        "store": {"uri": f"file://{tmp_path}/store"},
        "cluster": {"num_cpus": 2},
        "download": {"url_list": "demo", "demo": {"num_images": 24, "image_size": 64, "seed": 3, "bad_fraction": 0.0},
                     "image_size": 64, "number_sample_per_shard": 12, "processes_count": 1, "thread_count": 4},
        "embed": {"clip": {"model": f"tiny:{enc}", "pretrained": None}, "t5": {"model": f"tiny:{enc}", "max_length": 32},
                  "batch_size": 12, "gpus_per_actor": 0, "num_actors": 1},
        **{s: dict(TRAIN) for s in ("train_prior", "train_decoder", "train_base", "train_sr256", "train_sr1024")},
        "sample": {"cascade": "both", "steps": 2, "prompts": ["a large red circle in the center on a white background"]},
    }
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["run", str(p)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = f"file://{tmp_path}/store/e2e"
    for stage in ("download", "embed", "train_prior", "train_decoder", "train_base", "train_sr256", "train_sr1024",
                  "sample"):
        m = store.read_json(store.join(stage_uri(run, stage), mf.MANIFEST))
        assert m["node"].get("node_id"), f"{stage} should record the Ray node it ran on"
    for stage in ("train_prior", "train_decoder", "train_base", "train_sr256", "train_sr1024"):
        final = resolve_final(stage_uri(run, stage))
        assert store.exists(store.join(final, "model.safetensors"))
        assert store.read_json(store.join(final, "config.json"))["step"] == 2
    pngs = [u for u in store.glob(store.join(stage_uri(run, "sample"), "*.png")) if not u.endswith("grid.png")]
    assert len(pngs) == 2, pngs  # one prompt x two cascades
    local = store.local_path(pngs[0])
    assert Image.open(local).size == (64, 64), "debug cascade ends at sr1024's 64px"
    assert "samples:" in res.output and "report:" in res.output
    # A quiet console: each stage's messages once, no repeated Ray warnings.
    from collections import Counter

    repeats = Counter(line.strip() for line in res.output.splitlines() if line.strip())
    worst = repeats.most_common(1)[0]
    assert worst[1] <= 5, f"a console line repeated {worst[1]} times: {worst[0]!r}"
    assert "PlacementGroupCleaner" not in res.output and "Traceback" not in res.output

    res2 = CliRunner().invoke(app, ["run", str(p)], catch_exceptions=False)
    assert res2.exit_code == 0 and res2.output.count("done already") == 8, res2.output

"""The whole pipeline, end to end on a local Ray, at the smallest flavors.

download (img2dataset from loopback) -> embed (Ray Data, tiny encoders) -> five trainings
(Ray Train + DeepSpeed on CPU) -> sample (both cascades) -> report; then a second run is a no-op.
"""
from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.run.planning import stage_uri
from stages.training.final_weights import resolve_final
from pipeline import manifest as mf
from pipeline import store
from pipeline.cli import app
from tests.support.specs import TRAIN_STAGES, smoke_spec, tiny_embed, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The smoke spec's debug trainings, 2 steps with a checkpoint each; the decoder on CLIP token features.
TRAIN = {"steps": 2, "checkpoint_every_steps": 1}
DECODER = {**TRAIN, "text_encoder": None, "lr_scales": None}


def test_whole_pipeline_on_ray(tmp_path):
    """The smoke spec's data, the five trainings of the 'both' cascades, sampling both; on Ray."""
    spec = smoke_spec(
        only=("download", "embed", *TRAIN_STAGES, "sample"), run_id="e2e", store={"uri": f"file://{tmp_path}/store"},
        embed=tiny_embed(tmp_path / "enc", gpus_per_actor=0, num_actors=1),
        **{s: DECODER if s == "train_decoder" else TRAIN for s in TRAIN_STAGES},
        sample={"cascade": "both"})
    p = write_spec(tmp_path / "spec.yaml", spec)
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

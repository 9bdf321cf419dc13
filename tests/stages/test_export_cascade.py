"""``t2i export RUN --cascade C --format diffusers``: a whole cascade that
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads in a Python
with no t2i-pipeline, drawing the images ``t2i sample`` draws for the same seeds, bit for bit (issue 27).

The shared ``trained_run`` (random debug-flavor weights for every model, the tiny encoders) is
sampled in this process with SDEdit and conditioning augmentation on, and each cascade is exported
and called in one clean subprocess with the same prompt features and seeds.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers comes with the test extra (pip install -e .[test])")

from pipeline import store  # noqa: E402
from stages.export.cascade_folder import MODEL_INDEX, PIPELINE_MODULE, export_cascade  # noqa: E402
from stages.sampling.cascade import sample_images  # noqa: E402
from stages.sampling.config import SampleConfig  # noqa: E402
from stages.sampling.loading import PromptEncoders  # noqa: E402
from tests.support.clean_python import run_probe  # noqa: E402
from tests.support.cli import t2i  # noqa: E402

CASCADES = ("imagen", "unclip", "glide")
PROMPTS = ["a small red circle in the top left on a white background", "a large blue square in the center"]
# Few steps, one per model: what the pipeline must follow is each model's own setting; the SR start and
# augmentation level on, so the upsamplers' SDEdit start and their augmentation noise are compared too.
SETTINGS = dict(prompts=PROMPTS, seed=7, steps={"prior": 3, "decoder": 2, "base": 3, "glide": 2, "sr256": 2, "sr1024": 1},
                guidance_scale={"base": 2.5, "sr256": 1.0}, sr_start_t=0.5, sr_aug_level=0.1, thresholding="dynamic")

PROBE = r"""
import numpy as np
from safetensors.torch import load_file, save_file
root, report = sys.argv[1], {}
for cascade in sys.argv[2:]:
    feats = load_file(f"{root}/features.safetensors")
    pipe = diffusers.DiffusionPipeline.from_pretrained(f"{root}/{cascade}", trust_remote_code=True)
    wanted = pipe.config.t2i["features"]
    out = pipe(**{k: v.clone() for k, v in feats.items() if k in wanted}, output_type="np").images
    save_file({"images": torch.from_numpy(np.stack(out)).contiguous()}, f"{root}/{cascade}-out.safetensors")
    r = {"class": type(pipe).__name__, "components": sorted(k for k, v in pipe.components.items() if v is not None),
         "features": wanted}
    # each image's noise is its own: image 1 alone, with its seed, is image 1 of the pair
    alone = pipe(**{k: v[1:].clone() for k, v in feats.items() if k in wanted}, seeds=[8], output_type="np").images
    r["alone_max_diff"] = int(np.abs(alone[0].astype(int) - out[1].astype(int)).max())
    first = pipe.config.t2i["roles"][0]
    r["stopped"] = list(pipe(**{k: v.clone() for k, v in feats.items() if k in wanted}, max_stage=first,
                             output_type="pt").images.shape)
    try:
        pipe(seed=0)
    except ValueError as e:
        r["no_features"] = str(e)
    report[cascade] = r
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run):
    """Each cascade sampled here and exported; the clean subprocess's images and report."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("export-cascade")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # both sides one thread: the same reduction order, so the same bits
    try:
        want = {}
        for cascade in CASCADES:
            cfg = SampleConfig(cascade=cascade, **SETTINGS)
            want[cascade] = np.stack([np.asarray(s.image) for s in sample_images(cfg, trained_run)])
            export_cascade(trained_run, cascade, str(root / cascade), cfg,
                           encoders=store.read_json(store.join(trained_run, "embed", "encoders.json")))
        f = PromptEncoders.load(store.join(trained_run, "embed")).encode(PROMPTS)
        save_file({k: v.contiguous() for k, v in vars(f).items() if v is not None}, str(root / "features.safetensors"))
    finally:
        torch.set_num_threads(n)
    return root, want, run_probe(PROBE, root, list(CASCADES))


@pytest.mark.parametrize("cascade", CASCADES)
def test_diffusers_draws_what_t2i_sample_draws(exported, cascade):
    from safetensors.torch import load_file

    root, want, report = exported
    got = load_file(str(root / f"{cascade}-out.safetensors"))["images"].numpy()
    assert got.dtype == np.uint8 and got.shape == want[cascade].shape == (2, 64, 64, 3)
    assert np.array_equal(got, want[cascade]), int(np.abs(got.astype(int) - want[cascade].astype(int)).max())
    r = report[cascade]
    roles = {"imagen": ["base", "sr1024", "sr256"], "unclip": ["decoder", "prior", "sr1024", "sr256"],
             "glide": ["glide", "sr1024", "sr256"]}[cascade]
    assert r["class"] == "T2ICascadePipeline" and r["components"] == roles
    assert r["alone_max_diff"] <= 1  # batch of one: the same noise; the arithmetic may differ in the last bit
    # stopped after its first model: the prior's CLIP image embeddings, or the first 16px images
    assert r["stopped"] == ([2, 32] if cascade == "unclip" else [2, 3, 16, 16])
    assert "missing: " in r["no_features"] and r["features"][0] in r["no_features"]


def test_the_folder_needs_diffusers_only_and_names_what_it_reads(exported, trained_run):
    root, _, report = exported
    assert report["t2i_modules"] == []
    index = json.loads((root / "imagen" / MODEL_INDEX).read_text())
    assert index["_class_name"] == [PIPELINE_MODULE, "T2ICascadePipeline"]
    assert index["base"] == ["modeling_t2i", "T2IUNet"] and "prior" not in index
    t2i = index["t2i"]
    assert t2i["features"] == ["t5_mask", "t5_tokens"] and t2i["roles"] == ["base", "sr256", "sr1024"]
    assert t2i["models"]["base"]["conditioning"] == {"text_tokens": "t5_tokens", "text_mask": "t5_mask"}
    assert t2i["models"]["sr256"]["kind"] == "upsampler" and t2i["models"]["base"]["steps"] == 3
    assert t2i["encoders"]["t5"]["model"].startswith("tiny:")  # named as the run named it, not copied
    decoder = json.loads((root / "unclip" / MODEL_INDEX).read_text())["t2i"]["models"]["decoder"]
    assert decoder["conditioning"]["image_embed"] == "previous"
    shipped = sorted(p.name.split("_")[1] for p in (root / "imagen").glob("t2i_*.py"))
    assert shipped == ["condaug", "diffusion", "draw", "process"]  # process_args
    assert "DiffusionPipeline.from_pretrained" in (root / "imagen" / "README.md").read_text()


def test_cli_exports_a_cascade_and_refuses_a_missing_stage(tmp_path, trained_run):
    """``--cascade`` with the run's sample settings; one of --stage/--cascade/--embeddings only; a cascade
    whose model the run never trained is refused before anything is written."""
    out = tmp_path / "imagen"
    r = t2i("export", trained_run, "--cascade", "imagen", "--out", out)
    assert r.code == 0, r.output
    assert (out / MODEL_INDEX).exists() and (out / "sr1024" / "config.json").exists()
    r = t2i("export", trained_run, "--cascade", "imagen", "--stage", "train_base", "--out", tmp_path / "x")
    assert r.code != 0 and "exactly one of" in r.output
    partial = tmp_path / "partial-run"  # the embed stage and the base, no upsampler
    partial.mkdir()
    for stage in ("embed", "train_base"):
        shutil.copytree(store.local_path(store.join(trained_run, stage)), partial / stage)
    r = t2i("export", str(partial), "--cascade", "imagen", "--out", tmp_path / "y")
    assert r.code != 0 and "train_sr256" in r.output and not (tmp_path / "y").exists()

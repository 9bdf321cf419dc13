"""``t2i export --stage S --format diffusers``: a folder diffusers loads with its custom-code path,
``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)``, in a Python that has no
t2i-pipeline, giving exactly load_final's outputs (issue 27).

One module-scoped export of every network a training stage writes (the debug flavor of each role,
the decoder's GLIDE variant and a demo UNet with CoordConv), then one clean subprocess loads them
all: imports of pipeline/stages/data_prep are blocked there, and PYTHONPATH and cwd hold no repo.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers comes with the test extra (pip install -e .[test])")

from pipeline import store  # noqa: E402
from stages.export import diffusers_code  # noqa: E402
from stages.export.model_folder import export_model, load_exported  # noqa: E402
from stages.nets.flavors import build_network, get_flavor  # noqa: E402
from stages.training.final_weights import (FinalConfig, load_final, network_config, resolve_final,  # noqa: E402
                                           write_final)
from tests.support.clean_python import run_probe  # noqa: E402
from tests.support.runs import write_random_final  # noqa: E402

DIMS = {"t5_dim": 24, "clip_dim": 16, "clip_token_dim": 12}
# (case, role, flavor, variant): every network class export ships (UNet, PriorTransformer, GlideModel, NoisedClip)
CASES = [(r, r, "debug", None) for r in ("base", "decoder", "sr256", "sr1024", "glide", "prior", "noised_clip")]
CASES += [("decoder_glide", "decoder", "debug", "glide"), ("base_demo", "base", "demo", None)]
ROLE = {case: role for case, role, _, _ in CASES}

# Run in the clean interpreter: load every exported folder twice (diffusers' default low_cpu_mem_usage
# loading on the meta device, and plain construction + load_state_dict), call it on the saved inputs.
PROBE = r"""
from safetensors.torch import load_file, save_file
root, cases, report = sys.argv[1], sys.argv[2:], {}
for case in cases:
    # fresh (64-byte aligned) copies, as the reference's inputs were: MKL may sum in another order for
    # another alignment
    inputs = {k: v.clone() for k, v in load_file(f"{root}/{case}/inputs.safetensors").items()}
    x, t = inputs.pop("x"), inputs.pop("t")
    outs = {}
    for mode in ("default", "no_low_mem"):
        kw = {} if mode == "default" else {"low_cpu_mem_usage": False}
        model = diffusers.AutoModel.from_pretrained(f"{root}/{case}/export", trust_remote_code=True, **kw)
        with torch.no_grad():
            outs[mode] = model(x, t, **inputs).contiguous()
    save_file(outs, f"{root}/{case}/outputs.safetensors")
    report[case] = {"class": type(model).__name__, "mro": [c.__module__.split(".")[0] for c in type(model).__mro__],
                    "training": model.training, "role": model.config.t2i["role"],
                    # off a 64-byte boundary, MKL sums in another order than for the run's own network
                    "unaligned": sum(t.data_ptr() % 64 != 0 for t in [*model.parameters(), *model.buffers()])}
"""


@contextmanager
def _one_thread():
    """Both sides compute with one thread, so the reduction order (hence every bit) is the same."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _write_final(run: str, role: str, flavor: str, variant: str | None, seed: int) -> str:
    """The final/ folder of a role's network with random weights (write_random_final for the debug
    flavor's default network, else the same through build_network's flavor and variant)."""
    if flavor == "debug" and variant is None:
        return resolve_final(write_random_final(run, role, DIMS, seed=seed, step=3))
    torch.manual_seed(seed)
    net = build_network(role, flavor, DIMS, variant=variant)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fl = get_flavor(role, flavor)
    return write_final(store.join(run, f"train_{role}_{flavor}_{variant}"), net.state_dict(), FinalConfig(
        role=role, flavor=flavor, cond_dims=DIMS, image_size=fl.image_size, low_res_size=fl.low_res_size,
        diffusion={"prediction": "eps"}, step=3, network=network_config(net)))


def _inputs(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A fixed input for the network's forward (x and t, then its keyword arguments), with a padded
    caption and one row whose conditioning is dropped, so masks and null embeddings are exercised."""
    g = torch.Generator().manual_seed(1)
    b, kind, cfg = 2, type(net).__name__, net.cfg
    t = torch.tensor([0.25, 0.75])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    drop = torch.tensor([False, True])
    if kind == "PriorTransformer":
        return {"x": torch.randn(b, cfg.clip_dim, generator=g), "t": t, "text_mask": mask, "drop_text": drop,
                "text_tokens": torch.randn(b, 5, cfg.text_token_dim, generator=g),
                "text_embed": torch.randn(b, cfg.clip_dim, generator=g)}
    if kind == "NoisedClip":
        return {"x": torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g), "t": t,
                "clip_text": torch.randn(3, cfg.embed_dim, generator=g)}
    unet = cfg.unet if kind == "GlideModel" else cfg
    out = {"x": torch.randn(b, unet.in_channels, unet.image_size, unet.image_size, generator=g), "t": t}
    if kind == "GlideModel":
        out.update({f"{cfg.tokenizer}_ids": torch.randint(0, cfg.text.vocab_size, (b, 5), generator=g),
                    f"{cfg.tokenizer}_id_mask": mask, "drop_text": drop})
    elif unet.text_dim:
        out.update({"text_tokens": torch.randn(b, 5, unet.text_dim, generator=g), "text_mask": mask, "drop_text": drop})
    if unet.image_embed_dim:
        out.update({"image_embed": torch.randn(b, unet.image_embed_dim, generator=g), "drop_image": drop.flip(0)})
    if unet.low_res_channels:
        low = unet.image_size // 2
        out.update({"low_res": torch.randn(b, unet.low_res_channels, low, low, generator=g),
                    "aug_level": torch.tensor([0.0, 0.3])})
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Every case exported and loaded in the clean subprocess: (root, {case: load_final's output}, report)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("export-diffusers")
    run = store.normalize(str(root / "run"))
    want = {}
    with _one_thread(), torch.no_grad():
        for seed, (case, role, flavor, variant) in enumerate(CASES):
            final = _write_final(run, role, flavor, variant, seed)
            export_model(final, str(root / case / "export"), fmt="diffusers", card={"name": case})
            net, _ = load_final(final)
            inputs = _inputs(net)
            save_file(inputs, str(root / case / "inputs.safetensors"))
            x, t = inputs.pop("x"), inputs.pop("t")
            want[case] = net(x, t, **inputs)
    return root, want, run_probe(PROBE, root, [c[0] for c in CASES])


def test_the_clean_interpreter_never_imported_t2i_pipeline(loaded):
    _, _, report = loaded
    assert report["t2i_modules"] == []


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_automodel_loads_the_export_and_matches_load_final(loaded, case):
    from safetensors.torch import load_file

    root, want, report = loaded
    info = report[case]
    net_class = json.loads((root / case / "export" / "config.json").read_text())["_class_name"]
    assert info["class"] == net_class and info["training"] is False and info["role"] == ROLE[case]
    assert info["unaligned"] == 0  # the wrapper's from_pretrained copies diffusers' loaded tensors
    # the network is the shipped copy of stages/nets (diffusers' dynamic module), wrapped as a ModelMixin
    assert info["mro"][:2] == ["diffusers_modules", "diffusers_modules"] and "diffusers" in info["mro"]
    got = load_file(str(root / case / "outputs.safetensors"))
    for mode, out in got.items():
        assert out.dtype == torch.float32 and torch.equal(out, want[case]), (case, mode)


def test_the_folder_is_what_diffusers_reads(loaded):
    """auto_map names a shipped file and class; every relative import of that file is shipped (the
    only ones diffusers copies), none of the shipped files imports beyond the stdlib and torch; the
    weights are training's bytes; load_exported still reads the folder."""
    root, want, _ = loaded
    folder = root / "glide" / "export"
    doc = json.loads((folder / "config.json").read_text())
    module, cls = doc["auto_map"]["AutoModel"].split(".")
    modeling = (folder / f"{module}.py").read_text()
    assert cls == doc["_class_name"] == "T2IGlideModel"
    assert f"class {cls}(GlideModel, ModelMixin, ConfigMixin)" in modeling
    shipped = {p.stem for p in folder.glob("t2i_*.py")}
    assert set(re.findall(r"^from \.(\w+) import", modeling, flags=re.M)) == shipped
    assert len(shipped) == 4  # text_transformer, prior_transformer, unet, layers
    for p in folder.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                tops = {(node.module or "").split(".")[0]} if node.level == 0 else set()
                assert node.level == 0 or node.module in shipped, (p.name, node.module)
            else:
                continue
            assert tops <= set(sys.stdlib_module_names) | {"torch", "diffusers"}, (p.name, tops)
    final = resolve_final(store.join(store.normalize(str(root / "run")), "train_glide"))
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == Path(
        store.local_path(store.join(final, "model.safetensors"))).read_bytes()
    net, cfg = load_exported(str(folder))
    assert cfg.role == "glide" and type(net).__name__ == "GlideModel"
    assert "AutoModel.from_pretrained" in (folder / "README.md").read_text()


def test_same_code_same_file_names_and_a_change_renames(monkeypatch):
    """The shipped modules are named by a digest of their text, which names their imports' digests:
    the same code gives the same names in every export, and a change to a dependency renames its
    importers too (diffusers caches every local custom-code module in one package)."""
    a, b = diffusers_code.modeling_files("UNet"), diffusers_code.modeling_files("PriorTransformer")
    unet_files = {n for n in a if n.startswith("t2i_")}
    assert unet_files <= set(b) and len(unet_files) == 2
    src = diffusers_code._source
    monkeypatch.setattr(diffusers_code, "_source", lambda mod: src(mod) + ("\n# changed\n" if mod == "nets.layers" else ""))
    changed = {n for n in diffusers_code.modeling_files("UNet") if n.startswith("t2i_")}
    assert len(changed) == 2 and not changed & unet_files


def test_exporting_again_into_the_folder_leaves_only_the_current_code(tmp_path):
    final = _write_final(store.normalize(str(tmp_path / "run")), "base", "debug", None, 0)
    out = tmp_path / "export"
    (out / "t2i_unet_00000000.py").parent.mkdir(parents=True)
    (out / "t2i_unet_00000000.py").write_text("# an earlier export's\n")
    export_model(final, str(out), fmt="diffusers")
    assert sorted(p.name for p in out.glob("*.py")) == sorted(diffusers_code.modeling_files("UNet"))


def test_a_network_module_that_imports_the_package_is_refused(monkeypatch):
    src = diffusers_code._source
    monkeypatch.setattr(diffusers_code, "_source",
                        lambda mod: src(mod).replace("import torch\n", "import torch\nfrom pipeline import store\n", 1))
    with pytest.raises(ValueError, match=r"stages/nets/\w+\.py imports pipeline .*only diffusers and torch"):
        diffusers_code.modeling_files("UNet")
    with pytest.raises(ValueError, match="no diffusers export for network class 'Frobnicator'"):
        diffusers_code.modeling_files("Frobnicator")

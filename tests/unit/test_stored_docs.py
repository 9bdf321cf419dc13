"""The documents stages hand each other through the store, read back typed and checked on load:
``encoders.json`` (data_prep/encoders_doc.py) and ``final/step_N/config.json``
(stages/training/final_weights.py). Files written by earlier releases load; a file missing a
required field is refused with an error naming the file and the field."""
from __future__ import annotations

import json

import pytest
import torch

from data_prep.encoders_doc import EncodersDoc, encoders_doc_uri, read_encoders_doc, write_encoders_doc
from data_prep.holdout import NO_HOLDOUT, read_rule
from pipeline import layout, store
from pipeline.configbase import DocError
from stages.nets.flavors import build_network, get_flavor
from stages.training.final_weights import FinalConfig, load_final, read_final_config, write_final

DIMS = {"clip_dim": 16, "clip_token_dim": 12, "t5_dim": 24}

# encoders.json as the first embed stage wrote it (before the held-out split: no "holdout").
OLD_ENCODERS = {
    "identity": {"clip": {"model": "ViT-L-14", "pretrained": "openai"}, "t5": {"model": "google/t5-v1_1-xxl",
                                                                              "max_length": 128}},
    "clip": {"model": "ViT-L-14", "pretrained": "openai"},
    "t5": {"model": "google/t5-v1_1-xxl", "max_length": 128},
    **DIMS,
    "clip_preprocess": {"size": [224, 224], "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28],
                        "interpolation": "bicubic", "resize_mode": "shortest"},
    "shards": [{"shard": "00000", "size": 1234}],
    "counts": {"n_total": 10, "n_embedded": 9, "n_bad_image": 1, "n_missing_caption": 0},
}

# final/config.json as the first training loop wrote it (before "network": rebuilt from the flavor).
OLD_FINAL = {"role": "base", "flavor": "debug", "cond_dims": DIMS, "image_size": get_flavor("base", "debug").image_size,
             "low_res_size": None, "diffusion": {"schedule": "cosine", "prediction": "v"}, "condaug": None, "step": 7}


def _write_raw(uri: str, doc: dict) -> None:
    store.write_bytes_atomic(uri, json.dumps(doc).encode())


def test_an_old_encoders_json_loads(tmp_path):
    embed = store.normalize(str(tmp_path / "embed"))
    _write_raw(encoders_doc_uri(embed), {**OLD_ENCODERS, "written_by": "a newer release"})
    doc = read_encoders_doc(embed)
    assert doc.dims == DIMS and doc.holdout is None and doc.clip_preprocess["resize_mode"] == "shortest"
    assert doc.clip_config().model == "ViT-L-14" and doc.t5_config().max_length == 128
    assert read_rule(embed) == NO_HOLDOUT  # an embedding made before the split holds nothing out
    # Read and written back, it is the same document: nothing dropped, nothing added.
    write_encoders_doc(embed, doc)
    assert store.read_json(encoders_doc_uri(embed)) == {**OLD_ENCODERS, "written_by": "a newer release"}
    assert read_encoders_doc(str(tmp_path / "nothing")) is None


def test_an_encoders_json_missing_a_field_is_refused_naming_it(tmp_path):
    embed = store.normalize(str(tmp_path / "embed"))
    uri = encoders_doc_uri(embed)
    _write_raw(uri, {k: v for k, v in OLD_ENCODERS.items() if k != "t5_dim"})
    with pytest.raises(DocError, match=r"encoders\.json: required field 't5_dim' is missing") as e:
        read_encoders_doc(embed)
    assert uri in str(e.value) and "re-run the embed stage" in str(e.value)
    _write_raw(uri, {**OLD_ENCODERS, "clip_dim": "16"})
    with pytest.raises(DocError, match=r"field 'clip_dim': Input should be a valid integer"):
        read_encoders_doc(embed)
    _write_raw(uri, {**OLD_ENCODERS, "clip": {"pretrained": "openai"}})
    with pytest.raises(DocError, match=r"field 'clip'.*'model'"):
        read_encoders_doc(embed)


def test_an_old_final_config_loads_and_rebuilds_its_network(tmp_path):
    net = build_network("base", "debug", DIMS)
    folder = layout.final_dir(store.normalize(str(tmp_path / "train_base")), 7)
    from safetensors.torch import save as st_save

    store.write_bytes_atomic(store.join(folder, layout.FINAL_WEIGHTS), st_save(dict(net.state_dict())))
    _write_raw(store.join(folder, layout.FINAL_CONFIG), OLD_FINAL)
    config = read_final_config(folder)
    assert config.network is None and config.step == 7 and config.cond_dims == DIMS
    loaded, config = load_final(folder)  # no "network": the flavor table builds it
    with torch.no_grad():
        for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k
    assert config.cond_dims["clip_dim"] == 16 and config.condaug is None and config.role == "base"


def test_a_final_config_missing_a_field_is_refused_naming_it(tmp_path):
    folder = store.normalize(str(tmp_path / "final"))
    uri = store.join(folder, layout.FINAL_CONFIG)
    _write_raw(uri, {k: v for k, v in OLD_FINAL.items() if k != "cond_dims"})
    with pytest.raises(DocError, match=r"config\.json: required field 'cond_dims' is missing") as e:
        read_final_config(folder)
    assert uri in str(e.value)
    _write_raw(uri, {**OLD_FINAL, "step": "7"})
    with pytest.raises(DocError, match=r"field 'step'"):
        read_final_config(folder)
    with pytest.raises(FileNotFoundError):
        read_final_config(str(tmp_path / "nothing"))


def test_write_final_writes_what_read_final_config_reads(tmp_path):
    net = build_network("prior", "debug", DIMS)
    config = FinalConfig(role="prior", flavor="debug", cond_dims=DIMS, image_size=None, step=3,
                         diffusion={"schedule": "cosine"})
    folder = write_final(str(tmp_path / "train_prior"), dict(net.state_dict()), config)
    assert folder.endswith(f"{layout.FINAL}/{layout.step_name(3)}")
    assert read_final_config(folder) == config
    # Only the fields given are written, as the training loop always has: no nulls invented.
    assert set(store.read_json(store.join(folder, layout.FINAL_CONFIG))) == {
        "role", "flavor", "cond_dims", "image_size", "step", "diffusion"}
    assert EncodersDoc(clip={"model": "x"}, t5={"model": "y"}, **DIMS).to_json() == {
        "clip": {"model": "x"}, "t5": {"model": "y"}, **DIMS}

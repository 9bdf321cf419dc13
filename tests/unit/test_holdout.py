"""The held-out split (data_prep/holdout.py): a hash rule on the sample key, fixed by the embed
stage; training never reads a held-out key, validation and evaluation read only those; and the
validation loss that every training stage computes on them (stages/training/validation.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.encoders_doc import read_encoders_doc, write_encoders_doc
from data_prep.holdout import NO_HOLDOUT, HoldoutRule, key_unit, read_rule, split_rule, target_count
from pipeline import store
from stages.training.loader import LoaderSpec, ShardStream, pair_shards
from tests.support.data import make_dataset
from tests.support.train import stage_ctx, tiny_train_kwargs


def _with_split(embed: str, n: int, fraction: float, minimum: int, max_fraction: float) -> HoldoutRule:
    """Record the split as the embed stage does (same function, same encoders.json field)."""
    npzs = sorted(store.glob(store.join(embed, "shards", "*.npz")))
    rule = split_rule(npzs, n, fraction, minimum, max_fraction)
    doc = read_encoders_doc(embed)
    write_encoders_doc(embed, doc.model_copy(update={"holdout": rule.to_doc(fraction, minimum, max_fraction, n)}))
    return rule


def test_rule_is_a_pure_function_of_the_key_with_exact_counts():
    keys = [f"{i:09d}" for i in range(2000)]
    units = np.array([key_unit(k) for k in keys])
    assert ((units >= 0) & (units < 1)).all() and abs(units.mean() - 0.5) < 0.05
    assert key_unit("000000001") == key_unit("000000001") != key_unit("000000002")
    # At scale the fraction wins; on a small set the minimum; never past max_fraction.
    assert target_count(100_000, 0.01, 256, 0.1) == 1000
    assert target_count(2000, 0.01, 256, 0.1) == 200
    assert target_count(24, 0.01, 6, 0.25) == 6
    assert target_count(10, 0.0, 0, 0.1) == 0
    from data_prep.holdout import SmallestUnits

    acc = SmallestUnits(200)
    for i in range(0, 2000, 300):  # streamed in shards, as the embed stage reads them
        acc.add(keys[i:i + 300])
    rule = acc.rule()
    assert rule.count == 200 and int(rule.mask(keys).sum()) == 200
    assert 0.05 < rule.fraction < 0.15
    # A superset of keys keeps every old key on its side (the rule has no state but the threshold).
    more = keys + [f"x{i}" for i in range(500)]
    assert (rule.mask(more)[:2000] == rule.mask(keys)).all()
    assert not NO_HOLDOUT.mask(keys).any()


def test_training_loader_never_yields_held_out_keys(tmp_path):
    download, embed = make_dataset(str(tmp_path), n_shards=3, per_shard=8)
    all_keys = [f"{s:05d}{i:04d}" for s in range(3) for i in range(8)]
    rule = _with_split(embed, len(all_keys), 0.0, 6, 0.25)
    assert read_rule(embed) == rule and rule.count == 6
    held = {k for k in all_keys if rule.is_held_out(k)}
    assert len(held) == 6
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    for image_size in (16, None):  # the image path (tars) and the prior's embeddings-only path
        seen_train: list[str] = []
        it = iter(ShardStream(shards, LoaderSpec(image_size, 2, 0, holdout=rule)))
        for _ in range(30):  # > 3 epochs of the 18 training samples
            seen_train += next(it)["keys"]
        assert set(seen_train) == set(all_keys) - held, "every training key, and no held-out key"
        hold_batch = next(iter(ShardStream(shards, LoaderSpec(image_size, 6, 0, holdout=rule), split="holdout")))
        assert set(hold_batch["keys"]) == held
    # Two ranks split the training keys between them; neither sees a held-out one.
    for rank in (0, 1):
        it = iter(ShardStream(shards, LoaderSpec(16, 3, 0, rank, 2, holdout=rule)))
        assert not {k for _ in range(12) for k in next(it)["keys"]} & held
    with pytest.raises(ValueError, match="split must be"):
        ShardStream(shards, LoaderSpec(16, 2, 0), split="eval")


def test_embed_records_the_split(tmp_path):
    """The real embed summary: encoders.json and the manifest's counts/metrics carry the split."""
    from data_prep.embed.config import EmbedConfig
    from data_prep.embed.stage import _summarize
    from data_prep.embed.ledger import embed_identity, finalize_shard, list_sources
    from tests.support.data import embedding_shard

    download, _ = make_dataset(str(tmp_path / "src"), n_shards=2, per_shard=10)
    out = str(tmp_path / "embed")
    cfg = EmbedConfig(clip={"model": "tiny:./x", "pretrained": None}, t5={"model": "tiny:./x"},
                      holdout_fraction=0.0, holdout_min=4, holdout_max_fraction=0.5)
    identity = embed_identity(cfg)
    sources = list_sources(store.join(download, "shards"))
    for s in sources:
        keys = [f"{s['shard']}{i:04d}" for i in range(10)]
        finalize_shard(store.join(out, "shards"), s, [embedding_shard(keys)],
                       [{"n_total": 10, "n_embedded": 10}], identity, 0.5)
    summary = _summarize(out, sources, identity, {"size": [8, 8]}, cfg, embedded_now=[])
    assert summary["counts"]["n_holdout"] == 4 and summary["counts"]["n_train"] == 16
    rule = read_rule(out)
    assert rule.count == 4 and rule.fraction == summary["metrics"]["holdout_fraction"]
    doc = read_encoders_doc(out).holdout
    assert doc["requested_fraction"] == 0.0 and doc["min"] == 4 and doc["of"] == 20
    # The fraction is identity: a new value is a new embed attempt (and so new training attempts).
    from pipeline.manifest import fingerprint

    assert fingerprint("embed", cfg, {}) != fingerprint("embed", cfg.model_copy(update={"holdout_min": 5}), {})
    assert fingerprint("embed", EmbedConfig(), {}) == fingerprint("embed", EmbedConfig(holdout_fraction=0.01), {})


def test_val_loss_in_metrics_and_manifest(tmp_path):
    from stages.models import imagen_base as base, prior

    download, embed = make_dataset(str(tmp_path / "data"), n_shards=2, per_shard=8)
    rule = _with_split(embed, 16, 0.0, 4, 0.25)
    results = {}
    for name, mod, cls, runs in (("train_base", base, base.BaseTrainConfig, "a"),
                                 ("train_prior", prior, prior.PriorTrainConfig, "ab")):
        for run in runs:
            cfg = cls(**tiny_train_kwargs(steps=3, log_every=2, eval_every=2, val_samples=3))
            ctx = stage_ctx(str(tmp_path / run), name, download, embed)
            res = mod.run(cfg, ctx)
            rows = [json.loads(x) for x in store.read_bytes(res.outputs["metrics"]).decode().splitlines()]
            # Validation at step 2 (cadence) and 3 (the end), merged into the rows logged then.
            assert [(r["step"], "val_loss" in r, "loss" in r) for r in rows] == [(2, True, True), (3, True, True)]
            assert res.metrics["val_loss"] == rows[-1]["val_loss"] and np.isfinite(res.metrics["val_loss"])
            assert "final_val_loss" not in res.metrics and "final_loss" in res.metrics
            results[(name, run)] = [r["val_loss"] for r in rows]
    # Deterministic: the same data, seed and steps give the same figures in another run.
    assert results[("train_prior", "a")] == results[("train_prior", "b")]
    assert rule.count == 4

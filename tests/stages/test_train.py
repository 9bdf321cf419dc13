"""The training loop end to end, in-process (real DeepSpeed on CPU with gloo, debug flavors)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load as st_load

from pipeline import store
from stages.training.final_weights import latest_final
from stages.models import imagen_base as base, decoder, prior, superres
from stages.nets.flavors import build_network, get_flavor
from stages.training.final_weights import load_final
from stages.training.trainer import DistEnv, TrainJob, train_loop
from stages.training.hooks import InjectFaultAfterStep
from tests.support.data import DIMS, make_dataset
from tests.support.train import stage_ctx, tiny_train_kwargs

STAGES = {
    "train_prior": (prior, prior.PriorTrainConfig),
    "train_decoder": (decoder, decoder.DecoderTrainConfig),
    "train_base": (base, base.BaseTrainConfig),
    "train_sr256": (superres, superres.SR256TrainConfig),
    "train_sr1024": (superres, superres.SR1024TrainConfig),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    download, embed = make_dataset(root, n_shards=2, per_shard=5, not_embedded=("000000002",),
                                   corrupt=("000000000", "000010000"))
    return root, download, embed


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_two_steps(stage, data, tmp_path):
    root, download, embed = data
    module, cfg_cls = STAGES[stage]
    cfg = cfg_cls(**tiny_train_kwargs(sample_every=0 if stage == "train_prior" else 2, sample_steps=2))
    ctx = stage_ctx(str(tmp_path), stage, download, embed)
    result = module.run(cfg, ctx)

    assert result.counts["steps"] == 2
    # Each shard starts with a corrupt JPEG: skipped and counted by every stage that decodes images.
    assert (result.counts["skipped_samples"] >= 1) == (stage != "train_prior")
    assert torch.isfinite(torch.tensor(result.metrics["final_loss"]))
    lines = [json.loads(x) for x in store.read_bytes(result.outputs["metrics"]).decode().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 and r["samples_per_s"] > 0 for r in lines)
    assert store.listdir(store.join(ctx.out_uri, "tb")), "TensorBoard event files are synced to the store"

    # Final output: the network's state_dict keys, loadable with build_network, config as contracted.
    config = store.read_json(result.outputs["config"])
    role = {"train_prior": "prior", "train_decoder": "decoder", "train_base": "base", "train_sr256": "sr256",
            "train_sr1024": "sr1024"}[stage]
    flavor = get_flavor(role, "debug")
    assert config["role"] == role and config["flavor"] == "debug" and config["step"] == 2
    assert config["cond_dims"] == DIMS
    assert config["image_size"] == flavor.image_size and config["low_res_size"] == flavor.low_res_size
    assert (config["condaug"] is not None) == stage.startswith("train_sr")
    weights = st_load(store.read_bytes(result.outputs["weights"]))
    assert set(weights) == set(build_network(role, "debug", DIMS).state_dict())
    net, _ = load_final(latest_final(ctx.out_uri))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    if stage != "train_prior":  # the prior's samples are embeddings, not images
        grids = store.glob(store.join(ctx.out_uri, "samples", "grid_*.png"))
        assert [g.rsplit("/", 1)[-1] for g in grids] == ["grid_00000002.png"]


def _recording(spec, seen: list):
    def build(batch, cfg, flavor, device, dtype):
        seen.append(list(batch["keys"]))
        return spec.build_batch(batch, cfg, flavor, device, dtype)
    return dataclasses.replace(spec, build_batch=build)


def test_resume_is_exact_and_skips_incomplete_checkpoint(data, tmp_path):
    """4 steps straight vs. 3 steps (checkpoint at 2) + crash + resume: identical keys and weights."""
    _, download, embed = data
    cfg = base.BaseTrainConfig(**tiny_train_kwargs(steps=4, checkpoint_every_steps=2, loader_workers=2,
                                                   grad_accum=2, log_every=2))

    def job(name):
        return TrainJob(str(tmp_path / name), store.join(download, "shards"), store.join(embed, "shards"), dict(DIMS))

    seen_a: list = []
    train_loop(_recording(base.SPEC, seen_a), cfg, job("a"), DistEnv.from_env())

    seen_b1: list = []
    with pytest.raises(RuntimeError, match="injected fault after step 3"):
        train_loop(_recording(base.SPEC, seen_b1), cfg, job("b"), DistEnv.from_env(), after_step=InjectFaultAfterStep(3))
    ckpts = store.join(job("b").out_uri, "checkpoints")
    assert [u.rsplit("/", 1)[-1] for u in store.listdir(ckpts)] == ["step_00000002"]
    # A half-written newer checkpoint (no COMPLETE marker) must be ignored.
    store.write_bytes_atomic(store.join(ckpts, "step_00000003", "ds", "garbage.pt"), b"half written")
    seen_b2: list = []
    out = train_loop(_recording(base.SPEC, seen_b2), cfg, job("b"), DistEnv.from_env())
    assert out["resumed_from"] == 2

    # Data: the resumed run consumed exactly what the straight run consumed after step 2.
    assert seen_b1[:4] == seen_a[:4]
    assert seen_b2 == seen_a[4:]
    # Weights: bit-identical final EMA weights.
    wa = st_load(store.read_bytes(store.join(latest_final(job("a").out_uri), "model.safetensors")))
    wb = st_load(store.read_bytes(store.join(latest_final(job("b").out_uri), "model.safetensors")))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # metrics.jsonl shows each step once, and the stale incomplete checkpoint got pruned.
    steps = [json.loads(x)["step"] for x in store.read_bytes(store.join(job("b").out_uri, "metrics.jsonl"))
             .decode().splitlines()]
    assert steps == [2, 4]
    assert [u.rsplit("/", 1)[-1] for u in store.listdir(ckpts)] == ["step_00000002", "step_00000004"]


def test_build_engine_and_train_step_match_plain_pytorch(data):
    """The bench's entry points: one DeepSpeed step (fp32, ZeRO-0) equals the plain PyTorch step."""
    from stages.diffusion import Diffusion
    from stages.training.loader import LoaderSpec, ShardStream, pair_shards
    from stages.bench.train_step import build_plain, plain_train_step
    from stages.training.distributed import setup_distributed
    from stages.training.engine import build_engine, train_step

    _, download, embed = data
    cfg = base.BaseTrainConfig(**tiny_train_kwargs(grad_clip=0.5))
    cpu = torch.device("cpu")
    setup_distributed(DistEnv.from_env(), cpu)
    batch = next(iter(ShardStream(pair_shards(store.join(download, "shards"), store.join(embed, "shards")), LoaderSpec(16, 2, seed=0))))
    micro = [base.build_batch(batch, cfg, get_flavor("base", "debug"), cpu, torch.float32)]
    diffusion = Diffusion(**cfg.diffusion.model_dump())

    torch.manual_seed(0)
    engine, precision = build_engine(cfg, build_network("base", "debug", DIMS), device=cpu)
    torch.manual_seed(0)
    model, opt, sched = build_plain(cfg, build_network("base", "debug", DIMS), device=cpu)
    assert precision == "fp32"
    torch.manual_seed(1)
    a = train_step(engine, diffusion, micro)
    torch.manual_seed(1)
    b = plain_train_step(model, opt, sched, diffusion, micro, grad_clip=cfg.grad_clip)
    torch.testing.assert_close(a["loss"], b["loss"])
    torch.testing.assert_close(torch.as_tensor(a["grad_norm"]), torch.as_tensor(b["grad_norm"]))
    for (n, p), q in zip(engine.module.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    assert engine.get_lr() == sched.get_last_lr()


def test_sample_grid_conditioning_is_clean(data):
    """SR grids condition on the real, un-augmented low-res image and never drop the text."""
    from stages.condaug import make_low_res
    from stages.training.loader import pair_shards
    from stages.training.trainer import fixed_conditioning

    _, download, embed = data
    cfg = superres.SR256TrainConfig(**tiny_train_kwargs(cfg_drop_text=1.0))
    flavor = get_flavor("sr256", "debug")
    x0, cond = fixed_conditioning(superres.SPEC_SR256, cfg, flavor, pair_shards(store.join(download, "shards"), store.join(embed, "shards")),
                                   torch.device("cpu"), torch.float32)
    assert not any(k.startswith("drop_") for k in cond)
    assert torch.equal(cond["aug_level"], torch.zeros(len(x0)))
    assert torch.equal(cond["low_res"], make_low_res(x0, flavor.low_res_size))


def test_bf16_zero2_with_activation_checkpointing(data, tmp_path):
    """The GPU configuration's code path (bf16 + fp32 master weights, ZeRO-2, recompute), on CPU."""
    _, download, embed = data
    cfg = base.BaseTrainConfig(**tiny_train_kwargs(precision="bf16", zero_stage=2, activation_checkpointing=True))
    job = TrainJob(str(tmp_path / "o"), store.join(download, "shards"), store.join(embed, "shards"), dict(DIMS))
    out = train_loop(base.SPEC, cfg, job, DistEnv.from_env())
    assert out["precision"] == "bf16" and out["step"] == 2
    weights = st_load(store.read_bytes(store.join(latest_final(job.out_uri), "model.safetensors")))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    init = build_network("base", "debug", DIMS).state_dict()
    assert not torch.equal(weights["conv_out.weight"], init["conv_out.weight"])  # zero-init, trained away

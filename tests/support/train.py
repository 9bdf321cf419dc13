"""Training-stage helpers: the context a training stage is handed, fast loop settings, a micro-batch."""
from __future__ import annotations

from data_prep.encoders_doc import encoders_doc_uri
from pipeline import store
from pipeline.context import StageContext
from pipeline.executors import LocalExecutor
from tests.support.data import upstream


def stage_ctx(root_uri: str, stage: str, download: str, embed: str, ray_enabled: bool = False) -> StageContext:
    """The context the runner hands training stage ``stage`` of the run at ``root_uri`` whose
    download and embed stages are finished at ``download`` / ``embed`` (see support.data.make_dataset)."""
    inputs = {"embed": upstream(embed, encoders=encoders_doc_uri(embed))}
    if stage != "train_prior":
        inputs["download"] = upstream(download)
    executor = LocalExecutor()
    if ray_enabled:
        from pipeline.run.ray_executor import RayExecutor

        executor = RayExecutor()
    return StageContext(run_uri=root_uri, out_uri=store.join(root_uri, stage), inputs=inputs, executor=executor)


def tiny_train_kwargs(**over) -> dict:
    """Fast settings for the debug flavors."""
    kw = dict(flavor="debug", steps=2, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=1, log_every=1,
              checkpoint_every_steps=0, keep_last=2, loader_workers=0, ema_decay=0.9)
    kw.update(over)
    return kw


def loader_batch(n: int = 2, size: int = 16, clip_dim: int = 16, clip_token_dim: int = 12) -> dict:
    """A micro-batch as stages/training/loader.collate makes it: images, CLIP embeddings and token ids."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (n, 5), generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return {"image": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            "clip_image": torch.randn(n, clip_dim, generator=g),
            "clip_tokens": torch.randn(n, 5, clip_token_dim, generator=g), "clip_mask": mask,
            "clip_ids": ids, "clip_id_mask": mask, "t5_ids": ids % 50, "t5_id_mask": mask}

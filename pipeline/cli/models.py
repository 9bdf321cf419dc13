"""``t2i flavors | embed | sample``: the models — their sizes, their conditioning, their samples."""
from __future__ import annotations

import os
from typing import List, Optional

import typer
from rich.table import Table

from pipeline.cli.common import console, load_spec_or_fail, resolve_run

app = typer.Typer()  # its commands join the main app in pipeline/cli/__init__.py


@app.command()
def flavors() -> None:
    """Named network sizes per model, with parameter counts (counted on the meta device)."""
    from stages.nets.flavors import count_params, list_flavors

    t = Table(title="flavors")
    for col in ("role", "flavor", "image", "params", "target"):
        t.add_column(col)
    for f in list_flavors():
        n = count_params(f.role, f.name)
        size = f"{f.low_res_size}→{f.image_size}" if f.low_res_size else (str(f.image_size) if f.image_size else "-")
        tgt = f"{f.target_params / 1e6:,.0f}M" if f.target_params else ""
        t.add_row(f.role, f.name, size, f"{n / 1e6:,.1f}M", tgt)
    console.print(t)


@app.command()
def embed(shards: str = typer.Option(..., help="URI of download shards (a folder of NNNNN.tar)."),
          out: str = typer.Option(..., help="URI to write the embedding shards to."),
          clip: Optional[str] = typer.Option(None, help="open_clip model name, 'name:pretrained' or a local directory."),
          t5: Optional[str] = typer.Option(None, help="T5 hub name or local directory."),
          spec: Optional[str] = typer.Option(None, help="Take the embed config from this run spec (default: demo spec)."),
          address: Optional[str] = typer.Option(None, help="Ray address; omit to embed in this process.")) -> None:
    """Precompute CLIP/T5 embeddings for existing shards, outside a pipeline run."""
    from data_prep.embed import embed_offline

    cfg = load_spec_or_fail(spec, []).embed
    if clip:
        # "ViT-L-14:openai" -> name + tag; a directory or "tiny:DIR" is the model itself.
        if os.path.exists(clip) or clip.startswith("tiny:") or clip.startswith("hf-hub:"):
            name, pretrained = clip, ""
        else:
            name, _, pretrained = clip.partition(":")
        cfg = cfg.model_copy(update={"clip": cfg.clip.model_copy(update={"model": name, "pretrained": pretrained or None})})
    if t5:
        cfg = cfg.model_copy(update={"t5": cfg.t5.model_copy(update={"model": t5})})
    if address is None:
        result = embed_offline(shards, out, cfg, progress=True)
    else:
        from pipeline.ray_executor import ray_session

        with ray_session(address) as executor:
            result = embed_offline(shards, out, cfg, executor=executor, progress=True)
    c = result["counts"]
    console.print(f"embedded {c['n_embedded']} of {c['n_total']} samples in {c['shards']} shards "
                  f"({c['shards_embedded_now']} now) -> {result['encoders_uri']}")


@app.command()
def sample(run: str = typer.Argument(..., help="Run URI or run id with trained stages."),
           prompt: List[str] = typer.Option(..., "--prompt", help="Prompt (repeatable)."),
           cascade: str = typer.Option("imagen", help="imagen (base→SR) or unclip (prior→decoder→SR)."),
           guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale for every model "
                                                     "(default: per model, e.g. 3 for base/decoder, 1 for the upsamplers)."),
           steps: Optional[int] = typer.Option(None, help="Sampler steps per model (default: the sample config's)."),
           out: Optional[str] = typer.Option(None, help="Where to write PNGs (default: <run>/samples_cli).")) -> None:
    """Sample prompts through a trained cascade."""
    from stages.sample import sample_cli

    uri = resolve_run(run)
    paths = sample_cli(uri, list(prompt), cascade=cascade, guidance=guidance, steps=steps, out=out)
    for p in paths:
        console.print(p)

"""``t2i flavors | embed | sample``: the models — their sizes, their conditioning, their samples."""
from __future__ import annotations

import os
from typing import List, Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from pipeline.cli.common import console, fail, load_spec_or_fail, resolve_run
from pipeline.context import StageFailed
from pipeline.manifest import read_manifest
from pipeline.run.lease import LeaseHeld, leased
from pipeline.run.ray_executor import ray_session
from pipeline.store import normalize
from stages.models import by_stage

app = typer.Typer()  # its commands join the main app in pipeline/cli/__init__.py


@app.command()
def flavors(run: Optional[str] = typer.Option(None, "--run", help="Count with this run's conditioning widths "
                                                                  "(its encoders), as its weights files hold.")) -> None:
    """Named network sizes per model, with parameter counts (counted on the meta device)."""
    from stages.nets.flavors import PAPER_COND_DIMS, count_params, list_flavors  # torch: t2i --help must not load it

    dims = dict(PAPER_COND_DIMS)
    if run:
        from pipeline.run.planning import finished_attempt  # speed: not for t2i --help (yaml, spec)
        from stages.training.trainer import read_cond_dims  # torch: t2i --help must not load it

        dims = read_cond_dims(finished_attempt(resolve_run(run), "embed"))
    t = Table(title=f"flavors (conditioning widths {dims})")
    for col in ("role", "flavor", "image", "params", "target"):
        t.add_column(col)
    for f in list_flavors():
        size = f"{f.low_res_size}→{f.image_size}" if f.low_res_size else (str(f.image_size) if f.image_size else "-")
        tgt = f"{f.target_params / 1e6:,.0f}M" if f.target_params else ""
        # A flavor with variants (the decoder's text encoders) gets a row per variant.
        for v in f.variant_names() or (None,):
            name = f.name if v is None else f"{f.name} ({v})"
            t.add_row(f.role, name, size, f"{count_params(f.role, f.name, dims, v):,}", tgt)
    console.print(t)


@app.command()
def embed(shards: str = typer.Option(..., help="URI of download shards (a folder of NNNNN.tar)."),
          out: str = typer.Option(..., help="URI to write the embedding shards to."),
          clip: Optional[str] = typer.Option(None, help="open_clip model name, 'name:pretrained' or a local directory."),
          t5: Optional[str] = typer.Option(None, help="T5 hub name or local directory."),
          spec: Optional[str] = typer.Option(None, help="Take the embed config from this run spec (default: demo spec)."),
          address: Optional[str] = typer.Option(None, help="Ray address; omit to embed in this process.")) -> None:
    """Precompute CLIP/T5 embeddings for existing shards, outside a pipeline run."""
    from data_prep.embed.stage import embed_offline  # torch: t2i --help must not load it

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
    try:
        with leased("embed", normalize(out), log=console.print):  # one writer of the output folder
            if address is None:
                result = embed_offline(shards, out, cfg, progress=True)
            else:
                with ray_session(address) as executor:
                    result = embed_offline(shards, out, cfg, executor=executor, progress=True)
    except LeaseHeld as e:
        fail(f"{out}: {e}; wait for it, or stop that driver")
    c = result["counts"]
    console.print(f"embedded {c['n_embedded']} of {c['n_total']} samples in {c['shards']} shards "
                  f"({c['shards_embedded_now']} now) -> {result['encoders_uri']}")


def _per_model(text: Optional[str], cast, flag: str):
    """``3`` (every model) or ``base=3,sr256=1`` (per model) -> a value for SampleConfig."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return cast(text)
        return {k.strip(): cast(v) for k, v in (part.split("=", 1) for part in text.split(",") if part.strip())}
    except ValueError:
        fail(f"{flag} takes a number or role=number pairs, e.g. {flag} 3 or {flag} base=3,sr256=1 (got {text!r})")


@app.command()
def sample(run: str = typer.Argument(..., help="Run URI or run id with trained stages."),
           prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="Prompt (repeatable)."),
           from_sample: Optional[int] = typer.Option(None, "--from-sample", help=(
               "Regenerate image N of the run's sample stage (its prompt and seed, the N of samples.json and "
               "report.html) in every cascade it sampled, byte for byte; other flags change it on top.")),
           cascade: Optional[str] = typer.Option(None, help="imagen (base→SR), unclip (prior→decoder→SR), glide "
                                                             "(GLIDE→SR), both (unclip+imagen) or all "
                                                             "(default: the run's sample section)."),
           seed: Optional[int] = typer.Option(None, help="Seed of all sampling noise."),
           sampler: Optional[str] = typer.Option(None, help="ddim | ddpm | dpmpp"),
           steps: Optional[str] = typer.Option(None, help="Denoising steps: N, or per model base=20,sr256=4,..."),
           guidance: Optional[str] = typer.Option(None, help="CFG scale: G, or per model base=3,decoder=3,..."),
           guidance_mode: Optional[str] = typer.Option(None, "--guidance-mode", help=(
               "cfg (classifier-free), clip (CLIP guidance of the glide/base models with the run's noised CLIP) "
               "or compare (both, same prompts and seeds; the CLIP-guided half as <cascade>_clip_guided).")),
           clip_guidance: Optional[str] = typer.Option(None, "--clip-guidance", help=(
               "CLIP guidance scale (with --guidance-mode clip|compare): S, or per model glide=0.03,base=0.03")),
           images_per_prompt: Optional[int] = typer.Option(None, "--images-per-prompt", help="Samples per prompt."),
           max_stage: Optional[str] = typer.Option(None, "--max-stage", help="Stop early: base | decoder | sr256."),
           aspect: Optional[str] = typer.Option(None, "--aspect", help=(
               "Image aspect width:height (16:9) or a number, carried through the whole cascade (default: square).")),
           out: Optional[str] = typer.Option(None, help="Where to write PNGs (default: <run>/samples_cli).")) -> None:
    """Sample prompts through a run's trained cascades. Starts from the run's own sample section
    (steps, guidance, sampler, SR settings); every flag overrides it."""
    from pipeline.run.planning import load_run_spec  # speed: not for t2i --help (yaml, spec)
    from stages.sampling.cascade import regenerate, sample_with_config  # torch: t2i --help must not load it
    from stages.sampling.config import SampleConfig  # heavy: stage code, loaded by the command that runs it

    uri = resolve_run(run)
    try:
        spec = load_run_spec(uri)
    except StageFailed as e:
        fail(str(e))
    if from_sample is not None and prompt:
        fail("give --prompt (repeatable) or --from-sample N, not both")
    if from_sample is None and not prompt:
        fail("give the prompts to sample (--prompt, repeatable) or an image of the run's sample stage to "
             "draw again (--from-sample N)")
    base = spec.sample.model_dump() if spec.sample is not None else {}
    if from_sample is not None:  # the sample stage's own config, as it ran
        from pipeline.run.planning import finished_attempt  # speed: not for t2i --help (yaml, spec)

        try:
            base = {**base, **((read_manifest(finished_attempt(uri, "sample")) or {}).get("config") or {})}
        except StageFailed as e:
            fail(f"--from-sample needs a finished sample stage: {e}")
    flags = {"prompts": list(prompt) if prompt else None, "cascade": cascade, "seed": seed, "sampler": sampler,
             "steps": _per_model(steps, int, "--steps"), "guidance_scale": _per_model(guidance, float, "--guidance"),
             "guidance": guidance_mode, "clip_guidance_scale": _per_model(clip_guidance, float, "--clip-guidance"),
             "images_per_prompt": images_per_prompt, "max_stage": max_stage, "aspect": aspect}
    try:
        cfg = SampleConfig(**{**base, **{k: v for k, v in flags.items() if v is not None}})
    except ValidationError as e:
        # the sample section's field names, spelled as this command's flags
        flag_of = {"guidance_scale": "guidance", "guidance": "guidance-mode", "clip_guidance_scale": "clip-guidance",
                   "prompts": "prompt"}

        def where(loc) -> str:
            first = flag_of.get(str(loc[0]), str(loc[0]).replace("_", "-")) if loc else ""
            return ".".join([first, *(str(x) for x in loc[1:])])
        msgs = "; ".join(f"--{where(err['loc'])}: {err['msg']}" for err in e.errors())
        fail(msgs)
    try:
        paths = (sample_with_config(cfg, uri, out=out) if from_sample is None
                 else regenerate(cfg, uri, from_sample, out=out))
    except StageFailed as e:
        fail(str(e))
    for p in paths:
        console.print(p)


@app.command()
def export(run: str = typer.Argument(..., help="Run URI or run id."),
           stage: Optional[str] = typer.Option(None, "--stage", help="Training stage to export, e.g. train_base."),
           cascade: Optional[str] = typer.Option(None, "--cascade", help=(
               "A whole cascade (imagen, unclip or glide) as one diffusers pipeline: "
               "DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True), sampling as the run's sample section.")),
           embeddings: bool = typer.Option(False, "--embeddings", help="Export the run's CLIP image and text "
                                           "embeddings with their key, caption and url instead of a model."),
           out: str = typer.Option(..., "--out", help="Folder (or store URI) to write."),
           fmt: Optional[str] = typer.Option(None, "--format", help="With --stage: diffusers (default: "
                                             "diffusers' AutoModel.from_pretrained(OUT, trust_remote_code=True) "
                                             "loads it, no t2i-pipeline needed) | folder (the run's final/ files). "
                                             "With --embeddings: clip-retrieval (default): img_emb/, text_emb/, "
                                             "metadata/, as autofaiss, embedding-reader and DALLE2-pytorch read."),
           push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also upload to this Hub repo id."),
           ) -> None:
    """Write a trained model as a standalone folder (config.json + safetensors + model card), a
    whole cascade as a diffusers pipeline (--cascade), or with --embeddings the run's CLIP
    embeddings in clip-retrieval's layout."""
    if sum((stage is not None, cascade is not None, embeddings)) != 1:
        fail("give exactly one of --stage STAGE (a trained model), --cascade C (a whole cascade) and --embeddings "
             "(the run's CLIP embeddings)")
    if embeddings:
        if fmt not in (None, "clip-retrieval"):
            fail(f"--embeddings writes --format clip-retrieval, not {fmt!r}")
        if push_to_hub:
            fail("--push-to-hub uploads a model: it does not go with --embeddings")
        _export_embeddings(run, out)
        return
    if fmt == "clip-retrieval":
        fail("--format clip-retrieval goes with --embeddings; --stage exports diffusers or folder")
    if cascade is not None:
        if fmt not in (None, "diffusers") or push_to_hub:
            fail("--cascade writes --format diffusers to a local or store folder (no --push-to-hub yet)")
        _export_cascade(run, cascade, out)
        return
    fmt = fmt or "diffusers"  # export_model names the formats it writes
    from pipeline.run.planning import finished_attempt, load_run_spec  # speed: not for t2i --help (yaml, spec)
    from stages.export.model_folder import export_model  # torch: t2i --help must not load it
    from stages.training.final_weights import resolve_final  # torch: t2i --help must not load it

    uri = resolve_run(run)
    try:
        model = by_stage(stage)
        attempt = finished_attempt(uri, stage)
    except (StageFailed, KeyError) as e:
        fail(str(e).strip("'\""))
    manifest = read_manifest(attempt) or {}
    spec = load_run_spec(uri)
    card = {"name": f"{spec.run_id}/{stage}", "description": model.description, "metrics": manifest.get("metrics"),
            "data": getattr(spec.download, "url_list", "unknown") if spec.download else "unknown",
            "samples": (manifest.get("counts") or {}).get("steps")}
    try:
        folder = export_model(resolve_final(attempt), normalize(out), fmt=fmt, card=card)
    except ValueError as e:
        fail(str(e))
    console.print(f"exported {stage} ({fmt}) -> {folder}")
    if push_to_hub:
        from stages.export.model_folder import push_to_hub as push  # torch: t2i --help must not load it

        console.print(f"pushed -> {push(folder, push_to_hub)}")


def _export_cascade(run: str, cascade: str, out: str) -> None:
    """``t2i export RUN --cascade C``: the cascade's finished models, sampled as the run's sample
    section says (its defaults for a run that saved no spec)."""
    from data_prep.encoders_doc import encoders_doc_uri  # speed: not for t2i --help
    from pipeline import layout, store  # speed: not for t2i --help
    from pipeline.run.planning import load_run_spec  # speed: not for t2i --help (yaml, spec)
    from stages.export.cascade_folder import export_cascade  # torch: t2i --help must not load it
    from stages.sampling.config import SampleConfig  # heavy: stage code, loaded by the command that runs it

    uri = resolve_run(run)
    try:
        spec = load_run_spec(uri)
        base = spec.sample.model_dump() if spec.sample is not None else {}
    except StageFailed:  # a run laid out without a spec (by hand, or by an older release)
        base = {}
    embed = layout.finished_stage_dir(uri, "embed")
    encoders = store.read_json(encoders_doc_uri(embed)) if embed and store.exists(encoders_doc_uri(embed)) else {}
    try:
        cfg = SampleConfig(**{**base, "cascade": cascade})
        folder = export_cascade(uri, cascade, normalize(out), cfg, encoders=encoders, card={"name": f"{run}/{cascade}"})
    except (StageFailed, ValueError) as e:
        fail(str(e))
    console.print(f"exported the {cascade} cascade (diffusers pipeline) -> {folder}")


def _export_embeddings(run: str, out: str) -> None:
    """``t2i export RUN --embeddings``: the finished embed attempt, with the download attempt it read."""
    from data_prep.embed.clip_retrieval import export_clip_retrieval, matching_download  # pyarrow: not for --help
    from pipeline.run.planning import finished_attempt  # speed: not for t2i --help (yaml, spec)

    uri, dest = resolve_run(run), normalize(out)
    try:
        embed_attempt = finished_attempt(uri, "embed")
        download_attempt = matching_download(uri, embed_attempt) or finished_attempt(uri, "download")
        s = export_clip_retrieval(embed_attempt, download_attempt, dest)
    except (StageFailed, ValueError) as e:
        fail(str(e))
    console.print(f"exported {s['rows']} rows of CLIP embeddings ({s['shards']} shards, clip-retrieval) -> {dest}",
                  soft_wrap=True)  # the URI on one line, whatever the terminal's width

"""T2ICascadePipeline: a whole t2i-pipeline cascade (unCLIP, Imagen or GLIDE) as a diffusers pipeline.

Shipped by ``t2i export RUN --cascade C --format diffusers`` (stages/export/cascade_folder.py) as
``pipeline_t2i.py`` at the root of the exported folder, beside the sampling modules it imports
(copies of t2i-pipeline's stages/diffusion.py, condaug.py and sampling/draw.py, renamed). This
package never imports this file; it is the consumer's code, run by diffusers:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(t5_tokens=..., t5_mask=..., seed=0).images        # an Imagen cascade

Its input is the prompt's features as the run's own encoders give them (the names of
``pipe.config.t2i["encoders"]``: a hub name or a local path each; the export downloads nothing),
under the names of t2i-pipeline's PromptFeatures: ``t5_tokens``/``t5_mask`` (Imagen),
``clip_text``/``clip_tokens``/``clip_mask`` (unCLIP's prior; its decoder reads
``clip_tokens``/``clip_mask`` or, with its own text transformer, token ids), ``t5_ids``/
``t5_id_mask`` or ``clip_ids``/``clip_id_mask`` (GLIDE). ``pipe.config.t2i["features"]`` lists
the ones this cascade reads. With the same features, seeds and settings the images are the ones
``t2i sample`` draws, bit for bit on the same machine: each image's noise comes from its own seed
(seed + its index, or ``seeds``), never from its batch.
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from stages.diffusion import Diffusion
from stages.sampling.draw import draw, image_generators, to_uint8

ROLES = ("prior", "decoder", "base", "glide", "sr256", "sr1024")  # every model a cascade may hold


class T2ICascadePipeline(DiffusionPipeline):
    """The models of one cascade, in order (``config.t2i["roles"]``), and how the run sampled them
    (``config.t2i["models"]``: per model its conditioning, steps, guidance, sampler, thresholding,
    diffusion; ``sr_start_t``, ``sr_aug_level`` and ``seed`` for the cascade)."""

    _optional_components = list(ROLES)
    model_cpu_offload_seq = None

    def __init__(self, prior=None, decoder=None, base=None, glide=None, sr256=None, sr1024=None, t2i=None):
        super().__init__()
        self.register_modules(prior=prior, decoder=decoder, base=base, glide=glide, sr256=sr256, sr1024=sr1024)
        self.register_to_config(t2i=t2i)

    def _settings(self, role: str, steps, guidance_scale) -> dict:
        m = self.config.t2i["models"][role]
        steps = steps.get(role, m["steps"]) if isinstance(steps, dict) else steps or m["steps"]
        guidance = (guidance_scale.get(role, m["guidance_scale"]) if isinstance(guidance_scale, dict)
                    else m["guidance_scale"] if guidance_scale is None else guidance_scale)
        return {"steps": int(steps), "guidance_scale": float(guidance)}

    @torch.no_grad()
    def __call__(self, *, seed: int | None = None, seeds: list[int] | None = None,
                 steps: int | dict[str, int] | None = None, guidance_scale: float | dict[str, float] | None = None,
                 max_stage: str | None = None, output_type: str = "pil", return_dict: bool = True,
                 **features: torch.Tensor):
        """Draw one image per row of the features. ``seeds``: one per image; else ``seed`` (default:
        the run's ``sample.seed``) + the row's index, as ``t2i sample`` numbers its images.
        ``steps`` / ``guidance_scale``: one value for every model or a dict per model (default: the
        run's). ``max_stage``: stop after that model. ``output_type``: ``pil``, ``np`` (uint8
        arrays) or ``pt`` (float tensors in [-1, 1], [B, 3, H, W])."""
        t2i = self.config.t2i
        roles = list(t2i["roles"])
        if max_stage is not None:
            if max_stage not in roles:
                raise ValueError(f"max_stage must be one of {', '.join(roles)} (got {max_stage!r})")
            roles = roles[: roles.index(max_stage) + 1]
        missing = sorted({f for r in roles for f in t2i["models"][r]["conditioning"].values()
                          if f != "previous" and f not in features})
        unknown = sorted(set(features) - set(t2i["features"]))
        if missing or unknown:
            raise ValueError(f"this {t2i['cascade']} cascade reads the features {', '.join(t2i['features'])}"
                             + (f"; missing: {', '.join(missing)}" if missing else "")
                             + (f"; not read: {', '.join(unknown)}" if unknown else ""))
        b = next(iter(features.values())).shape[0]
        if seeds is None:
            start = t2i["seed"] if seed is None else seed
            seeds = [start + i for i in range(b)]
        if len(seeds) != b:
            raise ValueError(f"seeds: {len(seeds)} given for {b} prompts")
        device = self._execution_device
        feats = {k: v.to(device) for k, v in features.items()}
        prev = None
        for si, role in enumerate(roles):
            m = t2i["models"][role]
            net = getattr(self, role)
            diffusion = Diffusion(**m["diffusion"])
            cond = {kw: prev.to(device) if name == "previous" else feats[name] for kw, name in m["conditioning"].items()}
            prev = draw(net, diffusion, cond, prev, kind=m["kind"], size=m["size"], low_res_size=m["low_res_size"],
                        condaug=m["condaug"], sampler=m["sampler"], thresholding=m["thresholding"],
                        sr_start_t=t2i["sr_start_t"], sr_aug_level=t2i["sr_aug_level"],
                        generator=image_generators(seeds, t2i["cascade_index"], si, device), device=device,
                        **self._settings(role, steps, guidance_scale))
        if t2i["models"][roles[-1]]["kind"] == "embedding":
            images = prev  # stopped at the prior: CLIP image embeddings
        elif output_type == "pt":
            images = prev
        elif output_type in ("np", "pil"):
            arrays = [to_uint8(x).contiguous().numpy() for x in prev]
            images = arrays if output_type == "np" else [Image.fromarray(a, "RGB") for a in arrays]
        else:
            raise ValueError(f"output_type must be pil, np or pt (got {output_type!r})")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

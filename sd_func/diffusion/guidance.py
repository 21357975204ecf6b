"""Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16).

`classifier_free(model_fn, cond, uncond, guidance_scale, guidance_rescale)` turns a
conditional model_fn(x, t, context) into the model_fn(x, t) that samplers take. Both
branches run in ONE batched call with the unconditional half first, as diffusers'
StableDiffusionPipeline does (torch.cat([negative, positive])); a negative prompt is
simply `uncond`. With guidance_scale <= 1 only the conditional branch runs (diffusers'
do_classifier_free_guidance is guidance_scale > 1).
"""

import torch

from sd_func.errors import UserError


def combine(out_uncond, out_cond, guidance_scale: float):
    """out_uncond + w (out_cond - out_uncond)."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def rescale(out_guided, out_cond, guidance_rescale: float):
    """Lin et al. 2023 eq. 15-16: scale the guided output to the per-sample std of the
    conditional one, then blend: phi * rescaled + (1 - phi) * guided."""
    dims = list(range(1, out_cond.ndim))
    std_cond = out_cond.std(dim=dims, keepdim=True)
    std_guided = out_guided.std(dim=dims, keepdim=True)
    rescaled = out_guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * out_guided


def classifier_free(model_fn, cond, uncond, guidance_scale: float, guidance_rescale: float = 0.0):
    """A guided model_fn(x, t) from model_fn(x, t, context) and contexts [B, ...] each."""
    if guidance_scale <= 1.0:
        return lambda x, t: model_fn(x, t, cond)
    if cond.shape != uncond.shape:
        raise ValueError(f"guidance: cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ in shape")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise UserError(f"guidance_rescale={guidance_rescale}: expected a value in [0, 1]")
    context = torch.cat([uncond, cond])

    def guided_fn(x, t):
        t = torch.as_tensor(t)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]) if t.ndim else t, context)
        out_uncond, out_cond = out.chunk(2)
        out = combine(out_uncond, out_cond, guidance_scale)
        return rescale(out, out_cond, guidance_rescale) if guidance_rescale > 0 else out
    return guided_fn

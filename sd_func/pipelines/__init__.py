"""Stable Diffusion pipelines as functions of (params, cfg): txt2img, img2img, inpaint.

  from sd_func import checkpoint, pipelines
  params, cfg = checkpoint.load("path/to/diffusers-folder")
  images = pipelines.txt2img(params, cfg, ["a red circle"], seeds=[0], steps=20,
                             sampler="ddim", guidance_scale=7.5)   # uint8 [B,H,W,3]
  unet_fn = pipelines.make_unet_fn(cfg.unet, compile=True)        # build once, hold, reuse
  o = pipelines.resolve_options(cfg, steps=20, unet_fn=unet_fn)  # one Options for all three
  images = pipelines.txt2img(params, cfg, ["a red circle"], seeds=[0], options=o)

generate.py composes the pieces (text encoder, guidance, samplers, VAE) and mirrors
diffusers' pipelines; options.py holds the Options the three share, resolved from
explicit values, cfg.sample and defaults; images.py handles pixels, masks and PNG files;
unet_call.py builds the (optionally compiled) UNet call; job.py is what run_sample.py
runs (checkpoint + prompts in, numbered PNGs out).
"""

from sd_func.pipelines import images, options
from sd_func.pipelines.generate import (
    decode_latents,
    encode_images,
    encode_prompts,
    image_keys,
    img2img,
    inpaint,
    inpaint_blend,
    txt2img,
    vae_scale_factor,
)
from sd_func.pipelines.options import OUTPUT_TYPES, Options
from sd_func.pipelines.options import resolve as resolve_options
from sd_func.pipelines.unet_call import make_unet_fn

__all__ = ["OUTPUT_TYPES", "Options", "decode_latents", "encode_images", "encode_prompts", "image_keys",
           "images", "img2img", "inpaint", "inpaint_blend", "make_unet_fn", "options", "resolve_options",
           "txt2img", "vae_scale_factor"]

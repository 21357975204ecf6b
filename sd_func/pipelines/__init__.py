"""Stable Diffusion pipelines as functions of (params, cfg): txt2img, img2img, inpaint.

  from sd_func import checkpoint, pipelines
  params, cfg = checkpoint.load("path/to/diffusers-folder")
  images = pipelines.txt2img(params, cfg, ["a red circle"], seeds=[0], steps=20,
                             sampler="ddim", guidance_scale=7.5)   # uint8 [B,H,W,3]

generate.py composes the pieces (text encoder, guidance, samplers, VAE) and mirrors
diffusers' pipelines; options.py resolves defaults from cfg.sample; images.py handles
pixels, masks and PNG files; unet_call.py the (optionally compiled) UNet call; job.py
is what run_sample.py runs (checkpoint + prompts in, numbered PNGs out).
"""

from sd_func.pipelines import images, options
from sd_func.pipelines.generate import (OUTPUT_TYPES, decode_latents, encode_images, encode_prompts,
                                        image_keys, img2img, inpaint, txt2img, vae_scale_factor)

__all__ = ["OUTPUT_TYPES", "decode_latents", "encode_images", "encode_prompts", "image_keys", "images",
           "img2img", "inpaint", "options", "txt2img", "vae_scale_factor"]
